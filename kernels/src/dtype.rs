//! Conversions between the checkpoint dtypes and the `f32` the CPU kernels compute in.
//!
//! FP8 is `float8_e4m3fn` (OCP 8-bit floating point spec): 1 sign, 4 exponent (bias 7),
//! 3 mantissa bits, no infinities, `S.1111.111` is NaN, largest finite 448. DeepSeek-V3
//! checkpoints store each weight as FP8 with one f32 `weight_scale_inv` per 128×128 block
//! (`weight = fp8 · scale_inv`, DeepSeek-V3 report §3.3.2).

use crate::{Error, Result};
use half::{bf16, f16};

/// Owns f32 values as their bytes (in the machine's order), keeping their 4-byte alignment.
pub struct F32s(pub Vec<f32>);

impl AsRef<[u8]> for F32s {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// `values` as little-endian f32 bytes: no copy on a little-endian machine (partial sums leave
/// a worker this way), swapped in place on a big-endian one.
pub fn into_le_bytes(mut values: Vec<f32>) -> F32s {
    if cfg!(target_endian = "big") {
        values.iter_mut().for_each(|v| *v = f32::from_bits(v.to_bits().swap_bytes()));
    }
    F32s(values)
}

/// Little-endian f32 bytes read where they lie when they can be (a little-endian machine, a
/// 4-byte aligned buffer: what a received frame is), else copied.
pub fn f32s_from_le(bytes: &[u8]) -> std::borrow::Cow<'_, [f32]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(values) if cfg!(target_endian = "little") => std::borrow::Cow::Borrowed(values),
        _ => std::borrow::Cow::Owned(f32_from_le(bytes)),
    }
}

/// Little-endian f32 bytes → f32 (a plain copy on little-endian machines: activations cross
/// the network this way, and a per-value loop runs at a fifth of memcpy speed).
pub fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    let whole = &bytes[..bytes.len() / 4 * 4];
    if cfg!(target_endian = "little") {
        bytemuck::pod_collect_to_vec(whole)
    } else {
        whole.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// Little-endian bf16 bytes → f32 (exact).
pub fn bf16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

/// Little-endian f16 bytes → f32 (exact).
pub fn f16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
}

/// f32 → little-endian f32 bytes.
pub fn f32_to_le(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    extend_f32_le(&mut out, values);
    out
}

/// Appends `values` to `out` as little-endian f32 bytes.
pub fn extend_f32_le(out: &mut Vec<u8>, values: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    }
}

/// f32 → little-endian bf16 bytes, rounded to nearest even.
pub fn bf16_to_le(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 2);
    for v in values {
        out.extend_from_slice(&bf16::from_f32(*v).to_le_bytes());
    }
    out
}

/// One `float8_e4m3fn` byte → f32.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((b >> 3) & 0x0F);
    let man = f32::from(b & 0x07);
    if exp == 0x0F && b & 0x07 == 0x07 {
        f32::NAN
    } else if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// f32 → the nearest `float8_e4m3fn` (ties to even), saturating at ±448; NaN stays NaN.
pub fn f32_to_fp8_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(448.0);
    if a < 2f32.powi(-6) {
        // Subnormal codes 0..=7 are multiples of 2^-9, and code 8 is 2^-6: one rounding of
        // a · 2^9 (exact) gives the code.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: the f32 exponent re-biased (127 → 7) and the mantissa rounded to 3 bits.
    let bits = a.to_bits();
    let mut exp = (bits >> 23) as i32 - 127 + 7;
    let man = bits & 0x7F_FFFF;
    let (mut q, rest) = (man >> 20, man & 0xF_FFFF);
    if rest > 0x8_0000 || (rest == 0x8_0000 && q & 1 == 1) {
        q += 1;
    }
    if q == 8 {
        q = 0;
        exp += 1;
    }
    // 448 is the largest finite code (0x7E); `a` was clamped to it.
    sign | ((exp as u32) << 3 | q).min(0x7E) as u8
}

fn block_grid(rows: usize, cols: usize, block: [usize; 2]) -> Result<(usize, usize)> {
    if block[0] == 0 || block[1] == 0 {
        return Err(Error::Param { op: "fp8", detail: format!("block size {block:?}") });
    }
    Ok((rows.div_ceil(block[0]), cols.div_ceil(block[1])))
}

/// FP8 weight [rows, cols] with `scale_inv` [⌈rows/b0⌉, ⌈cols/b1⌉] → f32 [rows, cols].
pub fn dequant_fp8_blocks(
    q: &[u8],
    rows: usize,
    cols: usize,
    scale_inv: &[f32],
    block: [usize; 2],
) -> Result<Vec<f32>> {
    let (br, bc) = block_grid(rows, cols, block)?;
    crate::check_len("fp8", "weight", q.len(), rows * cols)?;
    if scale_inv.len() != br * bc {
        return Err(Error::Shape {
            op: "fp8",
            detail: format!(
                "weight_scale_inv holds {} scales, a [{rows}, {cols}] weight in {block:?} blocks needs [{br}, {bc}]",
                scale_inv.len()
            ),
        });
    }
    let lut: Vec<f32> = (0..=255u8).map(fp8_e4m3_to_f32).collect();
    let mut out = vec![0f32; rows * cols];
    for (r, (orow, qrow)) in out.chunks_mut(cols).zip(q.chunks(cols)).enumerate() {
        let srow = &scale_inv[(r / block[0]) * bc..][..bc];
        for (c, (o, b)) in orow.iter_mut().zip(qrow).enumerate() {
            *o = lut[*b as usize] * srow[c / block[1]];
        }
    }
    Ok(out)
}

