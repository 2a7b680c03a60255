//! Compute primitives for DeepSeek-family MoE inference, on the CPU and, with the `cuda`
//! feature, on NVIDIA GPUs ([`device`] is what both provide; `cuda` states the GPU's rules).
//!
//! Every kernel takes flat row-major `f32` slices plus their dimensions, checks that the
//! slices cover those dimensions (a [`Error::Shape`] otherwise), and reduces in `f32`.
//! The kernels know nothing of models, checkpoints or networks: the `model` crate composes
//! them into DeepSeek-V2/V3 layers, following the math of the DeepSeek-V2 and DeepSeek-V3
//! technical reports (arXiv:2405.04434, arXiv:2412.19437) and transformers' modelling code.
//! [`rng`] is kubemoe's one random source; [`rel_err`] is how its tests compare results.

pub mod activation;
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod gate;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod pool;
pub mod rng;
pub mod rope;
pub mod weight;

pub use matmul::{linear, matmul, View};
pub use weight::Weight;

/// What went wrong inside a kernel call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A slice does not cover the dimensions it was passed with.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// Parameters that cannot describe a valid computation.
    #[error("{op}: invalid parameter: {detail}")]
    Param { op: &'static str, detail: String },
    /// A stored value that is NaN or infinite, or widens to one.
    #[error("{what} value at index {index} is {value}: the checkpoint is corrupt or was saved after a diverged step")]
    NonFinite { what: &'static str, index: usize, value: f32 },
    /// A CUDA library is missing, or the driver, NVRTC or a launch failed.
    #[cfg(feature = "cuda")]
    #[error("CUDA {what}: {detail}")]
    Cuda { what: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fails with [`Error::Shape`] unless `len >= need`.
pub(crate) fn check_len(op: &'static str, what: &str, len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(Error::Shape { op, detail: format!("{what} holds {len} values, needs {need}") });
    }
    Ok(())
}

/// Relative error `‖a − b‖ / ‖b‖` of `a` against the reference `b` (f32 or f64): how every
/// kubemoe test compares a result with its reference.
pub fn rel_err<T: Copy + Into<f64>>(a: &[f32], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err of slices of different lengths");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - (*y).into()).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y).into().powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}
