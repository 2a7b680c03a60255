//! What a spec means for a given model: where the weights come from, the expert layout
//! (`kubemoe_placement::layout`), the balancing policy, and the settings that are accepted by
//! the schema but not built yet, which are refused with a reason rather than served some other
//! way. Pure functions; the controller turns an [`Invalid`] into `Ready=False` with its reason
//! and message, `render` and `kubemoe up` into an error.

use crate::deployment::{Dtype, ModelDeploymentSpec, PlacementPolicy, Transport};
use kubemoe_placement::rebalance::Policy;
use kubemoe_placement::{Invalid, Layout, LayoutSpec, ModelConfig};

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

/// Checks the spec against the model and what is built; returns the expert layout, or what to
/// change.
pub fn layout(spec: &ModelDeploymentSpec, model: &ModelConfig) -> Result<Layout, Invalid> {
    not_built(spec)?;
    let drafts = speculative(spec, model)?;
    kv_cache(spec, model, drafts)?;
    dtype(spec, model)?;
    let experts = LayoutSpec {
        workers: spec.workers.replicas,
        redundant: spec.experts.redundant,
        min_replicas: spec.experts.min_replicas,
    };
    kubemoe_placement::layout::layout(&experts, model)
}

/// `model.dtype: bf16` on an FP8 checkpoint would round its values again; every pod would
/// refuse it at load (crash-looping), so it is refused here, before any pod is made.
fn dtype(spec: &ModelDeploymentSpec, model: &ModelConfig) -> Result<(), Invalid> {
    if spec.model.dtype != Dtype::Bf16 || !model.is_fp8() {
        return Ok(());
    }
    Err(Invalid::new(
        "DtypeNotSupported",
        "model.dtype bf16: the checkpoint stores its weights in FP8 (its config.json's \
         quantization_config.quant_method is fp8), and holding them in bf16 would round their \
         values; set model.dtype to auto (FP8 kept, one byte a value) or f32 (dequantised)",
    ))
}

/// `router.speculative`: the draft tokens per step (0: none), parsed as a router parses its
/// flag; the model must have an MTP module.
fn speculative(spec: &ModelDeploymentSpec, model: &ModelConfig) -> Result<usize, Invalid> {
    let Some(value) = &spec.router.speculative else { return Ok(0) };
    let drafts = kubemoe_api::speculative::parse(value)
        .map_err(|e| Invalid::new("InvalidSpeculative", format!("router.speculative {e}")))?;
    if model.num_nextn_predict_layers == 0 {
        return Err(Invalid::new(
            "InvalidSpeculative",
            format!(
                "router.speculative {value}: the model has no MTP module (its config's \
                 num_nextn_predict_layers is 0); remove router.speculative"
            ),
        ));
    }
    Ok(drafts)
}

/// The routers' KV cache must hold one request of the whole context (with its `drafts` and
/// MTP cache when speculating), as a router checks at start (vLLM refuses a `max_model_len`
/// its cache cannot hold the same way): a smaller one would refuse every long request, or
/// never start.
fn kv_cache(spec: &ModelDeploymentSpec, model: &ModelConfig, drafts: usize) -> Result<(), Invalid> {
    let context = model.context_length(spec.model.max_context_length.map(|c| c.max(1) as u32));
    let reserved =
        kubemoe_api::speculative::reservation(context as usize, drafts, model.num_hidden_layers as usize)
            as u64;
    let per_token = model.kv_bytes_per_token().max(1);
    let mib = spec.router.kv_cache_mib.max(1) as u64;
    let holds = (mib << 20) / per_token;
    if holds >= reserved {
        return Ok(());
    }
    let need = (reserved * per_token).div_ceil(1 << 20);
    let with_drafts = if drafts > 0 {
        format!(" ({reserved} with router.speculative's drafts and MTP cache)")
    } else {
        String::new()
    };
    Err(Invalid::new(
        "KvCacheTooSmall",
        format!(
            "router.kvCacheMiB {mib} holds {holds} tokens of this model's KV cache ({per_token} bytes \
             each), fewer than one request of the context length {context}{with_drafts} \
             (model.maxContextLength, default {}): set router.kvCacheMiB to at least {need}, or \
             lower model.maxContextLength",
            kubemoe_placement::DEFAULT_MAX_CONTEXT
        ),
    ))
}

