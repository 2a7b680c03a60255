//! Expert load over a sliding window: tokens routed to each (MoE layer, logical
//! expert), what the rebalancer plans from. Pure: the caller passes the time.
//!
//! The window is a ring of [`BUCKETS`] buckets each `window / BUCKETS` long; a snapshot sums
//! the buckets that started less than one window ago, so it covers between `window − bucket`
//! and `window` of history (less while the router is young: see [`LoadWindow::covered`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Buckets per window: the granularity at which old load leaves the window.
pub const BUCKETS: u32 = 12;

/// Routed tokens per (MoE layer, logical expert) over the last `window`.
pub struct LoadWindow {
    window: Duration,
    experts: usize,
    layers: usize,
    started: Instant,
    /// (bucket start, tokens [layer][expert] flattened), oldest first.
    buckets: VecDeque<(Instant, Vec<u64>)>,
}

impl LoadWindow {
    /// An empty window over `layers` MoE layers of `experts` experts, started at `now`.
    pub fn new(window: Duration, layers: usize, experts: usize, now: Instant) -> Self {
        let window = window.max(Duration::from_millis(BUCKETS as u64));
        Self { window, experts, layers, started: now, buckets: VecDeque::new() }
    }

    /// Counts one MoE layer's routed expert ids (`layer` is the index among MoE layers).
    pub fn record(&mut self, now: Instant, layer: usize, ids: &[u32]) {
        let bucket = self.window / BUCKETS;
        if self.buckets.back().is_none_or(|(start, _)| now.duration_since(*start) >= bucket) {
            self.buckets.push_back((now, vec![0; self.layers * self.experts]));
        }
        self.expire(now);
        let row = layer * self.experts..(layer + 1) * self.experts;
        if let Some(row) = self.buckets.back_mut().and_then(|(_, counts)| counts.get_mut(row)) {
            for &e in ids {
                if let Some(c) = row.get_mut(e as usize) {
                    *c += 1;
                }
            }
        }
    }

    /// Tokens per expert of each MoE layer over the window ending at `now`.
    pub fn snapshot(&mut self, now: Instant) -> Vec<Vec<u64>> {
        self.expire(now);
        let mut total = vec![0u64; self.layers * self.experts];
        for (_, counts) in &self.buckets {
            total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
        total.chunks(self.experts.max(1)).map(<[u64]>::to_vec).collect()
    }

    /// How much time a snapshot at `now` covers.
    pub fn covered(&self, now: Instant) -> Duration {
        now.duration_since(self.started).min(self.window)
    }

    fn expire(&mut self, now: Instant) {
        while self.buckets.front().is_some_and(|(start, _)| now.duration_since(*start) >= self.window) {
            self.buckets.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_leave_the_window_as_it_slides() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = LoadWindow::new(12 * s, 2, 3, t0);
        w.record(t0, 0, &[0, 0, 2]);
        w.record(t0 + s / 2, 1, &[1]);
        w.record(t0 + 6 * s, 0, &[1, 1]);
        assert_eq!(w.snapshot(t0 + 6 * s), vec![vec![2, 2, 1], vec![0, 1, 0]]);
        assert_eq!(w.covered(t0 + 6 * s), 6 * s);
        // 12 s after the first bucket started, it has left; the one from 6 s has not.
        assert_eq!(w.snapshot(t0 + 12 * s), vec![vec![0, 2, 0], vec![0, 0, 0]]);
        assert_eq!(w.covered(t0 + 20 * s), 12 * s);
        assert_eq!(w.snapshot(t0 + 30 * s), vec![vec![0; 3], vec![0; 3]]);
        // Ids past the expert count (never produced by a gate) are not counted anywhere.
        w.record(t0 + 31 * s, 1, &[7]);
        assert_eq!(w.snapshot(t0 + 31 * s), vec![vec![0; 3], vec![0; 3]]);
    }
}
