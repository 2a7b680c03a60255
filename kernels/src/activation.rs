//! Activations of the DeepSeek MLPs.

/// `gate[i] = silu(gate[i]) * up[i]`: the SwiGLU of `Expert(x) = W_down(silu(W_gate x) ⊙ W_up x)`.
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Logistic sigmoid, the V3 gate's scoring function.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// In-place softmax over one row, reduced in f32 after subtracting the maximum.
pub fn softmax_inplace(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_matches_definition() {
        let mut g = vec![-2.0f32, 0.0, 1.5];
        let u = vec![3.0f32, 4.0, -0.5];
        let want: Vec<f64> = [-2.0f64, 0.0, 1.5]
            .iter()
            .zip([3.0f64, 4.0, -0.5])
            .map(|(x, y)| x / (1.0 + (-x).exp()) * y)
            .collect();
        swiglu_inplace(&mut g, &u);
        for (a, b) in g.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_sums_to_one_and_handles_large_values() {
        let mut r = vec![1000.0f32, 1001.0, 999.0];
        softmax_inplace(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(r[1] > r[0] && r[0] > r[2]);
        let mut masked = vec![f32::NEG_INFINITY; 3];
        softmax_inplace(&mut masked);
        assert_eq!(masked, vec![0.0; 3]);
    }
}