/// `spec.balancing` as the rebalance loop takes it; a bad duration names its field.
pub fn policy(spec: &ModelDeploymentSpec) -> kubemoe_placement::Result<Policy> {
    let b = &spec.balancing;
    Policy::parse(
        b.enabled,
        &b.interval,
        &b.cooldown,
        b.imbalance_threshold,
        b.max_experts_moved_per_rebalance,
    )
}

/// Settings the schema accepts for what is planned but not built: refused (reason `NotBuilt`)
/// until their issue lands, so that nothing is silently served another way.
/// Longest ModelDeployment name: the StatefulSet `<name>-worker` gets a controller revision
/// label `<statefulset>-<10-character hash>`, and label values stop at 63 characters.
pub const MAX_NAME: usize = 45;

/// A ModelDeployment's name must make valid names of its children: the router Service is
/// `<name>` (a DNS-1035 label), the StatefulSet `<name>-worker` (see [`MAX_NAME`]).
pub fn check_name(name: &str) -> Result<(), Invalid> {
    let label = name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if label {
        return Ok(());
    }
    Err(Invalid::new(
        "InvalidName",
        format!(
            "metadata.name {name:?}: the router Service and the worker StatefulSet take this name, so it \
             must be at most {MAX_NAME} characters of a-z, 0-9 and '-', starting with a letter and \
             not ending with '-'"
        ),
    ))
}

