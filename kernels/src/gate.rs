//! The MoE gates of DeepSeek-V2 and V3: which experts each token goes to, with what weight.
//!
//! - V3 (`noaux_tc`, DeepSeek-V3 report §2.1.2): `s = sigmoid(logits)`; choice scores
//!   `s' = s + e_score_correction_bias`; a group scores the sum of its top two `s'`; the best
//!   `topk_group` groups stay, the others are set to −∞; the top-k `s'` pick the experts;
//!   their weights are `s`, normalised when `norm_topk_prob`, times `routed_scaling_factor`.
//! - V2 (`greedy`, `group_limited_greedy`, DeepSeek-V2 report §2.2): `s = softmax(logits)`;
//!   top-k over all experts, or over the `topk_group` groups with the largest maximum score;
//!   weights are `s`, normalised when `norm_topk_prob` (and `top_k > 1`), otherwise scaled.
//!
//! Ties go to the lower expert id. Each token's experts come out sorted by id.

use crate::activation::{sigmoid, softmax_inplace};
use crate::{check_len, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    Greedy,
    GroupLimitedGreedy,
    NoauxTc,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GateParams {
    pub n_experts: usize,
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub scoring: Scoring,
    pub method: TopkMethod,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl GateParams {
    /// Checks that the parameters describe a gate that can pick `top_k` experts.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::Param { op: "gate", detail });
        if self.n_experts == 0 || self.top_k == 0 || self.top_k > self.n_experts {
            return bad(format!("top_k {} of {} experts", self.top_k, self.n_experts));
        }
        if self.method != TopkMethod::Greedy {
            if self.n_group == 0 || !self.n_experts.is_multiple_of(self.n_group) {
                return bad(format!("{} experts do not split into {} groups", self.n_experts, self.n_group));
            }
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return bad(format!("topk_group {} of {} groups", self.topk_group, self.n_group));
            }
            if self.topk_group * (self.n_experts / self.n_group) < self.top_k {
                return bad(format!(
                    "{} groups of {} experts cannot supply top_k {}",
                    self.topk_group,
                    self.n_experts / self.n_group,
                    self.top_k
                ));
            }
        }
        Ok(())
    }
}

/// Indices of the `k` largest values, ties to the lower index, in descending order.
fn top_indices(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (i, v) in values.iter().enumerate() {
            if out.contains(&i) {
                continue;
            }
            if best.is_none_or(|b| *v > values[b]) {
                best = Some(i);
            }
        }
        out.extend(best);
    }
}

