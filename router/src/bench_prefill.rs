//! `kubemoe bench-prefill`: what a long prompt does to the streams already decoding (issue
//! 13's chunked prefill). `streams` requests decode in the batch loop (the single-process
//! engine, experts local); a `prompt_len`-token prompt arrives; the streams' inter-token gaps
//! while it is prefilled are compared with their median gap outside it, for each step
//! token budget (`--max-batch-tokens`): one that holds the whole prompt (no chunking, the
//! stall), and smaller ones that prefill it in chunks between decode steps. The limit is the
//! run's own median gap while no prompt is prefilled: p99 during the prefill ≤ 3× the median
//! is the goal. Smaller chunks stall the streams less and make the prompt's first token later;
//! both are reported.
//!
//! With a shared prefix ([`shared_prefix`]): two prompts that begin with the same long prefix
//! arrive one after the other; the second's time to first token against the first's is the
//! prefix cache's gain (goal ≥ 5×), the first being the limit measured in the same run. Both
//! then decode [`DECODED`] tokens: the second's decode reads the prefix's shared pages in place
//! beside its own rows, and its time per token is compared with the same prompt's without a
//! prefix cache (all its rows its own).

use crate::bench_api::percentile;
use crate::engine::{self, Event, Submission};
use crate::scheduler::Limits;
use crate::stats::Stats;
use crate::{Error, Result};
use kubemoe_model::{Model, SamplingParams};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, serde::Serialize)]
pub struct Run {
    pub max_batch_tokens: usize,
    pub streams: usize,
    pub prompt_len: usize,
    /// From the prompt's arrival to its first token.
    pub prefill_ms: f64,
    /// Median gap between two tokens of a stream before the prompt arrived and after its
    /// first token.
    pub median_gap_ms: f64,
    /// 99th percentile of the gaps that ended while the prompt was prefilled.
    pub p99_gap_during_prefill_ms: f64,
    /// p99 during the prefill / median (goal ≤ 3).
    pub ratio: f64,
}

/// Gaps decoded before and after the prompt, per stream, on top of those during it.
const AROUND: usize = 12;

/// What the prefix cache saves a prompt whose prefix was prefilled before.
#[derive(Debug, serde::Serialize)]
pub struct PrefixRun {
    pub prefix_len: usize,
    /// Time to first token of the first prompt (prefix + 1 token) and of the second (the same
    /// prefix, another last token).
    pub first_ttft_ms: f64,
    pub second_ttft_ms: f64,
    /// first / second (goal ≥ 5).
    pub speedup: f64,
    /// Prompt tokens the second found in the prefix cache.
    pub reused_tokens: u64,
    /// Whether both prompts' tokens equal those of an engine without the cache.
    pub same_tokens: bool,
    /// The second prompt's decode time per token, with the prefix cache and without.
    pub second_decode_ms_per_token: f64,
    pub second_decode_ms_per_token_uncached: f64,
    /// with / without.
    pub decode_time_ratio: f64,
}

/// Tokens each prompt of [`shared_prefix`] decodes after its first.
const DECODED: usize = 32;

