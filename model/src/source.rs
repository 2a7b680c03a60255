//! Opening a model by the name a user gives it: a checkpoint directory or `builtin:<preset>`.

use crate::checkpoint::{Checkpoint, Precision, TensorSource};
use crate::{synth, Config, Experts, Model, Result};
use std::path::Path;

/// The config and tensors of `spec` (a Hugging Face model directory, or `builtin:<preset>`).
/// A directory is mapped lazily whatever `wants` says; a builtin model generates only the
/// tensors `wants` accepts (a worker, its experts; a router, everything else).
/// The stored bytes of the tensors `wants` accepts count as to be loaded
/// ([`crate::progress`]); reading a shard's header to size them touches none of its data.
pub fn open_tensors(spec: &str, wants: &dyn Fn(&str) -> bool) -> Result<(Config, Box<dyn TensorSource>)> {
    let (config, src): (Config, Box<dyn TensorSource>) = match spec.strip_prefix("builtin:") {
        Some(preset) => {
            let (config, tensors) = synth::builtin(preset, wants)?;
            (config, Box::new(tensors))
        }
        None => {
            let dir = Path::new(spec);
            (Config::from_file(&dir.join("config.json"))?, Box::new(Checkpoint::open(dir)?))
        }
    };
    let mut bytes = 0;
    for name in src.names().into_iter().filter(|n| wants(n)) {
        bytes += src.raw(name)?.map_or(0, |t| t.data.len() as u64);
    }
    crate::progress::load().expect(bytes);
    Ok((config, src))
}

/// Whether `name` is a copy the engine never loads: DeepSeek-V3 stores the embedding and the
/// output head again in its MTP layers (`model.layers.61.embed_tokens`, `…shared_head.head`),
/// identical to the main model's.
fn is_unused_copy(name: &str) -> bool {
    (name.ends_with(".embed_tokens.weight") && name != "model.embed_tokens.weight")
        || name.ends_with(".shared_head.head.weight")
}

/// Whether `name` is a routed expert's tensor.
pub fn is_routed_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// The layer and expert of a routed expert's tensor (`model.layers.{l}.mlp.experts.{e}.…`).
fn expert_of(name: &str) -> Option<(usize, usize)> {
    let (layer, rest) = name.strip_prefix("model.layers.")?.split_once(".mlp.experts.")?;
    let expert = rest.split('.').next()?;
    Some((layer.parse().ok()?, expert.parse().ok()?))
}

/// Loads the model `spec` names with the routed experts `experts` selects, in the
/// checkpoint's precision.
pub fn open(spec: &str, experts: Experts) -> Result<Model> {
    open_as(spec, experts, Precision::Auto)
}

/// [`open`] with the weight matrices held in `precision`.
pub fn open_as(spec: &str, experts: Experts, precision: Precision) -> Result<Model> {
    let wants = |name: &str| {
        let routed =
            || expert_of(name).map_or(!matches!(experts, Experts::None), |(l, e)| experts.wants(l, e));
        (!is_routed_expert(name) || routed()) && !is_unused_copy(name)
    };
    let (config, src) = open_tensors(spec, &wants)?;
    Model::load_as(config, src.as_ref(), experts, precision)
}
