//! Grouped expert FFN: tokens grouped by expert, one matrix product per expert and
//! projection, so that each expert's weights stream through the cache once per step
//! (the grouped-GEMM formulation of MegaBlocks, Gale et al. 2022, on the CPU).
//!
//! Experts run in parallel on the rayon pool once their work is large enough to pay for it;
//! each expert's products run single-threaded.
//! Results are summed per token in expert order, so the output does not depend on threads.

use crate::activation::swiglu_inplace;
use crate::weight::{Lines, Weight};
use crate::{check_len, Error, Result, View};
use rayon::prelude::*;

/// One expert's SwiGLU weights in the PyTorch layout: `gate_proj`, `up_proj` [inter, hidden],
/// `down_proj` [hidden, inter], each in the precision it is held in.
#[derive(Clone, Copy, Debug)]
pub struct ExpertRef<'a> {
    pub gate_proj: &'a Weight,
    pub up_proj: &'a Weight,
    pub down_proj: &'a Weight,
}

impl ExpertRef<'_> {
    /// `[rows, cols]` of `gate_proj`, `up_proj`, `down_proj`.
    pub fn shapes(&self) -> [[usize; 2]; 3] {
        [self.gate_proj, self.up_proj, self.down_proj].map(|w| [w.rows(), w.cols()])
    }
}

