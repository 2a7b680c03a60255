//! `config.json` exactly as Hugging Face ships DeepSeek-V2, V2-Lite and V3 (and R1).
//!
//! Fields and defaults follow transformers' `DeepseekV2Config` / `DeepseekV3Config`. Where a
//! checkpoint leaves a field out, the default depends on `model_type` (V2: softmax scoring,
//! `greedy`, no top-k normalisation; V3: sigmoid, `noaux_tc`, normalised). RoPE settings are
//! read from both spellings: `rope_theta` + `rope_scaling: {type: yarn, ...}` (the checkpoints)
//! and `rope_parameters: {rope_type, rope_theta, ...}` (transformers 5).

use crate::{Error, Result};
use kubemoe_kernels::gate::{GateParams, Scoring, TopkMethod};
use kubemoe_kernels::rope::Yarn;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V2,
    V3,
}

/// A resolved DeepSeek configuration: every default applied, every value checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Expert and layer counts as the placement reads them: one parser of which layers are MoE.
    pub experts: kubemoe_placement::ModelConfig,
    /// 0 for a model without routed experts.
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub gate: GateParams,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub yarn: Option<Yarn>,
    pub rope_interleave: bool,
    pub max_position_embeddings: usize,
    pub num_nextn_predict_layers: usize,
    pub tie_word_embeddings: bool,
    /// FP8 weight block size when the checkpoint is block-quantised.
    pub fp8_block: Option<[usize; 2]>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct Raw {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    moe_intermediate_size: Option<usize>,
    n_shared_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    topk_group: Option<usize>,
    topk_method: Option<String>,
    scoring_func: Option<String>,
    norm_topk_prob: Option<bool>,
    routed_scaling_factor: Option<f32>,
    num_attention_heads: usize,
    q_lora_rank: Option<usize>,
    kv_lora_rank: usize,
    qk_nope_head_dim: usize,
    qk_rope_head_dim: usize,
    v_head_dim: usize,
    rms_norm_eps: Option<f32>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rope_interleave: Option<bool>,
    max_position_embeddings: Option<usize>,
    num_nextn_predict_layers: Option<usize>,
    tie_word_embeddings: Option<bool>,
    quantization_config: Option<Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

impl Config {
    /// Reads and resolves `path` (a `config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses config JSON; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|source| Error::Json { path: origin.into(), source })?;
        let model_type = value.get("model_type").and_then(Value::as_str).unwrap_or_default();
        let family = match model_type {
            "deepseek_v3" | "kimi_k2" => Family::V3,
            "deepseek_v2" => Family::V2,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    model_type: if other.is_empty() { "(missing)".into() } else { other.into() },
                })
            }
        };
        let experts = serde_json::from_value(value.clone())
            .map_err(|source| Error::Json { path: origin.into(), source })?;
        let raw: Raw =
            serde_json::from_value(value).map_err(|source| Error::Json { path: origin.into(), source })?;
        resolve(raw, experts, family, origin)
    }

    /// Whether decoder layer `i` has routed experts (DeepSeek's `first_k_dense_replace` and
    /// `moe_layer_freq` rule).
    pub fn is_moe_layer(&self, i: usize) -> bool {
        u32::try_from(i).is_ok_and(|i| self.experts.is_moe_layer(i))
    }

    /// Bytes of KV cache per token: every layer's `c_kv` and `k_pe` rows in f32.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * 4
    }

    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.num_hidden_layers).filter(|i| self.is_moe_layer(*i))
    }

    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention score scale: `1/sqrt(d_nope + d_rope)`, times `mscale²` under YaRN.
    pub fn softmax_scale(&self) -> f32 {
        let base = 1.0 / (self.q_head_dim() as f64).sqrt();
        let yarn = self.yarn.as_ref().filter(|y| y.mscale_all_dim != 0.0);
        (base * yarn.map_or(1.0, Yarn::softmax_scale_factor)) as f32
    }
}

