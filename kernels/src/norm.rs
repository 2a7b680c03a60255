//! RMSNorm: `w ⊙ x / sqrt(mean(x²) + eps)` (Zhang & Sennrich 2019), as DeepSeek's
//! `DeepseekV3RMSNorm` computes it: the mean in f32, the weight applied after normalising.

use crate::{check_len, Result};

/// Normalises each `dim`-long row of `x` in place.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(crate::Error::Shape {
            op: "rms_norm",
            detail: format!("{} values are not rows of the weight's {dim}", x.len()),
        });
    }
    for row in x.chunks_mut(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *w * (*v * inv);
        }
    }
    Ok(())
}

/// Normalises row `r` of `src` (rows `src_ld` apart, first `dim` values) into `dst[r]`.
pub fn rms_norm_rows(src: &[f32], src_ld: usize, weight: &[f32], eps: f32, dst: &mut [f32]) -> Result<()> {
    let dim = weight.len();
    let rows = dst.len() / dim.max(1);
    check_len("rms_norm", "source", src.len(), rows.saturating_sub(1) * src_ld + dim)?;
    for (r, out) in dst.chunks_mut(dim).enumerate() {
        out.copy_from_slice(&src[r * src_ld..r * src_ld + dim]);
    }
    rms_norm_inplace(dst, weight, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel_err;
    use crate::rng::Rng;

    #[test]
    fn matches_f64_reference() {
        let mut rng = Rng::new(11);
        let (rows, dim) = (5, 48);
        let x = rng.vec(rows * dim);
        let w = rng.vec(dim);
        let mut want = vec![0f64; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                want[r * dim + i] = w[i] as f64 * row[i] as f64 / (ms + 1e-6).sqrt();
            }
        }
        let mut got = x.clone();
        rms_norm_inplace(&mut got, &w, 1e-6).unwrap();
        assert!(rel_err(&got, &want) < 1e-6);
        let mut dst = vec![0f32; 2 * 8];
        rms_norm_rows(&x, dim, &w[..8], 1e-6, &mut dst).unwrap();
        let mut first = x[..8].to_vec();
        rms_norm_inplace(&mut first, &w[..8], 1e-6).unwrap();
        assert_eq!(&dst[..8], &first[..]);
    }

    #[test]
    fn ragged_input_is_refused() {
        let mut x = vec![0f32; 7];
        assert!(rms_norm_inplace(&mut x, &[1.0; 3], 1e-6).is_err());
    }
}
