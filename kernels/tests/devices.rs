//! Every operation of `Device`, on every device present, against a reference: f64 sums where
//! one exists, the checkpoint formats' own decoders for weights, and the CPU's kernels for
//! the rest (rotary tables, gate selection), which then run on the devices other than the
//! CPU. Written once: the CPU and, built with `cuda` on a machine with a GPU, GPU 0 run the
//! same assertions. Without a GPU the GPU runs are skipped and say so on stderr;
//! `KUBEMOE_REQUIRE_GPU=1` (`scripts/gpu-check`) makes that a failure.

use kubemoe_kernels::attention::Latent;
use kubemoe_kernels::device::{Cpu, Device};
use kubemoe_kernels::dtype::{bf16_from_le, dequant_fp8_blocks, f16_from_le};
use kubemoe_kernels::gate::{route, GateParams, Scoring, TopkMethod};
use kubemoe_kernels::moe::{Assignment, ExpertRef};
use kubemoe_kernels::rel_err;
use kubemoe_kernels::rng::Rng;
use kubemoe_kernels::rope::{Rope, Yarn};
use kubemoe_kernels::weight::Dtype;
use kubemoe_kernels::Weight;

fn skip(why: &str) {
    if std::env::var("KUBEMOE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("a GPU is required (KUBEMOE_REQUIRE_GPU=1): {why}");
    }
    eprintln!("SKIPPED on the GPU: {why}");
}

fn devices() -> Vec<Box<dyn Device>> {
    #[allow(unused_mut)]
    let mut all: Vec<Box<dyn Device>> = vec![Box::new(Cpu)];
    #[cfg(feature = "cuda")]
    match kubemoe_kernels::cuda::Gpu::new(0) {
        Ok(gpu) => all.push(Box::new(gpu)),
        Err(e) => skip(&e.to_string()),
    }
    #[cfg(not(feature = "cuda"))]
    skip("built without the `cuda` feature");
    all
}

#[test]
fn rms_norm_matches_f64() {
    let devices = devices();
    let mut rng = Rng::new(21);
    // 48: one warp's worth; 1000: several warps and a partial one.
    for (rows, dim) in [(5, 48), (3, 1000)] {
        let x = rng.vec(rows * dim);
        let w = rng.vec(dim);
        let mut want = vec![0f64; rows * dim];
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                want[r * dim + i] = f64::from(w[i]) * f64::from(row[i]) / (ms + 1e-6).sqrt();
            }
        }
        for d in &devices {
            let got = d.rms_norm(&x, &w, 1e-6).unwrap();
            let e = rel_err(&got, &want);
            assert!(e < 1e-6, "{}: rms_norm [{rows}, {dim}] rel err {e:e}", d.name());
        }
    }
}

#[test]
fn swiglu_matches_f64() {
    let devices = devices();
    let mut rng = Rng::new(22);
    let (g, u) = (rng.vec(3000), rng.vec(3000));
    let g: Vec<f32> = g.iter().map(|v| v * 8.0).collect();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| f64::from(*g) / (1.0 + (-f64::from(*g)).exp()) * f64::from(*u))
        .collect();
    for d in &devices {
        let e = rel_err(&d.swiglu(&g, &u).unwrap(), &want);
        assert!(e < 1e-6, "{}: swiglu rel err {e:e}", d.name());
    }
}

#[test]
fn rope_matches_the_cpu_tables() {
    let devices = devices();
    let mut rng = Rng::new(23);
    let yarn = Yarn {
        factor: 40.0,
        original_max_position_embeddings: 4096.0,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 0.707,
    };
    // DeepSeek's query layout: heads of [nope 32 | rope 16], the rope part rotated.
    let (heads, stride, offset) = (4, 48, 32);
    let positions = [0usize, 1, 7, 4095, 70_000];
    let x = rng.vec(positions.len() * heads * stride);
    for (yarn, interleaved) in [(None, true), (Some(&yarn), true), (Some(&yarn), false)] {
        let rope = Rope::new(16, 10000.0, yarn, interleaved).unwrap();
        let mut want = x.clone();
        for (token, &pos) in want.chunks_mut(heads * stride).zip(&positions) {
            rope.rotate(token, stride, offset, pos).unwrap();
        }
        // The reference is the CPU's own kernel: the other devices are compared with it.
        for d in &devices[1..] {
            let got = d.rope(&rope, &x, stride, offset, heads, &positions).unwrap();
            let e = rel_err(&got, &want);
            assert!(
                e < 1e-6,
                "{}: rope (yarn {}, interleaved {interleaved}) rel err {e:e}",
                d.name(),
                yarn.is_some()
            );
            // The values outside the rotary part are untouched.
            for (g, x) in got.chunks(stride).zip(x.chunks(stride)) {
                assert_eq!(g[..offset], x[..offset], "{}", d.name());
            }
        }
    }
}

