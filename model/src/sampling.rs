//! Next-token sampling: greedy, temperature, top-k, top-p (nucleus, Holtzman et al. 2020),
//! seeded. Filters apply in the order vLLM and transformers use: temperature, top-k, top-p.

use crate::{Error, Result};
use kubemoe_kernels::rng::Rng;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// 1 means no top-p filter.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "temperature {} must be 0 (greedy) or positive",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }
}

/// Samples tokens for one sequence.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// The index of the largest value, the lowest index on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// The log-probability of a chosen token and of the most likely tokens, under the model's own
/// distribution: the log-softmax of the raw logits, before temperature and filters (vLLM's
/// default `raw_logprobs`), so the numbers do not depend on how the token was sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub token: u32,
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first (lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

impl Logprobs {
    /// `logits`: [vocab] of one position; `token` was chosen from them.
    pub fn of(logits: &[f32], token: u32, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|l| ((l - max) as f64).exp()).sum();
        // log p(i) = l_i - max - ln(sum), with the sum in f64 over the whole vocabulary.
        let norm = max + sum.ln() as f32;
        let mut best: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(logits.len());
        let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if top > 0 && top < best.len() {
            best.select_nth_unstable_by(top - 1, order);
        }
        best.truncate(top);
        best.sort_by(order);
        Self {
            token,
            logprob: logits[token as usize] - norm,
            top: best.into_iter().map(|i| (i, logits[i as usize] - norm)).collect(),
        }
    }
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Self { params, rng })
    }

    /// The next token from `logits` [vocab]; refuses logits that are not all finite.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if !logits.iter().all(|l| l.is_finite()) {
            return Err(Error::NonFiniteLogits);
        }
        Ok(self.draw(logits))
    }

    /// Speculative sampling's verification of a `draft` token the drafter proposed with
    /// certainty (a greedy draft; Leviathan et al. ICML 2023, Chen et al. 2023): the token to
    /// emit at this position, `draft` itself when it is accepted. Greedy: the argmax (the draft
    /// is accepted iff it is the argmax). Sampling: the draft is accepted with probability
    /// p(draft) under this sampler's distribution p, otherwise a token is drawn from p without
    /// the draft; so every token comes out with probability p, as without speculation.
    pub fn verify(&mut self, logits: &[f32], draft: u32) -> Result<u32> {
        if !logits.iter().all(|l| l.is_finite()) {
            return Err(Error::NonFiniteLogits);
        }
        if self.is_greedy() {
            return Ok(argmax(logits));
        }
        let (mut cand, mut sum) = self.distribution(logits);
        let p_draft = cand.iter().find(|c| c.0 == draft).map_or(0.0, |c| c.1 as f64 / sum);
        if self.rng.uniform() < p_draft {
            return Ok(draft);
        }
        cand.retain(|c| c.0 != draft);
        sum = cand.iter().map(|c| c.1 as f64).sum();
        Ok(self.pick(&cand, sum))
    }

    fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 || self.params.top_k == 1
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let (cand, sum) = self.distribution(logits);
        self.pick(&cand, sum)
    }

    /// The tokens the filters keep, most likely first, with unnormalised probabilities, and
    /// their sum.
    fn distribution(&self, logits: &[f32]) -> (Vec<(u32, f32)>, f64) {
        let p = &self.params;
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, l)| (i as u32, l / p.temperature)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut sum = 0f64;
        for c in &mut cand {
            c.1 = (c.1 - max).exp();
            sum += c.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut acc = 0f64;
            let keep = cand
                .iter()
                .position(|c| {
                    acc += c.1 as f64 / sum;
                    acc >= p.top_p as f64
                })
                .map_or(cand.len(), |i| i + 1);
            cand.truncate(keep);
            sum = cand.iter().map(|c| c.1 as f64).sum();
        }
        (cand, sum)
    }

    /// A draw from `cand` weighted by its values (summing to `sum`).
    fn pick(&mut self, cand: &[(u32, f32)], sum: f64) -> u32 {
        let mut u = self.rng.uniform() * sum;
        for c in cand {
            u -= c.1 as f64;
            if u < 0.0 {
                return c.0;
            }
        }
        cand.last().map_or(0, |c| c.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, seed }
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [0.1f32, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(params(0.0, 0, 1.0, 0)).unwrap().sample(&logits).unwrap(), 1);
        // top_k 2 never yields tokens 0 or 3.
        let mut s = Sampler::new(params(1.0, 2, 1.0, 3)).unwrap();
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits).unwrap()).collect();
        assert!(draws.iter().all(|t| *t == 1 || *t == 2));
        assert!(draws.contains(&1) && draws.contains(&2));
        // A tiny top_p keeps only the most likely token.
        let mut s = Sampler::new(params(1.0, 0, 0.01, 3)).unwrap();
        assert!((0..50).all(|_| s.sample(&logits).unwrap() == 1));
    }

    #[test]
    fn seed_reproduces_and_distribution_follows_temperature() {
        let logits = [0.0f32, (2.0f32).ln()];
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..3000).map(|_| s.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(9), run(9));
        let ones = run(9).iter().filter(|t| **t == 1).count() as f64 / 3000.0;
        assert!((ones - 2.0 / 3.0).abs() < 0.03, "{ones}");
    }

    #[test]
    fn speculative_verification_keeps_the_distribution() {
        let logits = [1.0f32, 0.2, 2.0, -0.5, 1.5];
        for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)] {
            let want = {
                let mut s = Sampler::new(params(temperature, top_k, top_p, 11)).unwrap();
                let mut counts = [0f64; 5];
                (0..20000).for_each(|_| counts[s.sample(&logits).unwrap() as usize] += 1.0);
                counts
            };
            // Whatever the draft (likely, unlikely, filtered out), the emitted tokens follow p.
            for draft in [2u32, 1, 3] {
                let mut s = Sampler::new(params(temperature, top_k, top_p, 5)).unwrap();
                let mut counts = [0f64; 5];
                (0..20000).for_each(|_| counts[s.verify(&logits, draft).unwrap() as usize] += 1.0);
                for (got, want) in counts.iter().zip(&want) {
                    assert!(
                        (got - want).abs() / 20000.0 < 0.015,
                        "{temperature} {top_k} {top_p} draft {draft}: {counts:?} vs {want:?}"
                    );
                }
            }
        }
        // Greedy: the argmax, accepted iff it is the draft.
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0)).unwrap();
        assert_eq!(s.verify(&logits, 2).unwrap(), 2);
        assert_eq!(s.verify(&logits, 4).unwrap(), 2);
        assert!(matches!(s.verify(&[f32::NAN, 1.0], 1), Err(Error::NonFiniteLogits)));
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lp = Logprobs::of(&logits, 4, 3);
        let z: f64 = logits.iter().map(|l| (*l as f64).exp()).sum();
        let want = |i: usize| ((logits[i] as f64).exp() / z).ln() as f32;
        assert!((lp.logprob - want(4)).abs() < 1e-6);
        // Most likely first, the lower id first on the tie.
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 2, 0]);
        for (id, value) in &lp.top {
            assert!((value - want(*id as usize)).abs() < 1e-6);
        }
        assert!(Logprobs::of(&logits, 0, 0).top.is_empty());
        assert_eq!(Logprobs::of(&logits, 0, 9).top.len(), 5);
        // Huge logits stay finite.
        let lp = Logprobs::of(&[1000.0, 0.0], 0, 2);
        assert!(lp.logprob.abs() < 1e-6 && lp.top[1].1 < -999.0);
    }

    #[test]
    fn logits_that_are_not_finite_are_never_sampled() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut s = Sampler::new(params(0.0, 0, 1.0, 0)).unwrap();
            assert!(matches!(s.sample(&[0.5, bad, 1.0]), Err(Error::NonFiniteLogits)));
        }
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(Sampler::new(params(-0.5, 0, 1.0, 0)).unwrap_err().to_string().contains("temperature"));
        assert!(Sampler::new(params(1.0, 0, 0.0, 0)).unwrap_err().to_string().contains("top_p"));
        assert!(Sampler::new(params(1.0, 0, 1.5, 0)).is_err());
    }
}
