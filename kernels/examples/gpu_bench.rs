//! The CUDA kernels' speed against limits measured in the same run on the same GPU: the
//! device-to-device copy bandwidth for the kernels bound by memory (RMSNorm, SwiGLU, weight
//! widening, MLA decode attention), and cuBLAS SGEMM of the same FLOPs for the grouped expert
//! GEMM (f32 products of the widened weights, the same function as the CPU's, so SGEMM is the
//! like-for-like limit). Medians of 9 timed runs after one warm-up. `scripts/gpu-check` runs it:
//!
//! ```sh
//! cargo run --release -p kubemoe-kernels --features cuda --example gpu_bench
//! ```
// cuBLAS is called through cudarc's unsafe `gemm` (FFI).
#![allow(unsafe_code)]

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use kubemoe_kernels::attention::Latent;
use kubemoe_kernels::cuda::{Gpu, GpuExpert};
use kubemoe_kernels::moe::{Assignment, ExpertRef};
use kubemoe_kernels::rng::Rng;
use kubemoe_kernels::weight::Dtype;
use kubemoe_kernels::{Error, Result, Weight};
use std::time::Instant;

fn median_secs(gpu: &Gpu, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    gpu.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..9 {
        let start = Instant::now();
        run()?;
        gpu.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[4])
}

/// A CUDA library's error as the crate's.
fn cuda(what: &'static str) -> impl Fn(&dyn std::fmt::Display) -> Error {
    move |e| Error::Cuda { what, detail: e.to_string() }
}

fn zeros(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    gpu.stream().alloc_zeros(n).map_err(|e| cuda("allocation")(&e))
}

