//! Weight matrices resident in the precision of their checkpoint, and the products that read
//! them: f32, bf16 and f16 (two bytes a value), and FP8 e4m3 (one byte a value) with one f32
//! scale per `block` (DeepSeek-V3's 128×128 `weight_scale_inv`, report §3.3.2).
//!
//! Invariants:
//! - Every value is widened to f32 exactly before it is multiplied (bf16 and f16 are subsets
//!   of f32; an FP8 value times its block scale is the one f32 rounding the checkpoint
//!   defines), and products and sums are f32. A bf16 or FP8 weight therefore computes the
//!   same function as the f32 engine on the widened values, to f32 summation order. This is
//!   why the decode kernels widen instead of using AVX-512 BF16 (`vdpbf16ps`) or AMX: both
//!   round the activations to bf16 as well (8 significant bits), which changes the function.
//! - One product kernel serves every batch size ([`Rows::linear`]): a tile of up to 4 rows of
//!   `x` by 1 or 2 weight rows, 16 columns a step along the shared dimension, each output
//!   summed in the lanes of two accumulators, the lanes of 8 outputs reduced together at the
//!   end. It needs no packing: rows of both operands are contiguous in the PyTorch layout.
//!   Decode (up to 4 rows of `x`) is bound by reading the weights, so it takes one weight row
//!   at a time (the weights stream through memory in order; two rows at a time read ~25%
//!   slower here) and widens each value in registers as it is read. Up to `WIDEN_FIRST`
//!   rows of `x` widen in registers too (once per four rows); past that, bf16 and FP8 rows
//!   are widened into a cache-resident f32 panel once per call. f32 weights are read in place.
//!   With more rows than decode (up to `PREFETCH_ROWS`), each panel's tiles prefetch the next
//!   panel's stored bytes, spread over the panel's passes: the first pass over a panel
//!   otherwise waits on memory with nothing to overlap (this took the grouped expert FFN from
//!   ~0.7 to ~0.8 of the GEMM rate here). Decode streams each weight once, in order, and is
//!   left to the hardware's prefetcher.
//! - Every output is summed in an order fixed by the column index alone (see [`tile`]),
//!   whatever the tile, the batch or where the weight was widened: a row's result does not
//!   depend on the rows batched with it, so the products of decode, speculative
//!   verification and prefill agree bit for bit. AVX-512F and AVX2+FMA (chosen at run time,
//!   explicit vectors: LLVM's auto-vectoriser kept several rows' accumulators in memory) fuse
//!   multiply and add and agree exactly; the portable code rounds twice.
//! - Stored values are checked once, at construction: no NaN or infinity can come out.
#![allow(unsafe_code)]

use crate::matmul::{matmul, View};
use crate::{check_len, Error, Result};
use bytes::Bytes;
use half::{bf16, f16};
use rayon::prelude::*;
use std::sync::OnceLock;

/// The precision a weight is held in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
    F16,
    /// `float8_e4m3fn` with block scales.
    Fp8,
}

impl Dtype {
    /// Bytes per value (FP8's scales not counted).
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 | Dtype::F16 => 2,
            Dtype::Fp8 => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::Fp8 => "fp8",
        }
    }
}

/// Rows of `x` up to which a product is decode: bound by reading the weights, it takes one
/// weight row at a time, runs in parallel only over large matrices, and [`Rows::left`]
/// multiplies in registers rather than widening the whole weight for the GEMM.
pub const SMALL: usize = 4;
/// Rows of `x` past which weights held narrower than f32 are widened into a panel before
/// the product, rather than in registers once per four rows.
const WIDEN_FIRST: usize = 16;
/// Rows of `x` up to which a panel prefetches the next: past that, the first of a panel's
/// many passes waits on memory for a small share of the time, and the prefetched lines would
/// compete with those of `x`, which no longer fits the cache.
const PREFETCH_ROWS: usize = 256;
const LANES: usize = 16;
/// 2^120, the step from FP8's exponent bias (7) to f32's (127).
const TWO_120: f32 = f32::from_bits(0x7B80_0000);
/// FP8 block scales must stay below this, so that `2^120 ·` a scale is finite.
const MAX_FP8_SCALE: f32 = 128.0;

/// A row-major `rows × cols` weight matrix in PyTorch's `Linear` layout ([out, in]).
#[derive(Clone)]
pub struct Weight {
    rows: usize,
    cols: usize,
    dtype: Dtype,
    /// `rows · cols` little-endian values; borrowed from a memory map or owned.
    data: Bytes,
    /// FP8 only: `[⌈rows/block[0]⌉, ⌈cols/block[1]⌉]` scales, row-major.
    scales: Vec<f32>,
    block: [usize; 2],
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weight({} [{}, {}])", self.dtype.as_str(), self.rows, self.cols)
    }
}

impl Weight {
    /// An f32 weight holding `values` [rows, cols].
    pub fn from_f32(values: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        Self::stored(Dtype::F32, Bytes::from_owner(crate::dtype::F32s(values)), rows, cols, None)
    }