/// Routes each of the `tokens` rows of `logits` [tokens, n_experts] (the gate's linear
/// output, f32) to `top_k` experts: `ids` and `weights` are [tokens, top_k].
pub fn route(
    p: &GateParams,
    logits: &[f32],
    bias: Option<&[f32]>,
    ids: &mut [u32],
    weights: &mut [f32],
) -> Result<()> {
    p.validate()?;
    let (e, k) = (p.n_experts, p.top_k);
    let tokens = logits.len() / e;
    check_len("gate", "logits", logits.len(), tokens * e)?;
    check_len("gate", "ids", ids.len(), tokens * k)?;
    check_len("gate", "weights", weights.len(), tokens * k)?;
    if let Some(b) = bias {
        check_len("gate", "e_score_correction_bias", b.len(), e)?;
    }
    let group_size = e / p.n_group.max(1);
    let mut scores = vec![0f32; e];
    let mut choice = vec![0f32; e];
    let mut group_scores = vec![0f32; p.n_group.max(1)];
    let (mut picked, mut groups, mut pair) = (Vec::new(), Vec::new(), Vec::new());
    for t in 0..tokens {
        let row = &logits[t * e..(t + 1) * e];
        match p.scoring {
            Scoring::Sigmoid => scores.iter_mut().zip(row).for_each(|(s, l)| *s = sigmoid(*l)),
            Scoring::Softmax => {
                scores.copy_from_slice(row);
                softmax_inplace(&mut scores);
            }
        }
        choice.copy_from_slice(&scores);
        if let (TopkMethod::NoauxTc, Some(b)) = (p.method, bias) {
            choice.iter_mut().zip(b).for_each(|(c, b)| *c += b);
        }
        if p.method != TopkMethod::Greedy {
            for (g, gs) in group_scores.iter_mut().enumerate() {
                let members = &choice[g * group_size..(g + 1) * group_size];
                *gs = if p.method == TopkMethod::NoauxTc {
                    top_indices(members, 2.min(group_size), &mut pair);
                    pair.iter().map(|i| members[*i]).sum()
                } else {
                    members.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                };
            }
            top_indices(&group_scores, p.topk_group, &mut groups);
            for g in 0..p.n_group {
                if !groups.contains(&g) {
                    choice[g * group_size..(g + 1) * group_size].fill(f32::NEG_INFINITY);
                }
            }
        }
        top_indices(&choice, k, &mut picked);
        picked.sort_unstable();
        let w = &mut weights[t * k..(t + 1) * k];
        for (slot, &i) in picked.iter().enumerate() {
            ids[t * k + slot] = i as u32;
            w[slot] = scores[i];
        }
        let normalise = p.norm_topk_prob && (p.method == TopkMethod::NoauxTc || k > 1);
        if normalise {
            let denom = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|x| *x /= denom);
        }
        if p.method == TopkMethod::NoauxTc || !normalise {
            w.iter_mut().for_each(|x| *x *= p.routed_scaling_factor);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(n_experts: usize, top_k: usize, n_group: usize, topk_group: usize) -> GateParams {
        GateParams {
            n_experts,
            top_k,
            n_group,
            topk_group,
            scoring: Scoring::Sigmoid,
            method: TopkMethod::NoauxTc,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        }
    }

    #[test]
    fn v3_keeps_best_groups_by_top_two_sum_and_uses_unbiased_weights() {
        // 8 experts, 4 groups of 2, keep 2 groups, pick 2 experts.
        // Group sums of choice scores decide; group 1 has the single best expert but a weak
        // partner, so groups 2 and 3 win.
        let logits = [0.0f32, 0.0, 3.0, -3.0, 1.0, 1.0, 1.2, 0.9];
        let bias = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let p = v3(8, 2, 4, 2);
        let (mut ids, mut w) = (vec![0u32; 2], vec![0f32; 2]);
        route(&p, &logits, Some(&bias), &mut ids, &mut w).unwrap();
        assert_eq!(ids, vec![4, 6]);
        let (s4, s6) = (sigmoid(1.0), sigmoid(1.2));
        assert!((w[0] - 2.5 * s4 / (s4 + s6)).abs() < 1e-6);
        assert!((w[1] - 2.5 * s6 / (s4 + s6)).abs() < 1e-6);
        // The correction bias changes the choice but not the weights.
        let bias = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0];
        route(&p, &logits, Some(&bias), &mut ids, &mut w).unwrap();
        assert_eq!(ids, vec![6, 7]);
        let s7 = sigmoid(0.9);
        assert!((w[1] - 2.5 * s7 / (s6 + s7)).abs() < 1e-6);
    }

    #[test]
    fn dropped_groups_are_minus_infinity_not_zero() {
        // With a strongly negative bias, zero-masking would let dropped groups win.
        let logits = [0.0f32; 4];
        let bias = [-2.0f32, -2.0, -3.0, -3.0];
        let p = v3(4, 2, 2, 1);
        let (mut ids, mut w) = (vec![0u32; 2], vec![0f32; 2]);
        route(&p, &logits, Some(&bias), &mut ids, &mut w).unwrap();
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn v2_greedy_scales_without_normalising_and_group_limited_uses_max() {
        let logits = [1.0f32, 2.0, 0.5, 1.9];
        let mut p = GateParams {
            n_experts: 4,
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            scoring: Scoring::Softmax,
            method: TopkMethod::Greedy,
            norm_topk_prob: false,
            routed_scaling_factor: 16.0,
        };
        let mut probs = logits.to_vec();
        softmax_inplace(&mut probs);
        let (mut ids, mut w) = (vec![0u32; 2], vec![0f32; 2]);
        route(&p, &logits, None, &mut ids, &mut w).unwrap();
        assert_eq!(ids, vec![1, 3]);
        assert!((w[0] - 16.0 * probs[1]).abs() < 1e-6);
        // Group 0 = {0, 1} (max 2.0) beats group 1 = {2, 3} (max 1.9).
        p.method = TopkMethod::GroupLimitedGreedy;
        route(&p, &logits, None, &mut ids, &mut w).unwrap();
        assert_eq!(ids, vec![0, 1]);
        p.norm_topk_prob = true;
        route(&p, &logits, None, &mut ids, &mut w).unwrap();
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn impossible_parameters_are_refused() {
        let p = v3(16, 8, 4, 1);
        let err = route(&p, &[0.0; 16], None, &mut [0; 8], &mut [0.0; 8]).unwrap_err();
        assert!(err.to_string().contains("cannot supply top_k"), "{err}");
        assert!(v3(16, 2, 5, 1).validate().is_err());
    }
}
