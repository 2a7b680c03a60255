//! `kubemoe bench`: the engine's hot paths, each as a ratio against a limit measured in the
//! same run (these machines are noisy; medians of repeated runs, never absolute targets).
//!
//! - GEMM: one large square f32 product on the same GEMM library, the machine's rate limit.
//! - Grouped expert FFN at `tokens_per_expert` tokens per expert, with the model's expert
//!   shapes, as a fraction of that rate.
//! - Prefill and decode tokens/s at batch 1 and 32, with the model FLOP rate those imply as
//!   a fraction of the GEMM rate.

use crate::generate::{generate, Request};
use crate::layers::FeedForward;
use crate::{KvCache, Model, Result, SamplingParams};
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

/// What one `kubemoe bench` run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub threads: usize,
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
    /// Grouped-FFN rate / large-GEMM rate. Goal: ≥ 0.6 at 32 tokens per expert.
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
}

/// Parameters one token multiplies by in the decoder layers (attention, dense or shared +
/// top-k experts), without the LM head.
fn active_layer_params(m: &Model) -> f64 {
    let mut p = 0;
    for l in &m.layers {
        let a = &l.self_attn;
        p += a.kv_a_proj_with_mqa.weight.len() + a.kv_b_proj.weight.len() + a.o_proj.weight.len();
        p += match &a.q {
            crate::layers::QueryProj::LowRank { q_a_proj, q_b_proj, .. } => {
                q_a_proj.weight.len() + q_b_proj.weight.len()
            }
            crate::layers::QueryProj::Plain { q_proj } => q_proj.weight.len(),
        };
        let mlp_len = |x: &crate::layers::Mlp| x.gate_proj.weight.len() * 3;
        p += match &l.mlp {
            FeedForward::Dense(d) => mlp_len(d),
            FeedForward::Moe(moe) => {
                let e = moe.experts.iter().flatten().next().map_or(0, mlp_len);
                moe.gate.weight.weight.len()
                    + moe.shared_experts.as_ref().map_or(0, mlp_len)
                    + e * m.config.gate.top_k
            }
        };
    }
    p as f64
}

/// Runs every measurement on `model`.
pub fn run(
    model: &Model,
    gemm_size: usize,
    tokens_per_expert: usize,
    prompt_len: usize,
    decode_steps: usize,
) -> Result<Report> {
    let mut rng = kubemoe_kernels::rng::Rng::new(1);
    let mut random = |n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f32>>();
    let n = gemm_size;
    let (a, b) = (random(n * n), random(n * n));
    let mut c = vec![0f32; n * n];
    let gemm_s =
        median_secs(5, || Ok(matmul(View::new(&a, n, n)?, View::new(&b, n, n)?, false, &mut c, n, false)?))?;
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
    let ffn_s =
        median_secs(5, || Ok(grouped_expert_ffn(&x, hidden, inter, &experts, &assignments, &mut out)?))?;
    let ffn_flops = (assignments.len() * 6 * hidden * inter) as f64;
    let ffn_gflops = ffn_flops / ffn_s / 1e9;

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
        for (phase, tps, flops) in
            [("prefill", prefill_tps, prefill_flops), ("decode", decode_tps, layer_flops + head_flops)]
        {
            results.push(Throughput {
                phase,
                batch,
                tokens_per_s: tps,
                flop_ratio_to_gemm: tps * flops / (gemm_gflops * 1e9),
            });
        }
    }
    Ok(Report {
        threads: rayon::current_num_threads(),
        gemm_size,
        gemm_gflops,
        expert_ffn: ExpertFfn {
            experts: experts.len(),
            tokens_per_expert,
            hidden,
            inter,
            gflops: ffn_gflops,
            ratio_to_gemm: ffn_gflops / gemm_gflops,
        },
        model: results,
    })
}