    /// A weight over stored little-endian values (`data`, borrowed or owned); FP8 needs its
    /// block scales `[⌈rows/b0⌉, ⌈cols/b1⌉]` and `block` size. Refuses data of the wrong size
    /// and any value that is NaN or infinite, or would widen to one.
    pub fn stored(
        dtype: Dtype,
        data: Bytes,
        rows: usize,
        cols: usize,
        fp8: Option<(Vec<f32>, [usize; 2])>,
    ) -> Result<Self> {
        let need = rows.checked_mul(cols).and_then(|v| v.checked_mul(dtype.size()));
        if need != Some(data.len()) {
            let need = need.map_or("more than fits in memory".into(), |n| n.to_string());
            return Err(Error::Shape {
                op: "weight",
                detail: format!(
                    "{} bytes for a {} [{rows}, {cols}] weight, which needs {need}",
                    data.len(),
                    dtype.as_str()
                ),
            });
        }
        // f32 values are read in place: a misaligned slice (possible in a memory map) is copied.
        let data = if dtype == Dtype::F32 && bytemuck::try_cast_slice::<u8, f32>(&data).is_err() {
            Bytes::from_owner(crate::dtype::F32s(crate::dtype::f32_from_le(&data)))
        } else {
            data
        };
        let (scales, block) = match (dtype, fp8) {
            (Dtype::Fp8, Some((scales, block))) => {
                let grid = fp8_grid(rows, cols, block)?;
                if scales.len() != grid.0 * grid.1 {
                    return Err(Error::Shape {
                        op: "weight",
                        detail: format!(
                            "weight_scale_inv holds {} scales, a [{rows}, {cols}] weight in {block:?} blocks \
                             needs [{}, {}]",
                            scales.len(),
                            grid.0,
                            grid.1
                        ),
                    });
                }
                if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
                    return Err(Error::NonFinite { what: "weight_scale_inv", index: i, value: scales[i] });
                }
                // Scales are a block's largest magnitude / 448: real weights are far below
                // 448 · 128. The kernels fold 2^120 into the scale, which needs this bound.
                if let Some(i) = scales.iter().position(|s| s.abs() >= MAX_FP8_SCALE) {
                    return Err(Error::Param {
                        op: "weight",
                        detail: format!(
                            "weight_scale_inv value at index {i} is {}: FP8 block scales must be below \
                             {MAX_FP8_SCALE} (weights under {} in magnitude)",
                            scales[i],
                            448.0 * MAX_FP8_SCALE
                        ),
                    });
                }
                (scales, block)
            }
            (Dtype::Fp8, None) => {
                return Err(Error::Param {
                    op: "weight",
                    detail: "an FP8 weight needs its block scales".into(),
                })
            }
            (_, _) => (Vec::new(), [1, 1]),
        };
        let w = Self { rows, cols, dtype, data, scales, block };
        if let Some((index, value)) = w.first_non_finite() {
            return Err(Error::NonFinite { what: "weight", index, value });
        }
        Ok(w)
    }

    fn first_non_finite(&self) -> Option<(usize, f32)> {
        let d = &self.data[..];
        // Only on the way to an error: the whole row, for the one value.
        let at = |i: usize| {
            let mut row = vec![0f32; self.cols];
            Rows { w: self, row0: i / self.cols.max(1), rows: 1 }.widen(&mut row);
            (i, row[i % self.cols.max(1)])
        };
        match self.dtype {
            Dtype::F32 => self.f32s().iter().position(|v| !v.is_finite()).map(|i| (i, self.f32s()[i])),
            Dtype::Bf16 => d.chunks_exact(2).position(|b| b[1] & 0x7F == 0x7F && b[0] & 0x80 != 0).map(at),
            Dtype::F16 => d.chunks_exact(2).position(|b| b[1] & 0x7C == 0x7C).map(at),
            Dtype::Fp8 => d.iter().position(|b| b & 0x7F == 0x7F).map(|i| (i, f32::NAN)),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Values held (`rows · cols`).
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held: the values, and FP8's scales.
    pub fn bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }

    /// The stored values and, for FP8, the scales and block size.
    pub fn raw(&self) -> (&[u8], &[f32], [usize; 2]) {
        (&self.data, &self.scales, self.block)
    }

    fn f32s(&self) -> &[f32] {
        // `stored` keeps f32 data 4-byte aligned (it copies a misaligned slice).
        bytemuck::try_cast_slice(&self.data).unwrap_or(&[])
    }

    /// The same weight in `dtype`: exact when widening, rounded to nearest even when
    /// narrowing; FP8 is quantised in `block`s scaled so that a block's largest magnitude maps
    /// to 448 (DeepSeek-V3's recipe).
    pub fn to(&self, dtype: Dtype, block: [usize; 2]) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let values = self.widen_all();
        let (rows, cols) = (self.rows, self.cols);
        match dtype {
            Dtype::F32 => Self::from_f32(values, rows, cols),
            Dtype::Bf16 => {
                let data: Vec<u8> = values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect();
                Self::stored(dtype, data.into(), rows, cols, None)
            }
            Dtype::F16 => {
                let data: Vec<u8> = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
                Self::stored(dtype, data.into(), rows, cols, None)
            }
            Dtype::Fp8 => {
                let (q, scales) = crate::dtype::quant_fp8_blocks(&values, rows, cols, block)?;
                Self::stored(dtype, q.into(), rows, cols, Some((scales, block)))
            }
        }
    }

    /// Every value as f32 [rows, cols].
    pub fn widen_all(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len()];
        self.view().widen(&mut out);
        out
    }

    /// Row `i` as f32 into `out` [cols] (an embedding lookup).
    pub fn row_into(&self, i: usize, out: &mut [f32]) -> Result<()> {
        check_len("row", "output", out.len(), self.cols)?;
        self.rows_view(i, 1)?.widen(out);
        Ok(())
    }

    /// The whole matrix as a [`Rows`] view.
    pub fn view(&self) -> Rows<'_> {
        Rows { w: self, row0: 0, rows: self.rows }
    }

    /// Rows `row0 .. row0 + rows` (a head's slice of `kv_b_proj`).
    pub fn rows_view(&self, row0: usize, rows: usize) -> Result<Rows<'_>> {
        if row0 + rows > self.rows {
            return Err(Error::Param {
                op: "weight",
                detail: format!("rows {row0}..{} of a weight with {} rows", row0 + rows, self.rows),
            });
        }
        Ok(Rows { w: self, row0, rows })
    }

    /// `x [m, cols] · Wᵀ` → [m, rows] (PyTorch `Linear` without bias).
    pub fn linear(&self, x: &[f32]) -> Result<Vec<f32>> {
        if self.cols == 0 || !x.len().is_multiple_of(self.cols) {
            return Err(Error::Shape {
                op: "linear",
                detail: format!(
                    "{} input values are not rows of the weight's {} columns",
                    x.len(),
                    self.cols
                ),
            });
        }
        let m = x.len() / self.cols;
        let mut y = vec![0f32; m * self.rows];
        self.view().linear(View::new(x, m, self.cols)?, &mut y, self.rows)?;
        Ok(y)
    }
}

/// Fails unless `out` holds `m` rows of `n` values `out_ld` apart, rows not overlapping.
fn check_out(op: &'static str, out: &[f32], m: usize, n: usize, out_ld: usize) -> Result<()> {
    if out_ld < n {
        return Err(Error::Param {
            op,
            detail: format!("output row stride {out_ld} is smaller than its {n} columns"),
        });
    }
    check_len(op, "output", out.len(), if m == 0 { 0 } else { (m - 1) * out_ld + n })
}

fn fp8_grid(rows: usize, cols: usize, block: [usize; 2]) -> Result<(usize, usize)> {
    if block[0] == 0 || block[1] == 0 {
        return Err(Error::Param { op: "weight", detail: format!("FP8 block size {block:?}") });
    }
    Ok((rows.div_ceil(block[0]), cols.div_ceil(block[1])))
}

/// f16 bits → f32 without branches (so that loops of it vectorise): the exponent and mantissa
/// shifted into f32's fields read as `2^(e-127)·1.m` (a subnormal f32 when `e = 0`), and
/// `2^112` moves the bias from 127 to 15. Exact for every finite f16; `stored` refuses the rest.
#[inline(always)]
fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let magnitude = f32::from_bits((h & 0x7FFF) << 13) * f32::from_bits(0x7780_0000); // 2^112
    f32::from_bits(magnitude.to_bits() | ((h & 0x8000) << 16))
}

/// A zeroed f32 buffer whose start is aligned to a cache line (64 bytes), so that the
/// tile kernel's 16-value loads of rows whose length is a multiple of 16 never straddle two
/// lines (a straddling load costs two).
pub(crate) struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; LANES]);

// SAFETY: `Line` is 16 f32 (64 bytes, no padding); all-zero bits are 16 zeros.
unsafe impl bytemuck::Zeroable for Line {}
// SAFETY: as above, and every bit pattern is valid for f32.
unsafe impl bytemuck::Pod for Line {}

