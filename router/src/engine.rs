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
//! With `--speculative mtp:K` ([`Limits::speculative_tokens`]) a decoding sequence feeds its
//! last token and up to K draft tokens that DeepSeek-V3's MTP module proposed (report §2.2;
//! verification as in Leviathan et al., ICML 2023): the step computes every fed position's
//! logits, the sampler accepts the drafts in order until one is rejected
//! ([`Sampler::verify`]: greedy, iff it is the argmax; sampling, with the acceptance rule that
//! keeps the output distribution), and emits one more token from the first position not
//! accepted, so a step emits 1 to K + 1 tokens and each is what decoding without speculation
//! would emit (greedy) or is distributed as it (sampling). The rejected drafts' rows are rolled
//! back from the cache. The MTP module keeps its own one-layer cache per sequence, fed after
//! every step with the final hidden state of each accepted position and the token after it
//! (prompt chunks too), and drafts greedily, chaining its own output for drafts past the first
//! (as vLLM does). Its routed experts are the router's own. A prefix-cache hit gives the MTP
//! module no rows for the cached positions: its drafts then see less context, the outputs are
//! unchanged. Whether a decode step drafts at all is [`Drafting`]'s choice, from the tokens per
//! second the loop measured with and without drafts: a decode step that does not draft feeds
//! the MTP module nothing (its cache skips that position, as after a prefix-cache hit), so it
//! costs what a decode step without speculation does (prompts still feed it, for later drafts).
//! Drafts made after a run of such steps see less context, until the module's cache fills
//! again.
//!
//! Requests arrive over a bounded channel; each sequence's events leave over its own bounded
//! channel sized so that a step never blocks on a slow client. A closed event channel means
//! the client went away: the sequence leaves the batch and its cache is freed. A failed step
//! fails every sequence in it (with the transport's status) and the loop goes on.

use crate::drafting::Drafting;
use crate::prefix::PrefixCache;
use crate::scheduler::{admit, chunks, Limits, Usage};
use crate::stats::Stats;
use kubemoe_model::layers::RoutedExperts;
use kubemoe_model::{KvCache, Logprobs, Model, MtpRows, Sampler, SamplingParams};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// Tokens to feed: what is left of the prompt, or the last token sampled.
    feed: Vec<u32>,
    /// With speculation: the MTP module's state.
    draft: Option<Draft>,
    generated: usize,
    max_tokens: usize,
    reserve: usize,
    events: mpsc::Sender<Event>,
}

