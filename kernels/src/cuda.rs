//! Kernels on an NVIDIA GPU (the `cuda` feature), through cudarc with the CUDA libraries loaded
//! at run time: a build needs no CUDA installed, and [`Gpu::new`] names the library it misses.
//!
//! The kernels are kubemoe's own, in `kernels/cuda/*.cu` ([`SOURCES`]), each compiled by NVRTC
//! with `common.cuh` in front to machine code (a cubin) for the GPU's architecture, the first
//! time a GPU needs it; cubins are kept on disk by content hash ([`kernel_cache`]), so a
//! machine without NVRTC runs kernels compiled on another. Not PTX: a driver refuses PTX from
//! an NVRTC newer than itself (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), while any CUDA 12 driver
//! loads a CUDA 12 cubin (NVIDIA's minor version compatibility). CI compiles every source for
//! sm_80 and sm_90 (A100, H100/H200) and fails on any warning.
//!
//! Invariants:
//! - Every kernel computes its CPU counterpart's function: conversions are exact, sums are
//!   f32, nothing is compiled with fast math; results differ from the CPU's in summation order,
//!   fused multiply-adds (NVRTC's default, as the CPU's AVX kernels) and `expf`'s last 2 ulp. The same tests run on both (`kernels/tests/devices.rs`).
//! - Every size is checked on the host before a launch, against the buffers passed: a kernel
//!   never reads or writes outside them. This is the safety argument of each launch below,
//!   with the kernel's parameter list, which each launch's arguments follow in order and type.
//! - A [`Gpu`] runs everything on one stream, in call order; a copy back to the host waits
//!   for what came before it.
#![allow(unsafe_code)]

use crate::attention::Latent;
use crate::device::{check_rope, check_swiglu, Device};
use crate::gate::{GateParams, Scoring, TopkMethod};
use crate::moe::{check_experts, sort_by_expert, Assignment, ExpertRef};
use crate::rope::Rope;
use crate::weight::Dtype;
use crate::{check_len, Error, Result, Weight};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{result as nvrtc, Ptx};
use std::collections::HashMap;
use std::ffi::CString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One CUDA source of `kernels/cuda/` and the kernels it defines.
pub struct Source {
    pub name: &'static str,
    pub code: &'static str,
    pub kernels: &'static [&'static str],
}

const PRELUDE: &str = include_str!("../cuda/common.cuh");

pub const SOURCES: &[Source] = &[
    Source { name: "norm.cu", code: include_str!("../cuda/norm.cu"), kernels: &["rms_norm"] },
    Source { name: "activation.cu", code: include_str!("../cuda/activation.cu"), kernels: &["swiglu"] },
    Source { name: "rope.cu", code: include_str!("../cuda/rope.cu"), kernels: &["rope"] },
    Source {
        name: "weights.cu",
        code: include_str!("../cuda/weights.cu"),
        kernels: &["widen_f32", "widen_bf16", "widen_f16", "widen_fp8"],
    },
    Source {
        name: "attention.cu",
        code: include_str!("../cuda/attention.cu"),
        kernels: &["latent_scores", "causal_softmax_rows", "latent_values"],
    },
    Source { name: "gate.cu", code: include_str!("../cuda/gate.cu"), kernels: &["route"] },
    Source {
        name: "moe.cu",
        code: include_str!("../cuda/moe.cu"),
        kernels: &[
            "gather_rows",
            "scatter_add_rows",
            "expert_linear_f32",
            "expert_linear_bf16",
            "expert_linear_f16",
            "expert_linear_fp8",
        ],
    },
];

/// The architectures CI compiles every source for: A100 (sm_80) and H100/H200 (sm_90).
pub const CHECKED_ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Limits of `gate.cu`'s per-thread arrays.
const MAX_EXPERTS: usize = 256;
const MAX_GROUPS: usize = 64;
const MAX_TOP_K: usize = 16;

fn err(what: &'static str, detail: impl std::fmt::Display) -> Error {
    Error::Cuda { what, detail: detail.to_string() }
}

/// What NVRTC compiles for `source`: the prelude, then the file with its own line numbers.
fn program_text(source: &Source) -> String {
    format!("{PRELUDE}\n#line 1 \"{}\"\n{}", source.name, source.code)
}

fn c_text(chars: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A cubin and what NVRTC said while compiling it (empty for a clean compile).
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub diagnostics: String,
}

/// Fails unless NVRTC can be loaded, saying how to get it. cudarc panics when a function of a
/// library it cannot load is called; this check turns that into an error.
fn nvrtc_present() -> Result<()> {
    // SAFETY: loading the library runs only its initialisers.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    Err(err(
        "nvrtc",
        "libnvrtc.so (NVRTC) was not found: install the CUDA toolkit, or `pip install \
         nvidia-cuda-nvrtc-cu12`, and put the folder that holds it on LD_LIBRARY_PATH",
    ))
}

