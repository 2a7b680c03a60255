//! The expert facts of a model's Hugging Face `config.json`: expert and layer counts, and which
//! layers are MoE layers. One parser for the operator (which never links the compute stack),
//! the model and the router, with the defaults transformers' `DeepseekV2Config` /
//! `DeepseekV3Config` use when a key is absent.
//!
//! The `builtin:<preset>` configurations live here too (`presets/*.json`, compiled in): the
//! operator lays out their experts, and the model crate generates models from the same files.

use crate::{Error, Result};

use serde::Deserialize;

/// Expert-layout facts of a DeepSeek-V2/V3 `config.json`. A key that is absent or `null` takes
/// transformers' default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ModelConfig {
    /// Routed experts per MoE layer (0: a dense model).
    #[serde(default, deserialize_with = "zero_if_null")]
    pub n_routed_experts: u32,
    pub num_hidden_layers: u32,
    /// The first `first_k_dense_replace` layers have a dense MLP instead of experts.
    #[serde(default, deserialize_with = "zero_if_null")]
    pub first_k_dense_replace: u32,
    /// Every `moe_layer_freq`-th layer (after the dense ones) is MoE; DeepSeek ships 1.
    #[serde(default = "one", deserialize_with = "one_if_null")]
    pub moe_layer_freq: u32,
    /// Expert groups for group-limited routing (1: no groups).
    #[serde(default = "one", deserialize_with = "one_if_null")]
    pub n_group: u32,
    /// MLA's latent KV width and decoupled RoPE key width: a token's cache row in each layer.
    #[serde(default, deserialize_with = "zero_if_null")]
    pub kv_lora_rank: u32,
    #[serde(default, deserialize_with = "zero_if_null")]
    pub qk_rope_head_dim: u32,
    /// The longest context the model was made for (0: not given).
    #[serde(default, deserialize_with = "zero_if_null")]
    pub max_position_embeddings: u32,
    /// DeepSeek-V3's multi-token-prediction modules (0: none; speculative decoding needs one).
    #[serde(default, deserialize_with = "zero_if_null")]
    pub num_nextn_predict_layers: u32,
    /// How the checkpoint's weights are quantised (DeepSeek-V3's: `fp8`); absent: not at all.
    #[serde(default, rename = "quantization_config")]
    pub quantization: Option<Quantization>,
}

/// `quantization_config` of a `config.json`, as far as the layout needs it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Quantization {
    #[serde(default)]
    pub quant_method: String,
}

impl ModelConfig {
    /// Whether the checkpoint stores its weights in FP8 (`quant_method: fp8`).
    pub fn is_fp8(&self) -> bool {
        self.quantization.as_ref().is_some_and(|q| q.quant_method == "fp8")
    }
}

/// A router's context length (prompt plus new tokens) when none is asked for.
pub const DEFAULT_MAX_CONTEXT: u32 = 8192;

fn one() -> u32 {
    1
}

fn zero_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Option::<u32>::deserialize(d).map(Option::unwrap_or_default)
}

fn one_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Option::<u32>::deserialize(d).map(|v| v.unwrap_or(1))
}

/// `builtin:<preset>` configurations, the files `kubemoe gen-model` and `builtin:` use:
/// - `tiny`: the shape of the reference fixture `deepseek-v3-tiny`;
/// - `small`: ~210M parameters, 64 experts, the benchmark model;
/// - `v2-lite-shape`: DeepSeek-V2-Lite's structure (plain `q_proj`, softmax greedy gate,
///   64 experts top-6, 2 shared, YaRN), narrower and shallower;
/// - `v3-shape`: DeepSeek-V3's structure (256 experts in 8 groups, top-8 of 4 groups, MTP,
///   YaRN), narrower and shallower.
const PRESETS: [(&str, &str); 4] = [
    ("tiny", include_str!("../presets/tiny.json")),
    ("small", include_str!("../presets/small.json")),
    ("v2-lite-shape", include_str!("../presets/v2-lite-shape.json")),
    ("v3-shape", include_str!("../presets/v3-shape.json")),
];

