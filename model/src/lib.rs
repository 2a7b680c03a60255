//! DeepSeek-V2/V3 family models: `config.json`, safetensors loading by Hugging Face tensor
//! name, the layers, a single-process forward pass with the MLA latent KV cache, sampling,
//! and generated models for tests, benchmarks and `builtin:` deployments.

pub mod bench;
pub mod checkpoint;
pub mod config;
mod error;
pub mod generate;
pub mod layers;
pub mod memory;
mod mmap;
pub mod model;
pub mod progress;
pub mod sampling;
pub mod source;
pub mod synth;

pub use checkpoint::Precision;
pub use config::Config;
pub use error::{Error, Result};
pub use layers::Experts;
pub use model::{KvCache, Model, MtpRows, Pages, Trace, PAGE_TOKENS};
pub use sampling::{Logprobs, Sampler, SamplingParams};