/// A sequence's MTP drafting state.
struct Draft {
    /// The MTP module's cache: a row for each position since the first this router computed.
    cache: KvCache,
    /// Draft tokens for the positions after `feed`, fed with it and verified.
    tokens: Vec<u32>,
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
    let mut drafting = Drafting::default();
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
        let layers = model.config.num_hidden_layers;
        let joining =
            admit(&limits, usage, waiting.iter().map(|s| reservation(&limits, layers, &prefixes, s)));
        for s in waiting.drain(..joining) {
            let reserve = reservation(&limits, layers, &prefixes, &s);
            let sampler = match Sampler::new(s.sampling) {
                Ok(sampler) => sampler,
                Err(e) => {
                    drop(s.events.try_send(Event::Failed(tonic::Status::invalid_argument(e.to_string()))));
                    continue;
                }
            };
            // The cached blocks its prompt begins with, shared into its own cache.
            let mut cache = KvCache::new(&model.config);
            let reused = prefixes.lookup(&s.prompt);
            if let Err(e) = reused.iter().try_for_each(|(pages, page)| cache.share(pages, *page)) {
                drop(s.events.try_send(Event::Failed(status_of(&e))));
                continue;
            }
            let skip = cache.len();
            if caching {
                stats.prefix_queried_tokens.fetch_add(s.prompt.len() as u64, Ordering::Relaxed);
                stats.prefix_hit_tokens.fetch_add(skip as u64, Ordering::Relaxed);
            }
            running.push(Sequence {
                draft: (limits.speculative_tokens > 0)
                    .then(|| Draft { cache: KvCache::for_mtp(&model.config), tokens: Vec::new() }),
                id: s.id,
                cache,
                prompt: caching.then(|| s.prompt.clone()),
                sampler,
                logprobs: s.logprobs,
                reserve,
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
        step(model, experts, &limits, &mut running, &mut prefixes, &mut drafting, stats);
        stats.prefix_cache_bytes.store(prefixes.bytes(), Ordering::Relaxed);
    }
    for s in running.iter().map(|s| &s.events).chain(waiting.iter().map(|s| &s.events)) {
        let _ = s.try_send(Event::Failed(tonic::Status::unavailable("the router is shutting down")));
    }
}

/// The KV cache `s` reserves in a model of `layers` layers: its prompt and `max_tokens`, less
/// the prompt's tokens whose pages it will share from the prefix cache (counted there, once,
/// and not evicted while it reads them).
fn reservation(limits: &Limits, layers: usize, prefixes: &PrefixCache, s: &Submission) -> usize {
    let own = s.prompt.len() + s.max_tokens - prefixes.cached_tokens(&s.prompt);
    limits.reservation(own, layers)
}

/// The scheduler gauges of `stats`.
fn publish(stats: &Stats, running: &[Sequence], waiting: &VecDeque<Submission>) {
    stats.running.store(running.len(), Ordering::Relaxed);
    stats.waiting.store(waiting.len(), Ordering::Relaxed);
    stats.kv_reserved.store(running.iter().map(|s| s.reserve).sum(), Ordering::Relaxed);
}

/// One step of the running batch (at most `max_batch_tokens` new tokens, but at least one
/// per decoding sequence and one of the first prompt being prefilled); caches the blocks of
/// the prompts it completes; removes the sequences that finished or failed. With speculation,
/// a step of decoding sequences alone is timed for `drafting`, which chooses whether the next
/// one drafts.
fn step(
    model: &Model,
    experts: &dyn RoutedExperts,
    limits: &Limits,
    running: &mut Vec<Sequence>,
    prefixes: &mut PrefixCache,
    drafting: &mut Drafting,
    stats: &Stats,
) {
    let started = Instant::now();
    let batch_size = running.len();
    let drafts: usize = running.iter().filter_map(|s| s.draft.as_ref()).map(|d| d.tokens.len()).sum();
    let fed = chunks(
        limits.max_batch_tokens.saturating_sub(drafts),
        &running.iter().map(|s| s.feed.len()).collect::<Vec<_>>(),
    );
    // What each sequence feeds: a prompt chunk, or its last token and its drafts.
    let inputs: Vec<Vec<u32>> = running
        .iter()
        .zip(&fed)
        .map(|(s, &n)| match &s.draft {
            Some(d) if n == s.feed.len() => [&s.feed[..], &d.tokens].concat(),
            _ => s.feed[..n].to_vec(),
        })
        .collect();
    let starts: Vec<usize> = running.iter().map(|s| s.cache.len()).collect();
    // Every sequence decoding (none prefilling): a step `drafting` learns from.
    let decoding = running.iter().zip(&fed).all(|(s, &n)| n > 0 && s.generated > 0);
    let requests =
        running.iter().zip(&fed).filter(|(_, n)| **n > 0).map(|(s, _)| &*s.id).collect::<Vec<_>>().join(",");
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let _span = tracing::debug_span!("step", requests = %requests, tokens).entered();
    experts.begin_step(&requests);
    let mut batch: Vec<(&mut KvCache, &[u32])> = running
        .iter_mut()
        .zip(&inputs)
        .filter(|(_, t)| !t.is_empty())
        .map(|(s, t)| (&mut s.cache, &t[..]))
        .collect();
    let speculating = limits.speculative_tokens > 0;
    let pass: Pass = if speculating { Model::forward_step_hidden } else { Model::forward_step_with };
    let result = forward(model, &mut batch, experts, limits.micro_batches, pass);
    experts.end_step();
    drop(batch);
    // Logits of every position that samples or verifies: each fed sequence's last one, and
    // with speculation its drafts' too (the normed hidden states of all are kept for MTP).
    let hid = model.config.hidden_size;
    let result = result.and_then(|out| {
        if !speculating {
            return Ok((out, Vec::new()));
        }
        let mut rows = Vec::new();
        let mut end = 0;
        for ((s, t), &n) in running.iter().zip(&inputs).zip(&fed) {
            end += t.len();
            if n > 0 && n == s.feed.len() {
                let first = end - (t.len() - n) - 1;
                rows.extend_from_slice(&out[first * hid..end * hid]);
            }
        }
        Ok((model.logits(&rows)?, out))
    });
    let (logits, hidden) = match result {
        Ok(out) => out,
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
    // The MTP module's rows of each sequence kept, for `draft`.
    let mut feeds: Vec<MtpFeed> = Vec::new();
    let draft_next = speculating && drafting.choose(batch_size);
    let mut emitted_tokens = 0;
    let mut offset = 0;
    for (((mut s, &n), input), start) in running.drain(..).zip(&fed).zip(&inputs).zip(starts) {
        let first_row = offset;
        offset += input.len();
        if n == 0 {
            keep.push(s);
            continue;
        }
        let hidden_of = |rows: usize| &hidden[first_row * hid..(first_row + rows) * hid];
        if n < s.feed.len() {
            // Part of its prompt is still to come: nothing to sample yet (without speculation
            // the pass gave its last row's logits all the same).
            if !speculating {
                rows.next();
            } else {
                let tokens = s.feed[1..=n].to_vec();
                feeds.push(MtpFeed {
                    index: keep.len(),
                    position: start,
                    hidden: hidden_of(n),
                    tokens,
                    drafts: 0,
                });
            }
            s.feed.drain(..n);
            keep.push(s);
            continue;
        }
        if let Some(prompt) = s.prompt.take() {
            if let Err(e) = prefixes.insert(&prompt, &s.cache) {
                tracing::warn!(request = %s.id, error = %e, "the prompt's blocks were not cached");
            }
        }
        let drafts = s.draft.as_mut().map(|d| std::mem::take(&mut d.tokens)).unwrap_or_default();
        // The drafts in order until one is rejected; then the token in its place (or, all
        // accepted, the token after them).
        let scored: Vec<&[f32]> = rows.by_ref().take(1 + drafts.len()).collect();
        let mut emitted: Vec<(u32, &[f32])> = Vec::with_capacity(scored.len());
        let mut failed = None;
        for (i, row) in scored.into_iter().enumerate() {
            let token = match drafts.get(i) {
                Some(&d) => s.sampler.verify(row, d),
                None => s.sampler.sample(row),
            };
            match token {
                Ok(token) => emitted.push((token, row)),
                Err(e) => failed = Some(e),
            }
            if failed.is_some() || emitted.last().map(|e| e.0) != drafts.get(i).copied() {
                break;
            }
        }
        if failed.is_none() && !drafts.is_empty() {
            stats.speculated(drafts.len(), emitted.len() - 1);
        }
        let generated = s.generated;
        // The tokens in order, until one ends the request (those after it are dropped).
        let mut finish = None;
        let mut gone = false;
        for &(token, row) in &emitted {
            s.generated += 1;
            let logprobs = s.logprobs.map(|top| Logprobs::of(row, token, top));
            if s.events.try_send(Event::Token(token, logprobs)).is_err() {
                gone = true; // the client went away: drop the sequence and its cache
                break;
            }
            finish = if model.config.eos_token_ids.contains(&token) {
                Some(Finish::Stop)
            } else if s.generated >= s.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            if finish.is_some() {
                break;
            }
        }
        // The tokens sent (not those after a stop).
        emitted_tokens += s.generated - generated;
        if gone {
            continue;
        }
        if let Some(f) = finish {
            drop(s.events.try_send(Event::Done(f)));
            continue;
        }
        if let Some(e) = failed {
            // After the drafts accepted before it, as decoding without them would have sent.
            tracing::warn!(request = %s.id, error = %e, "the step's logits are not finite; the request fails");
            drop(s.events.try_send(Event::Failed(status_of(&e))));
            continue;
        }
        let Some(&(last, _)) = emitted.last() else { continue };
        let accepted = emitted.len() - 1;
        // The cache keeps the fed tokens up to the last accepted draft.
        let kept = n + accepted;
        s.cache.rollback(start + kept);
        // Not drafting next, a lone position (a decode token, or a prompt's last chunk of one
        // token) is left out of the MTP module's cache; several rows (a prompt's last chunk,
        // accepted drafts) still go in, for later drafts.
        if speculating && (draft_next || kept > 1) {
            let tokens = [&input[1..kept], &[last]].concat();
            let drafts =
                if draft_next { limits.speculative_tokens.min(s.max_tokens - s.generated - 1) } else { 0 };
            feeds.push(MtpFeed {
                index: keep.len(),
                position: start,
                hidden: hidden_of(kept),
                tokens,
                drafts,
            });
        }
        s.feed = vec![last];
        keep.push(s);
    }
    *running = keep;
    let drafting_started = Instant::now();
    if speculating && decoding {
        drafting.record(batch_size, drafts > 0, emitted_tokens, drafting_started - started);
    }
    if !feeds.is_empty() {
        draft(model, running, &feeds);
    }
    if speculating {
        drafting.prepared(drafting_started.elapsed());
    }
}

fn mtp_cache(s: &mut Sequence) -> Option<&mut KvCache> {
    s.draft.as_mut().map(|d| &mut d.cache)
}

/// What a step gives a sequence's MTP module: the final hidden states of the positions it
/// accepted from `position` on and the token after each, and how many tokens to draft.
struct MtpFeed<'a> {
    /// The sequence's index in the running batch.
    index: usize,
    position: usize,
    hidden: &'a [f32],
    tokens: Vec<u32>,
    drafts: usize,
}

/// Feeds the MTP module of each sequence in `feeds` and drafts its next tokens: the first
/// from the last row's output, each further one by running the module again on its own
/// output and the previous draft; those chained rows leave its cache afterwards. A failed MTP
/// step costs only drafts (the sequences decode without them).
fn draft(model: &Model, running: &mut [Sequence], feeds: &[MtpFeed]) {
    let hid = model.config.hidden_size;
    let mut seqs: Vec<(&mut Sequence, &MtpFeed)> = Vec::with_capacity(feeds.len());
    let mut feeds_left = feeds.iter().peekable();
    for (i, s) in running.iter_mut().enumerate() {
        if let Some(f) = feeds_left.next_if(|f| f.index == i) {
            seqs.push((s, f));
        }
    }
    // Each cache's length with the accepted rows alone.
    let exact: Vec<Option<usize>> =
        seqs.iter_mut().map(|(s, f)| mtp_cache(s).map(|c| c.len() + f.tokens.len())).collect();
    let mut batch: Vec<MtpRows> = Vec::new();
    for (s, f) in seqs.iter_mut() {
        if let Some(cache) = mtp_cache(s) {
            batch.push(MtpRows { cache, position: f.position, hidden: f.hidden, tokens: &f.tokens });
        }
    }
    let out = match model.on_pool(batch.iter().map(|r| r.tokens.len()).sum(), || model.mtp_step(&mut batch)) {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(error = %e, "the MTP step failed; decoding without drafts this step");
            return;
        }
    };
    drop(batch);
    // Each drafting sequence's latest MTP output row, its next position and its drafts.
    let mut end = 0;
    let mut chains: Vec<(usize, Vec<f32>, usize)> = Vec::new();
    for (j, (_, f)) in seqs.iter().enumerate() {
        end += f.tokens.len();
        if f.drafts > 0 {
            chains.push((j, out[(end - 1) * hid..end * hid].to_vec(), f.position + f.tokens.len()));
        }
    }
    for round in 0.. {
        if chains.is_empty() {
            break;
        }
        let rows: Vec<f32> = chains.iter().flat_map(|c| c.1.iter().copied()).collect();
        let logits = match model.logits(&rows) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the MTP step failed; decoding without drafts this step");
                break;
            }
        };
        let vocab = model.config.vocab_size;
        for (c, row) in chains.iter().zip(logits.chunks(vocab)) {
            if let Some(d) = seqs[c.0].0.draft.as_mut() {
                d.tokens.push(kubemoe_model::sampling::argmax(row));
            }
        }
        chains.retain(|c| seqs[c.0].1.drafts > round + 1);
        if chains.is_empty() {
            break;
        }
        let tokens: Vec<[u32; 1]> = chains
            .iter()
            .map(|c| [seqs[c.0].0.draft.as_ref().and_then(|d| d.tokens.last().copied()).unwrap_or(0)])
            .collect();
        let mut batch: Vec<MtpRows> = Vec::new();
        let mut order = Vec::new();
        for (j, (s, _)) in seqs.iter_mut().enumerate() {
            if let Some(k) = chains.iter().position(|c| c.0 == j) {
                let Some(cache) = mtp_cache(s) else { continue };
                order.push(k);
                batch.push(MtpRows {
                    cache,
                    position: chains[k].2,
                    hidden: &chains[k].1,
                    tokens: &tokens[k],
                });
            }
        }
        let out = model.on_pool(batch.iter().map(|r| r.tokens.len()).sum(), || model.mtp_step(&mut batch));
        drop(batch);
        match out {
            Ok(out) => {
                for (k, row) in order.iter().zip(out.chunks(hid)) {
                    chains[*k].1 = row.to_vec();
                    chains[*k].2 += 1;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "a chained MTP step failed; fewer drafts this step");
                break;
            }
        }
    }
    // The chained rows were guesses: only the rows of accepted positions stay.
    for ((s, _), len) in seqs.iter_mut().zip(exact) {
        if let (Some(cache), Some(len)) = (mtp_cache(s), len) {
            cache.rollback(len);
        }
    }
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
    pass: Pass,
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
    pass(model, batch, &TakingTurns { experts, baton })
}