/// A request of `prompt` for `max_tokens` to `engine`; its events.
fn submit(
    engine: &engine::EngineHandle,
    id: usize,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> Result<mpsc::Receiver<Event>> {
    let (events, rx) = mpsc::channel(max_tokens + 2);
    let s = Submission {
        id: Arc::from(format!("bench-{id}")),
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        logprobs: None,
        events,
    };
    engine.submit(s).map_err(|e| Error::Workers(format!("the batch loop refused a request: {e:?}")))?;
    Ok(rx)
}

/// The first token of `rx`, and how long it took from `since`.
async fn first_token(rx: &mut mpsc::Receiver<Event>, since: Instant) -> Result<(u32, f64)> {
    match rx.recv().await {
        Some(Event::Token(token, _)) => Ok((token, since.elapsed().as_secs_f64() * 1e3)),
        other => Err(Error::Workers(format!("the prompt ended with {other:?}"))),
    }
}

/// Two prompts of `prefix_len` shared tokens and one of their own, one after the other, on
/// `model` with a prefix cache and without one.
pub fn shared_prefix(model: Arc<Model>, prefix_len: usize) -> Result<PrefixRun> {
    let context = model.config.max_position_embeddings;
    if prefix_len == 0 || prefix_len + 2 + DECODED > context {
        return Err(Error::Config(format!(
            "--shared-prefix {prefix_len}: give 1 to {} tokens, the model's context is {context}",
            context.saturating_sub(2 + DECODED)
        )));
    }
    let vocab = model.config.vocab_size as u32;
    let prompt = |last: u32| -> Vec<u32> {
        (0..prefix_len as u32).map(|j| (j * 13 + 5) % vocab).chain([last % vocab]).collect()
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // ((tokens, time to first token, decode ms per token) of each prompt, tokens reused) with
    // a cache of `bytes`.
    let serve = |bytes: usize| {
        runtime.block_on(async {
            let limits = Limits {
                max_batch_tokens: prefix_len + 1,
                max_running: 2,
                kv_budget_tokens: 2 * context,
                micro_batches: 1,
                speculative_tokens: 0,
            };
            let experts: Arc<dyn kubemoe_model::layers::RoutedExperts + Send> = model.clone();
            let stats = Arc::new(Stats::default());
            let shutdown = tokio_util::sync::CancellationToken::new();
            let (engine, thread) =
                engine::spawn(model.clone(), experts, limits, bytes, 2, stats.clone(), shutdown.clone())?;
            let mut out = Vec::new();
            for (id, last) in [(0, 1), (1, 2)] {
                let since = Instant::now();
                let mut rx = submit(&engine, id, prompt(last), 1 + DECODED)?;
                let (first, ttft) = first_token(&mut rx, since).await?;
                let mut tokens = vec![first];
                let decoding = Instant::now();
                for _ in 0..DECODED {
                    tokens.push(first_token(&mut rx, decoding).await?.0);
                }
                out.push((tokens, ttft, decoding.elapsed().as_secs_f64() * 1e3 / DECODED as f64));
            }
            shutdown.cancel();
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            Ok::<_, Error>((out, stats.prefix_hit_tokens.load(std::sync::atomic::Ordering::Relaxed)))
        })
    };
    let (cached, reused_tokens) = serve(1 << 30)?;
    let (plain, _) = serve(0)?;
    let (first_ttft_ms, second_ttft_ms) = (cached[0].1, cached[1].1);
    let (with, without) = (cached[1].2, plain[1].2);
    Ok(PrefixRun {
        prefix_len,
        first_ttft_ms,
        second_ttft_ms,
        speedup: first_ttft_ms / second_ttft_ms.max(f64::MIN_POSITIVE),
        reused_tokens,
        same_tokens: cached.iter().map(|c| &c.0).eq(plain.iter().map(|p| &p.0)),
        second_decode_ms_per_token: with,
        second_decode_ms_per_token_uncached: without,
        decode_time_ratio: with / without.max(f64::MIN_POSITIVE),
    })
}

/// One run per budget of `budgets`, on `model`.
pub fn run(model: Arc<Model>, streams: usize, prompt_len: usize, budgets: &[usize]) -> Result<Vec<Run>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    budgets.iter().map(|&budget| runtime.block_on(one(model.clone(), streams, prompt_len, budget))).collect()
}

async fn one(model: Arc<Model>, streams: usize, prompt_len: usize, budget: usize) -> Result<Run> {
    if streams == 0 {
        return Err(Error::Config("--streams 0: give at least one decoding stream to measure".into()));
    }
    let context = model.config.max_position_embeddings;
    if prompt_len == 0 || prompt_len + 1 > context {
        return Err(Error::Config(format!(
            "--prompt-len {prompt_len}: give 1 to {} tokens, the model's context is {context}",
            context - 1
        )));
    }
    let max_tokens = (context - 8).min(4 * AROUND + 64 + prompt_len);
    let limits = Limits {
        max_batch_tokens: budget,
        max_running: streams + 1,
        kv_budget_tokens: (streams + 1) * context,
        // Experts in this process: nothing to overlap.
        micro_batches: 1,
        speculative_tokens: 0,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let experts: Arc<dyn kubemoe_model::layers::RoutedExperts + Send> = model.clone();
    // No prefix cache: the long prompt is prefilled, whatever came before.
    let (engine, thread) = engine::spawn(
        model.clone(),
        experts,
        limits,
        0,
        streams + 1,
        Arc::new(Stats::default()),
        shutdown.clone(),
    )?;
    let submit = |id: usize, prompt: Vec<u32>, max_tokens: usize| submit(&engine, id, prompt, max_tokens);
    let vocab = model.config.vocab_size as u32;
    // Every stream's token times, collected as they come.
    let times: Arc<Mutex<Vec<Vec<Instant>>>> = Arc::new(Mutex::new(vec![Vec::new(); streams]));
    let mut tasks = Vec::new();
    for i in 0..streams {
        let prompt = (0..8).map(|j| (i as u32 * 31 + j * 7) % vocab).collect();
        let mut rx = submit(i, prompt, max_tokens)?;
        let times = times.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Event::Token(..)) = rx.recv().await {
                times.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i].push(Instant::now());
            }
        }));
    }
    let decoded = |n: usize| times.lock().is_ok_and(|t| t.iter().all(|s| s.len() >= n));
    let wait_for = |n: usize| async move {
        let started = Instant::now();
        while !decoded(n) {
            if started.elapsed() > Duration::from_secs(600) {
                return Err(Error::Workers("the streams stopped decoding".into()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    };
    wait_for(AROUND + 1).await?;
    let arrived = Instant::now();
    let prompt = (0..prompt_len as u32).map(|j| (j * 13 + 5) % vocab).collect();
    let mut long = submit(streams, prompt, 1)?;
    first_token(&mut long, arrived).await?;
    let first_token = Instant::now();
    let after = times.lock().map_or(0, |t| t.iter().map(Vec::len).min().unwrap_or(0));
    wait_for(after + AROUND).await?;
    shutdown.cancel();
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;

    let times = times.lock().map_err(|_| Error::Workers("a stream's collector panicked".into()))?.clone();
    let (mut outside, mut during) = (Vec::new(), Vec::new());
    for stream in &times {
        for pair in stream.windows(2) {
            let gap = pair[1].duration_since(pair[0]).as_secs_f64() * 1e3;
            if pair[1] > arrived && pair[0] < first_token {
                during.push(gap);
            } else {
                outside.push(gap);
            }
        }
    }
    let median_gap_ms = percentile(&mut outside, 0.5);
    let p99_gap_during_prefill_ms = percentile(&mut during, 0.99);
    Ok(Run {
        max_batch_tokens: budget,
        streams,
        prompt_len,
        prefill_ms: first_token.duration_since(arrived).as_secs_f64() * 1e3,
        median_gap_ms,
        p99_gap_during_prefill_ms,
        ratio: p99_gap_during_prefill_ms / median_gap_ms.max(f64::MIN_POSITIVE),
    })
}
