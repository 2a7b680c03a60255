//! Generated DeepSeek models: random weights under the real tensor names and shapes, in the
//! Hugging Face layout (config.json, sharded safetensors with an index, tokenizer.json).
//!
//! Real checkpoints cannot be downloaded everywhere kubemoe is tested, so the loader, the
//! engine and the deployments run on these. Each tensor's values come from its own seed
//! (the model seed and the tensor name), so any subset of a model can be generated alone.
//! `builtin:<preset>` names a model generated in memory from seed 0.

use crate::checkpoint::{OwnedTensor, TensorMap};
use crate::config::Config;
use crate::{Error, Result};
use kubemoe_kernels::dtype;
use kubemoe_kernels::rng::Rng;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::Path;

/// The storage dtype of a generated checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    Bf16,
    /// FP8 e4m3 projection weights with 128×128 `weight_scale_inv` blocks, the rest BF16
    /// (DeepSeek-V3's published layout).
    Fp8,
}

impl std::str::FromStr for StorageDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "fp8" => Ok(Self::Fp8),
            o => Err(Error::Invalid(format!("dtype `{o}` is not one of f32, bf16, fp8"))),
        }
    }
}

/// `config.json` of a preset, as Hugging Face would write it (the presets are described in
/// `kubemoe_placement::config`, which holds their files for the operator as well).
pub fn preset_config(name: &str) -> Result<Value> {
    let text = kubemoe_placement::config::preset_json(name).ok_or_else(|| {
        let names: Vec<_> = kubemoe_placement::ModelConfig::preset_names().collect();
        Error::Invalid(format!("unknown preset `{name}`; presets: {}", names.join(", ")))
    })?;
    serde_json::from_str(text)
        .map_err(|source| Error::Json { path: format!("presets/{name}.json").into(), source })
}

/// How a tensor is initialised.
enum Init {
    /// Normal with standard deviation `1/sqrt(fan_in)`, keeping activations O(1).
    Linear(usize),
    Ones,
    Normal(f32),
}