fn resolve(
    raw: Raw,
    experts: kubemoe_placement::ModelConfig,
    family: Family,
    origin: &str,
) -> Result<Config> {
    let bad = |key: &str, reason: String| Error::Config { path: origin.into(), key: key.into(), reason };
    if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
        return Err(bad("hidden_act", format!("`{act}` is not supported; DeepSeek models use `silu`")));
    }
    if raw.attention_bias == Some(true) {
        return Err(bad("attention_bias", "attention biases are not supported; set false".into()));
    }
    let v3 = family == Family::V3;
    let n_routed_experts = experts.n_routed_experts as usize;
    let scoring = match raw.scoring_func.as_deref() {
        None => {
            if v3 {
                Scoring::Sigmoid
            } else {
                Scoring::Softmax
            }
        }
        Some("sigmoid") => Scoring::Sigmoid,
        Some("softmax") => Scoring::Softmax,
        Some(o) => return Err(bad("scoring_func", format!("`{o}` is not one of sigmoid, softmax"))),
    };
    let method = match raw.topk_method.as_deref() {
        None => {
            if v3 {
                TopkMethod::NoauxTc
            } else {
                TopkMethod::Greedy
            }
        }
        Some("noaux_tc") => TopkMethod::NoauxTc,
        Some("greedy") => TopkMethod::Greedy,
        Some("group_limited_greedy") => TopkMethod::GroupLimitedGreedy,
        Some(o) => {
            return Err(bad(
                "topk_method",
                format!("`{o}` is not one of noaux_tc, greedy, group_limited_greedy"),
            ))
        }
    };
    let gate = GateParams {
        n_experts: n_routed_experts,
        top_k: raw.num_experts_per_tok.unwrap_or(if v3 { 8 } else { 6 }),
        n_group: experts.n_group as usize,
        topk_group: raw.topk_group.unwrap_or(1),
        scoring,
        method,
        norm_topk_prob: raw.norm_topk_prob.unwrap_or(v3),
        routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(if v3 { 2.5 } else { 1.0 }),
    };
    if n_routed_experts > 0 {
        gate.validate().map_err(|e| bad("num_experts_per_tok", e.to_string()))?;
    }
    let (rope_theta, yarn) = rope(&raw, origin)?;
    let fp8_block = match &raw.quantization_config {
        None | Some(Value::Null) => None,
        Some(q) => Some(fp8_block(q).map_err(|r| bad("quantization_config", r))?),
    };
    let eos_token_ids = match raw.eos_token_id {
        None => vec![],
        Some(OneOrMany::One(id)) => vec![id],
        Some(OneOrMany::Many(ids)) => ids,
    };
    let config = Config {
        family,
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(raw.intermediate_size),
        num_hidden_layers: experts.num_hidden_layers as usize,
        experts,
        n_routed_experts,
        n_shared_experts: raw.n_shared_experts.unwrap_or(0),
        gate,
        num_attention_heads: raw.num_attention_heads,
        q_lora_rank: raw.q_lora_rank,
        kv_lora_rank: raw.kv_lora_rank,
        qk_nope_head_dim: raw.qk_nope_head_dim,
        qk_rope_head_dim: raw.qk_rope_head_dim,
        v_head_dim: raw.v_head_dim,
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        yarn,
        rope_interleave: raw.rope_interleave.unwrap_or(true),
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
        num_nextn_predict_layers: raw.num_nextn_predict_layers.unwrap_or(0),
        tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        fp8_block,
        bos_token_id: raw.bos_token_id,
        eos_token_ids,
    };
    for (key, v) in [
        ("vocab_size", config.vocab_size),
        ("hidden_size", config.hidden_size),
        ("num_hidden_layers", config.num_hidden_layers),
        ("num_attention_heads", config.num_attention_heads),
        ("kv_lora_rank", config.kv_lora_rank),
        ("qk_rope_head_dim", config.qk_rope_head_dim),
        ("v_head_dim", config.v_head_dim),
        ("moe_layer_freq", config.experts.moe_layer_freq as usize),
    ] {
        if v == 0 {
            return Err(bad(key, "must be positive".into()));
        }
    }
    if !config.qk_rope_head_dim.is_multiple_of(2) {
        return Err(bad("qk_rope_head_dim", format!("{} must be even", config.qk_rope_head_dim)));
    }
    Ok(config)
}

fn rope(raw: &Raw, origin: &str) -> Result<(f64, Option<Yarn>)> {
    // transformers 5 moved everything into `rope_parameters`; checkpoints keep `rope_scaling`.
    let (key, params) = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let num = |k: &str| params.and_then(|p| p.get(k)).and_then(Value::as_f64);
    let theta = num("rope_theta").or(raw.rope_theta).unwrap_or(10000.0);
    let bad = |reason: String| Error::Config { path: origin.into(), key: key.into(), reason };
    let Some(p) = params else { return Ok((theta, None)) };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "yarn" => {
            let factor = num("factor").ok_or_else(|| bad("yarn needs `factor`".into()))?;
            let original = num("original_max_position_embeddings")
                .or(raw.max_position_embeddings.map(|m| m as f64))
                .ok_or_else(|| bad("yarn needs `original_max_position_embeddings`".into()))?;
            Ok((
                theta,
                Some(Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast").unwrap_or(32.0),
                    beta_slow: num("beta_slow").unwrap_or(1.0),
                    mscale: num("mscale").unwrap_or(1.0),
                    mscale_all_dim: num("mscale_all_dim").unwrap_or(0.0),
                }),
            ))
        }
        other => Err(bad(format!("rope type `{other}` is not supported (default or yarn)"))),
    }
}

