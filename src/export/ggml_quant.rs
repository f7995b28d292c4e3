//! Encoders for the ggml block formats `amthal export` writes: F16, BF16, Q8_0, Q5_0,
//! Q4_K and Q6_K, each the inverse of the decoder in `crate::model::dequant` (which follows
//! ggml's reference code and is checked against the gguf Python package).
//!
//! Each follows ggml's reference quantizer (ggml-quants.c, without an importance
//! matrix): Q8_0 `quantize_row_q8_0_ref`; Q5_0 `quantize_row_q5_0_ref`; Q4_K `quantize_row_q4_K_ref`, whose
//! sub-block scale and min come from `make_qkx2_quants` (a search over 21 candidate
//! scales for the least weighted squared error); Q6_K `quantize_row_q6_K_ref` with
//! `make_qx_quants` (19 candidates). ggml rounds K-quant codes with `nearest_int`
//! (ties to even) and Q8_0's with `roundf` (ties away from zero); so does this.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::dequant::block_layout;
pub use crate::model::dequant::ggml_type;

/// Values per K-quant super-block.
pub const QK_K: usize = 256;

/// Encodes `values` (a whole number of blocks) as `ggml_type`.
pub fn encode(ggml_type: u32, values: &[f32]) -> Vec<u8> {
    match ggml_type {
        ggml_type::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ggml_type::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        ggml_type::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        ggml_type::Q8_0 => blocks(ggml_type, values, q8_0),
        ggml_type::Q5_0 => blocks(ggml_type, values, q5_0),
        ggml_type::Q4_K => blocks(ggml_type, values, q4_k),
        ggml_type::Q6_K => blocks(ggml_type, values, q6_k),
        other => unreachable!("no encoder for ggml type {other}"),
    }
}

/// Encodes block by block, in parallel, in the decoder's block layout.
fn blocks(ggml_type: u32, values: &[f32], encode: fn(&[f32], &mut [u8])) -> Vec<u8> {
    let (size, bytes) = block_layout(ggml_type).expect("a block type");
    assert_eq!(values.len() % size, 0, "a whole number of blocks");
    let mut out = vec![0u8; values.len() / size * bytes];
    out.par_chunks_mut(bytes)
        .zip(values.par_chunks(size))
        .for_each(|(block, x)| encode(x, block));
    out
}

/// ggml's `nearest_int` (ties to even).
pub(super) fn nearest(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// ggml's GROUP_MAX_EPS: a sub-block whose largest magnitude is below it is all zero.
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// Q8_0: 32 values, an f16 scale (absmax / 127) and 32 int8 codes.
fn q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (j, v) in x.iter().enumerate() {
        out[2 + j] = ((v * id).round() as i8) as u8;
    }
}

/// Q5_0 (`quantize_row_q5_0_ref`): 32 values, an f16 scale d = (the value of largest
/// magnitude) / -16 and 5-bit codes min(31, trunc(x / d + 16.5)), so that value is
/// code 0; the scale's reciprocal is taken before the f16 rounding, as ggml does.
fn q5_0(x: &[f32], out: &mut [u8]) {
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut codes = [0u8; 32];
    for (c, v) in codes.iter_mut().zip(x) {
        *c = ((v * id + 16.5) as i8).min(31) as u8;
    }
    pack_q5_0(d, &codes, out);
}

