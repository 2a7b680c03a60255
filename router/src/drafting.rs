//! Whether a decode step drafts: speculation ([`crate::engine`]) pays only where verifying
//! 1 + K tokens costs less than the tokens it saves, and that depends on where the step's time
//! goes. With the experts on workers a step pays each MoE layer's round trip once, whatever
//! the tokens it carries, and drafting pays; with the weights in cache a step's cost grows with
//! its tokens (each extra token reaches more experts), and drafting can lose. So the batch
//! loop measures both: the tokens a decode step emits per second of its time, with drafts and
//! without, per batch size (powers of two), and drafts where that rate is higher, trying the
//! other way every [`EXPLORE_EVERY`] steps so that a change (the batch, the link, the load on
//! the machine) is seen. Outputs do not depend on it: a step with drafts emits the tokens one
//! without would (greedy) or the same distribution (sampling).
//!
//! Policy only: the engine times its steps and asks; tested directly.

use std::time::Duration;

/// Decode steps between two steps of the way not chosen.
pub const EXPLORE_EVERY: u64 = 16;
/// Steps each way a batch size takes before the rates decide.
const WARMUP: u32 = 3;
/// Weight of a new step in a rate's moving average.
const ALPHA: f64 = 0.25;
/// Batch sizes up to 2^(BUCKETS - 1) and more share the last bucket.
const BUCKETS: usize = 10;

/// Tokens per second of one way, as a moving average.
#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    tokens_per_s: f64,
    samples: u32,
}

impl Rate {
    fn add(&mut self, tokens_per_s: f64) {
        self.tokens_per_s = if self.samples == 0 {
            tokens_per_s
        } else {
            ALPHA * tokens_per_s + (1.0 - ALPHA) * self.tokens_per_s
        };
        self.samples = self.samples.saturating_add(1);
    }
}

/// The rates measured so far, per batch size: `[without drafts, with]`.
#[derive(Debug, Default)]
pub struct Drafting {
    rates: [[Rate; 2]; BUCKETS],
    steps: u64,
    /// The time the last step spent drafting for the next: part of the next step's cost.
    prepared: Duration,
}

fn bucket(batch: usize) -> usize {
    (batch.max(1).ilog2() as usize).min(BUCKETS - 1)
}

impl Drafting {
    /// Whether the next decode step of `batch` sequences drafts.
    pub fn choose(&mut self, batch: usize) -> bool {
        self.steps += 1;
        let [plain, drafted] = self.rates[bucket(batch)];
        if drafted.samples < WARMUP {
            return true;
        }
        if plain.samples < WARMUP {
            return false;
        }
        let better = drafted.tokens_per_s > plain.tokens_per_s;
        if self.steps.is_multiple_of(EXPLORE_EVERY) {
            !better
        } else {
            better
        }
    }

    /// A decode step of `batch` sequences, with drafts or without, emitted `tokens` in
    /// `elapsed`, not counting the drafting it did for the next step (see [`Self::prepared`]).
    pub fn record(&mut self, batch: usize, drafted: bool, tokens: usize, elapsed: Duration) {
        let seconds = (elapsed + self.prepared).as_secs_f64();
        if seconds > 0.0 {
            self.rates[bucket(batch)][usize::from(drafted)].add(tokens as f64 / seconds);
        }
    }

    /// The step just recorded (or not: a step with prompts) spent `elapsed` drafting for the
    /// next: counted in that one, whose drafts they are, so a step's rate is its own cost
    /// whichever way the steps around it went.
    pub fn prepared(&mut self, elapsed: Duration) {
        self.prepared = elapsed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `steps` decode steps of `batch`, each taking `ms[drafted]` milliseconds and
    /// emitting `tokens[drafted]` tokens a sequence: the share of steps that drafted.
    fn share(d: &mut Drafting, batch: usize, steps: usize, ms: [f64; 2], tokens: [usize; 2]) -> f64 {
        let mut drafted = 0;
        for _ in 0..steps {
            let way = d.choose(batch);
            drafted += usize::from(way);
            let i = usize::from(way);
            d.record(batch, way, tokens[i] * batch, Duration::from_secs_f64(ms[i] / 1e3));
        }
        drafted as f64 / steps as f64
    }

    #[test]
    fn drafts_where_they_pay_and_not_where_they_lose() {
        // Workers: a step of 1 or 2 tokens costs the round trips; drafts nearly double the rate.
        let mut d = Drafting::default();
        let s = share(&mut d, 1, 320, [2.0, 2.2], [1, 2]);
        assert!(s > 0.9, "{s}");
        // In cache: a step of 2 tokens costs twice one; drafting loses.
        let s = share(&mut d, 8, 320, [1.0, 2.3], [1, 2]);
        assert!(s < 0.1, "{s}");
        // Batch sizes are judged apart: batch 1 still drafts.
        let s = share(&mut d, 1, 160, [2.0, 2.2], [1, 2]);
        assert!(s > 0.9, "{s}");
    }

    #[test]
    fn the_way_not_chosen_is_tried_again_and_a_change_is_followed() {
        let mut d = Drafting::default();
        share(&mut d, 4, 200, [1.0, 2.5], [1, 2]);
        let before = d.rates[bucket(4)][0].samples;
        // The other way keeps being measured, once every EXPLORE_EVERY steps.
        let s = share(&mut d, 4, EXPLORE_EVERY as usize * 10, [1.0, 2.5], [1, 2]);
        assert_eq!(d.rates[bucket(4)][0].samples - before, (EXPLORE_EVERY * 10 - 10) as u32);
        assert!((s - 1.0 / EXPLORE_EVERY as f64).abs() < 1e-9, "{s}");
        // The link gets slower (a step's fixed cost grows): drafting starts to pay and is taken.
        let s = share(&mut d, 4, 400, [5.0, 5.5], [1, 2]);
        assert!(s > 0.8, "{s}");
    }

    #[test]
    fn drafting_for_the_next_step_is_counted_in_it() {
        let mut d = Drafting::default();
        d.prepared(Duration::from_millis(3));
        d.record(1, true, 2, Duration::from_millis(1));
        assert_eq!(d.rates[0][1].tokens_per_s, 500.0);
        // Each step's own: a step that prepared nothing costs only its time.
        d.prepared(Duration::ZERO);
        d.record(1, false, 1, Duration::from_millis(1));
        assert_eq!(d.rates[0][0].tokens_per_s, 1000.0);
    }

    #[test]
    fn every_batch_size_starts_by_measuring_both_ways() {
        let mut d = Drafting::default();
        let ways: Vec<bool> = (0..2 * WARMUP)
            .map(|_| {
                let w = d.choose(3);
                d.record(3, w, 3, Duration::from_millis(1));
                w
            })
            .collect();
        assert_eq!(ways, [[true; WARMUP as usize], [false; WARMUP as usize]].concat());
        // A step that took no measurable time is not a rate.
        d.record(3, true, 3, Duration::ZERO);
        assert_eq!(d.rates[bucket(3)][1].samples, WARMUP);
        assert_eq!((bucket(0), bucket(1), bucket(2), bucket(3), bucket(1 << 20)), (0, 0, 1, 1, BUCKETS - 1));
    }
}