/// The `config.json` text of a `builtin:` preset, or None for an unknown name.
pub fn preset_json(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(preset, _)| *preset == name).map(|(_, text)| *text)
}

impl ModelConfig {
    /// Parses a `config.json`; `origin` names it in the error.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::ModelConfig { origin: origin.to_string(), source })
    }

    /// The compiled-in configuration of a `builtin:` preset, or None for an unknown name.
    pub fn preset(name: &str) -> Option<Result<Self>> {
        preset_json(name).map(|text| Self::from_json(text, &format!("builtin:{name}")))
    }

    /// Names of the presets, for messages.
    pub fn preset_names() -> impl Iterator<Item = &'static str> {
        PRESETS.iter().map(|(name, _)| *name)
    }

    /// Whether decoder layer `layer` has routed experts, as DeepSeek's modelling code decides it:
    /// past the first `first_k_dense_replace` layers, every `moe_layer_freq`-th.
    pub fn is_moe_layer(&self, layer: u32) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// Bytes of KV cache one token takes in a router: the latent and RoPE key rows of every
    /// layer, in f32 (what `KvCache` holds).
    pub fn kv_bytes_per_token(&self) -> u64 {
        u64::from(self.num_hidden_layers) * u64::from(self.kv_lora_rank + self.qk_rope_head_dim) * 4
    }

    /// The context length a router serves when `requested` (else [`DEFAULT_MAX_CONTEXT`]) is
    /// asked for: at most the model's `max_position_embeddings`.
    pub fn context_length(&self, requested: Option<u32>) -> u32 {
        let requested = requested.unwrap_or(DEFAULT_MAX_CONTEXT);
        match self.max_position_embeddings {
            0 => requested,
            max => requested.min(max),
        }
    }

    /// Indices of the layers whose MLP is a mixture of experts.
    pub fn moe_layers(&self) -> Vec<u32> {
        (0..self.num_hidden_layers).filter(|&layer| self.is_moe_layer(layer)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_with_its_expert_counts() {
        let tiny = ModelConfig::preset("tiny").unwrap().unwrap();
        assert_eq!((tiny.n_routed_experts, tiny.n_group), (16, 4));
        assert_eq!(tiny.moe_layers(), [1, 2]);
        let v3 = ModelConfig::preset("v3-shape").unwrap().unwrap();
        assert_eq!((v3.n_routed_experts, v3.n_group), (256, 8));
        assert_eq!(ModelConfig::preset_names().count(), 4);
        for name in ModelConfig::preset_names() {
            ModelConfig::preset(name).unwrap().unwrap();
        }
        assert!(ModelConfig::preset("v4").is_none());
    }

    #[test]
    fn layers_follow_first_k_dense_replace_and_frequency() {
        let text = r#"{"n_routed_experts": 64, "num_hidden_layers": 6, "first_k_dense_replace": 1,
                       "moe_layer_freq": 2, "num_experts_per_tok": 6}"#;
        let config = ModelConfig::from_json(text, "test").unwrap();
        assert_eq!(config.moe_layers(), [2, 4]);
        assert_eq!(config.n_group, 1);
    }

    #[test]
    fn a_missing_key_is_named() {
        let err = ModelConfig::from_json(r#"{"n_routed_experts": 2}"#, "cm/config.json").unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("cm/config.json") && text.contains("num_hidden_layers"), "{text}");
        let dense = ModelConfig::from_json(r#"{"num_hidden_layers": 2}"#, "t").unwrap();
        assert!(dense.moe_layers().is_empty());
        let nulls = r#"{"num_hidden_layers": 3, "n_routed_experts": 4, "moe_layer_freq": null,
                        "n_group": null, "first_k_dense_replace": null}"#;
        let nulls = ModelConfig::from_json(nulls, "t").unwrap();
        assert_eq!((nulls.moe_layer_freq, nulls.n_group, nulls.moe_layers()), (1, 1, vec![0, 1, 2]));
    }
}
