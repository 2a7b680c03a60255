"""Trains kubemoe-tiny-chat, the model `kubemoe up` serves by default, from scratch on the CPU.

    python3 scripts/train-tiny-chat/train.py --out models/kubemoe-tiny-chat --minutes 60

(needs `pip install torch transformers tokenizers safetensors`; about an hour on 2 cores; CI
does not run it). What it builds, as the DeepSeek-V3 report (arXiv:2412.19437) describes:
- the architecture of DeepSeek-V3 at a small size, built from transformers'
  `DeepseekV3ForCausalLM`: MLA with a low-rank query (`q_lora_rank`) and the latent KV
  (`kv_lora_rank`), one dense layer then MoE layers of one shared and 16 fine-grained routed
  experts, the sigmoid gate with top-4 of the best 2 of 4 groups (`noaux_tc`);
- auxiliary-loss-free load balancing (§2.1.2): after every step each MoE layer's
  `e_score_correction_bias` moves by `--bias-rate` towards the experts that took fewer tokens
  than the mean (up if under-loaded, down if over-loaded); the bias only selects experts, the
  gate weights stay the sigmoid scores. Plus the complementary sequence-wise balance loss with
  the report's tiny weight (α = 1e-4);
- one multi-token-prediction module (§2.2): position i combines the main model's final hidden
  state (after its last norm, as transformers and vLLM feed it) with the embedding of token
  i+1, runs one more decoder layer and predicts token i+2 with the shared output head; its
  loss is weighted by λ = 0.3, then 0.1 for the last third of training, as in the report;
- a byte-level BPE tokenizer trained on the same corpus (corpus.py says how it is made).

The model is written in the Hugging Face layout DeepSeek-V3 uses: `config.json`
(`model_type: deepseek_v3`, `num_nextn_predict_layers: 1`), `model.safetensors` in bf16 with
the gate weights and the correction bias in f32 (as DeepSeek-V3's checkpoint keeps them), the
MTP module as decoder layer `num_hidden_layers` (`enorm`, `hnorm`, `eh_proj`,
`shared_head.norm`, `shared_head.head`, `embed_tokens`), `tokenizer.json`,
`tokenizer_config.json` with the chat template, `generation_config.json`, and `training.log`.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}"
    "{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% elif m.role == 'assistant' %}"
    "<｜Assistant｜>{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


def train_tokenizer(vocab_size, seed):
    """Byte-level BPE over 20 000 documents, the special tokens at ids 0-3."""
    docs = corpus.documents(seed)
    texts = []
    for _ in range(20000):
        text = next(docs)
        for s in corpus.SPECIALS:
            text = text.replace(s, "\n")
        texts.append(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=corpus.SPECIALS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def config(vocab_size, **sizes):
    """kubemoe-tiny-chat's configuration, or another size of the same design (`sizes`)."""
    c = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=True,
        num_mtp_layers=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        rms_norm_eps=1e-6, initializer_range=0.02, attn_implementation="sdpa")
    c.update(sizes)
    return DeepseekV3Config(**c)


def new_mtp(model):
    """transformers' MTP module for `model`, initialised as the main model's layers are
    (`MtpModel` itself leaves the routed experts' weights uninitialised: zero experts would
    never train)."""
    mtp = MtpModel(model, 1)
    with torch.no_grad():
        mtp.layers.apply(model._init_weights)
    return mtp


def batches(tok, seed, batch, seq):
    """[batch, seq + 1] windows of the concatenated token stream."""
    docs = corpus.documents(seed)
    buf = []
    while True:
        while len(buf) < batch * (seq + 1):
            buf.extend(tok.encode(next(docs)).ids)
        rows = [buf[i * (seq + 1):(i + 1) * (seq + 1)] for i in range(batch)]
        buf = buf[batch * (seq + 1):]
        yield torch.tensor(rows, dtype=torch.long)