fn not_built(spec: &ModelDeploymentSpec) -> Result<(), Invalid> {
    let refuse = |message: String| Err(Invalid::new("NotBuilt", message));
    if spec.transport == Transport::Nccl {
        return refuse(
            "transport nccl is not built yet (it comes with the GPU data plane); activations travel \
             over TCP today: set transport to tcp"
                .into(),
        );
    }
    if spec.workers.gpus_per_worker > 0 {
        return refuse(format!(
            "workers.gpusPerWorker {}: experts compute on the CPU today (the GPU data plane is not \
             built yet); set workers.gpusPerWorker to 0",
            spec.workers.gpus_per_worker
        ));
    }
    if spec.experts.placement == PlacementPolicy::Hierarchical {
        return refuse(
            "experts.placement hierarchical keeps each expert group's replicas on one node, which \
             needs workers pinned to nodes and is not built yet; set experts.placement to global"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_make_valid_child_names() {
        for good in ["tiny", "v3-r1", &"a".repeat(MAX_NAME)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "3fold", "Tiny", "a.b", "a-", "a_b", &"a".repeat(MAX_NAME + 1)] {
            assert_eq!(check_name(bad).unwrap_err().reason, "InvalidName", "{bad}");
        }
    }

    fn spec(extra: serde_json::Value) -> ModelDeploymentSpec {
        let mut base = serde_json::json!({"model": {"source": "builtin:tiny"}, "workers": {"replicas": 2}});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn tiny() -> ModelConfig {
        ModelConfig::preset("tiny").unwrap().unwrap()
    }

    #[test]
    fn a_kv_cache_smaller_than_one_request_of_the_context_is_refused() {
        let v3: ModelConfig = serde_json::from_str(
            r#"{"n_routed_experts": 256, "num_hidden_layers": 61, "first_k_dense_replace": 3,
                "kv_lora_rank": 512, "qk_rope_head_dim": 64, "max_position_embeddings": 163840}"#,
        )
        .unwrap();
        // 61 layers x 576 x 4 bytes = 140,544 bytes a token: 1 GiB holds 7,639 tokens.
        let refused = kv_cache(&spec(serde_json::json!({})), &v3, 0).unwrap_err();
        assert_eq!(refused.reason, "KvCacheTooSmall");
        assert!(refused.message.contains("holds 7639 tokens"), "{}", refused.message);
        assert!(refused.message.contains("at least 1098"), "{}", refused.message);
        let long = spec(serde_json::json!({
            "model": {"source": "builtin:tiny", "maxContextLength": 131072},
            "router": {"kvCacheMiB": 17568}
        }));
        assert!(kv_cache(&long, &v3, 0).is_ok());
        // Speculation reserves more: 131072 + 2 drafts, and 1/61 of that for the MTP cache.
        let refused = kv_cache(&long, &v3, 2).unwrap_err();
        assert!(refused.message.contains("(133223 with router.speculative's"), "{}", refused.message);
        assert!(refused.message.contains("at least 17857"), "{}", refused.message);
        let short = spec(serde_json::json!({"model": {"source": "builtin:tiny", "maxContextLength": 4096}}));
        assert!(kv_cache(&short, &v3, 0).is_ok());
        // The model's own limit caps the context asked for.
        assert!(kv_cache(&spec(serde_json::json!({})), &tiny(), 0).is_ok());
    }

    #[test]
    fn speculation_needs_mtp_and_says_what_it_takes() {
        let with_mtp: ModelConfig = serde_json::from_str(
            r#"{"n_routed_experts": 16, "num_hidden_layers": 4, "num_nextn_predict_layers": 1}"#,
        )
        .unwrap();
        let speculating = |value: &str| spec(serde_json::json!({"router": {"speculative": value}}));
        assert_eq!(speculative(&speculating("mtp:2"), &with_mtp).unwrap(), 2);
        assert_eq!(speculative(&spec(serde_json::json!({})), &with_mtp).unwrap(), 0);
        let bad = speculative(&speculating("mtp:9"), &with_mtp).unwrap_err();
        assert_eq!(bad.reason, "InvalidSpeculative");
        assert!(bad.message.contains("router.speculative \"mtp:9\" is not mtp:K"), "{}", bad.message);
        let none = speculative(&speculating("mtp:1"), &tiny()).unwrap_err();
        assert!(none.message.contains("has no MTP module"), "{}", none.message);
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
    fn what_is_not_built_is_refused_with_what_to_change() {
        assert!(layout(&spec(serde_json::json!({})), &tiny()).is_ok());
        let nccl = layout(
            &spec(serde_json::json!({"transport": "nccl", "workers": {"replicas": 2, "gpusPerWorker": 1}})),
            &tiny(),
        )
        .unwrap_err();
        assert_eq!(nccl.reason, "NotBuilt");
        assert!(nccl.message.contains("set transport to tcp"), "{}", nccl.message);
        let gpus =
            layout(&spec(serde_json::json!({"workers": {"replicas": 2, "gpusPerWorker": 1}})), &tiny())
                .unwrap_err();
        assert!(gpus.message.contains("set workers.gpusPerWorker to 0"), "{}", gpus.message);
        let hierarchical =
            layout(&spec(serde_json::json!({"experts": {"placement": "hierarchical"}})), &tiny())
                .unwrap_err();
        assert!(hierarchical.message.contains("set experts.placement to global"), "{}", hierarchical.message);
        let mut fp8 = tiny();
        fp8.quantization = serde_json::from_value(serde_json::json!({"quant_method": "fp8"})).unwrap();
        let bf16 = spec(serde_json::json!({"model": {"source": "builtin:tiny", "dtype": "bf16"}}));
        let refused = layout(&bf16, &fp8).unwrap_err();
        assert_eq!(refused.reason, "DtypeNotSupported");
        assert!(refused.message.contains("set model.dtype to auto"), "{}", refused.message);
        for dtype in ["auto", "f32", "fp8"] {
            let kept = spec(serde_json::json!({"model": {"source": "builtin:tiny", "dtype": dtype}}));
            assert!(layout(&kept, &fp8).is_ok(), "{dtype}");
        }
        for dtype in ["auto", "f32", "bf16", "fp8"] {
            assert!(layout(
                &spec(serde_json::json!({"model": {"source": "builtin:tiny", "dtype": dtype}})),
                &tiny()
            )
            .is_ok());
        }
    }

    #[test]
    fn balancing_durations_name_their_field() {
        let mut s = spec(serde_json::json!({}));
        assert_eq!(policy(&s).unwrap().max_moves, s.balancing.max_experts_moved_per_rebalance as usize);
        s.balancing.cooldown = "soon".into();
        assert!(policy(&s).unwrap_err().to_string().contains("balancing.cooldown"));
    }
}
