//! The batch loop: one thread owns the dense model, every sequence's KV cache and sampler,
//! and runs the running batch one step at a time (one decode token of each decoding sequence
//! and chunks of the prompts being prefilled together, [`crate::scheduler::chunks`]),
//! dispatching routed experts through [`RoutedExperts`]. A sequence samples once its whole
//! prompt is in its cache; a chunk computes exactly what the whole prompt would (the cache
//! holds the positions before it), so outputs do not depend on the chunking.
//!
//! A step runs in two micro-batches on two threads when `--micro-batches 2` ([`forward`]), so
//! that one's dispatch overlaps the other's compute.
//!
//! A prompt starts from the blocks of its prefix already in the prefix cache
//! ([`crate::prefix`]) and prefills the rest; its whole blocks are stored there once its
//! prefill completes.
//!
//! Requests arrive over a bounded channel; each sequence's events leave over its own bounded
//! channel sized so that a step never blocks on a slow client. A closed event channel means
//! the client went away: the sequence leaves the batch and its cache is freed. A failed step
//! fails every sequence in it (with the transport's status) and the loop goes on.

use crate::prefix::{PrefixCache, BLOCK};
use crate::scheduler::{admit, chunks, Limits, Usage};
use crate::stats::Stats;
use kubemoe_model::layers::RoutedExperts;
use kubemoe_model::{KvCache, Logprobs, Model, Sampler, SamplingParams};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a sequence finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` reached.
    Length,
    /// An end-of-sequence token.
    Stop,
}

#[derive(Debug)]
pub enum Event {
    /// A new token, with its log-probabilities when the request asked for them.
    Token(u32, Option<Logprobs>),
    Done(Finish),
    Failed(tonic::Status),
}

/// A request for the batch loop.
pub struct Submission {
    /// The request's id, for logs here and on the workers.
    pub id: Arc<str>,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Return log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Capacity at least `max_tokens + 1`.
    pub events: mpsc::Sender<Event>,
}

struct Sequence {
    id: Arc<str>,
    cache: KvCache,
    /// The whole prompt, until its prefill completes and its blocks are cached (None when the
    /// prefix cache is off).
    prompt: Option<Vec<u32>>,
    sampler: Sampler,
    logprobs: Option<usize>,
    feed: Vec<u32>,
    generated: usize,
    max_tokens: usize,
    reserve: usize,
    events: mpsc::Sender<Event>,
}

/// Submits requests to a running batch loop.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Submission>,
}

/// Why a submission was not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    Full,
    Stopped,
}

impl EngineHandle {
    pub fn submit(&self, s: Submission) -> Result<(), SubmitError> {
        self.tx.try_send(s).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::Full,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

/// Starts the batch loop on its own thread, with a prefix cache of `prefix_cache_bytes` (0:
/// none); it stops when `shutdown` fires.
pub fn spawn(
    model: Arc<Model>,
    experts: Arc<dyn RoutedExperts + Send>,
    limits: Limits,
    prefix_cache_bytes: usize,
    queue: usize,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    stats.kv_budget.store(limits.kv_budget_tokens, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::sync_channel(queue);
    let prefixes = PrefixCache::new(prefix_cache_bytes);
    let thread = std::thread::Builder::new()
        .name("kubemoe-engine".into())
        .spawn(move || run(&model, experts.as_ref(), limits, prefixes, rx, &stats, shutdown))?;
    Ok((EngineHandle { tx }, thread))
}

fn run(
    model: &Model,
    experts: &dyn RoutedExperts,
    limits: Limits,
    mut prefixes: PrefixCache,
    rx: Receiver<Submission>,
    stats: &Stats,
    shutdown: CancellationToken,
) {
    let caching = prefixes.budget() > 0;
    let mut waiting: VecDeque<Submission> = VecDeque::new();
    let mut running: Vec<Sequence> = Vec::new();
    while !shutdown.is_cancelled() {
        if running.is_empty() && waiting.is_empty() {
            publish(stats, &running, &waiting);
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(s) => waiting.push_back(s),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        waiting.extend(rx.try_iter());
        waiting.retain(|s| !s.events.is_closed());
        let usage =
            Usage { running: running.len(), reserved_tokens: running.iter().map(|s| s.reserve).sum() };
        let joining = admit(&limits, usage, waiting.iter().map(|s| s.prompt.len() + s.max_tokens));
        for s in waiting.drain(..joining) {
            let sampler = match Sampler::new(s.sampling) {
                Ok(sampler) => sampler,
                Err(e) => {
                    drop(s.events.try_send(Event::Failed(tonic::Status::invalid_argument(e.to_string()))));
                    continue;
                }
            };
            // The cached blocks its prompt begins with, copied into its own cache.
            let mut cache = KvCache::new(&model.config);
            let reused = prefixes.lookup(&s.prompt);
            if let Err(e) = reused.iter().try_for_each(|rows| cache.extend_rows(rows, BLOCK, &model.config)) {
                drop(s.events.try_send(Event::Failed(status_of(&e))));
                continue;
            }
            let skip = cache.len();
            if caching {
                stats.prefix_queried_tokens.fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
                stats.prefix_hit_tokens.fetch_add(skip as u64, Ordering::Relaxed);
            }
            running.push(Sequence {
                id: s.id,
                cache,
                prompt: caching.then(|| s.prompt.clone()),
                sampler,
                logprobs: s.logprobs,
                reserve: s.prompt.len() + s.max_tokens,
                feed: s.prompt[skip..].to_vec(),
                generated: 0,
                max_tokens: s.max_tokens,
                events: s.events,
            });
        }
        publish(stats, &running, &waiting);
        if running.is_empty() {
            continue;
        }
        step(model, experts, (limits.max_batch_tokens, limits.micro_batches), &mut running, &mut prefixes);
        stats.prefix_cache_bytes.store(prefixes.bytes(), Ordering::Relaxed);
    }
    for s in running.iter().map(|s| &s.events).chain(waiting.iter().map(|s| &s.events)) {
        let _ = s.try_send(Event::Failed(tonic::Status::unavailable("the router is shutting down")));
    }
}

/// The scheduler gauges of `stats`.
fn publish(stats: &Stats, running: &[Sequence], waiting: &VecDeque<Submission>) {
    stats.running.store(running.len(), Ordering::Relaxed);
    stats.waiting.store(waiting.len(), Ordering::Relaxed);
    stats.kv_reserved.store(running.iter().map(|s| s.reserve).sum(), Ordering::Relaxed);
}

/// One step of the running batch (at most `max_batch_tokens` new tokens, but at least one
/// per decoding sequence and one of the first prompt being prefilled); caches the blocks of
/// the prompts it completes; removes the sequences that finished or failed.
fn step(
    model: &Model,
    experts: &dyn RoutedExperts,
    (max_batch_tokens, micro_batches): (usize, usize),
    running: &mut Vec<Sequence>,
    prefixes: &mut PrefixCache,
) {
    let fed = chunks(max_batch_tokens, &running.iter().map(|s| s.feed.len()).collect::<Vec<_>>());
    let requests =
        running.iter().zip(&fed).filter(|(_, n)| **n > 0).map(|(s, _)| &*s.id).collect::<Vec<_>>().join(",");
    let tokens: usize = fed.iter().sum();
    let _span = tracing::debug_span!("step", requests = %requests, tokens).entered();
    experts.begin_step(&requests);
    let mut batch: Vec<(&mut KvCache, &[u32])> = running
        .iter_mut()
        .zip(&fed)
        .filter(|(_, n)| **n > 0)
        .map(|(s, &n)| (&mut s.cache, &s.feed[..n]))
        .collect();
    let result = forward(model, &mut batch, experts, micro_batches);
    experts.end_step();
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            let status = status_of(&e);
            tracing::warn!(error = %status.message(), "step failed; its requests fail");
            let (failed, waited): (Vec<_>, Vec<_>) = running.drain(..).zip(&fed).partition(|(_, n)| **n > 0);
            for (s, _) in failed {
                let _ = s.events.try_send(Event::Failed(status.clone()));
            }
            *running = waited.into_iter().map(|(s, _)| s).collect();
            return;
        }
    };
    let vocab = model.config.vocab_size;
    let mut keep = Vec::with_capacity(running.len());
    let mut rows = logits.chunks(vocab);
    for (mut s, &n) in running.drain(..).zip(&fed) {
        if n == 0 {
            keep.push(s);
            continue;
        }
        let Some(row) = rows.next() else { break };
        if n < s.feed.len() {
            // Part of its prompt is still to come: nothing to sample yet.
            s.feed.drain(..n);
            keep.push(s);
            continue;
        }
        if let Some(prompt) = s.prompt.take() {
            if let Err(e) = prefixes.insert(&prompt, &s.cache) {
                tracing::warn!(request = %s.id, error = %e, "the prompt's blocks were not cached");
            }
        }
        let token = match s.sampler.sample(row) {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(request = %s.id, error = %e, "the step's logits are not finite; the request fails");
                drop(s.events.try_send(Event::Failed(status_of(&e))));
                continue;
            }
        };
        s.generated += 1;
        let logprobs = s.logprobs.map(|top| Logprobs::of(row, token, top));
        if s.events.try_send(Event::Token(token, logprobs)).is_err() {
            continue; // the client went away: drop the sequence and its cache
        }
        let finish = if model.config.eos_token_ids.contains(&token) {
            Some(Finish::Stop)
        } else if s.generated >= s.max_tokens {
            Some(Finish::Length)
        } else {
            None
        };
        match finish {
            Some(f) => drop(s.events.try_send(Event::Done(f))),
            None => {
                s.feed = vec![token];
                keep.push(s);
            }
        }
    }
    *running = keep;
}

/// Whose turn it is to compute on the router: the two micro-batches of a step take turns, one
/// computing while the other's tokens are on the workers (the ping-pong of DeepSeek-V3's
/// overlap and MegaScale-Infer's). Without turns the two halves share the cores evenly, reach
/// their dispatches together and wait out their round trips together.
#[derive(Default)]
struct Baton {
    taken: std::sync::Mutex<bool>,
    given: std::sync::Condvar,
}

impl Baton {
    fn take(&self) {
        let mut taken = self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *taken {
            taken = self.given.wait(taken).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *taken = true;
    }

    fn give(&self) {
        *self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        self.given.notify_one();
    }
}

/// The routed experts, with the baton given up while the workers compute.
struct TakingTurns<'a> {
    experts: &'a dyn RoutedExperts,
    baton: &'a Baton,
}

impl RoutedExperts for TakingTurns<'_> {
    fn run(
        &self,
        layer: usize,
        x: &[f32],
        routing: &kubemoe_model::layers::Routing,
    ) -> kubemoe_model::Result<Vec<f32>> {
        self.baton.give();
        let out = self.experts.run(layer, x, routing);
        self.baton.take();
        out
    }

    fn begin_step(&self, requests: &str) {
        self.experts.begin_step(requests)
    }

    fn end_step(&self) {
        self.experts.end_step()
    }
}

/// A micro-batch's forward step, computing only while it holds the baton.
fn in_turn(
    model: &Model,
    batch: &mut [(&mut KvCache, &[u32])],
    experts: &dyn RoutedExperts,
    baton: &Baton,
) -> kubemoe_model::Result<Vec<f32>> {
    /// Gives the baton back however the step ends.
    struct Holding<'a>(&'a Baton);
    impl Drop for Holding<'_> {
        fn drop(&mut self) {
            self.0.give();
        }
    }
    baton.take();
    let _holding = Holding(baton);
    model.forward_step_with(batch, &TakingTurns { experts, baton })
}

/// One forward step of `batch`, in `micro_batches` (1 or 2): with 2 and at least two
/// sequences, the batch is cut into two halves of about equal tokens, each a forward step of
/// its own on its own thread, taking turns on the router's cores ([`Baton`]) so that while one
/// half's tokens are on the workers the other's attention and dense layers run (DeepSeek-V3's
/// two-micro-batch overlap, arXiv:2412.19437 §3.4; SGLang's two-batch overlap). Each sequence
/// computes what it would in one batch (to float rounding: the matrices see fewer rows).
/// Logits in batch order.
pub fn forward(
    model: &Model,
    batch: &mut [(&mut KvCache, &[u32])],
    experts: &dyn RoutedExperts,
    micro_batches: usize,
) -> kubemoe_model::Result<Vec<f32>> {
    if micro_batches < 2 || batch.len() < 2 {
        return model.forward_step_with(batch, experts);
    }
    let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
    let mut seen = 0;
    let cut = batch.iter().position(|(_, t)| {
        seen += t.len();
        2 * seen >= total
    });
    let cut = cut.map_or(1, |i| i + 1).clamp(1, batch.len() - 1);
    /// Ends a thread's part of the step however its forward pass ends (a panic too: a part
    /// left open would hold every placement commit back).
    struct Ending<'a>(&'a dyn RoutedExperts);
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            self.0.end_step();
        }
    }
    let (first, second) = batch.split_at_mut(cut);
    let baton = Baton::default();
    let (a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let _ending = Ending(experts);
            in_turn(model, first, experts, &baton)
        });
        let b = {
            let _ending = Ending(experts);
            in_turn(model, second, experts, &baton)
        };
        (other.join(), b)
    });
    let mut logits = a.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
    logits.extend(b?);
    Ok(logits)
}

/// The gRPC status a failed step gives each of its sequences.
fn status_of(e: &kubemoe_model::Error) -> tonic::Status {
    let message = kubemoe_placement::error_chain(e);
    match e {
        kubemoe_model::Error::ExpertsUnavailable { .. } => tonic::Status::unavailable(message),
        kubemoe_model::Error::TokenOutOfVocab { .. } | kubemoe_model::Error::ContextOverflow { .. } => {
            tonic::Status::invalid_argument(message)
        }
        _ => tonic::Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use kubemoe_model::{source, Experts};

    #[test]
    fn two_micro_batches_give_each_sequence_what_one_batch_gives_in_batch_order() {
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let prompts: [&[u32]; 4] = [&[1, 2, 3], &[4], &[5, 6, 7, 8, 9, 10], &[11, 12]];
        let logits = |micro_batches: usize| {
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(&model.config)).collect();
            let mut batch: Vec<(&mut KvCache, &[u32])> = caches.iter_mut().zip(prompts).collect();
            let first = forward(&model, &mut batch, &model, micro_batches).unwrap();
            // The caches advanced as one batch's would: a decode step after agrees too.
            let mut batch: Vec<(&mut KvCache, &[u32])> =
                caches.iter_mut().map(|c| (c, &[7u32][..])).collect();
            (first, forward(&model, &mut batch, &model, micro_batches).unwrap())
        };
        let (one, two) = (logits(1), logits(2));
        for (a, b) in [(&one.0, &two.0), (&one.1, &two.1)] {
            assert_eq!(a.len(), 4 * model.config.vocab_size);
            let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{err}");
        }
    }
}