def select(scores, bias, gate):
    """The experts the gate picks for `scores` (sigmoid, [tokens, experts]) with `bias`."""
    choice = scores + bias
    g = gate.num_group
    groups = choice.view(-1, g, gate.num_experts // g).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(groups).scatter_(1, groups.topk(gate.topk_group, dim=-1)[1], 1)
    mask = keep.unsqueeze(-1).expand(-1, g, gate.num_experts // g).reshape(-1, gate.num_experts)
    return choice.masked_fill(mask == 0, float("-inf")).topk(gate.top_k, dim=-1)[1]


class Balance:
    """Records each gate's choices in a step: the load for the bias update, the sequence-wise
    balance loss, and (for the log) the load the same gate would give without its bias."""

    def __init__(self, gates, seq):
        self.gates, self.seq = gates, seq
        self.load = {}
        self.loss = []
        self.unbiased = {}
        self.seen = {}
        for name, gate in gates.items():
            gate.register_forward_hook(self.hook(name))

    def hook(self, name):
        def record(gate, _inputs, outputs):
            if not gate.training:
                return
            logits, _, idx = outputs
            n = gate.num_experts
            counts = torch.bincount(idx.flatten(), minlength=n).float()
            self.load[name] = self.load.get(name, 0) + counts
            with torch.no_grad():
                plain = select(logits.sigmoid(), torch.zeros_like(gate.e_score_correction_bias), gate)
                self.unbiased[name] = self.unbiased.get(name, 0) + torch.bincount(
                    plain.flatten(), minlength=n).float()
            # Sequence-wise balance loss: Σ_i f_i P_i per sequence (report eq. 17-20).
            scores = logits.sigmoid().view(-1, self.seq, n)
            p = (scores / scores.sum(-1, keepdim=True)).mean(1)
            chosen = F.one_hot(idx.view(-1, self.seq, gate.top_k), n).sum(2).float()
            f = chosen.mean(1) * n / gate.top_k
            self.loss.append((f * p).sum(-1).mean())
        return record

    def take_loss(self):
        loss, self.loss = sum(self.loss), []
        return loss

    def update_bias(self, rate):
        with torch.no_grad():
            for name, gate in self.gates.items():
                load = self.load[name]
                gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self.load = {}

    def report(self):
        """max/mean expert load per gate, with and without the bias, since the last report."""
        out = {}
        for name in self.seen:
            with_bias, without = self.seen[name], self.unbiased[name]
            out[name] = (float(with_bias.max() / with_bias.mean()), float(without.max() / without.mean()))
        self.seen, self.unbiased = {}, {}
        return out

    def accumulate(self):
        """Keeps this step's loads for the report before the bias update consumes them."""
        for name, load in self.load.items():
            self.seen[name] = self.seen.get(name, 0) + load


def export(out, cfg, model, mtp, tok, dtype=torch.bfloat16):
    """The checkpoint in DeepSeek-V3's layout (`dtype`; gate weights and bias f32), with the
    tokenizer when `tok` is given."""
    os.makedirs(out, exist_ok=True)
    L = cfg.num_hidden_layers
    tensors = {}

    def put(name, t):
        keep_f32 = name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")
        tensors[name] = t.detach().to(torch.float32 if keep_f32 else dtype).clone().contiguous()

    def put_layer(prefix, state):
        for key, t in state.items():
            if key.startswith("mlp.experts."):
                continue
            put(f"{prefix}.{key}", t)
        experts = {k: v for k, v in state.items() if k.startswith("mlp.experts.")}
        if experts:
            gate_up, down = experts["mlp.experts.gate_up_proj"], experts["mlp.experts.down_proj"]
            i = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                put(f"{prefix}.mlp.experts.{e}.gate_proj.weight", gate_up[e, :i])
                put(f"{prefix}.mlp.experts.{e}.up_proj.weight", gate_up[e, i:])
                put(f"{prefix}.mlp.experts.{e}.down_proj.weight", down[e])

    put("model.embed_tokens.weight", model.model.embed_tokens.weight)
    put("model.norm.weight", model.model.norm.weight)
    put("lm_head.weight", model.lm_head.weight)
    for i, layer in enumerate(model.model.layers):
        put_layer(f"model.layers.{i}", layer.state_dict())
    m = mtp.layers[0]
    p = f"model.layers.{L}"
    put_layer(p, m.mtp_block.state_dict())
    put(f"{p}.enorm.weight", m.enorm.weight)
    put(f"{p}.hnorm.weight", m.hnorm.weight)
    put(f"{p}.eh_proj.weight", m.eh_proj.weight)
    put(f"{p}.shared_head.norm.weight", m.post_norm.weight)
    # DeepSeek-V3 stores the shared embedding and head again in its MTP layer.
    put(f"{p}.shared_head.head.weight", model.lm_head.weight)
    put(f"{p}.embed_tokens.weight", model.model.embed_tokens.weight)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    c = cfg.to_dict()
    c.update({"architectures": ["DeepseekV3ForCausalLM"], "num_nextn_predict_layers": 1,
              "topk_method": "noaux_tc", "scoring_func": "sigmoid",
              "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch.")})
    # head_dim and qk_head_dim are transformers' derived values; DeepSeek-V3's config has neither.
    for k in ("num_mtp_layers", "_attn_implementation_autoset", "attn_implementation", "head_dim", "qk_head_dim"):
        c.pop(k, None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, f, indent=2)
    if tok is None:
        return
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": corpus.BOS, "eos_token": corpus.EOS, "chat_template": CHAT_TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
                   "add_bos_token": False, "add_eos_token": False}, f, indent=2, ensure_ascii=False)


