//! Encoders for the ggml block formats `amthal export` writes: F16, BF16, Q8_0, Q4_K
//! and Q6_K, each the inverse of the decoder in `crate::model::dequant` (which follows
//! ggml's reference code and is checked against the gguf Python package).
//!
//! Q8_0 is ggml's `quantize_row_q8_0_ref` exactly. The K-quants use ggml's block
//! layouts and scale packing with a simpler choice of scales than ggml's
//! (`make_qkx2_quants` / `make_qx_quants` search several candidate scales per
//! sub-block to minimise the weighted error): Q4_K takes each sub-block's min and max,
//! Q6_K its largest magnitude. The files are valid for every reader; their error is a
//! little larger than llama-quantize's (the round-trip tests report it).

use half::{bf16, f16};
use rayon::prelude::*;

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
        ggml_type::Q8_0 => blocks(values, 32, 34, q8_0),
        ggml_type::Q4_K => blocks(values, QK_K, 144, q4_k),
        ggml_type::Q6_K => blocks(values, QK_K, 210, q6_k),
        other => unreachable!("no encoder for ggml type {other}"),
    }
}

/// Encodes block by block, in parallel.
fn blocks(values: &[f32], size: usize, bytes: usize, encode: fn(&[f32], &mut [u8])) -> Vec<u8> {
    assert_eq!(values.len() % size, 0, "a whole number of blocks");
    let mut out = vec![0u8; values.len() / size * bytes];
    out.par_chunks_mut(bytes)
        .zip(values.par_chunks(size))
        .for_each(|(block, x)| encode(x, block));
    out
}

/// ggml's `nearest_int`: round half away from zero.
fn nearest(x: f32) -> i32 {
    x.round() as i32
}

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

/// Q4_K: 256 values in 8 sub-blocks of 32, each `d * sc * q - dmin * m` with 4-bit q
/// and 6-bit sc, m; d and dmin f16. Layout: d, dmin, 12 packed scale bytes, 128 code
/// bytes (two sub-blocks share each run of 32 bytes, low and high nibble).
fn q4_k(x: &[f32], out: &mut [u8]) {
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let min = sub.iter().fold(0f32, |m, &v| m.min(v));
        let max = sub.iter().fold(f32::MIN, |m, &v| m.max(v));
        scales[j] = (max - min) / 15.0;
        mins[j] = -min;
    }
    let max_scale = scales.iter().fold(0f32, |m, &v| m.max(v));
    let max_min = mins.iter().fold(0f32, |m, &v| m.max(v));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = nearest(inv_scale * scales[j]).clamp(0, 63) as u8;
        lm[j] = nearest(inv_min * mins[j]).clamp(0, 63) as u8;
        if j < 4 {
            packed[j] = ls[j];
            packed[j + 4] = lm[j];
        } else {
            packed[j + 4] = (ls[j] & 0x0F) | ((lm[j] & 0x0F) << 4);
            packed[j - 4] |= (ls[j] >> 4) << 6;
            packed[j] |= (lm[j] >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    out[0..2].copy_from_slice(&d.to_le_bytes());
    out[2..4].copy_from_slice(&dmin.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    // Codes against the scales as stored (rounded), as ggml does.
    let mut codes = [0u8; QK_K];
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
    // Each sub-block's scale maps its largest magnitude to code -32 (ggml's nmax 32).
    let mut sub_scales = [0f32; 16];
    for (ib, scale) in sub_scales.iter_mut().enumerate() {
        let sub = &x[16 * ib..16 * ib + 16];
        let max = sub
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        *scale = if max != 0.0 { max / -32.0 } else { 0.0 };
    }
    let max_scale = sub_scales
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let iscale = if max_scale != 0.0 {
        -128.0 / max_scale
    } else {
        0.0
    };
    let d = f16::from_f32(if iscale != 0.0 { 1.0 / iscale } else { 0.0 });
    let mut scales = [0i8; 16];
    let mut codes = [0u8; QK_K];
    for ib in 0..16 {
        scales[ib] = nearest(iscale * sub_scales[ib]).clamp(-128, 127) as i8;
        let step = d.to_f32() * scales[ib] as f32;
        for i in 0..16 {
            let q = if step != 0.0 {
                nearest(x[16 * ib + i] / step).clamp(-32, 31)
            } else {
                0
            };
            codes[16 * ib + i] = (q + 32) as u8;
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
        assert!(max_error(ggml_type::Q6_K, &x) <= amax / 32.0 * 1.1);
        assert!(max_error(ggml_type::Q4_K, &x) <= amax * 2.0 / 15.0 * 1.1);
        // Exact where the format can be: constant blocks and zeros.
        let zeros = vec![0f32; QK_K];
        for t in [ggml_type::Q8_0, ggml_type::Q4_K, ggml_type::Q6_K] {
            assert_eq!(max_error(t, &zeros), 0.0, "type {t}");
        }
    }
}
