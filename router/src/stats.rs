//! Serving statistics under vLLM's metric names and meaning, so that dashboards built for vLLM
//! and the Gateway API Inference Extension's endpoint picker read a kubemoe router as they read
//! vLLM (names, label `model_name`, histogram buckets as vLLM's v1 engine defines them). The
//! batch loop sets the scheduler gauges after each admission; the relay of every request
//! (gRPC and HTTP alike) records its latencies and tokens. Rendered by [`crate::metrics`].

use kubemoe_api::metrics::{label_value, Histogram};
use kubemoe_api::speculative::MAX_DRAFT_TOKENS;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// vLLM's buckets (seconds).
const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
];
const ITL: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
const E2E: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
];

/// The statistics of one router.
pub struct Stats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    /// KV tokens reserved by running sequences, and the budget.
    pub kv_reserved: AtomicUsize,
    pub kv_budget: AtomicUsize,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Finished requests by reason: `stop`, `length`.
    pub success_stop: AtomicU64,
    pub success_length: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_queried_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Bytes of latent rows the prefix cache holds.
    pub prefix_cache_bytes: AtomicUsize,
    /// Speculative decoding: verification steps with drafts, draft tokens, those accepted, and
    /// those accepted at each draft position (the first `MAX_DRAFT_TOKENS`).
    pub spec_drafts: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    pub spec_accepted_per_position: [AtomicU64; MAX_DRAFT_TOKENS],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            running: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            kv_reserved: AtomicUsize::new(0),
            kv_budget: AtomicUsize::new(0),
            time_to_first_token: Histogram::new(TTFT),
            inter_token_latency: Histogram::new(ITL),
            e2e_latency: Histogram::new(E2E),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            prefix_queried_tokens: AtomicU64::new(0),
            prefix_hit_tokens: AtomicU64::new(0),
            prefix_cache_bytes: AtomicUsize::new(0),
            spec_drafts: AtomicU64::new(0),
            spec_draft_tokens: AtomicU64::new(0),
            spec_accepted_tokens: AtomicU64::new(0),
            spec_accepted_per_position: Default::default(),
        }
    }
}

