//! Causal scaled-dot-product attention (Vaswani et al. 2017) over rows of heads.
//!
//! Queries are new tokens at positions `first_pos..first_pos + n`; keys are every position
//! from 0. Query token `t` sees keys `0..=first_pos + t`. Softmax in f32.

use crate::activation::softmax_inplace;
use crate::{check_len, matmul, Result, View};

/// Scales and masks `scores` [n, heads, s] (query token, head, key position) in place and
/// turns each row into causal softmax probabilities.
pub fn causal_softmax(
    scores: &mut [f32],
    n: usize,
    heads: usize,
    s: usize,
    first_pos: usize,
    scale: f32,
) -> Result<()> {
    check_len("causal_softmax", "scores", scores.len(), n * heads * s)?;
    if first_pos + n > s {
        return Err(crate::Error::Shape {
            op: "causal_softmax",
            detail: format!("{n} queries from position {first_pos} need {} keys, have {s}", first_pos + n),
        });
    }
    for (row_idx, row) in scores.chunks_mut(s).take(n * heads).enumerate() {
        let visible = first_pos + row_idx / heads + 1;
        for v in &mut row[..visible] {
            *v *= scale;
        }
        softmax_inplace(&mut row[..visible]);
        row[visible..].fill(0.0);
    }
    Ok(())
}

/// Multi-head causal attention with one key and value per head.
///
/// `q` [n, heads, dqk], `k` [s, heads, dqk], `v` [s, heads, dv] → `out` [n, heads, dv].
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    s: usize,
    heads: usize,
    dqk: usize,
    dv: usize,
    first_pos: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check_len("attention", "output", out.len(), n * heads * dv)?;
    let mut scores = vec![0f32; n * s];
    for h in 0..heads {
        // scores[t, j] = q[t, h] · k[j, h]
        let qh = View::strided(&q[h * dqk..], n, dqk, heads * dqk)?;
        let kh = View::strided(&k[h * dqk..], s, dqk, heads * dqk)?;
        matmul(qh, kh, true, &mut scores, s, false)?;
        causal_softmax(&mut scores, n, 1, s, first_pos, scale)?;
        let vh = View::strided(&v[h * dv..], s, dv, heads * dv)?;
        matmul(View::new(&scores, n, s)?, vh, false, &mut out[h * dv..], heads * dv, false)?;
    }
    Ok(())
}

/// The shape of MLA attention on a latent cache (DeepSeek-V2 report §2.1.2, the absorbed
/// form): `heads` query heads against rows of `rank` latent values (`c_kv`) followed by `rope`
/// values of the shared rotary key (`k_pe`), scores scaled by `scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latent {
    pub heads: usize,
    pub rank: usize,
    pub rope: usize,
    pub scale: f32,
}

impl Latent {
    /// Values per cache row and per absorbed query: `rank + rope`.
    pub fn width(&self) -> usize {
        self.rank + self.rope
    }

    /// Cache rows in `cache`, after checking that `qa`, `cache` and `out` fit `n` queries.
    pub fn check(&self, qa: usize, cache: usize, n: usize, out: usize) -> Result<usize> {
        let w = self.width();
        if w == 0 || self.heads == 0 || !cache.is_multiple_of(w) || cache / w < n {
            return Err(crate::Error::Shape {
                op: "latent_attention",
                detail: format!("{cache} cache values are not rows of {w} for {n} queries"),
            });
        }
        check_len("latent_attention", "queries", qa, n * self.heads * w)?;
        check_len("latent_attention", "output", out, n * self.heads * self.rank)?;
        Ok(cache / w)
    }

    /// Values in `pages`, after checking that each holds whole rows.
    pub fn page_values(&self, pages: &[&[f32]]) -> Result<usize> {
        let w = self.width();
        if let Some(p) = pages.iter().find(|p| w == 0 || !p.len().is_multiple_of(w)) {
            return Err(crate::Error::Shape {
                op: "latent_attention",
                detail: format!("a page of {} values is not rows of {w}", p.len()),
            });
        }
        Ok(pages.iter().map(|p| p.len()).sum())
    }
}

/// `out` [n, heads, rank] = causal softmax(scale · `qa` · cacheᵀ) · `c_kv`: the absorbed
/// queries `qa` [n, heads, rank + rope] (`q_nopeᵀ W_k` then the roped `q_pe`) of the last `n`
/// of the `s` positions of a cache [s, rank + rope] held in `pages`, its rows in order, each
/// page whole rows (a paged cache's pages need not be adjacent in memory, as in vLLM's
/// PagedAttention, Kwon et al. 2023); query `i` sees positions `..= s - n + i`. The caller
/// applies `W_v` per head.
pub fn latent_attention(
    shape: Latent,
    qa: &[f32],
    pages: &[&[f32]],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    let w = shape.width();
    let s = shape.check(qa.len(), shape.page_values(pages)?, n, out.len())?;
    let (heads, r) = (shape.heads, shape.rank);
    let qa = View::new(&qa[..n * heads * w], n * heads, w)?;
    // Scores [n, heads, s] against every cached row, shared by all heads: one column block
    // per page.
    let mut scores = vec![0f32; n * heads * s];
    let mut first = 0;
    for page in pages.iter().filter(|p| !p.is_empty()) {
        let rows = page.len() / w;
        matmul(qa, View::new(page, rows, w)?, true, &mut scores[first..], s, false)?;
        first += rows;
    }
    causal_softmax(&mut scores, n, heads, s, s - n, shape.scale)?;
    // out = Σ over pages of their probabilities · their c_kv rows.
    let mut first = 0;
    for page in pages.iter().filter(|p| !p.is_empty()) {
        let rows = page.len() / w;
        let p = View::strided(&scores[first..], n * heads, rows, s)?;
        matmul(p, View::strided(page, rows, r, w)?, false, out, r, first > 0)?;
        first += rows;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel_err;
    use crate::rng::Rng;

    #[test]
    fn matches_f64_reference_with_offset_queries() {
        let mut rng = Rng::new(5);
        let (s, heads, dqk, dv, first) = (9, 3, 6, 4, 5);
        let n = s - first;
        let q = rng.vec(n * heads * dqk);
        let k = rng.vec(s * heads * dqk);
        let v = rng.vec(s * heads * dv);
        let scale = 0.37f32;
        let mut out = vec![0f32; n * heads * dv];
        causal_attention(&q, &k, &v, n, s, heads, dqk, dv, first, scale, &mut out).unwrap();
        let mut want = vec![0f64; n * heads * dv];
        for t in 0..n {
            for h in 0..heads {
                let vis = first + t + 1;
                let sc: Vec<f64> = (0..vis)
                    .map(|j| {
                        (0..dqk)
                            .map(|d| {
                                q[(t * heads + h) * dqk + d] as f64 * k[(j * heads + h) * dqk + d] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..dv {
                    want[(t * heads + h) * dv + d] =
                        (0..vis).map(|j| e[j] / z * v[(j * heads + h) * dv + d] as f64).sum();
                }
            }
        }
        assert!(rel_err(&out, &want) < 1e-6);
    }

    #[test]
    fn too_few_keys_is_refused() {
        let mut scores = vec![0f32; 4];
        assert!(causal_softmax(&mut scores, 2, 1, 2, 1, 1.0).is_err());
    }
}