/// Token `token` (a row of the input) goes to `expert` (an index into the expert list) with
/// weight `weight`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Assignment {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// `out[t] += Σ weight · Expert(x[t])` over the assignments of token `t`.
///
/// `x` and `out` are [tokens, hidden]; every expert is `hidden → inter → hidden`.
pub fn grouped_expert_ffn(
    x: &[f32],
    hidden: usize,
    inter: usize,
    experts: &[ExpertRef<'_>],
    assignments: &[Assignment],
    out: &mut [f32],
) -> Result<()> {
    let tokens = x.len() / hidden.max(1);
    check_len("expert_ffn", "output", out.len(), tokens * hidden)?;
    check_experts(hidden, inter, experts.iter().map(ExpertRef::shapes))?;
    let (counts, order) = sort_by_expert(assignments, experts.len(), tokens)?;
    // Each expert writes its rows of `y` [assignments, hidden] in sorted order.
    let mut y = vec![0f32; assignments.len() * hidden];
    let mut work = Vec::new();
    let (mut rest_y, mut rest_order) = (&mut y[..], &order[..]);
    for (e, &c) in counts.iter().enumerate() {
        let (ye, ry) = rest_y.split_at_mut(c * hidden);
        let (oe, ro) = rest_order.split_at(c);
        (rest_y, rest_order) = (ry, ro);
        if c > 0 {
            work.push((e, ye, oe));
        }
    }
    let run = |(e, ye, oe): (usize, &mut [f32], &[usize])| -> Result<()> {
        let c = oe.len();
        let mut xs = Lines::zeroed(c * hidden);
        for (row, &ai) in xs.chunks_mut(hidden).zip(oe) {
            let t = assignments[ai].token as usize;
            row.copy_from_slice(&x[t * hidden..(t + 1) * hidden]);
        }
        let w = &experts[e];
        let mut g = Lines::zeroed(c * inter);
        let mut u = vec![0f32; c * inter];
        w.gate_proj.view().linear(View::new(&xs, c, hidden)?, &mut g, inter)?; // [c, inter]
        w.up_proj.view().linear(View::new(&xs, c, hidden)?, &mut u, inter)?; // [c, inter]
        swiglu_inplace(&mut g, &u);
        w.down_proj.view().linear(View::new(&g, c, inter)?, ye, hidden) // [c, hidden]
    };
    // Threads pay off only once the experts' work is large: waking the pool costs tens of
    // microseconds, as much as a decode token's experts in a small model.
    if assignments.len() * 3 * hidden * inter >= 1 << 20 && crate::pool::may_split() {
        work.into_par_iter().try_for_each(|w| crate::pool::task(|| run(w)))?;
    } else {
        work.into_iter().try_for_each(run)?;
    }
    for (row, &ai) in y.chunks(hidden).zip(&order) {
        let a = assignments[ai];
        let t = a.token as usize;
        for (o, v) in out[t * hidden..(t + 1) * hidden].iter_mut().zip(row) {
            *o += a.weight * v;
        }
    }
    Ok(())
}

/// Fails unless every expert is `hidden → inter → hidden`: `experts` gives each one's
/// `[rows, cols]` of `gate_proj`, `up_proj`, `down_proj`, wherever its weights are held.
pub(crate) fn check_experts(
    hidden: usize,
    inter: usize,
    experts: impl IntoIterator<Item = [[usize; 2]; 3]>,
) -> Result<()> {
    for (i, shapes) in experts.into_iter().enumerate() {
        if shapes != [[inter, hidden], [inter, hidden], [hidden, inter]] {
            return Err(Error::Shape {
                op: "expert_ffn",
                detail: format!(
                    "expert {i} weights are {shapes:?}, an expert of hidden size {hidden} and \
                     intermediate size {inter} needs [[{inter}, {hidden}], [{inter}, {hidden}], [{hidden}, {inter}]]"
                ),
            });
        }
    }
    Ok(())
}

/// The assignments sorted by expert (a counting sort, stable): `counts[e]` of them go to expert
/// `e`, and `order` lists their indices, expert 0's first. Refuses an assignment outside
/// `tokens` or `experts`.
pub(crate) fn sort_by_expert(
    assignments: &[Assignment],
    experts: usize,
    tokens: usize,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut counts = vec![0usize; experts];
    for a in assignments {
        if a.expert as usize >= experts || a.token as usize >= tokens {
            return Err(Error::Param {
                op: "expert_ffn",
                detail: format!(
                    "assignment of token {} to expert {} outside {tokens} tokens and {experts} experts",
                    a.token, a.expert
                ),
            });
        }
        counts[a.expert as usize] += 1;
    }
    let mut next: Vec<usize> = counts
        .iter()
        .scan(0, |acc, c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect();
    let mut order = vec![0usize; assignments.len()];
    for (i, a) in assignments.iter().enumerate() {
        order[next[a.expert as usize]] = i;
        next[a.expert as usize] += 1;
    }
    Ok((counts, order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel_err;
    use crate::rng::Rng;

    #[test]
    fn matches_per_token_f64_reference() {
        let mut rng = Rng::new(9);
        let (hidden, inter, n_exp, tokens) = (24, 10, 5, 7);
        let weights: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..n_exp)
            .map(|_| (rng.vec(inter * hidden), rng.vec(inter * hidden), rng.vec(hidden * inter)))
            .collect();
        let held: Vec<[Weight; 3]> = weights
            .iter()
            .map(|(g, u, d)| {
                [(g, inter, hidden), (u, inter, hidden), (d, hidden, inter)]
                    .map(|(w, r, c)| Weight::from_f32(w.clone(), r, c).unwrap())
            })
            .collect();
        let experts: Vec<ExpertRef> =
            held.iter().map(|[g, u, d]| ExpertRef { gate_proj: g, up_proj: u, down_proj: d }).collect();
        let x = rng.vec(tokens * hidden);
        let mut assignments = Vec::new();
        for t in 0..tokens {
            for k in 0..2 {
                let e = (t * 3 + k * 2) % n_exp;
                assignments.push(Assignment { token: t as u32, expert: e as u32, weight: 0.3 + k as f32 });
            }
        }
        let mut out = vec![1f32; tokens * hidden];
        grouped_expert_ffn(&x, hidden, inter, &experts, &assignments, &mut out).unwrap();
        let mut want = vec![1f64; tokens * hidden];
        for a in &assignments {
            let (g, u, d) = &weights[a.expert as usize];
            let xt = &x[a.token as usize * hidden..][..hidden];
            let h: Vec<f64> = (0..inter)
                .map(|i| {
                    let gv: f64 = (0..hidden).map(|j| g[i * hidden + j] as f64 * xt[j] as f64).sum();
                    let uv: f64 = (0..hidden).map(|j| u[i * hidden + j] as f64 * xt[j] as f64).sum();
                    gv / (1.0 + (-gv).exp()) * uv
                })
                .collect();
            for j in 0..hidden {
                let dv: f64 = (0..inter).map(|i| d[j * inter + i] as f64 * h[i]).sum();
                want[a.token as usize * hidden + j] += a.weight as f64 * dv;
            }
        }
        assert!(rel_err(&out, &want) < 1e-6);
    }

    #[test]
    fn out_of_range_assignment_is_refused() {
        let w = Weight::from_f32(vec![0f32; 4], 2, 2).unwrap();
        let e = [ExpertRef { gate_proj: &w, up_proj: &w, down_proj: &w }];
        let a = [Assignment { token: 0, expert: 1, weight: 1.0 }];
        let err = grouped_expert_ffn(&[0.0; 2], 2, 2, &e, &a, &mut [0.0; 2]).unwrap_err();
        assert!(err.to_string().contains("expert 1"), "{err}");
    }
}