impl Lines {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self { lines: vec![Line([0.0; LANES]); len.div_ceil(LANES)], len }
    }

    /// The first `len` values, growing the buffer if it is shorter (a scratch buffer reused
    /// across calls: its contents are whatever the last user left).
    fn slice(&mut self, len: usize) -> &mut [f32] {
        if self.lines.len() < len.div_ceil(LANES) {
            self.lines.resize(len.div_ceil(LANES), Line([0.0; LANES]));
        }
        self.len = len;
        self
    }
}

thread_local! {
    /// Each thread's panel of widened weight rows (at most 256 rows, or 64 KiB of values).
    static PANEL: std::cell::RefCell<Lines> = const { std::cell::RefCell::new(Lines { lines: Vec::new(), len: 0 }) };
}

impl std::ops::Deref for Lines {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// Rows `row0 .. row0 + rows` of a [`Weight`].
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    w: &'a Weight,
    row0: usize,
    rows: usize,
}

impl Rows<'_> {
    /// Every value as f32 into `out` [rows, cols].
    pub fn widen(&self, out: &mut [f32]) {
        widen_rows(self, out)
    }

    fn f32_view(&self) -> Result<View<'_>> {
        let cols = self.w.cols;
        View::new(&self.w.f32s()[self.row0 * cols..(self.row0 + self.rows) * cols], self.rows, cols)
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ`, rows of `out` `out_ld` apart.
    pub fn linear(&self, x: View<'_>, out: &mut [f32], out_ld: usize) -> Result<()> {
        let (m, k, n) = (x.rows, self.w.cols, self.rows);
        if x.cols != k {
            return Err(Error::Shape {
                op: "linear",
                detail: format!("input rows hold {} values, the weight takes {k}", x.cols),
            });
        }
        check_out("linear", out, m, n, out_ld)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Panels of weight rows, in parallel unless this is already a task of the pool or
        // the product is too small to pay for waking it (tens of microseconds). Up to
        // `WIDEN_FIRST` rows of `x` read each weight once per four of them, widening it in
        // registers (decode is bound by reading the weights). More rows read f32 weights in
        // place and widen the others into a cache-resident panel once per call.
        let widen_first = m > WIDEN_FIRST && self.w.dtype != Dtype::F32;
        let parallel = crate::pool::worth_splitting(m, n * k) && crate::pool::may_split();
        let p = if widen_first { ((1 << 16) / k).clamp(16, 256) } else { (1 << 16) / k + 1 };
        // In parallel, at least four panels a thread, so that none waits long on the last.
        let p = if parallel { p.min(n.div_ceil(4 * rayon::current_num_threads())).max(4) } else { p };
        let panel = |j: usize, out: &mut [f32], out_ld: usize| {
            let rows = Rows { w: self.w, row0: self.row0 + j, rows: p.min(n - j) };
            // The next panel's stored bytes, fetched into the cache while this one
            // multiplies: with more rows of `x` than decode, a panel's first pass would
            // otherwise wait on memory with no arithmetic to overlap. Decode reads each weight
            // once, in order, and is left to the hardware's prefetcher.
            let next = if (SMALL + 1..=PREFETCH_ROWS).contains(&m) && j + p < n {
                Source::stored(&Rows { w: self.w, row0: self.row0 + j + p, rows: p.min(n - j - p) }).bytes
            } else {
                &[]
            };
            if widen_first {
                PANEL.with_borrow_mut(|buf| {
                    let buf = buf.slice(rows.rows * k);
                    rows.widen(buf);
                    tiles(Source::widened(&rows, buf), x, out, out_ld, next);
                });
            } else {
                tiles(Source::stored(&rows), x, out, out_ld, next);
            }
        };
        let starts: Vec<usize> = (0..n).step_by(p).collect();
        if !parallel || starts.len() < 2 {
            for &j in &starts {
                panel(j, &mut out[j..], out_ld);
            }
            return Ok(());
        }
        let results: Vec<Vec<f32>> = starts
            .par_iter()
            .map(|&j| {
                crate::pool::task(|| {
                    let len = p.min(n - j);
                    let mut o = vec![0f32; m * len];
                    panel(j, &mut o, len);
                    o
                })
            })
            .collect();
        for (&j, o) in starts.iter().zip(&results) {
            let len = p.min(n - j);
            for (i, row) in o.chunks(len).enumerate() {
                out[i * out_ld + j..][..len].copy_from_slice(row);
            }
        }
        Ok(())
    }

    /// `out[m, cols] = x[m, rows] · W` (the weight not transposed: MLA's absorbed `q_nopeᵀ W_k`).
    pub fn left(&self, x: View<'_>, out: &mut [f32], out_ld: usize) -> Result<()> {
        let (m, k, n) = (x.rows, self.rows, self.w.cols);
        if x.cols != k {
            return Err(Error::Shape {
                op: "left",
                detail: format!("input rows hold {} values, the weight has {k} rows", x.cols),
            });
        }
        check_out("left", out, m, n, out_ld)?;
        if self.w.dtype == Dtype::F32 {
            return matmul(x, self.f32_view()?, false, out, out_ld, false);
        }
        if m > SMALL {
            let mut buf = vec![0f32; k * n];
            self.widen(&mut buf);
            return matmul(x, View::new(&buf, k, n)?, false, out, out_ld, false);
        }
        for i in 0..m {
            out[i * out_ld..][..n].fill(0.0);
        }
        axpy(self, x, out, out_ld);
        Ok(())
    }
}

/// Weight rows as the product kernel reads them: rows of `w.cols` values held as `dtype`
/// from the start of `bytes` (the stored ones, or f32 widened from them), the first being
/// row `row0` of `w`.
#[derive(Clone, Copy)]
struct Source<'a> {
    w: &'a Weight,
    row0: usize,
    bytes: &'a [u8],
    dtype: Dtype,
}

impl<'a> Source<'a> {
    fn stored(rows: &Rows<'a>) -> Self {
        let row_bytes = rows.w.cols * rows.w.dtype.size();
        let bytes = &rows.w.data[rows.row0 * row_bytes..(rows.row0 + rows.rows) * row_bytes];
        Self { w: rows.w, row0: rows.row0, bytes, dtype: rows.w.dtype }
    }

    /// `rows` as [`Rows::widen`] wrote them into `widened` (FP8's scales applied).
    fn widened(rows: &Rows<'a>, widened: &'a [f32]) -> Self {
        Self { w: rows.w, row0: rows.row0, bytes: bytemuck::cast_slice(widened), dtype: Dtype::F32 }
    }

    fn rows(&self) -> usize {
        self.bytes.len() / (self.w.cols * self.dtype.size()).max(1)
    }

    /// Row `j`'s values, and its column segments (with scales only while still FP8).
    #[inline(always)]
    fn row(&self, j: usize) -> (&'a [u8], Segments<'a>) {
        let (k, size) = (self.w.cols, self.dtype.size());
        let segments = Segments::of(self.w, self.row0 + j);
        let segments = if self.dtype == Dtype::Fp8 { segments } else { Segments { scales: &[], ..segments } };
        (&self.bytes[j * k * size..][..k * size], segments)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| available()[0])
}

/// The instruction sets this CPU runs the kernels with, best first: [`isa`] takes the first,
/// the tests every one. Every [`Isa`] the kernels are called with comes from here, which is
/// the safety argument of `dispatch!`.
fn available() -> Vec<Isa> {
    let mut sets = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            sets.push(Isa::Avx512);
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            sets.push(Isa::Avx2);
        }
    }
    sets.push(Isa::Portable);
    sets
}

/// The instruction set the decode kernels run on here: `avx512f`, `avx2` or `portable`.
pub fn isa_name() -> &'static str {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512f",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// How the kernels read one dtype: `LANES` values at a time into f32, exactly.
trait Widen {
    /// Bytes per value.
    const SIZE: usize;
    /// Whether values are multiplied by a block scale (FP8: [`Widen::one`] and
    /// [`Widen::lanes`] give `2^-120 ·` the value, and the scale carries `2^120`).
    const SCALED: bool;
    /// The value at the start of `b`.
    fn one(b: &[u8]) -> f32;
    /// The `LANES` values at the start of `b`.
    fn lanes(b: &[u8]) -> [f32; LANES];
}

/// The first `N` elements of `b` read as `[T; N]` (one unaligned vector load).
#[inline(always)]
fn load<T: bytemuck::Pod, const N: usize>(b: &[u8]) -> [T; N] {
    let b = &b[..N * std::mem::size_of::<T>()];
    // SAFETY: `b` holds exactly the bytes of `[T; N]` (checked by the slice above), `T` is
    // plain old data (every bit pattern valid), and the read makes no alignment assumption.
    unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<[T; N]>()) }
}

struct F32Le;
struct Bf16Le;
struct F16Le;
struct Fp8E4m3;

impl Widen for F32Le {
    const SIZE: usize = 4;
    const SCALED: bool = false;
    #[inline(always)]
    fn one(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn lanes(b: &[u8]) -> [f32; LANES] {
        let raw = load::<u32, LANES>(b);
        let mut v = [0f32; LANES];
        for l in 0..LANES {
            v[l] = f32::from_bits(u32::from_le(raw[l]));
        }
        v
    }
}

impl Widen for Bf16Le {
    const SIZE: usize = 2;
    const SCALED: bool = false;
    #[inline(always)]
    fn one(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
    }
    #[inline(always)]
    fn lanes(b: &[u8]) -> [f32; LANES] {
        let raw = load::<u16, LANES>(b);
        let mut v = [0f32; LANES];
        for l in 0..LANES {
            v[l] = f32::from_bits(u32::from(u16::from_le(raw[l])) << 16);
        }
        v
    }
}

impl Widen for F16Le {
    const SIZE: usize = 2;
    const SCALED: bool = false;
    #[inline(always)]
    fn one(b: &[u8]) -> f32 {
        f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
    }
    #[inline(always)]
    fn lanes(b: &[u8]) -> [f32; LANES] {
        let raw = load::<u16, LANES>(b);
        let mut v = [0f32; LANES];
        for l in 0..LANES {
            v[l] = f16_bits_to_f32(u16::from_le(raw[l]));
        }
        v
    }
}

impl Widen for Fp8E4m3 {
    const SIZE: usize = 1;
    const SCALED: bool = true;
    #[inline(always)]
    fn one(b: &[u8]) -> f32 {
        f32::from_bits((i32::from(b[0] as i8) << 20) as u32 & 0x87F0_0000)
    }
    #[inline(always)]
    fn lanes(b: &[u8]) -> [f32; LANES] {
        let raw = load::<i8, LANES>(b);
        let mut v = [0f32; LANES];
        for l in 0..LANES {
            // Sign-extended and shifted, bit 31 is the sign and bits 26..20 the exponent and
            // mantissa: `2^-120 ·` the value (bias 7, not 127; as `f16_bits_to_f32` does).
            v[l] = f32::from_bits((i32::from(raw[l]) << 20) as u32 & 0x87F0_0000);
        }
        v
    }
}

/// Column segments of a row that share one scale: FP8's blocks, or the whole row. Plain
/// loops over these, not closures: a closure would be compiled without the kernel's target
/// features.
#[derive(Clone, Copy)]
struct Segments<'a> {
    cols: usize,
    width: usize,
    /// FP8: the scales of the row's blocks; empty otherwise.
    scales: &'a [f32],
}

impl<'a> Segments<'a> {
    #[inline(always)]
    fn of(w: &'a Weight, row: usize) -> Self {
        if w.dtype != Dtype::Fp8 {
            return Self { cols: w.cols, width: w.cols.max(1), scales: &[] };
        }
        let bc = w.cols.div_ceil(w.block[1]);
        Self { cols: w.cols, width: w.block[1], scales: &w.scales[row / w.block[0] * bc..][..bc] }
    }

    #[inline(always)]
    fn count(&self) -> usize {
        self.cols.div_ceil(self.width)
    }

    /// Columns `c0..c1` of segment `i` and their scale.
    #[inline(always)]
    fn get(&self, i: usize) -> (usize, usize, f32) {
        let c0 = i * self.width;
        // 2^120 · scale is exact (`stored` keeps scales below 2^7), and one rounding of
        // 2^-120·v · (2^120·scale) equals that of v · scale.
        (c0, (c0 + self.width).min(self.cols), self.scales.get(i).map_or(1.0, |s| s * TWO_120))
    }
}

/// Calls `$call`'s version for the [`Widen`] type of `$dtype` and the instruction set `$isa`
/// (one of [`available`]).
macro_rules! dispatch {
    ($dtype:expr, $isa:expr, $call:ident, ($($arg:expr),*)) => {
        match $dtype {
            Dtype::F32 => dispatch!(@isa F32Le, $isa, $call, ($($arg),*)),
            Dtype::Bf16 => dispatch!(@isa Bf16Le, $isa, $call, ($($arg),*)),
            Dtype::F16 => dispatch!(@isa F16Le, $isa, $call, ($($arg),*)),
            Dtype::Fp8 => dispatch!(@isa Fp8E4m3, $isa, $call, ($($arg),*)),
        }
    };
    (@isa $d:ty, $isa:expr, $call:ident, ($($arg:expr),*)) => {
        match $isa {
            // SAFETY: `available()`, where every `Isa` comes from, names AVX-512F only where
            // the CPU reports it.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { $call::avx512::<$d>($($arg),*) },
            // SAFETY: as above, AVX2 and FMA only where the CPU reports them.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { $call::avx2::<$d>($($arg),*) },
            Isa::Portable => $call::portable::<$d>($($arg),*),
        }
    };
}

/// Wraps a generic kernel `$imp` into `avx512`, `avx2` and `portable` entry points: the same
/// code compiled for each instruction set, chosen at run time.
macro_rules! versions {
    ($name:ident, $imp:ident, ($($a:ident: $t:ty),*)) => {
        mod $name {
            use super::*;
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            pub(super) fn avx512<D: Widen>($($a: $t),*) {
                $imp::<D, x86::Avx512>($($a),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            pub(super) fn avx2<D: Widen>($($a: $t),*) {
                $imp::<D, x86::Avx2>($($a),*)
            }
            pub(super) fn portable<D: Widen>($($a: $t),*) {
                $imp::<D, Portable>($($a),*)
            }
        }
    };
}

versions!(axpy_k, axpy_impl, (w: &Rows<'_>, x: View<'_>, out: &mut [f32], out_ld: usize));
versions!(widen_k, widen_impl, (w: &Rows<'_>, out: &mut [f32]));
versions!(tiles_k, tiles_impl, (w: Source<'_>, x: View<'_>, out: &mut [f32], out_ld: usize, next: &[u8]));

/// [`Rows::widen`] (a function after the macros it uses).
fn widen_rows(w: &Rows<'_>, out: &mut [f32]) {
    dispatch!(w.w.dtype, isa(), widen_k, (w, out))
}

/// `out[i, j] = Σ_c x[i, c] · W[j, c]` for the rows of `w`; rows of `out` `out_ld` apart.
fn tiles(w: Source<'_>, x: View<'_>, out: &mut [f32], out_ld: usize, next: &[u8]) {
    tiles_on(isa(), w, x, out, out_ld, next)
}

/// [`tiles`] with the instruction set `isa` (one of [`available`]).
fn tiles_on(isa: Isa, w: Source<'_>, x: View<'_>, out: &mut [f32], out_ld: usize, next: &[u8]) {
    dispatch!(w.dtype, isa, tiles_k, (w, x, out, out_ld, next))
}

/// 16 f32 accumulators in registers. Explicit vectors: LLVM's auto-vectoriser kept the
/// accumulators of several rows in memory, one lane at a time.
///
/// The x86 implementations run AVX instructions from safe methods: they may be named only
/// by the `versions!` entry points compiled with the matching `target_feature`, which
/// `dispatch!` calls only where `isa()` found the features (`x86` is private to this module).
trait Lanes: Copy {
    /// Whether the registers hold a 4 × 2 tile's 16 accumulators besides its operands
    /// (AVX-512's 32 registers; AVX2's 16 hold only 8 of its double-register values).
    const WIDE: bool;
    fn zero() -> Self;
    /// 16 values from the start of `x`.
    fn load(x: &[f32]) -> Self;
    fn from_array(a: &[f32; LANES]) -> Self;
    /// `self + a · b`: fused (one rounding) on AVX-512F and AVX2+FMA, two roundings in the
    /// portable code.
    fn add_mul(self, a: Self, b: Self) -> Self;
    fn to_array(self) -> [f32; LANES];
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Self::from_array(&[v; LANES])
    }
    /// Writes the 16 values to the start of `out`.
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        out[..LANES].copy_from_slice(&self.to_array());
    }
    /// [`sum_lanes`] of each of 16 vectors.
    #[inline(always)]
    fn sum_each(v: &[Self; LANES]) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        for (o, v) in out.iter_mut().zip(v) {
            *o = sum_lanes(&v.to_array());
        }
        out
    }
}

#[derive(Clone, Copy)]
struct Portable([f32; LANES]);

impl Lanes for Portable {
    const WIDE: bool = false;
    #[inline(always)]
    fn zero() -> Self {
        Self([0.0; LANES])
    }
    #[inline(always)]
    fn load(x: &[f32]) -> Self {
        let mut a = [0f32; LANES];
        a.copy_from_slice(&x[..LANES]);
        Self(a)
    }
    #[inline(always)]
    fn from_array(a: &[f32; LANES]) -> Self {
        Self(*a)
    }
    #[inline(always)]
    fn add_mul(mut self, a: Self, b: Self) -> Self {
        for l in 0..LANES {
            self.0[l] += a.0[l] * b.0[l];
        }
        self
    }
    #[inline(always)]
    fn to_array(self) -> [f32; LANES] {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The [`Lanes`] of AVX-512F (one register) and AVX2 with FMA (two). Their functions are inlined
    //! only into kernels compiled with the matching `target_feature`, which `isa()` runs
    //! only on CPUs that report it.
    use super::{Lanes, LANES};
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub(super) struct Avx512(__m512);

    impl Lanes for Avx512 {
        const WIDE: bool = true;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only reached from `avx512f` kernels (see the module doc).
            Self(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        fn load(x: &[f32]) -> Self {
            let x = &x[..LANES];
            // SAFETY: `x` holds 16 values; an unaligned load; `avx512f` as above.
            Self(unsafe { _mm512_loadu_ps(x.as_ptr()) })
        }
        #[inline(always)]
        fn from_array(a: &[f32; LANES]) -> Self {
            Self::load(a)
        }
        #[inline(always)]
        fn add_mul(self, a: Self, b: Self) -> Self {
            // SAFETY: `avx512f` as above.
            Self(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }
        #[inline(always)]
        fn to_array(self) -> [f32; LANES] {
            let mut a = [0f32; LANES];
            // SAFETY: `a` holds 16 values; `avx512f` as above.
            unsafe { _mm512_storeu_ps(a.as_mut_ptr(), self.0) };
            a
        }
        /// The same pairs as [`super::sum_lanes`] (lane `l` plus lane `l + width`, width 8,
        /// 4, 2, 1), added for all 16 vectors in 15 vector additions instead of 4 each:
        /// each step shuffles the halves of two vectors' partial sums side by side, then adds.
        #[inline(always)]
        fn sum_each(v: &[Self; LANES]) -> [f32; LANES] {
            // SAFETY: `avx512f` as above; `sums` holds 16 values.
            unsafe {
                // s1[p]: lanes 0..8 vector 2p's `l + (l + 8)`, lanes 8..16 vector 2p+1's.
                let mut s1 = [_mm512_setzero_ps(); 8];
                for (p, s) in s1.iter_mut().enumerate() {
                    let (a, b) = (v[2 * p].0, v[2 * p + 1].0);
                    *s =
                        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
                }
                // s2[p]: 128-bit quarter q holds vector 4p+q's four partial sums.
                let mut s2 = [_mm512_setzero_ps(); 4];
                for (p, s) in s2.iter_mut().enumerate() {
                    let (c, d) = (s1[2 * p], s1[2 * p + 1]);
                    *s =
                        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(c, d), _mm512_shuffle_f32x4::<0xDD>(c, d));
                }
                // s3[p], quarter q: two partial sums of vector 8p+q, then two of 8p+4+q.
                let mut s3 = [_mm512_setzero_ps(); 2];
                for (p, s) in s3.iter_mut().enumerate() {
                    let (e, f) = (s2[2 * p], s2[2 * p + 1]);
                    *s = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(e, f), _mm512_shuffle_ps::<0xEE>(e, f));
                }
                // Lane 4q + i: the sum of vector 4i + q.
                let (g, h) = (s3[0], s3[1]);
                let s4 = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(g, h), _mm512_shuffle_ps::<0xDD>(g, h));
                let mut sums = [0f32; LANES];
                _mm512_storeu_ps(sums.as_mut_ptr(), s4);
                let mut out = [0f32; LANES];
                for (l, s) in sums.iter().enumerate() {
                    out[(l % 4) * 4 + l / 4] = *s;
                }
                out
            }
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        const WIDE: bool = false;
        #[inline(always)]
        fn zero() -> Self {
            // SAFETY: only reached from `avx2` kernels (see the module doc).
            unsafe { Self(_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn load(x: &[f32]) -> Self {
            let x = &x[..LANES];
            // SAFETY: `x` holds 16 values; unaligned loads; `avx2` as above.
            unsafe { Self(_mm256_loadu_ps(x.as_ptr()), _mm256_loadu_ps(x[8..].as_ptr())) }
        }
        #[inline(always)]
        fn from_array(a: &[f32; LANES]) -> Self {
            Self::load(a)
        }
        #[inline(always)]
        fn add_mul(self, a: Self, b: Self) -> Self {
            // SAFETY: `avx2,fma` as above.
            unsafe { Self(_mm256_fmadd_ps(a.0, b.0, self.0), _mm256_fmadd_ps(a.1, b.1, self.1)) }
        }
        #[inline(always)]
        fn to_array(self) -> [f32; LANES] {
            let mut a = [0f32; LANES];
            // SAFETY: `a` holds 16 values; `avx2` as above.
            unsafe {
                _mm256_storeu_ps(a.as_mut_ptr(), self.0);
                _mm256_storeu_ps(a[8..].as_mut_ptr(), self.1);
            }
            a
        }
    }
}

/// [`tiles`]: up to four rows of `x` (decode) one weight row at a time, so that the weights
/// stream through memory in order; more rows four at a time with weight rows two at a time
/// where the registers allow (see [`Lanes::WIDE`]).
#[inline(always)]
fn tiles_impl<D: Widen, S: Lanes>(w: Source<'_>, x: View<'_>, out: &mut [f32], out_ld: usize, next: &[u8]) {
    let mut i = 0;
    let groups = x.rows.div_ceil(4);
    while i < x.rows {
        let r = (x.rows - i).min(4);
        let g = i / 4;
        let next = &next[next.len() * g / groups..next.len() * (g + 1) / groups];
        let o = Out { data: &mut out[i * out_ld..], ld: out_ld, n: w.rows(), next };
        match (r, x.rows > SMALL && S::WIDE) {
            (4, false) => tile_row::<D, S, 4, 1>(w, x_rows(x, i), o),
            (3, false) => tile_row::<D, S, 3, 1>(w, x_rows(x, i), o),
            (2, false) => tile_row::<D, S, 2, 1>(w, x_rows(x, i), o),
            (_, false) => tile_row::<D, S, 1, 1>(w, x_rows(x, i), o),
            (4, true) => tile_row::<D, S, 4, 2>(w, x_rows(x, i), o),
            (3, true) => tile_row::<D, S, 3, 2>(w, x_rows(x, i), o),
            (2, true) => tile_row::<D, S, 2, 2>(w, x_rows(x, i), o),
            (_, true) => tile_row::<D, S, 1, 2>(w, x_rows(x, i), o),
        }
        i += r;
    }
}

/// `R` rows of `x` from row `i`.
#[inline(always)]
fn x_rows<const R: usize>(x: View<'_>, i: usize) -> [&[f32]; R] {
    let mut xs = [&[][..]; R];
    for (r, xr) in xs.iter_mut().enumerate() {
        *xr = &x.data[(i + r) * x.ld..][..x.cols];
    }
    xs
}

/// `R` rows of the output, `n` values `ld` apart.
struct Out<'a> {
    data: &'a mut [f32],
    ld: usize,
    n: usize,
    /// Bytes to prefetch, spread over the weight rows.
    next: &'a [u8],
}

/// `out` for `R` rows of `x` and every row of `w`, `C` weight rows at a time.
#[inline(always)]
fn tile_row<D: Widen, S: Lanes, const R: usize, const C: usize>(
    w: Source<'_>,
    xs: [&[f32]; R],
    out: Out<'_>,
) {
    let Out { data: out, ld, n, next } = out;
    let per_row = next.len().div_ceil(n.max(1));
    let mut j = 0;
    while j < n {
        prefetch(next.get(j * per_row..((j + C) * per_row).min(next.len())).unwrap_or(&[]));
        if j + C <= n {
            let mut ws = [w.row(j); C];
            for (q, wr) in ws.iter_mut().enumerate().skip(1) {
                *wr = w.row(j + q);
            }
            let t = tile::<D, S, R, C>(ws, xs);
            for (r, t) in t.iter().enumerate() {
                out[r * ld + j..][..C].copy_from_slice(t);
            }
            j += C;
        } else {
            let t = tile::<D, S, R, 1>([w.row(j)], xs);
            for (r, t) in t.iter().enumerate() {
                out[r * ld + j] = t[0];
            }
            j += 1;
        }
    }
}

/// The one product kernel: `out[r][q] = Σ_c xs[r][c] · W_q[c]` for `R` rows of `x` and `C`
/// weight rows, each given as its bytes (read as `D`) and its column segments (FP8's blocks
/// and scales). Every output is summed in the same order whatever `R`, `C` and the
/// instruction set: in the lanes of two accumulators taking alternate vectors of each
/// 64-column step of a segment (two, so that a single row does not wait out the fused
/// multiply-add's latency at every step), the segment's remaining 16-column steps in the
/// first, the columns past those in a tail; then the accumulators and the tail added, then
/// the lanes pairwise. So a row's result does not depend on the rows batched with it, nor
/// on whether its weights were widened in registers or in a panel.
#[inline(always)]
fn tile<D: Widen, S: Lanes, const R: usize, const C: usize>(
    w: [(&[u8], Segments<'_>); C],
    xs: [&[f32]; R],
) -> [[f32; C]; R] {
    let step = 4 * LANES;
    let mut acc = [[[S::zero(); 2]; C]; R];
    let mut tail = [[[0f32; LANES]; C]; R];
    let mut has_tail = false;
    let segments = w[0].1;
    for seg in 0..segments.count() {
        let (c0, c1, _) = segments.get(seg);
        let mut scale = [1f32; C];
        for (s, (_, sw)) in scale.iter_mut().zip(&w) {
            *s = sw.get(seg).2;
        }
        let mut c = c0;
        while c + step <= c1 {
            // Slices of the step, so that the loads below need no bounds check.
            let mut wb = [&[][..]; C];
            for (b, (bytes, _)) in wb.iter_mut().zip(&w) {
                *b = &bytes[c * D::SIZE..(c + step) * D::SIZE];
            }
            let mut xr = [&[][..]; R];
            for (s, x) in xr.iter_mut().zip(&xs) {
                *s = &x[c..c + step];
            }
            for u in 0..4 {
                let mut xv = [S::zero(); R];
                for (v, x) in xv.iter_mut().zip(&xr) {
                    *v = S::load(&x[u * LANES..]);
                }
                for q in 0..C {
                    let v = widen::<D, S>(wb[q], u * LANES, scale[q]);
                    for (acc, xv) in acc.iter_mut().zip(&xv) {
                        acc[q][u % 2] = acc[q][u % 2].add_mul(v, *xv);
                    }
                }
            }
            c += step;
        }
        while c + LANES <= c1 {
            let mut xv = [S::zero(); R];
            for (v, x) in xv.iter_mut().zip(&xs) {
                *v = S::load(&x[c..]);
            }
            for q in 0..C {
                let v = widen::<D, S>(w[q].0, c, scale[q]);
                for (acc, xv) in acc.iter_mut().zip(&xv) {
                    acc[q][0] = acc[q][0].add_mul(v, *xv);
                }
            }
            c += LANES;
        }
        let rest = c;
        has_tail |= rest < c1;
        for c in rest..c1 {
            for q in 0..C {
                let v = D::one(&w[q].0[c * D::SIZE..]);
                let v = if D::SCALED { v * scale[q] } else { v };
                for (tail, x) in tail.iter_mut().zip(&xs) {
                    tail[q][c - rest] += v * x[c];
                }
            }
        }
    }
    // The accumulators and the tail summed as vectors (a multiply by one is exact, so each
    // fused step rounds once, as an addition), then the lanes: of 8 or more outputs at once.
    let one = S::splat(1.0);
    let mut sums = [S::zero(); LANES];
    for (r, (acc, tail)) in acc.iter().zip(&tail).enumerate() {
        for (q, ([a0, a1], t)) in acc.iter().zip(tail).enumerate() {
            let a = a0.add_mul(*a1, one);
            sums[r * C + q] = if has_tail { a.add_mul(S::from_array(t), one) } else { a };
        }
    }
    let together = R * C >= 8;
    let lanes = if together { S::sum_each(&sums) } else { [0f32; LANES] };
    let mut out = [[0f32; C]; R];
    for (r, o) in out.iter_mut().enumerate() {
        for (q, o) in o.iter_mut().enumerate() {
            let i = r * C + q;
            *o = if together { lanes[i] } else { sum_lanes(&sums[i].to_array()) };
        }
    }
    out
}

/// [`Rows::widen`]: each value widened and scaled as the product kernels do.
#[inline(always)]
fn widen_impl<D: Widen, S: Lanes>(w: &Rows<'_>, out: &mut [f32]) {
    let cols = w.w.cols;
    for (r, orow) in out.chunks_mut(cols.max(1)).take(w.rows).enumerate() {
        let row = w.row0 + r;
        let bytes = &w.w.data[row * cols * D::SIZE..][..cols * D::SIZE];
        let segments = Segments::of(w.w, row);
        for i in 0..segments.count() {
            let (c0, c1, scale) = segments.get(i);
            let mut c = c0;
            while c + LANES <= c1 {
                widen::<D, S>(bytes, c, scale).store(&mut orow[c..]);
                c += LANES;
            }
            for c in c..c1 {
                let v = D::one(&bytes[c * D::SIZE..]);
                orow[c] = if D::SCALED { v * scale } else { v };
            }
        }
    }
}

/// The 16 values of `bytes` from column `c`, scaled (FP8). A function, not a closure: a
/// closure would be compiled without the kernel's target features.
#[inline(always)]
fn widen<D: Widen, S: Lanes>(bytes: &[u8], c: usize, scale: f32) -> S {
    let mut v = D::lanes(&bytes[c * D::SIZE..]);
    if D::SCALED {
        for v in &mut v {
            *v *= scale;
        }
    }
    S::from_array(&v)
}

/// Asks for `bytes` to be brought into the second-level cache: a hint with no effect on
/// any result.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        // SAFETY: a prefetch reads nothing architecturally and never faults; SSE is part of
        // x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// A fixed-order sum of 16 lanes (pairwise, as a vector reduction would).
#[inline(always)]
fn sum_lanes(a: &[f32; LANES]) -> f32 {
    let mut v = *a;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// `out[i, :] += Σ_d x[i, d] · W[d, :]` for the (few) rows `i` of `x`.
fn axpy(w: &Rows<'_>, x: View<'_>, out: &mut [f32], out_ld: usize) {
    dispatch!(w.w.dtype, isa(), axpy_k, (w, x, out, out_ld))
}

#[inline(always)]
fn axpy_impl<D: Widen, S: Lanes>(w: &Rows<'_>, x: View<'_>, out: &mut [f32], out_ld: usize) {
    let n = w.w.cols;
    for d in 0..w.rows {
        let row = w.row0 + d;
        let bytes = &w.w.data[row * n * D::SIZE..][..n * D::SIZE];
        let segments = Segments::of(w.w, row);
        for seg in 0..segments.count() {
            let (c0, c1, scale) = segments.get(seg);
            for i in 0..x.rows {
                let coef = x.data[i * x.ld + d];
                let o = &mut out[i * out_ld..][..n];
                let full = c0 + (c1 - c0) / LANES * LANES;
                let mut c = c0;
                while c < full {
                    let mut v = D::lanes(&bytes[c * D::SIZE..]);
                    if D::SCALED {
                        // The widened value first (v · scale), as the f32 engine has it.
                        for v in &mut v {
                            *v *= scale;
                        }
                    }
                    S::load(&o[c..]).add_mul(S::splat(coef), S::from_array(&v)).store(&mut o[c..]);
                    c += LANES;
                }
                for c in full..c1 {
                    let v = D::one(&bytes[c * D::SIZE..]);
                    o[c] += coef * if D::SCALED { v * scale } else { v };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel_err;
    use crate::rng::Rng;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c])).sum();
            }
        }
        y
    }

    #[test]
    fn widening_is_exact_for_every_code() {
        for b in 0..=255u8 {
            let (want, got) = (crate::dtype::fp8_e4m3_to_f32(b), Fp8E4m3::one(&[b]) * TWO_120);
            assert!(want.to_bits() == got.to_bits() || (b & 0x7F == 0x7F), "fp8 {b:#x}: {want} {got}");
        }
        for h in 0..=u16::MAX {
            if h & 0x7C00 != 0x7C00 {
                assert_eq!(f16::from_bits(h).to_f32().to_bits(), f16_bits_to_f32(h).to_bits(), "f16 {h:#x}");
            }
        }
    }

    /// Every instruction set this CPU has computes the same products: AVX-512F and AVX2 bit
    /// for bit (both fuse, in the same order), the portable code within its second rounding,
    /// all against f64, with row tails of every kind; the same sums with the weights widened
    /// in registers or in a panel, and for a row batched or alone.
    #[test]
    fn every_instruction_set_computes_the_same_products() {
        let mut rng = Rng::new(31);
        // 6 rows of x: a tile of four and one of two; 9 weight rows: tiles and an edge.
        let (m, n, sets) = (6, 9, available());
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Fp8] {
            for k in [37, 64, 300, 500] {
                let w = Weight::from_f32(rng.vec(n * k), n, k).unwrap().to(dtype, [4, 64]).unwrap();
                let (rows, widened) = (w.view(), w.widen_all());
                let x = rng.vec(m * k);
                let want = reference(&x, &widened, m, k, n);
                let run = |isa: Isa, panel: bool, x: &[f32]| {
                    let src = if panel { Source::widened(&rows, &widened) } else { Source::stored(&rows) };
                    let rows_x = x.len() / k;
                    let mut out = vec![f32::NAN; rows_x * n];
                    tiles_on(isa, src, View::new(x, rows_x, k).unwrap(), &mut out, n, &[]);
                    out
                };
                let mut fused = Vec::new();
                for &isa in &sets {
                    let got = run(isa, false, &x);
                    let err = rel_err(&got, &want);
                    assert!(err < 1e-6, "{dtype:?} k={k} {isa:?}: {err}");
                    // The same sums whether the weights are widened in registers or in a
                    // panel, and whatever rows are batched with a row.
                    assert_eq!(run(isa, true, &x), got, "{dtype:?} k={k} {isa:?}: panel");
                    for (r, xr) in x.chunks(k).enumerate() {
                        assert_eq!(
                            run(isa, false, xr),
                            got[r * n..][..n],
                            "{dtype:?} k={k} {isa:?}: row {r} alone"
                        );
                    }
                    if isa != Isa::Portable {
                        fused.push((isa, got));
                    }
                }
                for pair in fused.windows(2) {
                    assert_eq!(pair[0].1, pair[1].1, "{dtype:?} k={k}: {:?} and {:?}", pair[0].0, pair[1].0);
                }
            }
        }
    }

    #[test]
    fn a_row_s_product_does_not_depend_on_the_batch() {
        let mut rng = Rng::new(5);
        // Two panels of weight rows, in parallel; the decode, in-register and panel paths.
        let (k, n) = (300, 400);
        let base = Weight::from_f32(rng.vec(n * k), n, k).unwrap();
        for dtype in [Dtype::F32, Dtype::Bf16, Dtype::Fp8] {
            let w = base.to(dtype, [128, 128]).unwrap();
            let x = rng.vec(40 * k);
            let alone: Vec<Vec<f32>> = x.chunks(k).map(|xr| w.linear(xr).unwrap()).collect();
            for m in [2, 4, 5, 16, 17, 40] {
                let y = w.linear(&x[..m * k]).unwrap();
                for (r, yr) in y.chunks(n).enumerate() {
                    assert_eq!(yr, alone[r], "{dtype:?}: row {r} of {m}");
                }
            }
        }
    }

    /// Every dtype, both products, decode and batch sizes, odd shapes and FP8 blocks that
    /// do not divide them: the f64 product of the widened values.
    #[test]
    fn products_equal_the_widened_weights_product() {
        let mut rng = Rng::new(11);
        for &(k, n) in &[(1, 1), (37, 19), (300, 70), (1024, 513)] {
            let base = Weight::from_f32(rng.vec(n * k), n, k).unwrap();
            for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16, Dtype::Fp8] {
                let w = base.to(dtype, [128, 64]).unwrap();
                let wide = w.widen_all();
                for m in [1, 2, 3, 4, 5, 40] {
                    let x = rng.vec(m * k);
                    let y = w.linear(&x).unwrap();
                    let err = rel_err(&y, &reference(&x, &wide, m, k, n));
                    assert!(err < 1e-6, "{dtype:?} linear m={m} {k}x{n}: {err}");
                    // x [m, n] · W [n, k] through rows 0..n.
                    let x = rng.vec(m * n);
                    let mut out = vec![0f32; m * k];
                    w.view().left(View::new(&x, m, n).unwrap(), &mut out, k).unwrap();
                    let wt: Vec<f32> = (0..k * n).map(|i| wide[(i % n) * k + i / n]).collect();
                    let err = rel_err(&out, &reference(&x, &wt, m, n, k));
                    assert!(err < 1e-6, "{dtype:?} left m={m} {n}x{k}: {err}");
                }
            }
        }
    }

    #[test]
    fn a_row_range_reads_its_own_rows_and_fp8_blocks() {
        let mut rng = Rng::new(5);
        let (n, k) = (200, 96);
        let w = Weight::from_f32(rng.vec(n * k), n, k).unwrap().to(Dtype::Fp8, [64, 32]).unwrap();
        let wide = w.widen_all();
        let x = rng.vec(3 * k);
        let (r0, len) = (70, 50);
        let mut out = vec![0f32; 3 * len];
        w.rows_view(r0, len).unwrap().linear(View::new(&x, 3, k).unwrap(), &mut out, len).unwrap();
        let want = reference(&x, &wide[r0 * k..(r0 + len) * k], 3, k, len);
        assert!(rel_err(&out, &want) < 1e-6);
        assert!(w.rows_view(190, 11).is_err());
    }

    #[test]
    fn decode_results_do_not_depend_on_the_batch() {
        let mut rng = Rng::new(3);
        let (n, k) = (33, 500);
        let w = Weight::from_f32(rng.vec(n * k), n, k).unwrap().to(Dtype::Bf16, [1, 1]).unwrap();
        let x = rng.vec(4 * k);
        let all = w.linear(&x).unwrap();
        for i in 0..4 {
            let one = w.linear(&x[i * k..(i + 1) * k]).unwrap();
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }

    #[test]
    fn bad_stored_weights_are_refused() {
        let err = Weight::stored(Dtype::Bf16, vec![0u8; 5].into(), 1, 3, None).unwrap_err();
        assert!(err.to_string().contains("needs 6"), "{err}");
        let nan = bf16::NAN.to_le_bytes();
        let err =
            Weight::stored(Dtype::Bf16, [0, 0, nan[0], nan[1]].to_vec().into(), 1, 2, None).unwrap_err();
        assert!(err.to_string().contains("index 1"), "{err}");
        let inf = f16::INFINITY.to_le_bytes().to_vec();
        assert!(Weight::stored(Dtype::F16, inf.into(), 1, 1, None).is_err());
        let fp8 =
            |b: u8, s: f32| Weight::stored(Dtype::Fp8, vec![b].into(), 1, 1, Some((vec![s], [128, 128])));
        assert!(fp8(0x7F, 1.0).is_err());
        assert!(fp8(0x38, 1e38).is_err());
        assert!(fp8(0x38, f32::NAN).is_err());
        assert!(fp8(0x38, 2.0).is_ok());
        let err =
            Weight::stored(Dtype::Fp8, vec![0x38; 4].into(), 2, 2, Some((vec![], [128, 128]))).unwrap_err();
        assert!(err.to_string().contains("weight_scale_inv"), "{err}");
    }

    #[test]
    fn outputs_that_overlap_or_inputs_that_are_not_rows_are_refused() {
        let w = Weight::from_f32(vec![1.0; 6], 3, 2).unwrap().to(Dtype::Bf16, [1, 1]).unwrap();
        let x = [1.0f32; 4];
        let mut out = vec![0f32; 6];
        let err = w.view().linear(View::new(&x, 2, 2).unwrap(), &mut out, 2).unwrap_err();
        assert!(err.to_string().contains("stride 2 is smaller than its 3 columns"), "{err}");
        assert!(w.linear(&[1.0; 3]).unwrap_err().to_string().contains("not rows"));
        assert!(w.row_into(0, &mut [0.0; 1]).is_err());
    }

    #[test]
    fn misaligned_f32_bytes_are_copied_not_refused() {
        let raw = Bytes::from(vec![0u8; 13]);
        let w = Weight::stored(Dtype::F32, raw.slice(1..13), 1, 3, None).unwrap();
        assert_eq!(w.widen_all(), [0.0; 3]);
    }
}