fn fp8_block(q: &Value) -> Result<[usize; 2], String> {
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or_default();
    if method != "fp8" {
        return Err(format!("quant_method `{method}` is not supported (fp8 with weight_block_size)"));
    }
    if let Some(fmt) = q.get("fmt").and_then(Value::as_str).filter(|f| *f != "e4m3") {
        return Err(format!("fp8 format `{fmt}` is not supported (e4m3)"));
    }
    let block: Vec<usize> = q
        .get("weight_block_size")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect())
        .unwrap_or_default();
    match block[..] {
        [r, c] if r > 0 && c > 0 => Ok([r, c]),
        _ => Err(format!("weight_block_size must be two positive integers, got {block:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_operator_budgets_the_kv_cache_a_router_holds() {
        let mut configs: Vec<(String, String)> = kubemoe_placement::ModelConfig::preset_names()
            .map(|name| (name.to_string(), kubemoe_placement::config::preset_json(name).unwrap().to_string()))
            .collect();
        configs.push(("v3".into(), v3_json().to_string()));
        for (name, text) in configs {
            let router = Config::from_json(&text, &name).unwrap();
            let operator = kubemoe_placement::ModelConfig::from_json(&text, &name).unwrap();
            assert_eq!(router.kv_bytes_per_token() as u64, operator.kv_bytes_per_token(), "{name}");
            let context = operator.context_length(Some(1 << 20)) as usize;
            assert_eq!(context, router.max_position_embeddings, "{name}");
        }
    }

    fn v3_json() -> Value {
        json!({
            "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
            "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
            "first_k_dense_replace": 3, "n_routed_experts": 256, "n_shared_experts": 1,
            "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
            "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
            "num_nextn_predict_layers": 1, "tie_word_embeddings": false,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                "quant_method": "fp8", "weight_block_size": [128, 128]},
            "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu"
        })
    }

    fn parse(v: &Value) -> Result<Config> {
        Config::from_json(&v.to_string(), "config.json")
    }

    #[test]
    fn real_v3_config_resolves() {
        let c = parse(&v3_json()).unwrap();
        assert_eq!(c.family, Family::V3);
        assert_eq!(c.fp8_block, Some([128, 128]));
        assert_eq!(c.gate.method, TopkMethod::NoauxTc);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3));
        let y = c.yarn.clone().unwrap();
        assert_eq!(y.factor, 40.0);
        let m = 0.1 * 40f64.ln() + 1.0;
        assert!((c.softmax_scale() as f64 - m * m / 192f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn rope_parameters_spelling_is_equivalent() {
        let mut v = v3_json();
        let scaling = v["rope_scaling"].take();
        v["rope_scaling"] = Value::Null;
        v.as_object_mut().unwrap().remove("rope_theta");
        let mut p = scaling.clone();
        p["rope_type"] = json!("yarn");
        p.as_object_mut().unwrap().remove("type");
        p["rope_theta"] = json!(10000.0);
        v["rope_parameters"] = p;
        let a = parse(&v).unwrap();
        let b = parse(&v3_json()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn v2_defaults_come_from_model_type() {
        let mut v = v3_json();
        let o = v.as_object_mut().unwrap();
        for k in
            ["topk_method", "scoring_func", "norm_topk_prob", "routed_scaling_factor", "quantization_config"]
        {
            o.remove(k);
        }
        o.insert("model_type".into(), json!("deepseek_v2"));
        o.insert("q_lora_rank".into(), Value::Null);
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::V2);
        assert_eq!(c.gate.scoring, Scoring::Softmax);
        assert_eq!(c.gate.method, TopkMethod::Greedy);
        assert!(!c.gate.norm_topk_prob);
        assert_eq!(c.gate.routed_scaling_factor, 1.0);
        assert_eq!(c.q_lora_rank, None);
    }

    #[test]
    fn bad_configs_name_their_cause() {
        let err = Config::from_json("{\"model_type\": \"deepseek_v3\",", "m/config.json").unwrap_err();
        assert!(err.to_string().contains("m/config.json"), "{err}");
        let mut v = v3_json();
        v["model_type"] = json!("llama");
        let err = parse(&v).unwrap_err();
        assert!(err.to_string().contains("`llama`"), "{err}");
        let mut v = v3_json();
        v.as_object_mut().unwrap().remove("hidden_size");
        let err = parse(&v).unwrap_err();
        assert!(format!("{err:#}").contains("config.json"), "{err}");
        assert!(std::error::Error::source(&err).unwrap().to_string().contains("hidden_size"));
        let mut v = v3_json();
        v["rope_scaling"]["type"] = json!("dynamic");
        assert!(parse(&v).unwrap_err().to_string().contains("rope_scaling"));
        let mut v = v3_json();
        v["quantization_config"]["quant_method"] = json!("awq");
        assert!(parse(&v).unwrap_err().to_string().contains("quantization_config"));
        let mut v = v3_json();
        v["num_experts_per_tok"] = json!(300);
        assert!(parse(&v).unwrap_err().to_string().contains("num_experts_per_tok"));
    }
}