/// f32 [rows, cols] → FP8 bytes and per-block `scale_inv` (block max maps to 448). Each band of
/// `block[0]` rows is independent (its own scales): bands are quantised in parallel, since a
/// load that converts to FP8 spends nearly all its time here.
pub fn quant_fp8_blocks(
    w: &[f32],
    rows: usize,
    cols: usize,
    block: [usize; 2],
) -> Result<(Vec<u8>, Vec<f32>)> {
    use rayon::prelude::*;
    let (br, bc) = block_grid(rows, cols, block)?;
    crate::check_len("fp8", "weight", w.len(), rows * cols)?;
    let mut scales = vec![0f32; br * bc];
    let mut q = vec![0u8; rows * cols];
    if q.is_empty() {
        return Ok((q, scales));
    }
    let band = block[0] * cols;
    // q: [br][≤block[0], cols], scales: [br][bc], w: [br][≤block[0], cols].
    q.par_chunks_mut(band).zip(scales.par_chunks_mut(bc)).zip(w[..rows * cols].par_chunks(band)).for_each(
        |((q, scales), w)| {
            for row in w.chunks(cols) {
                for (c, v) in row.iter().enumerate() {
                    let s = &mut scales[c / block[1]];
                    *s = s.max(v.abs());
                }
            }
            for s in scales.iter_mut() {
                *s = if *s > 0.0 { *s / 448.0 } else { 1.0 };
            }
            for (qrow, row) in q.chunks_mut(cols).zip(w.chunks(cols)) {
                for (c, (o, v)) in qrow.iter_mut().zip(row).enumerate() {
                    *o = f32_to_fp8_e4m3(v / scales[c / block[1]]);
                }
            }
        },
    );
    Ok((q, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_known_values() {
        assert_eq!(fp8_e4m3_to_f32(0x00), 0.0);
        assert_eq!(fp8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(fp8_e4m3_to_f32(0x7E), 448.0);
        assert_eq!(fp8_e4m3_to_f32(0xFE), -448.0);
        assert_eq!(fp8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(fp8_e4m3_to_f32(0x7F).is_nan());
        assert_eq!(fp8_e4m3_to_f32(0x40), 2.0);
        assert_eq!(fp8_e4m3_to_f32(0x3C), 1.5);
    }

    #[test]
    fn fp8_round_trip_and_rounding() {
        for b in 0..=0x7Eu8 {
            let v = fp8_e4m3_to_f32(b);
            assert_eq!(f32_to_fp8_e4m3(v), b);
            assert_eq!(f32_to_fp8_e4m3(-v), b | 0x80);
        }
        assert_eq!(f32_to_fp8_e4m3(1e6), 0x7E);
        // 1.0625 is halfway between 1.0 (0x38, even) and 1.125 (0x39): ties to even.
        assert_eq!(f32_to_fp8_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_fp8_e4m3(1.07), 0x39);
        // Every midpoint between neighbouring codes rounds to the even one; just off it, to
        // the nearer one (subnormals, the subnormal/normal edge, and the top of the range).
        for b in 0..0x7Eu8 {
            let (lo, hi) = (fp8_e4m3_to_f32(b), fp8_e4m3_to_f32(b + 1));
            let mid = (lo + hi) / 2.0;
            let even = if b % 2 == 0 { b } else { b + 1 };
            assert_eq!(f32_to_fp8_e4m3(mid), even, "midpoint of {b:#x}");
            assert_eq!(f32_to_fp8_e4m3(mid * (1.0 - 1e-6)), b, "below the midpoint of {b:#x}");
            assert_eq!(f32_to_fp8_e4m3(mid * (1.0 + 1e-6)), b + 1, "above the midpoint of {b:#x}");
        }
        assert_eq!(f32_to_fp8_e4m3(460.0), 0x7E);
        assert_eq!(f32_to_fp8_e4m3(-1e-12), 0x80);
    }

    #[test]
    fn block_quantisation_error_is_within_e4m3_precision() {
        let (rows, cols) = (130, 200);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        let (q, s) = quant_fp8_blocks(&w, rows, cols, [128, 128]).unwrap();
        assert_eq!(s.len(), 2 * 2);
        let back = dequant_fp8_blocks(&q, rows, cols, &s, [128, 128]).unwrap();
        for (a, b) in w.iter().zip(&back) {
            // 3 mantissa bits: relative step 2^-3, half of it when rounding, plus subnormals.
            assert!((a - b).abs() <= a.abs() / 16.0 + 448.0 * 1e-3 * s[0], "{a} {b}");
        }
        let err = dequant_fp8_blocks(&q, rows, cols, &s[..3], [128, 128]).unwrap_err();
        assert!(err.to_string().contains("weight_scale_inv"), "{err}");
    }

    #[test]
    fn half_precision_conversions() {
        let v = [1.0f32, -2.5, 3.140625];
        assert_eq!(bf16_from_le(&bf16_to_le(&v)), v);
        assert_eq!(f32_from_le(&f32_to_le(&v)), v);
        assert_eq!(into_le_bytes(v.to_vec()).as_ref(), f32_to_le(&v));
        assert_eq!(*f32s_from_le(into_le_bytes(v.to_vec()).as_ref()), v);
        // Misaligned or a partial value: copied (whole values only), same numbers.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&f32_to_le(&v));
        assert_eq!(*f32s_from_le(&shifted[1..]), v);
        assert_eq!(*f32s_from_le(&shifted[1..shifted.len() - 1]), v[..v.len() - 1]);
        let h: Vec<u8> = v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect();
        assert_eq!(f16_from_le(&h), v);
    }
}
