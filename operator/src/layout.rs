//! What a spec means for a given model: the model source, the expert layout, and the rules the
//! schema cannot judge because they need the model's `config.json`. Pure functions; the
//! controller turns an [`Invalid`] into `Ready=False` with its reason and message.

use crate::model::ModelConfig;
use kubemoe_api::deployment::{ModelDeploymentSpec, PlacementPolicy};

/// A spec that cannot be served as written. `message` says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// CamelCase reason for the condition and the event.
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Invalid { reason, message: message.into() }
    }
}

/// Where the weights come from, parsed from `spec.model.source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A PersistentVolumeClaim in the deployment's namespace and a directory inside it
    /// (empty: the claim's root).
    Pvc { claim: String, path: String },
    /// An absolute directory on the node.
    HostPath { path: String },
    /// A generated model (`builtin:<preset>`), made at start-up from a fixed seed.
    Builtin { preset: String },
}

impl ModelSource {
    pub fn parse(source: &str) -> Result<Self, Invalid> {
        let bad = || {
            Invalid::new(
                "InvalidModelSource",
                format!(
                    "model.source {source:?} is not pvc://<claim>/<path>, hostPath:///<path> or builtin:<preset>"
                ),
            )
        };
        if let Some(rest) = source.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if claim.is_empty() {
                return Err(bad());
            }
            let path = path.trim_matches('/').to_string();
            if path.split('/').any(|part| part == "..") {
                return Err(bad());
            }
            Ok(ModelSource::Pvc { claim: claim.to_string(), path })
        } else if let Some(path) = source.strip_prefix("hostPath://") {
            if !path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(bad());
            }
            Ok(ModelSource::HostPath { path: path.to_string() })
        } else if let Some(preset) = source.strip_prefix("builtin:") {
            if preset.is_empty() {
                return Err(bad());
            }
            Ok(ModelSource::Builtin { preset: preset.to_string() })
        } else {
            Err(bad())
        }
    }

    /// The compiled-in config of a `builtin:` model; `None` for volume-backed models, whose
    /// config comes from `spec.model.configMap` (controller) or `--model-config` (render).
    pub fn builtin_config(&self) -> Option<Result<ModelConfig, Invalid>> {
        let ModelSource::Builtin { preset } = self else { return None };
        Some(match ModelConfig::preset(preset) {
            Some(Ok(config)) => Ok(config),
            Some(Err(e)) => Err(Invalid::new("InvalidModelConfig", e.to_string())),
            None => Err(Invalid::new(
                "UnknownPreset",
                format!(
                    "model.source builtin:{preset} names no preset; use one of: {}",
                    ModelConfig::preset_names().collect::<Vec<_>>().join(", ")
                ),
            )),
        })
    }
}

/// The expert layout a valid spec asks for. Every worker holds `slots_per_worker` physical
/// expert slots of every MoE layer; `logical + redundant == workers * slots_per_worker`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub logical: u32,
    pub redundant: u32,
    pub workers: u32,
    pub slots_per_worker: u32,
    pub moe_layers: Vec<u32>,
}

impl Layout {
    pub fn physical(&self) -> u32 {
        self.logical + self.redundant
    }
}

/// Checks the spec against the model and returns the layout, or what to change.
pub fn layout(spec: &ModelDeploymentSpec, model: &ModelConfig) -> Result<Layout, Invalid> {
    let moe_layers = model.moe_layers();
    if moe_layers.is_empty() {
        return Err(Invalid::new(
            "NoExperts",
            format!(
                "the model has no MoE layers (n_routed_experts = {}, first_k_dense_replace = {}, \
                 num_hidden_layers = {}); kubemoe serves Mixture-of-Experts models only",
                model.n_routed_experts, model.first_k_dense_replace, model.num_hidden_layers
            ),
        ));
    }
    let logical = model.n_routed_experts;
    // The schema bounds both to small positive ranges; render (no schema) can see anything.
    let redundant = u32::try_from(spec.experts.redundant)
        .map_err(|_| Invalid::new("InvalidExperts", "experts.redundant must be 0 or more"))?;
    let workers = u32::try_from(spec.workers.replicas)
        .ok()
        .filter(|w| *w > 0)
        .ok_or_else(|| Invalid::new("InvalidWorkers", "workers.replicas must be 1 or more"))?;
    let physical = logical + redundant;
    if !physical.is_multiple_of(workers) {
        let next_redundant = redundant + (workers - physical % workers);
        let (below, above) = nearest_divisors(physical, workers);
        let mut choices = vec![format!("set experts.redundant to {next_redundant}")];
        choices.extend(below.map(|w| format!("set workers.replicas to {w}")));
        choices.extend(above.map(|w| format!("set workers.replicas to {w}")));
        return Err(Invalid::new(
            "ExpertsNotDivisible",
            format!(
                "n_routed_experts ({logical}) + experts.redundant ({redundant}) = {physical} expert slots \
                 cannot be split evenly over workers.replicas ({workers}); {}",
                choices.join(", or ")
            ),
        ));
    }
    if redundant > logical * (workers - 1) {
        return Err(Invalid::new(
            "TooManyRedundantExperts",
            format!(
                "experts.redundant ({redundant}) exceeds the replicas that can live on other workers \
                 than their original (n_routed_experts × (workers.replicas − 1) = {}); lower experts.redundant",
                logical * (workers - 1)
            ),
        ));
    }
    if spec.experts.placement == PlacementPolicy::Hierarchical && model.n_group <= 1 {
        return Err(Invalid::new(
            "NoExpertGroups",
            "experts.placement hierarchical packs expert groups onto workers, but the model's \
             config.json has n_group = 1; set experts.placement to global",
        ));
    }
    Ok(Layout { logical, redundant, workers, slots_per_worker: physical / workers, moe_layers })
}

