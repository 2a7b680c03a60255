//! `kubemoe bench`: the engine's hot paths, each as a ratio against a limit measured in the
//! same run (these machines are noisy; medians of repeated runs, never absolute targets).
//!
//! - GEMM: one large square f32 product on the same GEMM library, the machine's rate limit.
//! - Grouped expert FFN at `tokens_per_expert` tokens per expert, with the model's expert
//!   shapes, as a fraction of that rate.
//! - Prefill and decode tokens/s at batch 1 and 32, with the model FLOP rate those imply as
//!   a fraction of the GEMM rate.
//! - Memory: the machine's read bandwidth (every core summing one buffer far larger than the
//!   caches), the bytes of weights a decode token (B=1) and a decode step (B=32) read in the
//!   precision the model is held in, and decode tokens/s as a fraction of the limit those two
//!   give (decode reads each weight once per step: it is bound by memory, not by FLOPs).

use crate::generate::{generate, Request};
use crate::layers::{FeedForward, Mlp};
use crate::{KvCache, Model, Precision, Result, SamplingParams};
use kubemoe_kernels::moe::{grouped_expert_ffn, Assignment};
use kubemoe_kernels::{matmul, View};
use std::time::Instant;

/// Median seconds of `runs` calls of `f` after one warm-up call.
fn median_secs(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// What `kubemoe bench` runs.
pub struct Params {
    /// Side of the square GEMM that measures the machine's rate.
    pub gemm_size: usize,
    pub tokens_per_expert: usize,
    pub prompt_len: usize,
    pub decode_steps: usize,
}

/// What one `kubemoe bench` run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `--dtype` the model was loaded with, and what its matrices are held in.
    pub dtype: &'static str,
    pub held: Vec<&'static str>,
    /// The instruction set of the 16-bit and FP8 decode kernels.
    pub isa: &'static str,
    pub threads: usize,
    /// Bytes of weight matrices held.
    pub weight_bytes: usize,
    /// Read bandwidth of this machine, measured in the same run (GB/s).
    pub read_gb_per_s: f64,
    /// Weight bytes one decode token reads at B=1 (dense layers, shared and top-k experts,
    /// LM head), and one decode step at B=32 (each expert counted once if any of the 32
    /// tokens is expected to use it under uniform routing).
    pub decode_bytes_b1: f64,
    pub decode_bytes_b32: f64,
    pub gemm_size: usize,
    pub gemm_gflops: f64,
    pub expert_ffn: ExpertFfn,
    pub model: Vec<Throughput>,
}