/// Every tensor of `c` with its shape, in the checkpoint's naming.
fn tensor_specs(c: &Config) -> Vec<(String, Vec<usize>, Init)> {
    let (h, heads, r) = (c.hidden_size, c.num_attention_heads, c.kv_lora_rank);
    let mut specs = vec![
        ("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h], Init::Normal(1.0)),
        ("model.norm.weight".into(), vec![h], Init::Ones),
        ("lm_head.weight".into(), vec![c.vocab_size, h], Init::Linear(h)),
    ];
    let linear = |specs: &mut Vec<_>, name: String, out: usize, inp: usize| {
        specs.push((format!("{name}.weight"), vec![out, inp], Init::Linear(inp)));
    };
    for i in 0..c.num_hidden_layers + c.num_nextn_predict_layers {
        let p = format!("model.layers.{i}");
        specs.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        specs.push((format!("{p}.post_attention_layernorm.weight"), vec![h], Init::Ones));
        let a = format!("{p}.self_attn");
        let q_out = heads * c.q_head_dim();
        match c.q_lora_rank {
            Some(q) => {
                linear(&mut specs, format!("{a}.q_a_proj"), q, h);
                specs.push((format!("{a}.q_a_layernorm.weight"), vec![q], Init::Ones));
                linear(&mut specs, format!("{a}.q_b_proj"), q_out, q);
            }
            None => linear(&mut specs, format!("{a}.q_proj"), q_out, h),
        }
        linear(&mut specs, format!("{a}.kv_a_proj_with_mqa"), r + c.qk_rope_head_dim, h);
        specs.push((format!("{a}.kv_a_layernorm.weight"), vec![r], Init::Ones));
        linear(&mut specs, format!("{a}.kv_b_proj"), heads * (c.qk_nope_head_dim + c.v_head_dim), r);
        linear(&mut specs, format!("{a}.o_proj"), h, heads * c.v_head_dim);
        let mlp = |specs: &mut Vec<_>, p: String, inter: usize| {
            linear(specs, format!("{p}.gate_proj"), inter, h);
            linear(specs, format!("{p}.up_proj"), inter, h);
            linear(specs, format!("{p}.down_proj"), h, inter);
        };
        if c.is_moe_layer(i) {
            linear(&mut specs, format!("{p}.mlp.gate"), c.n_routed_experts, h);
            if c.gate.method == kubemoe_kernels::gate::TopkMethod::NoauxTc {
                specs.push((
                    format!("{p}.mlp.gate.e_score_correction_bias"),
                    vec![c.n_routed_experts],
                    Init::Normal(0.01),
                ));
            }
            for e in 0..c.n_routed_experts {
                mlp(&mut specs, format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
            }
            if c.n_shared_experts > 0 {
                mlp(
                    &mut specs,
                    format!("{p}.mlp.shared_experts"),
                    c.moe_intermediate_size * c.n_shared_experts,
                );
            }
        } else {
            mlp(&mut specs, format!("{p}.mlp"), c.intermediate_size);
        }
        if i >= c.num_hidden_layers {
            specs.push((format!("{p}.enorm.weight"), vec![h], Init::Ones));
            specs.push((format!("{p}.hnorm.weight"), vec![h], Init::Ones));
            linear(&mut specs, format!("{p}.eh_proj"), h, 2 * h);
            specs.push((format!("{p}.shared_head.norm.weight"), vec![h], Init::Ones));
        }
    }
    specs
}

/// FNV-1a, to give every tensor its own stream from the model seed.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Random weights for `c`, stored as `storage`: those whose name `wants` accepts.
///
/// `skew` > 0 makes the gates favour low-numbered experts, so that expert load is skewed on
/// purpose: expert `e` of `E` gets `skew · (1 − e/(E−1)) / 10` added to its
/// `e_score_correction_bias` (which only steers selection, not the gate weights), so it needs
/// a `noaux_tc` model.
pub fn generate_tensors(
    c: &Config,
    storage: StorageDtype,
    seed: u64,
    skew: f32,
    label: &str,
    wants: &dyn Fn(&str) -> bool,
) -> Result<TensorMap> {
    if skew != 0.0 && c.gate.method != kubemoe_kernels::gate::TopkMethod::NoauxTc {
        return Err(Error::Config {
            path: format!("{label}/config.json"),
            key: "topk_method".into(),
            reason: "a skewed gate needs e_score_correction_bias, which only noaux_tc models have \
                     (the tiny, small and v3-shape presets)"
                .into(),
        });
    }
    let mut map = TensorMap { label: label.into(), ..Default::default() };
    for (name, shape, init) in tensor_specs(c).into_iter().filter(|(n, ..)| wants(n)) {
        let n: usize = shape.iter().product();
        let mut rng = Rng::new(seed ^ name_hash(&name));
        let mut values: Vec<f32> = match init {
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n).map(|_| rng.normal() * std).collect(),
            Init::Linear(fan_in) => {
                let std = 1.0 / (fan_in as f32).sqrt();
                (0..n).map(|_| rng.normal() * std).collect()
            }
        };
        if skew != 0.0 && name.ends_with("e_score_correction_bias") {
            let last = (n.max(2) - 1) as f32;
            values.iter_mut().enumerate().for_each(|(e, v)| *v += skew * (1.0 - e as f32 / last) / 10.0);
        }
        let quantise = storage == StorageDtype::Fp8 && shape.len() == 2 && name.contains("_proj.");
        if quantise {
            let block = [128, 128];
            let (q, scales) = dtype::quant_fp8_blocks(&values, shape[0], shape[1], block)?;
            let scale_shape = vec![shape[0].div_ceil(block[0]), shape[1].div_ceil(block[1])];
            let scale =
                OwnedTensor { dtype: Dtype::F32, shape: scale_shape, data: dtype::f32_to_le(&scales) };
            map.tensors.insert(format!("{name}_scale_inv"), scale);
            map.tensors.insert(name, OwnedTensor { dtype: Dtype::F8_E4M3, shape, data: q });
        } else {
            let (dtype, data) = match storage {
                StorageDtype::F32 => (Dtype::F32, dtype::f32_to_le(&values)),
                _ => (Dtype::BF16, dtype::bf16_to_le(&values)),
            };
            map.tensors.insert(name, OwnedTensor { dtype, shape, data });
        }
    }
    Ok(map)
}

/// A `builtin:<preset>` model: the preset's config and the weights `wants` names, from
/// seed 0, in memory.
pub fn builtin(preset: &str, wants: &dyn Fn(&str) -> bool) -> Result<(Config, TensorMap)> {
    let config = Config::from_json(&preset_config(preset)?.to_string(), &format!("builtin:{preset}"))?;
    let tensors = generate_tensors(&config, StorageDtype::F32, 0, 0.0, &format!("builtin:{preset}"), wants)?;
    Ok((config, tensors))
}

/// Writes a generated model directory: config.json, generation_config.json, sharded
/// safetensors with `model.safetensors.index.json`, tokenizer.json and tokenizer_config.json.
pub fn write_model_dir(
    dir: &Path,
    preset: &str,
    overrides: &[(String, Value)],
    storage: StorageDtype,
    seed: u64,
    skew: f32,
    shard_bytes: usize,
) -> Result<()> {
    let mut raw = preset_config(preset)?;
    // Other shapes from a preset's: `config.json` keys replaced before anything is made (a
    // value `Config` then refuses says which key).
    for (key, value) in overrides {
        raw[key.as_str()] = value.clone();
    }
    if storage == StorageDtype::Fp8 {
        raw["quantization_config"] = json!({"activation_scheme": "dynamic", "fmt": "e4m3",
            "quant_method": "fp8", "weight_block_size": [128, 128]});
    }
    raw["torch_dtype"] = json!(if storage == StorageDtype::F32 { "float32" } else { "bfloat16" });
    let config = Config::from_json(&raw.to_string(), preset)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.into(), source })?;
    let write = |file: &str, value: &Value| {
        let path = dir.join(file);
        let text = serde_json::to_string_pretty(value)
            .map_err(|source| Error::Json { path: path.clone(), source })?;
        std::fs::write(&path, text + "\n").map_err(|source| Error::Io { path, source })
    };
    write("config.json", &raw)?;
    write("generation_config.json", &json!({"bos_token_id": 0, "eos_token_id": 1, "do_sample": false}))?;
    write("tokenizer.json", &tokenizer_json(config.vocab_size))?;
    write("tokenizer_config.json", &tokenizer_config_json())?;
    generate_tensors(&config, storage, seed, skew, &dir.display().to_string(), &|_| true)?
        .save_sharded(dir, shard_bytes)
}

