//! `kubemoe bench-speculative`: MTP speculative decoding ([`crate::engine`]) against decoding
//! without it, in the batch loop, on the same greedy requests: decode tokens/s at each batch
//! size and draft count, and the speedup over no speculation measured in the same run (the
//! limit it is judged against; goal ≥ 1.4× at batch 1), the acceptance rate of each draft
//! position (goal ≥ 0.6 for the first; DeepSeek reports 0.85–0.9 for V3), and whether the
//! outputs are the same tokens as without speculation (they must be). Once with the experts in
//! this process, and once on workers when their URLs are given, then again behind proxies
//! delaying every segment each way (cross-node links simulated on one machine: speculation
//! pays once per step for the MoE layers' round trips, whatever the tokens a step carries).

use crate::engine::{self, Event, Submission};
use crate::scheduler::Limits;
use crate::stats::Stats;
use crate::{Error, Result};
use kubemoe_api::auth::Bearer;
use kubemoe_model::layers::RoutedExperts;
use kubemoe_model::{source, Experts, Model, SamplingParams};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The default prompts: stories and questions in kubemoe-tiny-chat's language.
pub const PROMPTS: [&str; 8] = [
    "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about the fox.<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>It was a sunny day. Ada the",
    "<｜begin▁of▁sentence｜><｜User｜>Tell me about the otter.<｜Assistant｜>",
    "<｜begin▁of▁sentence｜><｜User｜>Write a program that adds 12 and 30.<｜Assistant｜>",
    "<｜begin▁of▁sentence｜>Every morning the bear",
    "<｜begin▁of▁sentence｜><｜User｜>Who is Finn?<｜Assistant｜>",
    "<｜begin▁of▁sentence｜><｜User｜>What is 7 + 5?<｜Assistant｜>",
    "<｜begin▁of▁sentence｜><｜User｜>Tell me a story about the duck.<｜Assistant｜>",
];

#[derive(Debug, serde::Serialize)]
pub struct Run {
    /// 0: the experts in this process.
    pub workers: usize,
    /// One-way delay added between the router and its workers (0: none).
    pub delay_us: u64,
    pub batch: usize,
    /// Draft tokens per step (0: no speculation, the limit).
    pub speculative_tokens: usize,
    /// Tokens after each request's first, over the time from the last first token to the
    /// last token.
    pub decode_tps: f64,
    /// Against the run without speculation at the same batch size.
    pub speedup: f64,
    /// Accepted / verified at each draft position (the first: the acceptance rate of the
    /// first draft token).
    pub acceptance_per_position: Vec<f64>,
    /// Tokens a sequence's step with drafts emits on average (1 + accepted drafts).
    pub tokens_per_step: f64,
    /// Of a sequence's decode steps, the share that verified drafts: the rest were steps
    /// [`crate::drafting`] chose not to draft for (it drafts where that measured faster).
    pub drafting_share: f64,
    pub generated_tokens: usize,
    /// Whether every request's tokens equal those without speculation.
    pub same_tokens: bool,
}