#[derive(Debug, serde::Serialize)]
pub struct ExpertFfn {
    pub experts: usize,
    pub tokens_per_expert: usize,
    pub hidden: usize,
    pub inter: usize,
    pub gflops: f64,
    /// Grouped-FFN rate / large-GEMM rate, the median of rounds that time one of each back
    /// to back. Goal: ≥ 0.85 at 32 tokens per expert.
    pub ratio_to_gemm: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Throughput {
    pub phase: &'static str,
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Tokens/s × 2 × active parameters per token / GEMM rate (prefill counts the LM head
    /// once per sequence, as it runs only on the last token).
    pub flop_ratio_to_gemm: f64,
    /// Decode: tokens/s / (read bandwidth / weight bytes per token). Goal ≥ 0.8 at B=1, 0.7
    /// at B=32.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_to_memory_limit: Option<f64>,
}

/// Per decoder layer, `size` summed over its matrices: (all but the routed experts, the routed
/// experts, one routed expert).
fn layer_sums(m: &Model, size: impl Fn(&kubemoe_kernels::Weight) -> f64) -> Vec<(f64, f64, f64)> {
    let sum = |ws: &mut dyn Iterator<Item = &kubemoe_kernels::Weight>| ws.map(&size).sum::<f64>();
    m.layers
        .iter()
        .map(|l| {
            let experts: Vec<&Mlp> = match &l.mlp {
                FeedForward::Moe(moe) => moe.experts.iter().flatten().collect(),
                FeedForward::Dense(_) => Vec::new(),
            };
            let routed = sum(&mut experts.iter().flat_map(|e| e.matrices()));
            let one = experts.first().map_or(0.0, |e| sum(&mut e.matrices().into_iter()));
            (sum(&mut l.matrices().into_iter()) - routed, routed, one)
        })
        .collect()
}

/// Weight bytes one decode token reads at batch `batch`: everything but the routed experts
/// once, and each routed expert with the probability that one of `batch` tokens picks it
/// (`1 − (1 − k/E)^batch`: uniform routing, which generated models' gates approach).
fn decode_bytes(m: &Model, batch: usize) -> f64 {
    let c = &m.config;
    let p = c.gate.top_k as f64 / c.n_routed_experts.max(1) as f64;
    let used = 1.0 - (1.0 - p).powi(batch as i32);
    let layers = layer_sums(m, |w| w.bytes() as f64);
    m.lm_head.weight.bytes() as f64 + layers.iter().map(|(rest, routed, _)| rest + routed * used).sum::<f64>()
}

/// Read bandwidth in GB/s: every thread of the pool sums its part of a 512 MiB buffer (16
/// lanes, so that the sum vectorises), median of 5.
fn read_bandwidth() -> Result<f64> {
    use rayon::prelude::*;
    let data = vec![1f32; 128 << 20];
    let mut total = 0f32;
    let secs = median_secs(5, || {
        total += data
            .par_chunks(1 << 16)
            .map(|c| {
                let mut acc = [0f32; 16];
                for ch in c.chunks_exact(16) {
                    for l in 0..16 {
                        acc[l] += ch[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum::<f32>();
        Ok(())
    })?;
    std::hint::black_box(total);
    Ok((data.len() * 4) as f64 / secs / 1e9)
}

/// Parameters one token multiplies by in the decoder layers (attention, dense or shared +
/// top-k experts), without the LM head.
fn active_layer_params(m: &Model) -> f64 {
    let top_k = m.config.gate.top_k as f64;
    layer_sums(m, |w| w.len() as f64).iter().map(|(rest, _, one)| rest + one * top_k).sum()
}

/// Runs every measurement on `model`, loaded with `precision`.
pub fn run(model: &Model, precision: Precision, params: &Params) -> Result<Report> {
    let &Params { gemm_size, tokens_per_expert, prompt_len, decode_steps } = params;
    let mut rng = kubemoe_kernels::rng::Rng::new(1);
    let mut random = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
    let n = gemm_size;
    let (a, b) = (random(n * n), random(n * n));
    let mut c = vec![0f32; n * n];
    let mut gemm = || Ok(matmul(View::new(&a, n, n)?, View::new(&b, n, n)?, false, &mut c, n, false)?);
    let gemm_s = median_secs(5, &mut gemm)?;
    let gemm_gflops = 2.0 * (n * n * n) as f64 / gemm_s / 1e9;

    let cfg = &model.config;
    let (hidden, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let moe = model.layers.iter().find_map(|l| match &l.mlp {
        FeedForward::Moe(m) => Some(m),
        FeedForward::Dense(_) => None,
    });
    let experts: Vec<_> =
        moe.map(|m| m.experts.iter().flatten().map(|e| e.as_expert()).collect()).unwrap_or_default();
    let tokens = experts.len() * tokens_per_expert / cfg.gate.top_k.max(1);
    let x = random(tokens * hidden);
    // Every expert gets exactly `tokens_per_expert` tokens, each token `top_k` experts.
    let assignments: Vec<Assignment> = (0..experts.len() * tokens_per_expert)
        .map(|i| Assignment {
            token: (i % tokens.max(1)) as u32,
            expert: (i / tokens_per_expert) as u32,
            weight: 0.5,
        })
        .collect();
    let mut out = vec![0f32; tokens * hidden];
    let mut ffn = || Ok(grouped_expert_ffn(&x, hidden, inter, &experts, &assignments, &mut out)?);
    let ffn_s = median_secs(5, &mut ffn)?;
    let ffn_flops = (assignments.len() * 6 * hidden * inter) as f64;
    let ffn_gflops = ffn_flops / ffn_s / 1e9;
    // The FFN's ratio from rounds of one GEMM and one FFN back to back: a shared machine's
    // speed swings by up to 2x within minutes, which two separate medians would carry.
    let mut ratios = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        gemm()?;
        let g = t.elapsed().as_secs_f64();
        let t = Instant::now();
        ffn()?;
        ratios.push(ffn_flops / t.elapsed().as_secs_f64() / (2.0 * (n * n * n) as f64 / g));
    }
    ratios.sort_by(f64::total_cmp);
    let ffn_ratio = ratios[ratios.len() / 2];

    let read_gb_per_s = read_bandwidth()?;
    let (decode_bytes_b1, decode_bytes_b32) = (decode_bytes(model, 1), decode_bytes(model, 32));
    let layer_flops = 2.0 * active_layer_params(model);
    let head_flops = 2.0 * model.lm_head.weight.len() as f64;
    let mut results = Vec::new();
    for batch in [1usize, 32] {
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|s| (0..prompt_len).map(|i| ((s * 7919 + i * 104729) % cfg.vocab_size) as u32).collect())
            .collect();
        let prefill_s = median_secs(3, || {
            let mut caches: Vec<KvCache> = prompts.iter().map(|_| KvCache::new(cfg)).collect();
            let mut b: Vec<(&mut KvCache, &[u32])> =
                caches.iter_mut().zip(&prompts).map(|(c, p)| (c, p.as_slice())).collect();
            model.forward_step(&mut b).map(drop)
        })?;
        let prefill_tps = (batch * prompt_len) as f64 / prefill_s;
        // Decode rate: full generations minus their prefill, over the tokens decoded.
        let requests: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                max_new_tokens: decode_steps + 1,
                sampling: SamplingParams::default(),
            })
            .collect();
        let mut eos_free = model.clone();
        eos_free.config.eos_token_ids.clear();
        let total_s = median_secs(3, || generate(&eos_free, &requests).map(drop))?;
        let decode_tps = (batch * decode_steps) as f64 / (total_s - prefill_s).max(1e-9);
        let prefill_flops = layer_flops + head_flops / prompt_len as f64;
        let step_bytes = if batch == 1 { decode_bytes_b1 } else { decode_bytes_b32 };
        let memory_limit = read_gb_per_s * 1e9 / step_bytes * batch as f64;
        for (phase, tps, flops) in
            [("prefill", prefill_tps, prefill_flops), ("decode", decode_tps, layer_flops + head_flops)]
        {
            results.push(Throughput {
                phase,
                batch,
                tokens_per_s: tps,
                flop_ratio_to_gemm: tps * flops / (gemm_gflops * 1e9),
                ratio_to_memory_limit: (phase == "decode").then(|| tps / memory_limit),
            });
        }
    }
    let held = crate::memory::Held::of(model.matrices());
    let weight_bytes = held.bytes();
    Ok(Report {
        dtype: precision.as_str(),
        held: held.names(),
        isa: kubemoe_kernels::weight::isa_name(),
        weight_bytes,
        read_gb_per_s,
        decode_bytes_b1,
        decode_bytes_b32,
        threads: rayon::current_num_threads(),
        gemm_size,
        gemm_gflops,
        expert_ffn: ExpertFfn {
            experts: experts.len(),
            tokens_per_expert,
            hidden,
            inter,
            gflops: ffn_gflops,
            ratio_to_gemm: ffn_ratio,
        },
        model: results,
    })
}