/// Writes a Q5_0 block: the scale as f16, the low nibbles, the fifth bits in a u32 at
/// each value's index.
pub(super) fn pack_q5_0(d: f32, codes: &[u8; 32], out: &mut [u8]) {
    out[0..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    let mut high = 0u32;
    for j in 0..16 {
        let (low, upper) = (codes[j], codes[j + 16]);
        out[6 + j] = (low & 0x0F) | ((upper & 0x0F) << 4);
        high |= u32::from(low >> 4) << j;
        high |= u32::from(upper >> 4) << (j + 16);
    }
    out[2..6].copy_from_slice(&high.to_le_bytes());
}

/// The candidate scales a `make_qkx*_quants` search tries: (rmin + rdelta * i + nmax) /
/// range for i in 0..=nstep.
#[derive(Clone, Copy)]
pub(super) struct ScaleSearch {
    rmin: f32,
    rdelta: f32,
    nstep: i32,
}

/// `make_qkx2_quants`' 21 candidates (Q4_K without an importance matrix).
const QKX2: ScaleSearch = ScaleSearch {
    rmin: -1.0,
    rdelta: 0.1,
    nstep: 20,
};

/// `make_qkx3_quants`' 37 candidates (Q4_K with an importance matrix).
pub(super) const QKX3: ScaleSearch = ScaleSearch {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
};

/// ggml's `make_qkx2_quants` / `make_qkx3_quants` (the same code with other candidates):
/// codes in 0..=nmax for `x ~ scale * code - min` (min >= 0 returned), choosing among
/// the candidate scales the one with the least weighted squared error. Returns (scale,
/// min) and writes the codes into `codes`.
pub(super) fn make_qkx_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    search: ScaleSearch,
) -> (f32, f32) {
    let ScaleSearch {
        rmin,
        rdelta,
        nstep,
    } = search;
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..x.len() {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..x.len() {
        let l = nearest(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * diff * diff;
    }
    let mut aux = vec![0u8; x.len()];
    for step in 0..=nstep {
        iscale = (rmin + rdelta * step as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..x.len() {
            let l = nearest(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0f32;
            for i in 0..x.len() {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                error += weights[i] * diff * diff;
            }
            if error < best_error {
                codes.copy_from_slice(&aux);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with rmse_type 1: a signed scale for codes in -nmax..nmax-1,
/// chosen among 19 candidates for the least squared error weighted by `weights` (an
/// importance matrix's), else by x^2; `codes` gets the chosen candidate's codes plus
/// nmax (all 0 for an all-zero group), as ggml's `L`.
pub(super) fn make_qx_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    codes: &mut [u8],
) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        codes.fill(0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (i, &v) in x.iter().enumerate() {
            let l = code(iscale, v) as f32;
            let w = weights.map_or(v * v, |w| w[i]);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let write_codes = |iscale: f32, codes: &mut [u8]| {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = (code(iscale, v) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    write_codes(iscale, codes);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            write_codes(iscale, codes);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Q4_K: 256 values in 8 sub-blocks of 32, each `d * sc * q - dmin * m` with 4-bit q
/// and 6-bit sc, m; d and dmin f16. Layout: d, dmin, 12 packed scale bytes, 128 code
/// bytes (two sub-blocks share each run of 32 bytes, low and high nibble).
fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut codes = [0u8; QK_K];
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = sub.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(sub) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) =
            make_qkx_quants(15, sub, &weights, &mut codes[32 * j..32 * j + 32], QKX2);
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls = scales.map(|v| nearest(inv_scale * v).min(63) as u8);
    let lm = mins.map(|v| nearest(inv_min * v).min(63) as u8);
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    pack_q4_k(x, (d, ls), (dmin, lm), &mut codes, out);
}

/// Writes a Q4_K block from its super-block scales (d, dmin) and 6-bit sub-block scales
/// (ls, lm), coding the values again against the scales as stored (rounded), as ggml
/// does; a sub-block with a zero scale keeps `codes` from its search.
pub(super) fn pack_q4_k(
    x: &[f32],
    (d, ls): (f16, [u8; 8]),
    (dmin, lm): (f16, [u8; 8]),
    codes: &mut [u8; QK_K],
    out: &mut [u8],
) {
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    for j in 0..8 {
        let step = d.to_f32() * ls[j] as f32;
        if step == 0.0 {
            continue;
        }
        let offset = dmin.to_f32() * lm[j] as f32;
        for i in 0..32 {
            codes[32 * j + i] = nearest((x[32 * j + i] + offset) / step).clamp(0, 15) as u8;
        }
    }
    let qs = &mut out[16..144];
    for chunk in 0..4 {
        for l in 0..32 {
            qs[32 * chunk + l] = codes[64 * chunk + l] | (codes[64 * chunk + l + 32] << 4);
        }
    }
}

/// Q6_K: 256 values in 16 sub-blocks of 16, each `d * sc * (q - 32)` with 6-bit q and
/// int8 sc; d f16. Layout: 128 bytes of low nibbles, 64 of high bit pairs, 16 scales, d.
fn q6_k(x: &[f32], out: &mut [u8]) {
    q6_k_weighted(x, None, out)
}

/// Q6_K with the sub-block scales searched for the least error weighted by `weights`
/// (`quantize_row_q6_K_impl`'s importance-matrix route), else by x^2 (the reference).
pub(super) fn q6_k_weighted(x: &[f32], weights: Option<&[f32]>, out: &mut [u8]) {
    let mut sub_scales = [0f32; 16];
    // The search's codes stay where a sub-block's scale rounds to zero, as in ggml.
    let mut codes = [0u8; QK_K];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for (ib, scale) in sub_scales.iter_mut().enumerate() {
        let range = 16 * ib..16 * ib + 16;
        let sub_weights = weights.map(|w| &w[range.clone()]);
        *scale = make_qx_quants(32, &x[range.clone()], sub_weights, &mut codes[range]);
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = *scale;
        }
    }
    out.fill(0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut scales = [0i8; 16];
    for ib in 0..16 {
        scales[ib] = nearest(iscale * sub_scales[ib]).min(127) as i8;
        let step = d.to_f32() * scales[ib] as f32;
        if step == 0.0 {
            continue;
        }
        for i in 0..16 {
            codes[16 * ib + i] = (nearest(x[16 * ib + i] / step).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = out.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for half in 0..2 {
        let l_codes = &codes[128 * half..128 * half + 128];
        let ql = &mut ql[64 * half..64 * half + 64];
        let qh = &mut qh[32 * half..32 * half + 32];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (
                l_codes[l],
                l_codes[l + 32],
                l_codes[l + 64],
                l_codes[l + 96],
            );
            ql[l] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            ql[l + 32] = (q2 & 0x0F) | ((q4 & 0x0F) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (slot, scale) in rest[..16].iter_mut().zip(scales) {
        *slot = scale as u8;
    }
    rest[16..18].copy_from_slice(&d.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dequant::dequantize;

    /// Deterministic values with a spread of magnitudes and signs.
    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * (1.0 + (i % 7) as f32)) * 0.01)
            .collect()
    }

    fn max_error(ggml_type: u32, x: &[f32]) -> f32 {
        let bytes = encode(ggml_type, x);
        let back = dequantize(ggml_type, &bytes, x.len()).unwrap();
        x.iter()
            .zip(&back)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
    }

    /// Each encoder round-trips through ggml's decoder within its format's step:
    /// half a code step of the block's range.
    #[test]
    fn encoders_round_trip_through_the_decoders() {
        let x = values(4 * QK_K);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max_error(ggml_type::F32, &x) == 0.0);
        assert!(max_error(ggml_type::F16, &x) <= amax * 1e-3);
        assert!(max_error(ggml_type::BF16, &x) <= amax * 8e-3);
        assert!(max_error(ggml_type::Q8_0, &x) <= amax / 127.0);
        // Q5_0's codes run from -16 to 15 steps: a value opposite in sign to the
        // largest is clipped by up to one step.
        assert!(max_error(ggml_type::Q5_0, &x) <= amax / 16.0 * 1.01);
        assert!(max_error(ggml_type::Q6_K, &x) <= amax / 32.0 * 1.1);
        assert!(max_error(ggml_type::Q4_K, &x) <= amax * 2.0 / 15.0 * 1.1);
        // Exact where the format can be: constant blocks and zeros.
        let zeros = vec![0f32; QK_K];
        for t in [
            ggml_type::Q8_0,
            ggml_type::Q5_0,
            ggml_type::Q4_K,
            ggml_type::Q6_K,
        ] {
            assert_eq!(max_error(t, &zeros), 0.0, "type {t}");
        }
    }

    /// Q5_0 by hand: a block whose largest magnitude is negative (-1.6) and one where it
    /// is positive, against codes worked out from ggml's formula; the value of largest
    /// magnitude is code 0 and the fifth bits land in the u32 at each value's index.
    #[test]
    fn q5_0_codes_follow_ggml() {
        let mut x = vec![0f32; 32];
        x[0] = -1.6; // d = 0.1: code trunc(-16 + 16.5) = 0
        x[1] = 0.75; // 7.5 + 16.5 = 24 (fifth bit set)
        x[17] = -0.04; // -0.4 + 16.5 = 16.1 -> 16 (fifth bit set)
        x[31] = 1.55; // 15.5 + 16.5 = 32 -> 31
        let bytes = encode(ggml_type::Q5_0, &x);
        assert_eq!(bytes.len(), 22);
        let d = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        assert_eq!(d, f16::from_f32(-1.6 / -16.0).to_f32());
        let high = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        let code = |j: usize| {
            let nibble = if j < 16 {
                bytes[6 + j] & 0x0F
            } else {
                bytes[6 + j - 16] >> 4
            };
            nibble | (((high >> j) & 1) as u8) << 4
        };
        assert_eq!([code(0), code(1), code(17), code(31)], [0, 24, 16, 31]);
        // Zeros are code 16 (fifth bit set, low bits 0).
        assert_eq!(code(5), 16);
        let back = dequantize(ggml_type::Q5_0, &bytes, 32).unwrap();
        assert!((back[1] - 8.0 * d).abs() < 1e-7 && back[5] == 0.0);
        // A positive largest value: d < 0, and the largest value is still code 0.
        let y: Vec<f32> = x.iter().map(|v| -v).collect();
        let bytes = encode(ggml_type::Q5_0, &y);
        assert_eq!(bytes[6] & 0x0F, 0);
        assert_eq!(
            u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) & 1,
            0
        );
    }
}