#[test]
fn weights_widen_exactly_as_their_formats_decode() {
    let devices = devices();
    let mut rng = Rng::new(24);
    // Not a multiple of the 128 × 128 FP8 blocks: the last row and column blocks are partial.
    let (rows, cols) = (130, 260);
    let f32w = Weight::from_f32(rng.vec(rows * cols), rows, cols).unwrap();
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Fp8] {
        let w = f32w.to(dtype, [128, 128]).unwrap();
        let (raw, scales, block) = w.raw();
        let want = match dtype {
            Dtype::F32 => f32w.widen_all(),
            Dtype::Bf16 => bf16_from_le(raw),
            Dtype::F16 => f16_from_le(raw),
            Dtype::Fp8 => dequant_fp8_blocks(raw, rows, cols, scales, block).unwrap(),
        };
        for d in &devices {
            let got = d.widen(&w).unwrap();
            assert!(got == want, "{}: {} values differ from the format's decoder", d.name(), dtype.as_str());
        }
    }
}

fn gate(
    n_experts: usize,
    top_k: usize,
    n_group: usize,
    topk_group: usize,
    v3: bool,
    method: TopkMethod,
) -> GateParams {
    GateParams {
        n_experts,
        top_k,
        n_group,
        topk_group,
        scoring: if v3 { Scoring::Sigmoid } else { Scoring::Softmax },
        method,
        norm_topk_prob: v3,
        routed_scaling_factor: 2.5,
    }
}

#[test]
fn route_picks_the_cpus_experts_and_weights() {
    let devices = devices();
    let mut rng = Rng::new(25);
    let tokens = 37;
    let cases = [
        // DeepSeek-V3: 256 experts, 8 groups, 4 kept, top 8, with the bias.
        (gate(256, 8, 8, 4, true, TopkMethod::NoauxTc), true),
        (gate(64, 6, 1, 1, false, TopkMethod::Greedy), false),
        (gate(160, 6, 8, 3, false, TopkMethod::GroupLimitedGreedy), false),
        // V3 without its bias; greedy top-1, where norm_topk_prob does not apply (scaled).
        (gate(64, 4, 8, 2, true, TopkMethod::NoauxTc), false),
        (gate(16, 1, 1, 1, true, TopkMethod::Greedy), false),
    ];
    for (p, with_bias) in cases {
        let logits: Vec<f32> = rng.vec(tokens * p.n_experts).iter().map(|v| v * 4.0).collect();
        let bias = with_bias.then(|| rng.vec(p.n_experts).iter().map(|v| v * 0.1).collect::<Vec<f32>>());
        let (mut ids, mut weights) = (vec![0u32; tokens * p.top_k], vec![0f32; tokens * p.top_k]);
        route(&p, &logits, bias.as_deref(), &mut ids, &mut weights).unwrap();
        // The reference is the CPU's own kernel: the other devices are compared with it.
        for d in &devices[1..] {
            let (got_ids, got_weights) = d.route(&p, &logits, bias.as_deref()).unwrap();
            assert_eq!(got_ids, ids, "{}: {:?} experts", d.name(), p.method);
            let e = rel_err(&got_weights, &weights);
            assert!(e < 1e-6, "{}: {:?} weights rel err {e:e}", d.name(), p.method);
        }
    }
}

/// A bad gate is refused on every device even with no tokens to route.
#[test]
fn a_bad_gate_is_refused_without_tokens_too() {
    for d in devices() {
        let top_k_past_experts = gate(8, 9, 1, 1, true, TopkMethod::NoauxTc);
        assert!(d.route(&top_k_past_experts, &[], None).is_err(), "{}: top_k 9 of 8", d.name());
        let good = gate(8, 2, 1, 1, true, TopkMethod::NoauxTc);
        assert!(d.route(&good, &[], Some(&[0.0; 7])).is_err(), "{}: 7 biases for 8 experts", d.name());
        assert_eq!(d.route(&good, &[], Some(&[0.0; 8])).unwrap(), (vec![], vec![]), "{}", d.name());
    }
}

