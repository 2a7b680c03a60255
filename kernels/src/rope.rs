//! Rotary position embeddings (Su et al. 2021, RoFormer) with YaRN context extension
//! (Peng et al. 2023), as DeepSeek-V2/V3 apply them to the `qk_rope_head_dim` part of
//! queries and the shared key.
//!
//! Pairs are interleaved `(x[2i], x[2i+1])` (DeepSeek's `rope_interleave: true`, the
//! checkpoint's native layout) or split halves `(x[i], x[i + d/2])`. The rotated values stay
//! in the input layout; Hugging Face's interleaved path permutes them to halves, which
//! changes no dot product between a query and a key rotated the same way.

use crate::{Error, Result};

/// YaRN parameters, named as in the `rope_scaling` block of a DeepSeek `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
}

/// `0.1 · m · ln(s) + 1` for `s > 1`: YaRN's attention temperature for scale `s`.
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

impl Yarn {
    /// The factor DeepSeek multiplies the softmax scale by (`mscale²` under YaRN).
    pub fn softmax_scale_factor(&self) -> f64 {
        let m = yarn_mscale(self.factor, self.mscale_all_dim);
        m * m
    }
}

/// Precomputed inverse frequencies for one rotary dimension.
#[derive(Clone, Debug)]
pub struct Rope {
    pub(crate) inv_freq: Vec<f64>,
    /// Multiplies cos and sin (YaRN's `mscale / mscale_all_dim` ratio; 1 without YaRN).
    pub(crate) attention_factor: f64,
    pub(crate) interleaved: bool,
}

impl Rope {
    pub fn new(dim: usize, theta: f64, yarn: Option<&Yarn>, interleaved: bool) -> Result<Self> {
        if dim == 0 || !dim.is_multiple_of(2) || theta <= 1.0 {
            return Err(Error::Param {
                op: "rope",
                detail: format!("rotary dimension {dim} must be even and theta {theta} above 1"),
            });
        }
        let half = dim / 2;
        let base: Vec<f64> = (0..half).map(|i| theta.powf(2.0 * i as f64 / dim as f64)).collect();
        let Some(y) = yarn else {
            return Ok(Self {
                inv_freq: base.iter().map(|b| 1.0 / b).collect(),
                attention_factor: 1.0,
                interleaved,
            });
        };
        if y.factor <= 0.0 || y.original_max_position_embeddings <= 0.0 {
            return Err(Error::Param {
                op: "rope",
                detail: "yarn factor and original_max_position_embeddings must be positive".into(),
            });
        }
        // Dimensions rotating faster than `beta_fast` turns over the original context keep
        // their frequency, slower than `beta_slow` are interpolated by `factor`, a linear ramp
        // between (YaRN §3.2, DeepSeek's `yarn_find_correction_range`).
        let correction_dim = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * theta.ln())
        };
        let low = correction_dim(y.beta_fast).floor().max(0.0);
        let high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
        let high = if low == high { high + 0.001 } else { high };
        let inv_freq = base
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let (extra, inter) = (1.0 / b, 1.0 / (y.factor * b));
                inter * (1.0 - extrapolation) + extra * extrapolation
            })
            .collect();
        let attention_factor = yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim);
        Ok(Self { inv_freq, attention_factor, interleaved })
    }

    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// Rotates, for every `stride`-long row of `x`, the `dim` values at `offset`, all at
    /// position `pos` (the heads of one token).
    pub fn rotate(&self, x: &mut [f32], stride: usize, offset: usize, pos: usize) -> Result<()> {
        let dim = self.dim();
        if offset + dim > stride || !x.len().is_multiple_of(stride) {
            return Err(Error::Shape {
                op: "rope",
                detail: format!(
                    "{} values in rows of {stride} cannot hold {dim} rotary values at {offset}",
                    x.len()
                ),
            });
        }
        // Angles in f32 as the reference computes `position · inv_freq`, then cos/sin.
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let angle = (pos as f32 * *f as f32) as f64;
                ((angle.cos() * self.attention_factor) as f32, (angle.sin() * self.attention_factor) as f32)
            })
            .unzip();
        let half = dim / 2;
        for row in x.chunks_mut(stride) {
            let v = &mut row[offset..offset + dim];
            for i in 0..half {
                let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
                let (x0, x1) = (v[a], v[b]);
                v[a] = x0 * cos[i] - x1 * sin[i];
                v[b] = x1 * cos[i] + x0 * sin[i];
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn rotation_is_relative_and_norm_preserving() {
        let rope = Rope::new(8, 10000.0, None, true).unwrap();
        let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).cos()).collect();
        let at = |v: &[f32], p| {
            let mut v = v.to_vec();
            rope.rotate(&mut v, 8, 0, p).unwrap();
            v
        };
        // q at m, k at n depends on m - n only.
        let d1 = dot(&at(&q, 9), &at(&k, 4));
        let d2 = dot(&at(&q, 25), &at(&k, 20));
        assert!((d1 - d2).abs() < 1e-4, "{d1} {d2}");
        assert!((dot(&at(&q, 13), &at(&q, 13)) - dot(&q, &q)).abs() < 1e-4);
        assert_eq!(at(&q, 0), q);
    }

    #[test]
    fn interleaved_pairs_match_complex_multiplication() {
        let rope = Rope::new(4, 100.0, None, true).unwrap();
        let mut v = vec![1.0f32, 2.0, 3.0, 4.0];
        rope.rotate(&mut v, 4, 0, 3).unwrap();
        let f1 = 1.0f64 / 100f64.powf(0.5);
        let want = [
            (3f64.cos() - 2.0 * 3f64.sin()),
            (2.0 * 3f64.cos() + 3f64.sin()),
            (3.0 * (3.0 * f1).cos() - 4.0 * (3.0 * f1).sin()),
            (4.0 * (3.0 * f1).cos() + 3.0 * (3.0 * f1).sin()),
        ];
        for (a, b) in v.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
    }

    #[test]
    fn yarn_interpolates_slow_dimensions_only() {
        let y = Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
        };
        let plain = Rope::new(64, 10000.0, None, true).unwrap();
        let yarn = Rope::new(64, 10000.0, Some(&y), true).unwrap();
        // Fastest frequency unchanged, slowest divided by the factor.
        assert!((yarn.inv_freq[0] - plain.inv_freq[0]).abs() < 1e-12);
        assert!((yarn.inv_freq[31] - plain.inv_freq[31] / 40.0).abs() < 1e-12);
        assert!((yarn.attention_factor - 1.0).abs() < 1e-12);
        assert!((y.softmax_scale_factor() - (0.1 * 40f64.ln() + 1.0).powi(2)).abs() < 1e-12);
    }

    #[test]
    fn odd_dimension_is_refused() {
        assert!(Rope::new(7, 10000.0, None, true).is_err());
    }
}