/// Every (batch, draft count) of `batches` × (0 and `drafts`) on the model at `model`, greedy
/// `max_tokens` from `prompts` (cycled), with the experts in this process, then on the
/// workers at `urls` (none: not), directly and behind proxies delaying each way by each of
/// `delays_us`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &str,
    prompts: &[Vec<u32>],
    batches: &[usize],
    drafts: &[usize],
    max_tokens: usize,
    urls: &[String],
    credential: &Bearer,
    delays_us: &[u64],
) -> Result<Vec<Run>> {
    if !delays_us.is_empty() && urls.is_empty() {
        return Err(Error::Config(
            "a delay (--delay-us) is added between the router and its workers: give workers (--workers) too"
                .into(),
        ));
    }
    if delays_us.contains(&0) {
        return Err(Error::Config(
            "--delay-us 0: the run without a delay is always made; give delays of 1 µs or more".into(),
        ));
    }
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(Error::Config("no prompts, or an empty one: give prompts of at least one token".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The workers' channels are made inside it.
    let _entered = runtime.enter();
    let local = Arc::new(source::open(model, Experts::All)?);
    if local.mtp.is_empty() {
        return Err(Error::Config(format!("{model} has no MTP module to draft with")));
    }
    let mut runs = Vec::new();
    let experts: Arc<dyn RoutedExperts + Send> = local.clone();
    let ask = Ask { prompts, batches, drafts, max_tokens };
    runs.extend(compare(&runtime, &local, experts, (0, 0), &ask)?);
    if !urls.is_empty() {
        let first_mtp = local.config.num_hidden_layers;
        drop(local);
        let dense = Arc::new(source::open(model, Experts::Only(&|layer, _| layer >= first_mtp))?);
        // 0: the workers directly (delays of 0 are refused above).
        for us in std::iter::once(0).chain(delays_us.iter().copied()) {
            let (_proxies, urls) = match us {
                0 => (Vec::new(), urls.to_vec()),
                us => crate::bench::behind_proxies(&runtime, urls, credential, Duration::from_micros(us))?,
            };
            let remote = crate::bench::connect(&runtime, model, &dense.config, &urls, credential)?;
            let experts: Arc<dyn RoutedExperts + Send> = Arc::new(remote);
            runs.extend(compare(&runtime, &dense, experts, (urls.len(), us), &ask)?);
        }
    }
    Ok(runs)
}

/// What each configuration runs: every batch size × (0 and every draft count).
struct Ask<'a> {
    prompts: &'a [Vec<u32>],
    batches: &'a [usize],
    drafts: &'a [usize],
    max_tokens: usize,
}

/// [`Ask`]'s runs with `experts`, labelled (workers, one-way delay).
fn compare(
    runtime: &tokio::runtime::Runtime,
    model: &Arc<Model>,
    experts: Arc<dyn RoutedExperts + Send>,
    (workers, delay_us): (usize, u64),
    ask: &Ask<'_>,
) -> Result<Vec<Run>> {
    let Ask { prompts, batches, drafts, max_tokens } = *ask;
    let mut runs = Vec::new();
    for &batch in batches {
        let requests: Vec<Vec<u32>> = prompts.iter().cycle().take(batch).cloned().collect();
        let mut plain = None;
        for &k in std::iter::once(&0).chain(drafts) {
            let stats = Arc::new(Stats::default());
            let (tokens, decode_tps) =
                runtime.block_on(decode(model, experts.clone(), &requests, max_tokens, k, stats.clone()))?;
            let (base_tokens, base_tps) = plain.get_or_insert_with(|| (tokens.clone(), decode_tps)).clone();
            let drafted = stats.spec_drafts.load(Ordering::Relaxed) as f64;
            let verified = drafted.max(1.0);
            let accepted = stats.spec_accepted_tokens.load(Ordering::Relaxed) as f64;
            // Each step emits one token and its accepted drafts; the first token came from
            // the prompt's step (drafts accepted past an end of sequence count here too, so
            // this can undercount steps without drafts by one a request).
            let decoded = tokens.iter().map(|t| t.len().saturating_sub(1)).sum::<usize>() as f64;
            let plain_steps = (decoded - drafted - accepted).max(0.0);
            runs.push(Run {
                workers,
                delay_us,
                batch,
                speculative_tokens: k,
                decode_tps,
                speedup: decode_tps / base_tps,
                acceptance_per_position: stats.spec_accepted_per_position[..k]
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed) as f64 / verified)
                    .collect(),
                tokens_per_step: 1.0 + accepted / verified,
                drafting_share: drafted / (drafted + plain_steps).max(1.0),
                generated_tokens: tokens.iter().map(Vec::len).sum(),
                same_tokens: tokens == base_tokens,
            });
        }
    }
    Ok(runs)
}

/// Runs `requests` together through a batch loop speculating `k` tokens: each one's tokens,
/// and the decode rate.
async fn decode(
    model: &Arc<Model>,
    experts: Arc<dyn RoutedExperts + Send>,
    requests: &[Vec<u32>],
    max_tokens: usize,
    k: usize,
    stats: Arc<Stats>,
) -> Result<(Vec<Vec<u32>>, f64)> {
    let context = model.config.max_position_embeddings;
    let limits = Limits {
        max_batch_tokens: 4096,
        max_running: requests.len(),
        kv_budget_tokens: requests.len() * 2 * context,
        micro_batches: 1,
        speculative_tokens: k,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (engine, thread) =
        engine::spawn(model.clone(), experts, limits, 0, requests.len(), stats, shutdown.clone())?;
    let mut streams = Vec::new();
    for (i, prompt) in requests.iter().enumerate() {
        let (events, rx) = tokio::sync::mpsc::channel(max_tokens + 2);
        let s = Submission {
            id: Arc::from(format!("bench-{i}")),
            prompt: prompt.clone(),
            max_tokens: max_tokens.min(context - prompt.len()),
            sampling: SamplingParams::default(),
            logprobs: None,
            events,
        };
        engine.submit(s).map_err(|e| Error::Workers(format!("the batch loop refused a request: {e:?}")))?;
        streams.push(tokio::spawn(collect(rx)));
    }
    let mut tokens = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for stream in streams {
        let (t, f, l) = stream.await.map_err(|e| Error::Workers(format!("a stream's collector: {e}")))??;
        first = first.max(Some(f));
        last = last.max(Some(l));
        tokens.push(t);
    }
    shutdown.cancel();
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    let decoded = tokens.iter().map(|t| t.len() - 1).sum::<usize>() as f64;
    let seconds = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    Ok((tokens, decoded / seconds.max(f64::MIN_POSITIVE)))
}

/// A request's tokens, and when its first and last came.
async fn collect(mut rx: tokio::sync::mpsc::Receiver<Event>) -> Result<(Vec<u32>, Instant, Instant)> {
    let mut tokens = Vec::new();
    let (mut first, mut last) = (None, Instant::now());
    while let Some(event) = rx.recv().await {
        match event {
            Event::Token(t, _) => {
                last = Instant::now();
                first.get_or_insert(last);
                tokens.push(t);
            }
            Event::Done(_) => break,
            Event::Failed(status) => return Err(Error::Call(status)),
        }
    }
    let first = first.ok_or_else(|| Error::Workers("a request ended without a token".into()))?;
    Ok((tokens, first, last))
}
