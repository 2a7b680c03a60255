"""Reference outputs of Hugging Face transformers for a model with an MTP module, in the form of
the shared fixtures (`reference.safetensors`: `sN.input_ids` int64 [T], `sN.logits` f32
[T, vocab]) plus `sN.mtp_logits` f32 [T-1, vocab]: the draft logits transformers' `MtpModel`
gives at each position i (the main model's final hidden state at i, after the last norm, and
token i+1; predicting token i+2).

    python3 scripts/train-tiny-chat/fixture.py --random model/tests/fixtures/mtp-tiny
    python3 scripts/train-tiny-chat/fixture.py models/kubemoe-tiny-chat --out DIR

`--random DIR` first writes a small random model (the `tiny` preset's shape with one MTP
module, float32, weights drawn with a fixed seed) to DIR with train.py's exporter; either way
the model is then loaded back with `DeepseekV3ForCausalLM.from_pretrained` and
`MtpModel.from_pretrained`, so the reference also proves transformers reads the layout.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402

SEQUENCES = [[0, 17, 301, 5, 77, 260, 9, 120, 44, 3], [0, 5, 5, 5, 400, 2, 33, 180, 61, 7, 250, 90, 11]]


def random_model(out):
    torch.manual_seed(0)
    # The `tiny` preset's sizes.
    cfg = train.config(
        512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=256, initializer_range=0.1, attn_implementation="eager")
    model = DeepseekV3ForCausalLM(cfg)
    mtp = train.new_mtp(model)
    with torch.no_grad():
        # Norm weights and biases away from their neutral start, so that a swapped norm shows.
        for m in (model, mtp):
            for name, p in m.named_parameters():
                if p.dim() == 1:
                    p.copy_(1 + 0.3 * torch.randn_like(p))
            for name, b in m.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.copy_(0.05 * torch.randn_like(b))
    train.export(out, cfg, model, mtp, None, dtype=torch.float32)


@torch.no_grad()
def reference(model_dir, out):
    main = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    main.eval()
    # transformers finds DeepSeek-V3's MTP weights by the layer number of the 61-layer model;
    # point it at this model's last layer (its own renamings do the rest).
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{main.config.num_hidden_layers}\..*"]
    mtp = MtpModel.from_pretrained(main)
    mtp.eval()
    tensors, greedy = {}, {}
    for n, seq in enumerate(SEQUENCES):
        ids = torch.tensor([seq])
        outputs = main(ids, output_hidden_states=True)
        hidden = outputs.hidden_states[-1]  # after the final norm (transformers ties it so)
        positions = torch.arange(len(seq)).unsqueeze(0)
        h = mtp.forward_layer(0, hidden[:, :-1], positions[:, 1:], None, input_ids=ids[:, 1:])
        tensors[f"s{n}.input_ids"] = ids[0].clone()
        tensors[f"s{n}.logits"] = outputs.logits[0].float().contiguous()
        tensors[f"s{n}.mtp_logits"] = mtp._project_to_logits(h)[0].float().contiguous()
        greedy[f"s{n}"] = outputs.logits[0, -1].argmax().item()
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "reference.safetensors"))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"sequences": SEQUENCES, "next_token": greedy}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--random", help="write a random model with an MTP module here first")
    ap.add_argument("--out", help="where the reference goes (default: the model's folder)")
    args = ap.parse_args()
    model_dir = args.random or args.model
    if model_dir is None:
        ap.error("give a model directory, or --random DIR")
    if args.random:
        random_model(args.random)
    reference(model_dir, args.out or model_dir)


if __name__ == "__main__":
    main()