impl Stats {
    /// Counts a verification of `drafts` draft tokens of which the first `accepted` passed.
    pub fn speculated(&self, drafts: usize, accepted: usize) {
        self.spec_drafts.fetch_add(1, Ordering::Relaxed);
        self.spec_draft_tokens.fetch_add(drafts as u64, Ordering::Relaxed);
        self.spec_accepted_tokens.fetch_add(accepted as u64, Ordering::Relaxed);
        for position in &self.spec_accepted_per_position[..accepted.min(MAX_DRAFT_TOKENS)] {
            position.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exposition text, every series labelled `model_name`.
    pub fn render(&self, out: &mut String, model_name: &str) {
        let labels = format!("model_name=\"{}\"", label_value(model_name));
        let mut gauge = |metric: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP vllm:{metric} {help}\n# TYPE vllm:{metric} gauge");
            let _ = writeln!(out, "vllm:{metric}{{{labels}}} {value}");
        };
        gauge(
            "num_requests_running",
            "Requests in the running batch.",
            self.running.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "num_requests_waiting",
            "Requests waiting to join the batch.",
            self.waiting.load(Ordering::Relaxed) as f64,
        );
        let budget = self.kv_budget.load(Ordering::Relaxed).max(1) as f64;
        gauge(
            "kv_cache_usage_perc",
            "Fraction of the KV cache budget reserved by running requests (1 is full).",
            self.kv_reserved.load(Ordering::Relaxed) as f64 / budget,
        );
        let mut counter = |metric: &str, help: &str, series: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP vllm:{metric} {help}\n# TYPE vllm:{metric} counter");
            for (extra, value) in series {
                let _ = writeln!(out, "vllm:{metric}{{{labels}{extra}}} {value}");
            }
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter("prompt_tokens_total", "Prompt tokens processed.", &[("", load(&self.prompt_tokens))]);
        counter("generation_tokens_total", "Tokens generated.", &[("", load(&self.generation_tokens))]);
        counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            &[("", load(&self.prefix_queried_tokens))],
        );
        counter(
            "prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache (not prefilled again).",
            &[("", load(&self.prefix_hit_tokens))],
        );
        counter(
            "spec_decode_num_drafts_total",
            "Decode steps of a sequence that verified draft tokens (MTP speculative decoding).",
            &[("", load(&self.spec_drafts))],
        );
        counter(
            "spec_decode_num_draft_tokens_total",
            "Draft tokens proposed and verified.",
            &[("", load(&self.spec_draft_tokens))],
        );
        counter(
            "spec_decode_num_accepted_tokens_total",
            "Draft tokens accepted.",
            &[("", load(&self.spec_accepted_tokens))],
        );
        let per_position: Vec<(String, u64)> = self
            .spec_accepted_per_position
            .iter()
            .enumerate()
            .map(|(i, a)| (format!(",position=\"{i}\""), load(a)))
            .collect();
        counter(
            "spec_decode_num_accepted_tokens_per_pos_total",
            "Draft tokens accepted, by position among a step's drafts (0: the first); over \
             vllm:spec_decode_num_drafts_total, the acceptance rate of each position.",
            &per_position.iter().map(|(l, v)| (l.as_str(), *v)).collect::<Vec<_>>(),
        );
        counter(
            "request_success_total",
            "Requests finished, by finish reason.",
            &[
                (",finished_reason=\"stop\"", load(&self.success_stop)),
                (",finished_reason=\"length\"", load(&self.success_length)),
            ],
        );
        self.time_to_first_token.render(
            out,
            "vllm:time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            &labels,
        );
        self.inter_token_latency.render(
            out,
            "vllm:inter_token_latency_seconds",
            "Time between two tokens of a request.",
            &labels,
        );
        self.e2e_latency.render(
            out,
            "vllm:e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            &labels,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let stats = Stats::default();
        for ms in [3, 30, 30, 5000] {
            stats.time_to_first_token.observe(Duration::from_millis(ms));
        }
        stats.success_length.fetch_add(2, Ordering::Relaxed);
        let mut text = String::new();
        stats.render(&mut text, "m\"x");
        let line = |prefix: &str| {
            text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {text}"))
        };
        assert!(line("vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.005\"}")
            .ends_with(" 1"));
        assert!(line("vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"0.04\"}")
            .ends_with(" 3"));
        assert!(line("vllm:time_to_first_token_seconds_bucket{model_name=\"m\\\"x\",le=\"+Inf\"}")
            .ends_with(" 4"));
        assert!(line("vllm:time_to_first_token_seconds_count").ends_with(" 4"));
        let sum: f64 =
            line("vllm:time_to_first_token_seconds_sum").rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 5.063).abs() < 1e-9, "{sum}");
        assert!(line("vllm:request_success_total{model_name=\"m\\\"x\",finished_reason=\"length\"}")
            .ends_with(" 2"));
        // Two verifications of 3 drafts: 2 then 0 accepted.
        stats.speculated(3, 2);
        stats.speculated(3, 0);
        let mut text = String::new();
        stats.render(&mut text, "m");
        let value = |prefix: &str| {
            text.lines().find(|l| l.starts_with(prefix)).map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(value("vllm:spec_decode_num_drafts_total").as_deref(), Some("2"));
        assert_eq!(value("vllm:spec_decode_num_draft_tokens_total").as_deref(), Some("6"));
        assert_eq!(value("vllm:spec_decode_num_accepted_tokens_total").as_deref(), Some("2"));
        let pos = |i: usize| {
            value(&format!(
                "vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name=\"m\",position=\"{i}\"}}"
            ))
        };
        assert_eq!(
            (pos(0).as_deref(), pos(1).as_deref(), pos(2).as_deref()),
            (Some("1"), Some("1"), Some("0"))
        );
    }
}