fn main() -> Result<()> {
    let gpu = Gpu::new(0)?;
    let mut rng = Rng::new(1);
    println!("{}", kubemoe_kernels::device::Device::name(&gpu));

    // The limit of the memory-bound kernels: a 1 GiB copy, read and write counted.
    let n = 1 << 28;
    let a = zeros(&gpu, n)?;
    let mut b = zeros(&gpu, n)?;
    let t = median_secs(&gpu, || gpu.stream().memcpy_dtod(&a, &mut b).map_err(|e| cuda("copy")(&e)))?;
    let bandwidth = 2.0 * (n * 4) as f64 / t;
    println!("copy bandwidth: {:.0} GB/s (the limit below)", bandwidth / 1e9);
    let report = |name: &str, bytes: f64, t: f64| {
        println!(
            "{name}: {:.3} ms, {:.0} GB/s, {:.2} of the copy bandwidth",
            t * 1e3,
            bytes / t / 1e9,
            bytes / t / bandwidth
        );
    };

    let (rows, dim) = (8192, 7168);
    let x = gpu.upload(&rng.vec(rows * dim))?;
    let w = gpu.upload(&rng.vec(dim))?;
    let mut out = zeros(&gpu, rows * dim)?;
    let t = median_secs(&gpu, || gpu.rms_norm(&x, dim, rows, &w, 1e-6, &mut out))?;
    report("rms_norm [8192, 7168]", (2 * rows * dim * 4) as f64, t);

    let mut g = zeros(&gpu, n / 4)?;
    let u = zeros(&gpu, n / 4)?;
    let t = median_secs(&gpu, || gpu.swiglu(&mut g, &u))?;
    report("swiglu 64M", (3 * (n / 4) * 4) as f64, t);

    let (wr, wc) = (7168, 2048);
    let f32w = Weight::from_f32(rng.vec(wr * wc), wr, wc)?;
    let mut wide = zeros(&gpu, wr * wc)?;
    for dtype in [Dtype::Bf16, Dtype::Fp8] {
        let w = gpu.weight(&f32w.to(dtype, [128, 128])?)?;
        let t = median_secs(&gpu, || gpu.widen(&w, &mut wide))?;
        report(&format!("widen {} [7168, 2048]", dtype.as_str()), (wr * wc * (dtype.size() + 4)) as f64, t);
    }

    // DeepSeek-V3's MLA decode: 128 heads on a 512 + 64 latent cache of 4096 positions.
    let shape = Latent { heads: 128, rank: 512, rope: 64, scale: 0.1 };
    let s = 4096;
    let qa = gpu.upload(&rng.vec(shape.heads * shape.width()))?;
    let cache = gpu.upload(&rng.vec(s * shape.width()))?;
    let mut lat = zeros(&gpu, shape.heads * shape.rank)?;
    let t = median_secs(&gpu, || gpu.latent_attention(shape, &qa, &cache, 1, &mut lat))?;
    report(
        "MLA decode attention (128 heads, 4096 positions), cache bytes",
        (s * shape.width() * 4) as f64,
        t,
    );

    // Grouped expert FFN, DeepSeek-V3's expert shape (7168 → 2048 → 7168), 16 experts × 256
    // rows, against one SGEMM of the same FLOPs ([4096, 7168] · [7168, 6144]).
    let (hidden, inter, experts_n, per) = (7168, 2048, 16, 256);
    let tokens = experts_n * per;
    let mut f32e = Vec::new();
    for _ in 0..experts_n {
        let mut three = Vec::new();
        for (r, c) in [(inter, hidden), (inter, hidden), (hidden, inter)] {
            three.push(Weight::from_f32(rng.vec(r * c).iter().map(|v| v * 0.02).collect(), r, c)?);
        }
        f32e.push(three);
    }
    let assignments: Vec<Assignment> =
        (0..tokens).map(|t| Assignment { token: t as u32, expert: (t / per) as u32, weight: 1.0 }).collect();
    let x = gpu.upload(&rng.vec(tokens * hidden))?;
    let mut out = zeros(&gpu, tokens * hidden)?;
    let flops = 2.0 * tokens as f64 * 3.0 * (hidden * inter) as f64;
    // SAFETY: loading the library runs only its initialisers; cudarc panics on a call into a
    // library it cannot load, which this check avoids.
    let t_blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| cuda("cuBLAS")(&e))?;
        let (m, k, nn) = (tokens, hidden, 3 * inter);
        let sa = zeros(&gpu, m * k)?;
        let sb = zeros(&gpu, k * nn)?;
        let mut sc = zeros(&gpu, m * nn)?;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: nn as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: nn as i32,
            ldb: k as i32,
            beta: 0.0f32,
            ldc: nn as i32,
        };
        // SAFETY: column-major [nn, k] · [k, m] → [nn, m] over buffers of exactly those sizes.
        let t_blas = median_secs(&gpu, || {
            unsafe { blas.gemm(cfg, &sb, &sa, &mut sc) }.map_err(|e| cuda("sgemm")(&e))
        })?;
        println!(
            "cuBLAS SGEMM [4096, 7168] · [7168, 6144]: {:.3} ms, {:.1} TFLOP/s (the limit below)",
            t_blas * 1e3,
            flops / t_blas / 1e12
        );
        Some(t_blas)
    } else {
        println!("cuBLAS (libcublas.so.12) not found: the grouped expert FFN is reported without its limit");
        None
    };
    for dtype in [Dtype::F32, Dtype::Bf16, Dtype::Fp8] {
        let held: Vec<Vec<Weight>> = f32e
            .iter()
            .map(|ws| ws.iter().map(|w| w.to(dtype, [128, 128])).collect::<Result<_>>())
            .collect::<Result<_>>()?;
        let refs: Vec<ExpertRef> = held
            .iter()
            .map(|ws| ExpertRef { gate_proj: &ws[0], up_proj: &ws[1], down_proj: &ws[2] })
            .collect();
        let experts: Vec<GpuExpert> =
            refs.iter().map(|e| gpu.expert(hidden, inter, e)).collect::<Result<_>>()?;
        let experts: Vec<&GpuExpert> = experts.iter().collect();
        let t = median_secs(&gpu, || gpu.grouped_expert_ffn(&x, &experts, &assignments, &mut out))?;
        println!(
            "grouped expert FFN {} (16 experts × 256 rows): {:.3} ms, {:.1} TFLOP/s{}",
            dtype.as_str(),
            t * 1e3,
            flops / t / 1e12,
            t_blas.map(|b| format!(", {:.2} of SGEMM", b / t)).unwrap_or_default()
        );
    }
    Ok(())
}
