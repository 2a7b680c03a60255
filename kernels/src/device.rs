//! Where kernels run. [`Device`] is the set of operations every device provides, over host
//! slices: the CPU ([`Cpu`], the reference) and, with the `cuda` feature, an NVIDIA GPU
//! (`cuda::Gpu`, which implements each one with its own CUDA kernel). Tests are written once
//! over `&dyn Device` and run on every device present (`kernels/tests/devices.rs`);
//! `scripts/gpu-check` runs them with a GPU required.
//!
//! Host slices in, host values out: on a GPU each call copies its inputs to the device and its
//! result back, which is what comparing devices needs. The GPU's methods on device buffers,
//! which these wrap, are the ones that keep data on the device.

use crate::attention::{latent_attention, Latent};
use crate::gate::{route, GateParams};
use crate::moe::{grouped_expert_ffn, Assignment, ExpertRef};
use crate::norm::rms_norm_inplace;
use crate::rope::Rope;
use crate::{Error, Result, Weight};

/// Where a process computes: `cpu`, or GPU `N` (`cuda:N`; `cuda` is `cuda:0`), the syntax of
/// `--device`. Parsing accepts `cuda:N` in every build; opening a GPU needs the `cuda` feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Param {
            op: "device",
            detail: format!("`{s}`: use cpu, cuda or cuda:N (N a GPU's index)"),
        };
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Self::Cuda).ok_or_else(bad),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

pub trait Device {
    /// What the device is, for reports (`cpu`, or the GPU's name and ordinal).
    fn name(&self) -> String;

    /// RMSNorm of each `weight.len()`-long row of `x`.
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Result<Vec<f32>>;

    /// `silu(gate) ⊙ up`.
    fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>>;

    /// `x` [tokens · heads, stride] with each of its rows' `rope.dim()` values at `offset`
    /// rotated to the position of its token: row `r` is token `r / heads`, at `positions[r / heads]`.
    fn rope(
        &self,
        rope: &Rope,
        x: &[f32],
        stride: usize,
        offset: usize,
        heads: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>>;

    /// `x [m, cols] · wᵀ` → [m, rows] (PyTorch's `Linear` without bias), `w` in its own precision.
    fn linear(&self, w: &Weight, x: &[f32]) -> Result<Vec<f32>>;

    /// Every value of `w` as f32 [rows, cols].
    fn widen(&self, w: &Weight) -> Result<Vec<f32>>;

    /// MLA attention on a latent cache, absorbed form: `out` [n, heads, rank] for absorbed
    /// queries `qa` [n, heads, rank + rope] of the last `n` positions of the cache whose rows
    /// `pages` hold in order (see [`latent_attention`]).
    fn latent_attention(&self, shape: Latent, qa: &[f32], pages: &[&[f32]], n: usize) -> Result<Vec<f32>>;

    /// The gate's expert ids and weights [tokens, top_k] for `logits` [tokens, n_experts].
    fn route(&self, p: &GateParams, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<u32>, Vec<f32>)>;

    /// `out[t] += Σ weight · Expert(x[t])` over the assignments of token `t`
    /// (see [`grouped_expert_ffn`]).
    fn grouped_expert_ffn(
        &self,
        x: &[f32],
        hidden: usize,
        inter: usize,
        experts: &[ExpertRef<'_>],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<()>;
}

/// The CPU: the crate's own kernels.
pub struct Cpu;

impl Device for Cpu {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Result<Vec<f32>> {
        let mut out = x.to_vec();
        rms_norm_inplace(&mut out, weight, eps)?;
        Ok(out)
    }

    fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        check_swiglu(gate, up)?;
        let mut out = gate.to_vec();
        crate::activation::swiglu_inplace(&mut out, up);
        Ok(out)
    }

    fn rope(
        &self,
        rope: &Rope,
        x: &[f32],
        stride: usize,
        offset: usize,
        heads: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        check_rope(x, stride, heads, positions)?;
        let mut out = x.to_vec();
        for (token, &pos) in out.chunks_mut(heads * stride).zip(positions) {
            rope.rotate(token, stride, offset, pos)?;
        }
        Ok(out)
    }

    fn linear(&self, w: &Weight, x: &[f32]) -> Result<Vec<f32>> {
        w.linear(x)
    }

    fn widen(&self, w: &Weight) -> Result<Vec<f32>> {
        Ok(w.widen_all())
    }

    fn latent_attention(&self, shape: Latent, qa: &[f32], pages: &[&[f32]], n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n * shape.heads * shape.rank];
        latent_attention(shape, qa, pages, n, &mut out)?;
        Ok(out)
    }

    fn route(&self, p: &GateParams, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<u32>, Vec<f32>)> {
        let tokens = logits.len() / p.n_experts.max(1);
        let (mut ids, mut weights) = (vec![0u32; tokens * p.top_k], vec![0f32; tokens * p.top_k]);
        route(p, logits, bias, &mut ids, &mut weights)?;
        Ok((ids, weights))
    }

    fn grouped_expert_ffn(
        &self,
        x: &[f32],
        hidden: usize,
        inter: usize,
        experts: &[ExpertRef<'_>],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<()> {
        grouped_expert_ffn(x, hidden, inter, experts, assignments, out)
    }
}

pub(crate) fn check_swiglu(gate: &[f32], up: &[f32]) -> Result<()> {
    if gate.len() != up.len() {
        return Err(Error::Shape {
            op: "swiglu",
            detail: format!("{} gate values, {} up values", gate.len(), up.len()),
        });
    }
    Ok(())
}

/// Fails unless `x` is `positions.len() · heads` rows of `stride` values.
pub(crate) fn check_rope(x: &[f32], stride: usize, heads: usize, positions: &[usize]) -> Result<()> {
    if stride == 0 || heads == 0 || x.len() != positions.len() * heads * stride {
        return Err(Error::Shape {
            op: "rope",
            detail: format!(
                "{} values are not {} tokens of {heads} rows of {stride}",
                x.len(),
                positions.len()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DeviceSpec;

    #[test]
    fn device_specs_parse_and_print() {
        for (text, spec) in
            [("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(0)), ("cuda:3", DeviceSpec::Cuda(3))]
        {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
    }
}
