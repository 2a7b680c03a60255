//! Opening a model by the name a user gives it: a checkpoint directory or `builtin:<preset>`.

use crate::checkpoint::Checkpoint;
use crate::{synth, Config, Experts, Model, Result};
use std::path::Path;

/// Loads `spec` (a Hugging Face model directory, or `builtin:<preset>`).
pub fn open(spec: &str, experts: Experts) -> Result<Model> {
    if let Some(preset) = spec.strip_prefix("builtin:") {
        let (config, tensors) = synth::builtin(preset)?;
        return Model::load(config, &tensors, experts);
    }
    let dir = Path::new(spec);
    let config = Config::from_file(&dir.join("config.json"))?;
    Model::load(config, &Checkpoint::open(dir)?, experts)
}
