//! The part of a model's Hugging Face `config.json` the operator needs: expert and layer counts.
//!
//! The operator never links the model crate (it would pull the compute stack into the control
//! plane); it reads the handful of keys that decide the expert layout, with the same defaults
//! transformers uses when a key is absent. `builtin:` presets are the same files the model
//! crate generates models from, compiled in.

use crate::{Error, Result};
use serde::Deserialize;

/// Expert-layout facts of a DeepSeek-V2/V3 `config.json`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ModelConfig {
    /// Routed experts per MoE layer.
    pub n_routed_experts: u32,
    pub num_hidden_layers: u32,
    /// The first `first_k_dense_replace` layers have a dense MLP instead of experts.
    #[serde(default)]
    pub first_k_dense_replace: u32,
    /// Every `moe_layer_freq`-th layer (after the dense ones) is MoE; DeepSeek ships 1.
    #[serde(default = "one")]
    pub moe_layer_freq: u32,
    /// Expert groups for group-limited routing (1: no groups).
    #[serde(default = "one")]
    pub n_group: u32,
    pub num_experts_per_tok: u32,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn one() -> u32 {
    1
}

/// `builtin:<preset>` configurations, the files `kubemoe gen-model` and `builtin:` use.
const PRESETS: [(&str, &str); 4] = [
    ("tiny", include_str!("../../model/presets/tiny.json")),
    ("small", include_str!("../../model/presets/small.json")),
    ("v2-lite-shape", include_str!("../../model/presets/v2-lite-shape.json")),
    ("v3-shape", include_str!("../../model/presets/v3-shape.json")),
];

impl ModelConfig {
    /// Parses a `config.json`; `origin` names it in the error.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::ModelConfig { origin: origin.to_string(), source })
    }

    /// The compiled-in configuration of a `builtin:` preset, or None for an unknown name.
    pub fn preset(name: &str) -> Option<Result<Self>> {
        PRESETS
            .iter()
            .find(|(preset, _)| *preset == name)
            .map(|(preset, text)| Self::from_json(text, &format!("builtin:{preset}")))
    }

    /// Names of the presets, for messages.
    pub fn preset_names() -> impl Iterator<Item = &'static str> {
        PRESETS.iter().map(|(name, _)| *name)
    }

    /// Indices of the layers whose MLP is a mixture of experts, as DeepSeek's modelling code
    /// decides it.
    pub fn moe_layers(&self) -> Vec<u32> {
        if self.n_routed_experts == 0 {
            return Vec::new();
        }
        (self.first_k_dense_replace..self.num_hidden_layers)
            .filter(|layer| layer % self.moe_layer_freq.max(1) == 0)
            .collect()
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
        assert_eq!((v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group), (256, 8, 8));
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
        let err = ModelConfig::from_json(r#"{"num_hidden_layers": 2}"#, "cm/config.json").unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(text.contains("cm/config.json") && text.contains("n_routed_experts"), "{text}");
    }
}