/// A forward step of the model: [`Model::forward_step_with`] (last-token logits) or
/// [`Model::forward_step_hidden`] (every new token's normed hidden state).
pub type Pass =
    fn(&Model, &mut [(&mut KvCache, &[u32])], &dyn RoutedExperts) -> kubemoe_model::Result<Vec<f32>>;

/// One forward step of `batch`, in `micro_batches` (1 or 2): with 2 and at least two
/// sequences, the batch is cut into two halves of about equal tokens, each a forward step of
/// its own on its own thread, taking turns on the router's cores ([`Baton`]) so that while one
/// half's tokens are on the workers the other's attention and dense layers run (DeepSeek-V3's
/// two-micro-batch overlap, arXiv:2412.19437 §3.4; SGLang's two-batch overlap). Each sequence
/// computes what it would in one batch (to float rounding: the matrices see fewer rows).
/// `pass`'s rows in batch order.
pub fn forward(
    model: &Model,
    batch: &mut [(&mut KvCache, &[u32])],
    experts: &dyn RoutedExperts,
    micro_batches: usize,
    pass: Pass,
) -> kubemoe_model::Result<Vec<f32>> {
    /// Ends a thread's part of the step however its forward pass ends (a panic too: a part
    /// left open would hold every placement commit back).
    struct Ending<'a>(&'a dyn RoutedExperts);
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            self.0.end_step();
        }
    }
    if micro_batches < 2 || batch.len() < 2 {
        // The step's part ends on the thread that ran it. Two micro-batches stay on threads
        // of their own: on the pool, one could wait for the baton inside the other's product,
        // on the same thread.
        let tokens = batch.iter().map(|(_, t)| t.len()).sum();
        return model.on_pool(tokens, || {
            let _ending = Ending(experts);
            pass(model, batch, experts)
        });
    }
    let total: usize = batch.iter().map(|(_, t)| t.len()).sum();
    let mut seen = 0;
    let cut = batch.iter().position(|(_, t)| {
        seen += t.len();
        2 * seen >= total
    });
    let cut = cut.map_or(1, |i| i + 1).clamp(1, batch.len() - 1);
    let (first, second) = batch.split_at_mut(cut);
    let baton = Baton::default();
    let (a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            let _ending = Ending(experts);
            in_turn(model, first, experts, &baton, pass)
        });
        let b = {
            let _ending = Ending(experts);
            in_turn(model, second, experts, &baton, pass)
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
            let first = forward(&model, &mut batch, &model, micro_batches, Model::forward_step_with).unwrap();
            // The caches advanced as one batch's would: a decode step after agrees too.
            let mut batch: Vec<(&mut KvCache, &[u32])> =
                caches.iter_mut().map(|c| (c, &[7u32][..])).collect();
            (first, forward(&model, &mut batch, &model, micro_batches, Model::forward_step_with).unwrap())
        };
        let (one, two) = (logits(1), logits(2));
        for (a, b) in [(&one.0, &two.0), (&one.1, &two.1)] {
            assert_eq!(a.len(), 4 * model.config.vocab_size);
            let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "{err}");
        }
    }

    /// Routed experts in the process that note which thread each MoE layer and each step's
    /// end ran on.
    struct Noting<'a> {
        model: &'a Model,
        threads: std::sync::Mutex<Vec<(&'static str, std::thread::ThreadId)>>,
    }

    impl RoutedExperts for Noting<'_> {
        fn run(
            &self,
            layer: usize,
            x: &[f32],
            routing: &kubemoe_model::layers::Routing,
        ) -> kubemoe_model::Result<Vec<f32>> {
            self.threads.lock().unwrap().push(("run", std::thread::current().id()));
            self.model.run(layer, x, routing)
        }

        fn end_step(&self) {
            self.threads.lock().unwrap().push(("end", std::thread::current().id()));
        }
    }

    #[test]
    fn one_micro_batch_ends_its_step_on_the_thread_that_ran_it_on_the_pool_or_not() {
        // A transport that tracks steps by thread (`RemoteExperts`) would otherwise keep a
        // step open for ever, holding every placement switch back.
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let mut cache = KvCache::new(&model.config);
        let prompt: Vec<u32> = (1..17).collect();
        // A 16-token prompt splits builtin:tiny's LM head (8 rows x 512 x 64 values): on the
        // pool; a decode step does not: here.
        for (tokens, on_pool) in [(&prompt[..], true), (&[7][..], false)] {
            let noting = Noting { model: &model, threads: Default::default() };
            forward(&model, &mut [(&mut cache, tokens)], &noting, 1, Model::forward_step_with).unwrap();
            let threads = noting.threads.into_inner().unwrap();
            assert!(threads.iter().filter(|(what, _)| *what == "run").count() > 0);
            assert_eq!(threads.last().unwrap().0, "end", "{threads:?}");
            assert!(threads.iter().all(|(_, t)| *t == threads[0].1), "{threads:?}");
            assert_eq!(threads[0].1 != std::thread::current().id(), on_pool, "{} tokens", tokens.len());
        }
    }

    #[test]
    fn prompts_that_share_cached_pages_reserve_only_their_own_rows() {
        let model = source::open("builtin:tiny", Experts::All).unwrap();
        let prefix: Vec<u32> = (0..64).map(|i| i % 50 + 3).collect();
        let prompt = |last: u32| [&prefix[..], &[last]].concat();
        let limits = Limits {
            max_batch_tokens: 4096,
            max_running: 8,
            kv_budget_tokens: 100,
            micro_batches: 1,
            speculative_tokens: 0,
        };
        let waiting: Vec<Submission> = (0..4)
            .map(|last| Submission {
                id: Arc::from("r"),
                prompt: prompt(last),
                max_tokens: 10,
                sampling: SamplingParams::default(),
                logprobs: None,
                events: mpsc::channel(1).0,
            })
            .collect();
        let layers = model.config.num_hidden_layers;
        let reserves =
            |p: &PrefixCache| waiting.iter().map(|s| reservation(&limits, layers, p, s)).collect::<Vec<_>>();
        // Nothing cached: 75 tokens each, one at a time in a budget of 100.
        let mut prefixes = PrefixCache::new(1 << 30);
        assert_eq!(reserves(&prefixes), [75; 4]);
        assert_eq!(admit(&limits, Usage::default(), reserves(&prefixes)), 1);
        // The prefix's 4 pages cached: 11 each (the last prompt token and 10 new), all at once.
        let mut cache = KvCache::new(&model.config);
        model.forward_step(&mut [(&mut cache, &prompt(9))]).unwrap();
        prefixes.insert(&prompt(9), &cache).unwrap();
        assert_eq!(reserves(&prefixes), [11; 4]);
        assert_eq!(admit(&limits, Usage::default(), reserves(&prefixes)), 4);
    }

    /// Every request's tokens from a batch loop with `limits`, experts in this process.
    fn serve(
        model: &Arc<Model>,
        limits: Limits,
        requests: &[(Vec<u32>, usize)],
    ) -> (Vec<Vec<u32>>, Arc<Stats>) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let stats = Arc::new(Stats::default());
        let shutdown = CancellationToken::new();
        let experts: Arc<dyn RoutedExperts + Send> = model.clone();
        let (engine, thread) =
            spawn(model.clone(), experts, limits, 0, requests.len(), stats.clone(), shutdown.clone())
                .unwrap();
        let mut streams = Vec::new();
        for (i, (prompt, max_tokens)) in requests.iter().enumerate() {
            let (events, rx) = mpsc::channel(max_tokens + 1);
            let sampling = SamplingParams::default();
            let id = Arc::from(format!("r{i}"));
            engine
                .submit(Submission {
                    id,
                    prompt: prompt.clone(),
                    max_tokens: *max_tokens,
                    sampling,
                    logprobs: None,
                    events,
                })
                .unwrap();
            streams.push(rx);
        }
        let tokens = runtime.block_on(async {
            let mut all = Vec::new();
            for mut rx in streams {
                let mut tokens = Vec::new();
                loop {
                    match rx.recv().await.unwrap() {
                        Event::Token(t, _) => tokens.push(t),
                        Event::Done(_) => break,
                        Event::Failed(s) => panic!("{s:?}"),
                    }
                }
                all.push(tokens);
            }
            all
        });
        shutdown.cancel();
        thread.join().unwrap();
        (tokens, stats)
    }

    #[test]
    fn greedy_speculation_emits_the_tokens_of_plain_decoding_batched_chunked_and_alone() {
        let dir =
            |d: &str| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(d).display().to_string();
        // A random model (drafts mostly rejected) and the trained one (mostly accepted).
        for path in [dir("../model/tests/fixtures/mtp-tiny"), dir("../models/kubemoe-tiny-chat")] {
            let model = Arc::new(source::open(&path, Experts::All).unwrap());
            let vocab = model.config.vocab_size as u32;
            let requests: Vec<(Vec<u32>, usize)> = (0..6u32)
                .map(|i| {
                    (
                        (0..1 + i * 5).map(|j| (j * 37 + i * 11) % (vocab - 4) + 4).collect(),
                        6 + 5 * i as usize,
                    )
                })
                .collect();
            let limits = |max_batch_tokens, speculative_tokens| Limits {
                max_batch_tokens,
                max_running: 8,
                kv_budget_tokens: 1 << 20,
                micro_batches: 1,
                speculative_tokens,
            };
            let (plain, _) = serve(&model, limits(4096, 0), &requests);
            for k in [0, 1, 2, 3] {
                // Together; in steps of 9 tokens (prompts in chunks beside drafts); one by one.
                for budget in [4096, 9] {
                    let (got, stats) = serve(&model, limits(budget, k), &requests);
                    assert_eq!(got, plain, "{path} mtp:{k}, steps of {budget}");
                    assert_eq!(stats.spec_drafts.load(Ordering::Relaxed) > 0, k > 0);
                }
                for (r, want) in requests.iter().zip(&plain) {
                    assert_eq!(&serve(&model, limits(4096, k), std::slice::from_ref(r)).0[0], want);
                }
            }
        }
    }
}