/// Compiles `source` to a cubin for `arch` (`sm_XY`) with NVRTC. Warnings come back in
/// [`Compiled::diagnostics`]: CI fails on any (the sources compile clean with CI's NVRTC), a
/// GPU host with another NVRTC logs them and runs.
pub fn compile(source: &Source, arch: &str) -> Result<Compiled> {
    nvrtc_present()?;
    let text = CString::new(program_text(source)).map_err(|e| err("nvrtc", e))?;
    let name = CString::new(source.name).map_err(|e| err("nvrtc", e))?;
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(|e| err("nvrtc", e))?;
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY: `prog` is the program created above; it is destroyed here and used nowhere else.
    // The cubin is copied into a buffer of the size NVRTC reports for it.
    let (compiled, log, cubin) = unsafe {
        let compiled = nvrtc::compile_program(prog, &options);
        let log = nvrtc::get_program_log(prog).map(|l| c_text(&l)).unwrap_or_default();
        let cubin = compiled.is_ok().then(|| {
            let mut size = 0usize;
            cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
            let mut cubin = vec![0u8; size];
            // A virtual architecture (`compute_XY`) has no cubin: size 0, nothing to read.
            if size > 0 {
                cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()).result()?;
            }
            Ok::<_, cudarc::nvrtc::result::NvrtcError>(cubin)
        });
        // Freeing a program that compiled cannot change its cubin, already copied.
        let _ = nvrtc::destroy_program(prog);
        (compiled, log, cubin)
    };
    if let Err(e) = compiled {
        return Err(err("nvrtc", format!("{} for {arch}: {e:?}\n{}", source.name, log.trim())));
    }
    match cubin {
        Some(Ok(cubin)) if !cubin.is_empty() => Ok(Compiled { cubin, diagnostics: log.trim().to_string() }),
        Some(Err(e)) => Err(err("nvrtc", format!("{}: reading the cubin: {e:?}", source.name))),
        _ => Err(err(
            "nvrtc",
            format!("{} for {arch}: no cubin (is {arch} a real architecture, sm_XY?)", source.name),
        )),
    }
}

/// Where compiled kernels are kept: `$KUBEMOE_KERNEL_CACHE`, else `kubemoe/kernels` under
/// `$XDG_CACHE_HOME` or `~/.cache`.
pub fn kernel_cache() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("KUBEMOE_KERNEL_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kubemoe/kernels")))
        .or_else(|| env("HOME").map(|d| d.join(".cache/kubemoe/kernels")))
}