@torch.no_grad()
def sample_text(model, tok, prompt, n=40):
    ids = torch.tensor([tok.encode(prompt).ids])
    for _ in range(n):
        nxt = model(ids, use_cache=False).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if nxt.item() == 1:
            break
    return tok.decode(ids[0].tolist(), skip_special_tokens=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="models/kubemoe-tiny-chat")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "training.log"), "w")

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"args {vars(args)} torch {torch.__version__}")
    tok = train_tokenizer(args.vocab, seed=1000 + args.seed)
    cfg = config(tok.get_vocab_size())
    model = DeepseekV3ForCausalLM(cfg)
    mtp = new_mtp(model)
    params = {id(p): p for p in list(model.parameters()) + list(mtp.parameters())}
    log(f"vocab {tok.get_vocab_size()} parameters {sum(p.numel() for p in params.values())}")
    gates = {n: m for n, m in list(model.named_modules()) + [("mtp." + n, m) for n, m in mtp.named_modules()]
             if isinstance(m, DeepseekV3TopkRouter)}
    balance = Balance(gates, args.seq)
    decay = [p for p in params.values() if p.dim() >= 2]
    rest = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = batches(tok, args.seed, args.batch, args.seq)
    positions = torch.arange(args.seq).unsqueeze(0)
    start = time.time()
    budget = args.minutes * 60
    step = 0
    seen_tokens = 0
    while time.time() - start < budget:
        progress = (time.time() - start) / budget
        # Warm-up over the first 5% of the time, then cosine down to a tenth.
        lr = args.lr * min(1.0, progress / 0.05 + 0.01) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        rows = next(data)
        ids, labels = rows[:, :-1], rows[:, 1:]
        out = model.model(input_ids=ids, position_ids=positions, use_cache=False)
        hidden = out.last_hidden_state  # after the final norm
        main_loss = F.cross_entropy(model.lm_head(hidden).flatten(0, 1), labels.flatten())
        # MTP: position i sees hidden_i and token i+1, predicts token i+2 (labels shifted once more).
        h = mtp.forward_layer(0, hidden, positions + 1, None, input_ids=labels)
        mtp_logits = model.lm_head(h[:, :-1])
        mtp_loss = F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, 1:].flatten())
        lam = 0.3 if progress < 2 / 3 else 0.1
        loss = main_loss + lam * mtp_loss + 1e-4 * balance.take_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        balance.accumulate()
        balance.update_bias(args.bias_rate)
        step += 1
        seen_tokens += ids.numel()
        if step % 25 == 0:
            acc = (mtp_logits.argmax(-1) == labels[:, 1:]).float().mean().item()
            log(f"step {step} min {(time.time() - start) / 60:.1f} tokens {seen_tokens} lr {lr:.2e} "
                f"loss {main_loss.item():.3f} mtp_loss {mtp_loss.item():.3f} mtp_top1 {acc:.3f}")
        if step % 100 == 0:
            for name, (b, nb) in balance.report().items():
                log(f"  load max/mean {name}: with bias {b:.2f}, without bias {nb:.2f}")
        if step % 500 == 0:
            model.eval()
            log("  sample: " + repr(sample_text(model, tok, corpus.BOS + corpus.USER + "What does the fox eat?"
                                                + corpus.ASSISTANT)))
            model.train()
    log(f"done: {step} steps, {seen_tokens} tokens, {(time.time() - start) / 60:.1f} min")
    export(args.out, cfg, model, mtp, tok)
    log(f"wrote {args.out}")
    for name, (b, nb) in balance.report().items():
        log(f"  load max/mean {name}: with bias {b:.2f}, without bias {nb:.2f}")
    model.eval()
    for prompt in ["It was a", corpus.USER + "Tell me a story about the owl." + corpus.ASSISTANT,
                   corpus.USER + "What is 12 + 7?" + corpus.ASSISTANT, "let x = 3;\n"]:
        log("  sample: " + repr(sample_text(model, tok, corpus.BOS + prompt, 60)))


if __name__ == "__main__":
    main()
