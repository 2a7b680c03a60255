//! Compute primitives for DeepSeek-family MoE inference, on the CPU.
//!
//! Every kernel takes flat row-major `f32` slices plus their dimensions, checks that the
//! slices cover those dimensions (a [`Error::Shape`] otherwise), and reduces in `f32`.
//! The kernels know nothing of models, checkpoints or networks: the `model` crate composes
//! them into DeepSeek-V2/V3 layers, following the math of `DESIGN.md` §2.

pub mod activation;
pub mod attention;
pub mod dtype;
pub mod gate;
pub mod matmul;
pub mod moe;
pub mod norm;
pub mod rope;

pub use matmul::{linear, matmul, View};

/// What went wrong inside a kernel call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A slice does not cover the dimensions it was passed with.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// Parameters that cannot describe a valid computation.
    #[error("{op}: invalid parameter: {detail}")]
    Param { op: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Fails with [`Error::Shape`] unless `len >= need`.
pub(crate) fn check_len(op: &'static str, what: &str, len: usize, need: usize) -> Result<()> {
    if len < need {
        return Err(Error::Shape { op, detail: format!("{what} holds {len} values, needs {need}") });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A small deterministic generator for test inputs (xorshift64*).
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.next_f32()).collect()
        }
    }

    pub fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-300)).sqrt()
    }
}
