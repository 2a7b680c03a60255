use std::path::PathBuf;

/// What went wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON for this file")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A `config.json` key holds a value kubemoe cannot run; says what to change.
    #[error("{path}: key `{key}`: {reason}")]
    Config { path: String, key: String, reason: String },
    #[error(
        "unsupported architecture `{model_type}` (config.json `model_type`): kubemoe runs deepseek_v2 and deepseek_v3"
    )]
    UnsupportedArchitecture { model_type: String },
    #[error("tensor `{name}` is missing from {checkpoint}")]
    MissingTensor { name: String, checkpoint: String },
    #[error("tensor `{name}` in {checkpoint} has shape {actual:?}, config.json implies {expected:?}")]
    Shape { name: String, checkpoint: String, actual: Vec<usize>, expected: Vec<usize> },
    #[error(
        "tensor `{name}` in {checkpoint} has dtype {dtype}, which kubemoe cannot load (F32, BF16, F16, or F8_E4M3 with a weight_scale_inv)"
    )]
    UnsupportedDtype { name: String, checkpoint: String, dtype: String },
    #[error("tensor `{name}` in {checkpoint} holds {value} at flat index {index}: weights must be finite")]
    NonFinite { name: String, checkpoint: String, index: usize, value: f32 },
    /// A step produced NaN or infinite logits: never sampled (the argmax of NaNs is token 0).
    #[error("the model's logits are not finite (NaN or infinite) at this step: the weights or activations overflowed")]
    NonFiniteLogits,
    #[error("safetensors file {path} is malformed")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: safetensors::SafeTensorError,
    },
    #[error("{0}")]
    Checkpoint(String),
    #[error("input id {id} at position {position} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenOutOfVocab { id: u32, position: usize, vocab_size: usize },
    #[error("sequence of {len} tokens exceeds max_position_embeddings {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("expert {expert} of layer {layer} is not loaded in this process")]
    ExpertNotLoaded { layer: usize, expert: usize },
    /// The workers computing routed experts failed (unreachable, timed out, refused).
    #[error("routed experts of layer {layer} unavailable")]
    ExpertsUnavailable {
        layer: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("kernel failed")]
    Kernel(#[from] kubemoe_kernels::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