/// `source`'s cubin for `arch`: from `cache` when it holds the cubin of this exact program
/// text (whichever CUDA 12 NVRTC made it), else compiled and stored there. A cache that cannot
/// be written only costs a compile.
pub fn cubin(source: &Source, arch: &str, cache: Option<&Path>) -> Result<Vec<u8>> {
    let text = program_text(source);
    let mut h = std::hash::DefaultHasher::new();
    (&text, arch).hash(&mut h);
    let stem = source.name.trim_end_matches(".cu");
    let file = cache.map(|d| d.join(format!("{stem}-{arch}-{:016x}.cubin", h.finish())));
    if let Some(cubin) = file.as_ref().and_then(|f| std::fs::read(f).ok()) {
        return Ok(cubin);
    }
    let Compiled { cubin, diagnostics } = compile(source, arch)?;
    if !diagnostics.is_empty() {
        tracing::warn!(source = source.name, arch, "NVRTC diagnostics: {diagnostics}");
    }
    if let Some(file) = file {
        // Unique per process and call: threads of one process may store the same file.
        static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = file.with_extension(format!("tmp{}-{n}", std::process::id()));
        let stored = file.parent().map(std::fs::create_dir_all).transpose().is_ok()
            && std::fs::write(&tmp, &cubin).is_ok()
            && std::fs::rename(&tmp, &file).is_ok();
        if !stored {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

/// `v` as a kernel's `int` parameter.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Param { op: "cuda", detail: format!("{what} {v} is over 2^31 - 1") })
}

/// Blocks of 256 threads for a grid-stride loop over `n` values.
fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A weight matrix resident on the GPU in its stored precision (FP8 with its block scales).
pub struct GpuWeight {
    dtype: Dtype,
    rows: usize,
    cols: usize,
    data: CudaSlice<u8>,
    /// FP8 only: `[⌈rows/b0⌉, ⌈cols/b1⌉]` scales.
    scales: Option<CudaSlice<f32>>,
    block: [usize; 2],
}

impl GpuWeight {
    /// Bytes held on the GPU: the values, and FP8's scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.as_ref().map_or(0, |s| s.len() * 4)
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// One routed expert on the GPU, `hidden → inter → hidden` (its three matrices' PyTorch layout).
pub struct GpuExpert {
    pub gate_proj: GpuWeight,
    pub up_proj: GpuWeight,
    pub down_proj: GpuWeight,
}

impl GpuExpert {
    pub fn matrices(&self) -> [&GpuWeight; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }
}

/// A [`Rope`]'s frequencies on the GPU.
pub struct GpuRope {
    /// f32, as the CPU multiplies them by the position.
    inv_freq: CudaSlice<f32>,
    attention_factor: f64,
    interleaved: bool,
}

/// One NVIDIA GPU with kubemoe's kernels loaded.
pub struct Gpu {
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    name: String,
}

impl Gpu {
    /// GPU `ordinal`, its kernels compiled (or read from [`kernel_cache`]) for its architecture.
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: as in `nvrtc_present`: loading the library runs only its initialisers.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(err(
                "driver",
                "libcuda.so (the NVIDIA driver) was not found: this machine has no NVIDIA driver, \
                 or the folder that holds it is not on LD_LIBRARY_PATH",
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| err("driver", format!("GPU {ordinal}: {e}")))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| err("driver", e))?;
        let arch = format!("sm_{major}{minor}");
        let cache = kernel_cache();
        let mut functions = HashMap::new();
        for source in SOURCES {
            let module =
                ctx.load_module(Ptx::from_binary(cubin(source, &arch, cache.as_deref())?)).map_err(|e| {
                    let cached = cache.as_ref().map(|d| {
                        format!(" (compiled or read in {}: empty it to compile again)", d.display())
                    });
                    err("driver", format!("{} for {arch}: {e}{}", source.name, cached.unwrap_or_default()))
                })?;
            for kernel in source.kernels {
                let f = module.load_function(kernel).map_err(|e| err("driver", format!("{kernel}: {e}")))?;
                functions.insert(*kernel, f);
            }
        }
        let name = format!("cuda:{ordinal} ({}, sm_{major}{minor})", ctx.name().unwrap_or_default());
        Ok(Self { stream: ctx.default_stream(), functions, name })
    }

    fn kernel(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| err("kernel", format!("{name} is not in any source")))
    }

    /// `v` on the GPU; an empty slice is refused (a zero-byte allocation fails on some drivers).
    pub fn upload<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        if v.is_empty() {
            return Err(Error::Param { op: "cuda", detail: "an empty buffer".into() });
        }
        self.stream.clone_htod(v).map_err(|e| err("copy to the GPU", e))
    }

    /// `v` back on the host, once everything before it on the stream has run.
    pub fn download<T: DeviceRepr>(&self, v: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(v).map_err(|e| err("copy from the GPU", e))
    }

    fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(n.max(1)).map_err(|e| err("allocation", e))
    }

    /// An output buffer of NaN, for the host-slice wrappers: a value a kernel fails to write
    /// shows in the tests instead of passing as a zero.
    fn unwritten(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.upload(&vec![f32::NAN; n.max(1)])
    }

    /// `w` resident on the GPU, in its own precision.
    pub fn weight(&self, w: &Weight) -> Result<GpuWeight> {
        let (bytes, scales, block) = w.raw();
        let scales = if w.dtype() == Dtype::Fp8 { Some(self.upload(scales)?) } else { None };
        Ok(GpuWeight {
            dtype: w.dtype(),
            rows: w.rows(),
            cols: w.cols(),
            data: self.upload(bytes)?,
            scales,
            block,
        })
    }

    /// An expert resident on the GPU, after checking it is `hidden → inter → hidden`.
    pub fn expert(&self, hidden: usize, inter: usize, e: &ExpertRef<'_>) -> Result<GpuExpert> {
        check_experts(hidden, inter, [e.shapes()])?;
        Ok(GpuExpert {
            gate_proj: self.weight(e.gate_proj)?,
            up_proj: self.weight(e.up_proj)?,
            down_proj: self.weight(e.down_proj)?,
        })
    }

    /// `out` [rows, dim] = RMSNorm of `rows` rows of `x`, `x_ld` apart; `dim` is the weight's length.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        x_ld: usize,
        rows: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let dim = weight.len();
        if x_ld < dim {
            return Err(Error::Param {
                op: "rms_norm",
                detail: format!("row stride {x_ld} below the {dim} values"),
            });
        }
        check_len("rms_norm", "x", x.len(), rows.saturating_sub(1) * x_ld + dim)?;
        check_len("rms_norm", "output", out.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (int(rows, "rows")? as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (x_ld, dim) = (int(x_ld, "row stride")?, int(dim, "dimension")?);
        // SAFETY: norm.cu `rms_norm(const float* x, int x_ld, const float* weight, float eps,
        // int dim, float* out)`; block r reads x[r·x_ld ..][..dim] and writes out[r·dim ..][..dim].
        let launched = unsafe {
            self.stream
                .launch_builder(self.kernel("rms_norm")?)
                .arg(x)
                .arg(&x_ld)
                .arg(weight)
                .arg(&eps)
                .arg(&dim)
                .arg(out)
                .launch(cfg)
        };
        launched.map(drop).map_err(|e| err("rms_norm", e))
    }

    /// `gate = silu(gate) ⊙ up`.
    pub fn swiglu(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        let n = gate.len();
        check_len("swiglu", "up", up.len(), n)?;
        // SAFETY: activation.cu `swiglu(float* gate, const float* up, long long n)`; i < n.
        let launched = unsafe {
            self.stream
                .launch_builder(self.kernel("swiglu")?)
                .arg(gate)
                .arg(up)
                .arg(&(n as i64))
                .launch(grid_1d(n))
        };
        launched.map(drop).map_err(|e| err("swiglu", e))
    }

    /// `rope`'s frequencies, for [`Gpu::rope`].
    pub fn rope_table(&self, rope: &Rope) -> Result<GpuRope> {
        let inv_freq: Vec<f32> = rope.inv_freq.iter().map(|f| *f as f32).collect();
        Ok(GpuRope {
            inv_freq: self.upload(&inv_freq)?,
            attention_factor: rope.attention_factor,
            interleaved: rope.interleaved,
        })
    }

    /// Rotates, in each `stride`-long row of `x`, the `2 · half` values at `offset` to the
    /// position of the row's token: row `r` is token `r / heads`, at `positions[r / heads]`.
    pub fn rope(
        &self,
        rope: &GpuRope,
        x: &mut CudaSlice<f32>,
        stride: usize,
        offset: usize,
        heads: usize,
        positions: &CudaSlice<i32>,
    ) -> Result<()> {
        let half = rope.inv_freq.len();
        let rows = positions.len() * heads;
        if offset + 2 * half > stride {
            return Err(Error::Shape {
                op: "rope",
                detail: format!("rows of {stride} cannot hold {} rotary values at {offset}", 2 * half),
            });
        }
        check_len("rope", "x", x.len(), rows * stride)?;
        if rows * half == 0 {
            return Ok(());
        }
        let (rows_i, stride_i, offset_i, heads_i, half_i) = (
            int(rows, "rows")?,
            int(stride, "stride")?,
            int(offset, "offset")?,
            int(heads, "heads")?,
            int(half, "half")?,
        );
        let cfg = LaunchConfig {
            grid_dim: ((rows * half).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let interleaved = i32::from(rope.interleaved);
        // SAFETY: rope.cu `rope(float* x, int rows, int stride, int offset, int heads,
        // const int* positions, const float* inv_freq, int half, double attention_factor,
        // int interleaved)`; thread (r, i) with r < rows touches x[r·stride + offset ..][..2·half],
        // positions[r / heads] (r / heads < positions.len()) and inv_freq[i], i < half.
        let launched = unsafe {
            self.stream
                .launch_builder(self.kernel("rope")?)
                .arg(x)
                .arg(&rows_i)
                .arg(&stride_i)
                .arg(&offset_i)
                .arg(&heads_i)
                .arg(positions)
                .arg(&rope.inv_freq)
                .arg(&half_i)
                .arg(&rope.attention_factor)
                .arg(&interleaved)
                .launch(cfg)
        };
        launched.map(drop).map_err(|e| err("rope", e))
    }

    /// `w` widened to f32 into `out` [rows, cols].
    pub fn widen(&self, w: &GpuWeight, out: &mut CudaSlice<f32>) -> Result<()> {
        let n = w.rows * w.cols;
        check_len("widen", "output", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let data = &w.data;
        let launched = match (w.dtype, &w.scales) {
            (Dtype::Fp8, Some(scales)) => {
                let (rows, cols) = (int(w.rows, "rows")?, int(w.cols, "cols")?);
                let (b0, b1) = (int(w.block[0], "block")?, int(w.block[1], "block")?);
                // SAFETY: weights.cu `widen_fp8(const u8* w, const float* scales, int rows,
                // int cols, int b0, int b1, float* out)`: rows·cols bytes in, as many floats
                // out, scales [⌈rows/b0⌉, ⌈cols/b1⌉].
                unsafe {
                    self.stream
                        .launch_builder(self.kernel("widen_fp8")?)
                        .arg(data)
                        .arg(scales)
                        .arg(&rows)
                        .arg(&cols)
                        .arg(&b0)
                        .arg(&b1)
                        .arg(out)
                        .launch(grid_1d(n))
                }
            }
            (Dtype::Fp8, None) => return Err(err("widen", "an FP8 weight without scales")),
            (dtype, _) => {
                let kernel = match dtype {
                    Dtype::F32 => "widen_f32",
                    Dtype::Bf16 => "widen_bf16",
                    _ => "widen_f16",
                };
                // SAFETY: weights.cu `widen_*(const T* w, long long n, float* out)` with T the
                // dtype's type: n values in (`bytes` bytes), n floats out.
                unsafe {
                    self.stream
                        .launch_builder(self.kernel(kernel)?)
                        .arg(data)
                        .arg(&(n as i64))
                        .arg(out)
                        .launch(grid_1d(n))
                }
            }
        };
        launched.map(drop).map_err(|e| err("widen", e))
    }

    /// MLA attention on a latent cache: `out` [n, heads, rank] for the absorbed queries `qa`
    /// [n, heads, rank + rope] of the last `n` positions of `cache` [s, rank + rope].
    pub fn latent_attention(
        &self,
        shape: Latent,
        qa: &CudaSlice<f32>,
        cache: &CudaSlice<f32>,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = shape.check(qa.len(), cache.len(), n, out.len())?;
        let rows = n * shape.heads;
        if rows * shape.rank == 0 {
            return Ok(());
        }
        let mut scores = self.zeros(rows * s)?;
        let (n_i, heads_i, s_i) = (int(n, "queries")?, int(shape.heads, "heads")?, int(s, "positions")?);
        let (w_i, r_i, rows_i) = (int(shape.width(), "width")?, int(shape.rank, "rank")?, int(rows, "rows")?);
        let blocks = |total: usize| LaunchConfig {
            grid_dim: (total.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attention.cu `latent_scores(const float* qa, const float* cache, int n, int heads,
        // int s, int w, float scale, float* scores)`: thread (q, j) < (n·heads, s) reads qa[q·w ..][..w]
        // and cache[j·w ..][..w], writes scores[q·s + j]; `check` sized qa and cache.
        unsafe {
            self.stream
                .launch_builder(self.kernel("latent_scores")?)
                .arg(qa)
                .arg(cache)
                .arg(&n_i)
                .arg(&heads_i)
                .arg(&s_i)
                .arg(&w_i)
                .arg(&shape.scale)
                .arg(&mut scores)
                .launch(blocks(rows * s))
        }
        .map_err(|e| err("latent_scores", e))?;
        let cfg =
            LaunchConfig { grid_dim: (rows_i as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: attention.cu `causal_softmax_rows(float* scores, int n, int heads, int s)`: block
        // q < n·heads touches scores[q·s ..][..s].
        unsafe {
            self.stream
                .launch_builder(self.kernel("causal_softmax_rows")?)
                .arg(&mut scores)
                .arg(&n_i)
                .arg(&heads_i)
                .arg(&s_i)
                .launch(cfg)
        }
        .map_err(|e| err("causal_softmax_rows", e))?;
        // SAFETY: attention.cu `latent_values(const float* p, const float* cache, int rows, int s,
        // int w, int r, float* out)`: thread (q, c) < (rows, r) reads p[q·s ..][..s] and column c
        // of cache's s rows of w, writes out[q·r + c]; `check` sized out.
        unsafe {
            self.stream
                .launch_builder(self.kernel("latent_values")?)
                .arg(&scores)
                .arg(cache)
                .arg(&rows_i)
                .arg(&s_i)
                .arg(&w_i)
                .arg(&r_i)
                .arg(out)
                .launch(blocks(rows * shape.rank))
        }
        .map(drop)
        .map_err(|e| err("latent_values", e))
    }

    /// The gate: `ids` and `weights` [tokens, top_k] for `logits` [tokens, n_experts].
    pub fn route(
        &self,
        p: &GateParams,
        logits: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        ids: &mut CudaSlice<u32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        p.validate()?;
        if p.n_experts > MAX_EXPERTS || p.n_group > MAX_GROUPS || p.top_k > MAX_TOP_K {
            return Err(Error::Param {
                op: "gate",
                detail: format!(
                    "the CUDA gate takes up to {MAX_EXPERTS} experts, {MAX_GROUPS} groups and top_k \
                     {MAX_TOP_K}; this one has {}, {} and {}",
                    p.n_experts, p.n_group, p.top_k
                ),
            });
        }
        let tokens = logits.len() / p.n_experts;
        check_len("gate", "ids", ids.len(), tokens * p.top_k)?;
        check_len("gate", "weights", weights.len(), tokens * p.top_k)?;
        if let Some(b) = bias {
            check_len("gate", "e_score_correction_bias", b.len(), p.n_experts)?;
        }
        let method = match p.method {
            TopkMethod::Greedy => 0i32,
            TopkMethod::GroupLimitedGreedy => 1,
            TopkMethod::NoauxTc => 2,
        };
        if tokens == 0 {
            return Ok(());
        }
        // The others are within the limits checked above.
        let ints = [
            int(tokens, "tokens")?,
            p.n_experts as i32,
            p.top_k as i32,
            p.n_group as i32,
            p.topk_group as i32,
        ];
        let (sigmoid, norm) = (i32::from(p.scoring == Scoring::Sigmoid), i32::from(p.norm_topk_prob));
        let null = 0u64;
        let cfg = LaunchConfig {
            grid_dim: (tokens.div_ceil(64) as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = self.kernel("route")?;
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(logits);
        match bias {
            Some(b) => launch.arg(b),
            None => launch.arg(&null),
        };
        for v in &ints {
            launch.arg(v);
        }
        launch.arg(&sigmoid).arg(&method).arg(&norm).arg(&p.routed_scaling_factor).arg(ids).arg(weights);
        // SAFETY: gate.cu `route(const float* logits, const float* bias (or null), int tokens,
        // int n_experts, int top_k, int n_group, int topk_group, int sigmoid_scoring, int method,
        // int norm_topk_prob, float routed_scaling_factor, u32* ids, float* weights)`; thread t <
        // tokens reads logits[t·n_experts ..][..n_experts] and writes [t·top_k ..][..top_k]; the
        // limits above bound its arrays; `validate` makes the groups divide the experts.
        unsafe { launch.launch(cfg) }.map(drop).map_err(|e| err("route", e))
    }

    /// `out[t] += Σ weight · Expert(x[t])` over the assignments of token `t` (their `expert`
    /// indexes `experts`); `x` and `out` [tokens, hidden], every expert `hidden → inter → hidden`.
    pub fn grouped_expert_ffn(
        &self,
        x: &CudaSlice<f32>,
        experts: &[&GpuExpert],
        assignments: &[Assignment],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let Some(first) = experts.first() else {
            return Err(Error::Param { op: "expert_ffn", detail: "no experts".into() });
        };
        let (hidden, inter) = (first.gate_proj.cols, first.gate_proj.rows);
        check_experts(hidden, inter, experts.iter().map(|e| e.matrices().map(|w| [w.rows, w.cols])))?;
        let tokens = x.len() / hidden.max(1);
        check_len("expert_ffn", "output", out.len(), tokens * hidden)?;
        let (counts, order) = sort_by_expert(assignments, experts.len(), tokens)?;
        let n = assignments.len();
        if n == 0 {
            return Ok(());
        }
        // Row j of the sorted rows is token `rows[j]`; expert e owns rows offsets[e]..offsets[e + 1].
        let rows: Vec<u32> = order.iter().map(|&i| assignments[i].token).collect();
        let mut offsets = vec![0i32; counts.len() + 1];
        for (e, c) in counts.iter().enumerate() {
            offsets[e + 1] = offsets[e] + int(*c, "assignments")?;
        }
        // Each token's sorted rows and weights, in sorted (expert) order: `starts` [tokens + 1].
        let mut starts = vec![0i32; tokens + 1];
        for a in assignments {
            starts[a.token as usize + 1] += 1;
        }
        for t in 0..tokens {
            starts[t + 1] += starts[t];
        }
        let mut fill: Vec<usize> = starts.iter().map(|s| *s as usize).collect();
        let (mut token_rows, mut token_weights) = (vec![0u32; n], vec![0f32; n]);
        for (j, &i) in order.iter().enumerate() {
            let t = assignments[i].token as usize;
            token_rows[fill[t]] = j as u32;
            token_weights[fill[t]] = assignments[i].weight;
            fill[t] += 1;
        }
        let (rows, offsets) = (self.upload(&rows)?, self.upload(&offsets)?);
        let (starts, token_rows, token_weights) =
            (self.upload(&starts)?, self.upload(&token_rows)?, self.upload(&token_weights)?);
        let max_rows = counts.iter().copied().max().unwrap_or(0);
        let mut xs = self.zeros(n * hidden)?;
        let (hidden_i, n_i) = (int(hidden, "hidden")?, int(n, "assignments")?);
        // SAFETY: moe.cu `gather_rows(const float* x, int hidden, const u32* rows, int n,
        // float* out)`: rows[j] < tokens (checked by `sort_by_expert`), out [n, hidden].
        unsafe {
            self.stream
                .launch_builder(self.kernel("gather_rows")?)
                .arg(x)
                .arg(&hidden_i)
                .arg(&rows)
                .arg(&n_i)
                .arg(&mut xs)
                .launch(grid_1d(n * hidden))
        }
        .map_err(|e| err("gather_rows", e))?;
        let mut g = self.zeros(n * inter)?;
        let mut u = self.zeros(n * inter)?;
        let mut y = self.zeros(n * hidden)?;
        let split = (&offsets, n, max_rows);
        let gate: Vec<&GpuWeight> = experts.iter().map(|e| &e.gate_proj).collect();
        let up: Vec<&GpuWeight> = experts.iter().map(|e| &e.up_proj).collect();
        let down: Vec<&GpuWeight> = experts.iter().map(|e| &e.down_proj).collect();
        self.expert_linear(&gate, &xs, split, &mut g)?;
        self.expert_linear(&up, &xs, split, &mut u)?;
        self.swiglu(&mut g, &u)?;
        self.expert_linear(&down, &g, split, &mut y)?;
        let cfg = LaunchConfig {
            grid_dim: (int(tokens, "tokens")? as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: moe.cu `scatter_add_rows(const float* y, int hidden, const int* starts,
        // const u32* rows, const float* weight, float* out)`: block t < tokens reads
        // starts[t..=t + 1] (tokens + 1 of them), entries below n of rows (each < n, a row of
        // y [n, hidden]) and weight, and writes out[t·hidden ..][..hidden].
        unsafe {
            self.stream
                .launch_builder(self.kernel("scatter_add_rows")?)
                .arg(&y)
                .arg(&hidden_i)
                .arg(&starts)
                .arg(&token_rows)
                .arg(&token_weights)
                .arg(out)
                .launch(cfg)
        }
        .map(drop)
        .map_err(|e| err("scatter_add_rows", e))
    }

    /// `y` [m, rows] = `x` [m, cols] · Wᵀ (a dense layer: one "expert" that owns every row).
    pub fn linear(&self, w: &GpuWeight, x: &CudaSlice<f32>, m: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let offsets = self.upload(&[0, int(m, "rows")?])?;
        self.expert_linear(&[w], x, (&offsets, m, m), y)
    }

    /// Waits for everything queued on the GPU's stream (for timing).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }

    /// The stream every call runs on (for libraries that join it, such as cuBLAS).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `y[r] = x[r] · W_eᵀ` for the rows r of each expert e, `ws[e]` its weight (all of one
    /// shape, dtype and block size): `offsets` [ws.len() + 1] (on the GPU) split `rows` rows
    /// among them, at most `max_rows` each.
    fn expert_linear(
        &self,
        ws: &[&GpuWeight],
        x: &CudaSlice<f32>,
        (offsets, rows, max_rows): (&CudaSlice<i32>, usize, usize),
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let Some(first) = ws.first() else {
            return Err(Error::Param { op: "expert_linear", detail: "no weights".into() });
        };
        for (i, w) in ws.iter().enumerate() {
            if (w.rows, w.cols, w.dtype, w.block) != (first.rows, first.cols, first.dtype, first.block) {
                return Err(Error::Shape {
                    op: "expert_linear",
                    detail: format!(
                        "weight {i} is {} [{}, {}], weight 0 {} [{}, {}]",
                        w.dtype.as_str(),
                        w.rows,
                        w.cols,
                        first.dtype.as_str(),
                        first.rows,
                        first.cols
                    ),
                });
            }
        }
        let (n, k) = (first.rows, first.cols);
        check_len("expert_linear", "input", x.len(), rows * k)?;
        check_len("expert_linear", "output", y.len(), rows * n)?;
        if offsets.len() != ws.len() + 1 {
            return Err(err("expert_linear", format!("{} offsets for {} weights", offsets.len(), ws.len())));
        }
        if rows * n == 0 {
            return Ok(());
        }
        if max_rows.div_ceil(16) > 65_535 || ws.len() > 65_535 {
            return Err(Error::Param {
                op: "expert_linear",
                detail: format!(
                    "{max_rows} rows of one weight over {} weights: the GPU kernel takes up to {} and 65535",
                    ws.len(),
                    65_535 * 16
                ),
            });
        }
        let kernel = match first.dtype {
            Dtype::F32 => "expert_linear_f32",
            Dtype::Bf16 => "expert_linear_bf16",
            Dtype::F16 => "expert_linear_f16",
            Dtype::Fp8 => "expert_linear_fp8",
        };
        // Each weight's device address (and FP8 scales'), read by the kernel per expert; the
        // guards order this stream after any pending writes of the weights.
        let mut guards = Vec::new();
        let (mut w_ptrs, mut s_ptrs) = (Vec::new(), Vec::new());
        for w in ws {
            let (p, g) = w.data.device_ptr(&self.stream);
            w_ptrs.push(p);
            guards.push(g);
            if let Some(sc) = &w.scales {
                let (p, g) = sc.device_ptr(&self.stream);
                s_ptrs.push(p);
                guards.push(g);
            }
        }
        let w_ptrs = self.upload(&w_ptrs)?;
        let s_ptrs = if first.dtype == Dtype::Fp8 { Some(self.upload(&s_ptrs)?) } else { None };
        let (b0, b1) = (int(first.block[0], "block")?, int(first.block[1], "block")?);
        let (n_i, k_i) = (int(n, "weight rows")?, int(k, "weight columns")?);
        let null = 0u64;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(16) as u32, max_rows.div_ceil(16).max(1) as u32, ws.len() as u32),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(self.kernel(kernel)?);
        launch.arg(x).arg(offsets).arg(&w_ptrs);
        match &s_ptrs {
            Some(s) => launch.arg(s),
            None => launch.arg(&null),
        };
        launch.arg(&b0).arg(&b1).arg(&n_i).arg(&k_i).arg(y);
        // SAFETY: moe.cu `expert_linear_*(const float* x, const int* offsets, const u64* w_ptrs,
        // const u64* s_ptrs (or null), int b0, int b1, int n, int k, float* y)`: expert
        // e = blockIdx.z < ws.len() reads rows offsets[e] .. offsets[e + 1] ≤ rows of x [rows, k]
        // (the callers' offsets end at `rows`, sized above), its weight [n, k] at w_ptrs[e] and
        // FP8 scales at s_ptrs[e] (each checked to be of this shape), and writes those rows of
        // y [rows, n]. The weights outlive the launch (borrowed for this call; `guards`).
        let launched = unsafe { launch.launch(cfg) }.map(drop).map_err(|e| err("expert_linear", e));
        drop(guards);
        launched
    }
}

impl Device for Gpu {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32) -> Result<Vec<f32>> {
        let dim = weight.len();
        if dim == 0 || !x.len().is_multiple_of(dim) {
            return Err(Error::Shape {
                op: "rms_norm",
                detail: format!("{} values are not rows of the weight's {dim}", x.len()),
            });
        }
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = self.unwritten(x.len())?;
        self.rms_norm(&self.upload(x)?, dim, x.len() / dim, &self.upload(weight)?, eps, &mut out)?;
        self.download(&out)
    }

    fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        check_swiglu(gate, up)?;
        if gate.is_empty() {
            return Ok(Vec::new());
        }
        let mut g = self.upload(gate)?;
        self.swiglu(&mut g, &self.upload(up)?)?;
        self.download(&g)
    }

    fn rope(
        &self,
        rope: &Rope,
        x: &[f32],
        stride: usize,
        offset: usize,
        heads: usize,
        positions: &[usize],
    ) -> Result<Vec<f32>> {
        check_rope(x, stride, heads, positions)?;
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let positions: Vec<i32> = positions.iter().map(|p| int(*p, "position")).collect::<Result<_>>()?;
        let mut xs = self.upload(x)?;
        self.rope(&self.rope_table(rope)?, &mut xs, stride, offset, heads, &self.upload(&positions)?)?;
        self.download(&xs)
    }

    fn linear(&self, w: &Weight, x: &[f32]) -> Result<Vec<f32>> {
        if w.cols() == 0 || !x.len().is_multiple_of(w.cols()) {
            return Err(Error::Shape {
                op: "linear",
                detail: format!("{} input values are not rows of the weight's {} columns", x.len(), w.cols()),
            });
        }
        let m = x.len() / w.cols();
        if m == 0 || w.is_empty() {
            return Ok(vec![0f32; m * w.rows()]);
        }
        let mut y = self.unwritten(m * w.rows())?;
        self.linear(&self.weight(w)?, &self.upload(x)?, m, &mut y)?;
        self.download(&y)
    }

    fn widen(&self, w: &Weight) -> Result<Vec<f32>> {
        if w.is_empty() {
            return Ok(Vec::new());
        }
        let mut out = self.unwritten(w.len())?;
        self.widen(&self.weight(w)?, &mut out)?;
        self.download(&out)
    }

    fn latent_attention(&self, shape: Latent, qa: &[f32], pages: &[&[f32]], n: usize) -> Result<Vec<f32>> {
        // The kernel reads one contiguous cache: the pages are joined on the host.
        shape.page_values(pages)?;
        let cache = pages.concat();
        let len = n * shape.heads * shape.rank;
        shape.check(qa.len(), cache.len(), n, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = self.unwritten(len)?;
        self.latent_attention(shape, &self.upload(qa)?, &self.upload(&cache)?, n, &mut out)?;
        self.download(&out)
    }

    fn route(&self, p: &GateParams, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<u32>, Vec<f32>)> {
        // Everything the CPU checks, before the no-token shortcut: no tokens do not make a bad
        // gate good.
        p.validate()?;
        let tokens = logits.len() / p.n_experts.max(1);
        check_len("gate", "logits", logits.len(), tokens * p.n_experts)?;
        if let Some(b) = bias {
            check_len("gate", "e_score_correction_bias", b.len(), p.n_experts)?;
        }
        if tokens == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let bias = bias.map(|b| self.upload(b)).transpose()?;
        let mut ids =
            self.stream.alloc_zeros::<u32>(tokens * p.top_k.max(1)).map_err(|e| err("allocation", e))?;
        let mut weights = self.unwritten(tokens * p.top_k)?;
        self.route(p, &self.upload(logits)?, bias.as_ref(), &mut ids, &mut weights)?;
        Ok((self.download(&ids)?, self.download(&weights)?))
    }

    fn grouped_expert_ffn(
        &self,
        x: &[f32],
        hidden: usize,
        inter: usize,
        experts: &[ExpertRef<'_>],
        assignments: &[Assignment],
        out: &mut [f32],
    ) -> Result<()> {
        let tokens = x.len() / hidden.max(1);
        check_len("expert_ffn", "output", out.len(), tokens * hidden)?;
        // Refused before any weight is uploaded.
        check_experts(hidden, inter, experts.iter().map(ExpertRef::shapes))?;
        sort_by_expert(assignments, experts.len(), tokens)?;
        if assignments.is_empty() {
            return Ok(());
        }
        let held: Vec<GpuExpert> =
            experts.iter().map(|e| self.expert(hidden, inter, e)).collect::<Result<_>>()?;
        let refs: Vec<&GpuExpert> = held.iter().collect();
        let mut o = self.upload(&out[..tokens * hidden])?;
        self.grouped_expert_ffn(&self.upload(&x[..tokens * hidden])?, &refs, assignments, &mut o)?;
        out[..tokens * hidden].copy_from_slice(&self.download(&o)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI's check of the sources: each compiles for sm_80 and sm_90 without a diagnostic and
    /// defines the kernels it lists. Needs NVRTC (`.ci/run` installs it from PyPI), not a GPU.
    /// With `KUBEMOE_KERNEL_CACHE` set the cubins are also stored there: how
    /// `scripts/gpu-check` takes them to a GPU machine without NVRTC.
    #[test]
    fn every_source_compiles_for_sm80_and_sm90_without_diagnostics() {
        let cache = std::env::var_os("KUBEMOE_KERNEL_CACHE").map(PathBuf::from);
        for source in SOURCES {
            for arch in CHECKED_ARCHS {
                let Compiled { cubin: image, diagnostics } =
                    compile(source, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(
                    diagnostics.is_empty(),
                    "{} for {arch} compiled with diagnostics:\n{diagnostics}",
                    source.name
                );
                for kernel in source.kernels {
                    // The ELF's string table holds each `extern "C"` kernel's name.
                    let name = format!("\0{kernel}\0").into_bytes();
                    assert!(
                        image.windows(name.len()).any(|w| w == name),
                        "{} for {arch}: no kernel {kernel}",
                        source.name
                    );
                }
                if let Some(dir) = &cache {
                    cubin(source, arch, Some(dir)).unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
    }

    #[test]
    fn a_warning_is_reported_with_its_line() {
        let bad = Source {
            name: "bad.cu",
            code: "extern \"C\" __global__ void k(float* x) {\n    int unused;\n    x[0] = 1.0f;\n}\n",
            kernels: &["k"],
        };
        let d = compile(&bad, "sm_80").unwrap().diagnostics;
        assert!(d.contains("bad.cu(2)") && d.contains("unused"), "{d}");
        let broken =
            Source { name: "broken.cu", code: "extern \"C\" __global__ void k() { nope; }\n", kernels: &[] };
        let e = compile(&broken, "sm_80").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("broken.cu(1)") && e.contains("nope"), "{e}");
    }

    #[test]
    fn cubins_are_cached_by_program_text() {
        let dir = std::env::temp_dir().join(format!("kubemoe-cubin-test-{}", std::process::id()));
        let mut first = cubin(&SOURCES[0], "sm_80", Some(&dir)).unwrap();
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1);
        // A stored cubin is what a second call returns, without NVRTC: mark it to tell.
        let file = files[0].as_ref().unwrap().path();
        first.extend_from_slice(b"cached");
        std::fs::write(&file, &first).unwrap();
        assert!(cubin(&SOURCES[0], "sm_80", Some(&dir)).unwrap().ends_with(b"cached"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