/// DeepSeek-V3's chat format, reduced to system, user and assistant turns.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}\
{% elif m.role == 'user' %}<｜User｜>{{ m.content }}{% elif m.role == 'assistant' %}<｜Assistant｜>{{ m.content }}\
{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";

/// `tokenizer_config.json` for generated models: the special tokens and [`CHAT_TEMPLATE`].
pub fn tokenizer_config_json() -> Value {
    json!({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"})
}

/// A byte-level BPE tokenizer (GPT-2's byte alphabet, no merges) with DeepSeek's special
/// tokens at ids 0 and 1: any text encodes, one token per byte.
pub fn tokenizer_json(vocab_size: usize) -> Value {
    let specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert((*s).into(), json!(i));
    }
    // GPT-2's byte → printable character table: printable bytes map to themselves, the
    // others to 256, 257, ... in byte order.
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 256;
    for b in 0..256u32 {
        let ch = if printable(b) {
            b
        } else {
            shifted += 1;
            shifted - 1
        };
        if specials.len() + (b as usize) < vocab_size {
            let s = char::from_u32(ch).map(String::from).unwrap_or_default();
            vocab.insert(s, json!(specials.len() + b as usize));
        }
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_shifts_the_selection_bias_towards_low_experts_only() {
        let config = Config::from_json(&preset_config("tiny").unwrap().to_string(), "tiny").unwrap();
        let gen = |skew| generate_tensors(&config, StorageDtype::F32, 3, skew, "t", &|_| true).unwrap();
        let (plain, skewed) = (gen(0.0), gen(2.0));
        let bias = |m: &TensorMap| {
            dtype::f32_from_le(&m.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].data)
        };
        let shift: Vec<f32> = bias(&skewed).iter().zip(bias(&plain)).map(|(a, b)| a - b).collect();
        assert!((shift[0] - 0.2).abs() < 1e-6 && shift[15].abs() < 1e-6, "{shift:?}");
        assert!(shift.windows(2).all(|w| w[0] > w[1]));
        let gate = "model.layers.1.mlp.gate.weight";
        assert_eq!(plain.tensors[gate].data, skewed.tensors[gate].data);
        let v2 = Config::from_json(&preset_config("v2-lite-shape").unwrap().to_string(), "v2").unwrap();
        let err =
            generate_tensors(&v2, StorageDtype::F32, 0, 1.0, "v2", &|_| false).err().unwrap().to_string();
        assert!(err.contains("topk_method") && err.contains("noaux_tc"), "{err}");
    }
}