#[test]
fn grouped_expert_ffn_matches_f64_in_every_dtype() {
    let devices = devices();
    let mut rng = Rng::new(26);
    // Sizes that are not multiples of the GPU's 16 × 16 tiles; experts with more than one
    // tile of rows (about 24 each); one expert gets no tokens.
    let (hidden, inter, n_exp, tokens) = (72, 40, 6, 41);
    let f32_experts: Vec<[Weight; 3]> = (0..n_exp)
        .map(|_| {
            [(inter, hidden), (inter, hidden), (hidden, inter)]
                .map(|(r, c)| Weight::from_f32(rng.vec(r * c), r, c).unwrap())
        })
        .collect();
    let x = rng.vec(tokens * hidden);
    let mut assignments = Vec::new();
    for t in 0..tokens {
        for k in 0..3 {
            let e = (t * 2 + k * 3) % (n_exp - 1);
            assignments.push(Assignment { token: t as u32, expert: e as u32, weight: 0.2 + 0.3 * k as f32 });
        }
    }
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Fp8] {
        let held: Vec<[Weight; 3]> =
            f32_experts.iter().map(|ws| ws.clone().map(|w| w.to(dtype, [32, 32]).unwrap())).collect();
        let experts: Vec<ExpertRef> =
            held.iter().map(|[g, u, d]| ExpertRef { gate_proj: g, up_proj: u, down_proj: d }).collect();
        // The reference: f64 sums over the values the dtype holds.
        let widened: Vec<[Vec<f32>; 3]> = held.iter().map(|ws| ws.clone().map(|w| w.widen_all())).collect();
        let mut want = vec![0.5f64; tokens * hidden];
        for a in &assignments {
            let [g, u, d] = &widened[a.expert as usize];
            let xt = &x[a.token as usize * hidden..][..hidden];
            let dot = |w: &[f32], row: usize, v: &dyn Fn(usize) -> f64, n: usize| -> f64 {
                (0..n).map(|j| f64::from(w[row * n + j]) * v(j)).sum()
            };
            let h: Vec<f64> = (0..inter)
                .map(|i| {
                    let gv = dot(g, i, &|j| f64::from(xt[j]), hidden);
                    let uv = dot(u, i, &|j| f64::from(xt[j]), hidden);
                    gv / (1.0 + (-gv).exp()) * uv
                })
                .collect();
            for j in 0..hidden {
                want[a.token as usize * hidden + j] += f64::from(a.weight) * dot(d, j, &|i| h[i], inter);
            }
        }
        for d in &devices {
            let mut out = vec![0.5f32; tokens * hidden];
            d.grouped_expert_ffn(&x, hidden, inter, &experts, &assignments, &mut out).unwrap();
            let e = rel_err(&out, &want);
            assert!(e < 1e-5, "{}: {} experts rel err {e:e}", d.name(), dtype.as_str());
        }
    }
}

#[test]
fn latent_attention_matches_f64() {
    let devices = devices();
    let mut rng = Rng::new(27);
    // A prefill chunk (3 of 11 positions) and a decode step over a longer cache.
    for (n, s) in [(3, 11), (1, 300)] {
        let shape = Latent { heads: 4, rank: 32, rope: 8, scale: 0.21 };
        let w = shape.width();
        let qa = rng.vec(n * shape.heads * w);
        let cache = rng.vec(s * w);
        let mut want = vec![0f64; n * shape.heads * shape.rank];
        for q in 0..n * shape.heads {
            let visible = s - n + q / shape.heads + 1;
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let dot: f64 =
                        (0..w).map(|c| f64::from(qa[q * w + c]) * f64::from(cache[j * w + c])).sum();
                    dot * f64::from(shape.scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..shape.rank {
                want[q * shape.rank + c] = (0..visible).map(|j| e[j] / z * f64::from(cache[j * w + c])).sum();
            }
        }
        // One contiguous cache, and pages of 16 rows (the last partial, one empty) as a paged
        // cache holds them.
        let mut paged: Vec<&[f32]> = cache.chunks(16 * w).collect();
        paged.insert(1, &[]);
        for d in &devices {
            for pages in [&[&cache[..]][..], &paged] {
                let got = d.latent_attention(shape, &qa, pages, n).unwrap();
                let e = rel_err(&got, &want);
                assert!(
                    e < 1e-6,
                    "{}: latent attention n {n} s {s} {} pages rel err {e:e}",
                    d.name(),
                    pages.len()
                );
            }
            // A page of part of a row is refused.
            let torn = [&cache[..w + 1], &cache[w + 1..]];
            assert!(d.latent_attention(shape, &qa, &torn, n).is_err(), "{}", d.name());
        }
    }
}

#[test]
fn linear_matches_f64_in_every_dtype() {
    let devices = devices();
    let mut rng = Rng::new(28);
    let (rows, cols) = (150, 200);
    let f32w = Weight::from_f32(rng.vec(rows * cols), rows, cols).unwrap();
    // Decode (1 row), a few rows, and a batch past the CPU's decode kernels.
    for m in [1, 3, 37] {
        let x = rng.vec(m * cols);
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Fp8] {
            let w = f32w.to(dtype, [128, 128]).unwrap();
            let held = w.widen_all();
            let want: Vec<f64> = (0..m * rows)
                .map(|i| {
                    let (r, j) = (i / rows, i % rows);
                    (0..cols).map(|c| f64::from(x[r * cols + c]) * f64::from(held[j * cols + c])).sum()
                })
                .collect();
            for d in &devices {
                let e = rel_err(&d.linear(&w, &x).unwrap(), &want);
                assert!(e < 1e-6, "{}: {} linear of {m} rows rel err {e:e}", d.name(), dtype.as_str());
            }
        }
    }
}
