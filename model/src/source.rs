//! Opening a model by the name a user gives it: a checkpoint directory or `builtin:<preset>`.

use crate::checkpoint::{Checkpoint, TensorSource};
use crate::{synth, Config, Experts, Model, Result};
use std::path::Path;

/// The config and tensors of `spec` (a Hugging Face model directory, or `builtin:<preset>`).
/// A directory is mapped lazily whatever `wants` says; a builtin model generates only the
/// tensors `wants` accepts (a worker, its experts; a router, everything else).
pub fn open_tensors(spec: &str, wants: &dyn Fn(&str) -> bool) -> Result<(Config, Box<dyn TensorSource>)> {
    if let Some(preset) = spec.strip_prefix("builtin:") {
        let (config, tensors) = synth::builtin(preset, wants)?;
        return Ok((config, Box::new(tensors)));
    }
    let dir = Path::new(spec);
    let config = Config::from_file(&dir.join("config.json"))?;
    Ok((config, Box::new(Checkpoint::open(dir)?)))
}

/// Whether `name` is a routed expert's tensor.
pub fn is_routed_expert(name: &str) -> bool {
    name.contains(".mlp.experts.")
}

/// Loads the model `spec` names with the routed experts `experts` selects.
pub fn open(spec: &str, experts: Experts) -> Result<Model> {
    let wants = |name: &str| !is_routed_expert(name) || !matches!(experts, Experts::None);
    let (config, src) = open_tensors(spec, &wants)?;
    Model::load(config, src.as_ref(), experts)
}