/// The divisors of `n` closest to `w` from below and from above (excluding `w`).
fn nearest_divisors(n: u32, w: u32) -> (Option<u32>, Option<u32>) {
    let below = (1..w).rev().find(|d| n.is_multiple_of(*d));
    let above = (w + 1..=n).find(|d| n.is_multiple_of(*d));
    (below, above)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(source: &str, workers: i32, redundant: i32) -> ModelDeploymentSpec {
        serde_json::from_value(serde_json::json!({
            "model": {"source": source},
            "workers": {"replicas": workers},
            "experts": {"redundant": redundant},
        }))
        .unwrap()
    }

    fn tiny() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap().unwrap()
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            ModelSource::parse("pvc://models/deepseek/v2-lite/").unwrap(),
            ModelSource::Pvc { claim: "models".into(), path: "deepseek/v2-lite".into() }
        );
        assert_eq!(
            ModelSource::parse("pvc://models").unwrap(),
            ModelSource::Pvc { claim: "models".into(), path: String::new() }
        );
        assert_eq!(
            ModelSource::parse("hostPath:///data/v3").unwrap(),
            ModelSource::HostPath { path: "/data/v3".into() }
        );
        for bad in ["s3://bucket/x", "pvc:///x", "hostPath://relative", "builtin:", "pvc://c/../etc"] {
            assert_eq!(ModelSource::parse(bad).unwrap_err().reason, "InvalidModelSource", "{bad}");
        }
        let unknown = ModelSource::parse("builtin:huge").unwrap().builtin_config().unwrap().unwrap_err();
        assert_eq!(unknown.reason, "UnknownPreset");
        assert!(unknown.message.contains("tiny, small, v2-lite-shape, v3-shape"), "{}", unknown.message);
    }

    #[test]
    fn divisible_layouts_split_slots_evenly() {
        let l = layout(&spec("builtin:tiny", 2, 0), &tiny()).unwrap();
        assert_eq!((l.physical(), l.slots_per_worker, l.moe_layers.clone()), (16, 8, vec![1, 2]));
        let l = layout(&spec("builtin:tiny", 3, 2), &tiny()).unwrap();
        assert_eq!(l.slots_per_worker, 6);
    }

    #[test]
    fn indivisible_experts_say_what_to_change() {
        let err = layout(&spec("builtin:tiny", 3, 0), &tiny()).unwrap_err();
        assert_eq!(err.reason, "ExpertsNotDivisible");
        assert!(err.message.contains("set experts.redundant to 2"), "{}", err.message);
        assert!(err.message.contains("set workers.replicas to 2"), "{}", err.message);
        assert!(err.message.contains("set workers.replicas to 4"), "{}", err.message);
    }

    #[test]
    fn redundant_slots_need_other_workers() {
        let err = layout(&spec("builtin:tiny", 1, 16), &tiny()).unwrap_err();
        assert_eq!(err.reason, "TooManyRedundantExperts");
    }

    #[test]
    fn hierarchical_placement_needs_groups() {
        let mut s = spec("builtin:v2-lite-shape", 4, 0);
        s.experts.placement = PlacementPolicy::Hierarchical;
        let v2 = ModelConfig::preset("v2-lite-shape").unwrap().unwrap();
        assert_eq!(layout(&s, &v2).unwrap_err().reason, "NoExpertGroups");
        s.experts.placement = PlacementPolicy::Global;
        assert!(layout(&s, &v2).is_ok());
    }

    #[test]
    fn dense_models_are_refused() {
        let dense = ModelConfig::from_json(
            r#"{"n_routed_experts": 8, "num_hidden_layers": 2, "first_k_dense_replace": 2, "num_experts_per_tok": 2}"#,
            "t",
        )
        .unwrap();
        assert_eq!(layout(&spec("builtin:tiny", 1, 0), &dense).unwrap_err().reason, "NoExperts");
    }
}
