//! Dequantization of GGUF tensor data to f32, block by block, following ggml's
//! reference `dequantize_row_*` functions (ggml-quants.c) and the gguf Python
//! package that transformers uses. Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q8_0,
//! Q4_K, Q5_K, Q6_K.

use anyhow::Result;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::bail_input;

/// ggml type ids (ggml.h `enum ggml_type`).
pub mod ggml_type {
    pub const F32: u32 = 0;
    pub const F16: u32 = 1;
    pub const Q4_0: u32 = 2;
    pub const Q4_1: u32 = 3;
    pub const Q5_0: u32 = 6;
    pub const Q8_0: u32 = 8;
    pub const Q4_K: u32 = 12;
    pub const Q5_K: u32 = 13;
    pub const Q6_K: u32 = 14;
    pub const BF16: u32 = 30;
}

/// (elements per block, bytes per block) for a supported type.
pub fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    use ggml_type::*;
    Some(match ggml_type {
        F32 => (1, 4),
        F16 | BF16 => (1, 2),
        Q4_0 => (32, 18),
        Q4_1 => (32, 20),
        Q5_0 => (32, 22),
        Q8_0 => (32, 34),
        Q4_K => (256, 144),
        Q5_K => (256, 176),
        Q6_K => (256, 210),
        _ => return None,
    })
}

pub fn type_name(ggml_type: u32) -> String {
    use ggml_type::*;
    match ggml_type {
        F32 => "F32".into(),
        F16 => "F16".into(),
        BF16 => "BF16".into(),
        Q4_0 => "Q4_0".into(),
        Q4_1 => "Q4_1".into(),
        Q5_0 => "Q5_0".into(),
        Q8_0 => "Q8_0".into(),
        Q4_K => "Q4_K".into(),
        Q5_K => "Q5_K".into(),
        Q6_K => "Q6_K".into(),
        other => format!("ggml type {other}"),
    }
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes `count` elements of `ggml_type` from `data`.
pub fn dequantize(ggml_type: u32, data: &[u8], count: usize) -> Result<Vec<f32>> {
    let Some((block_elems, block_bytes)) = block_layout(ggml_type) else {
        bail_input!("{} tensors are not supported", type_name(ggml_type));
    };
    if !count.is_multiple_of(block_elems) {
        bail_input!(
            "{count} elements is not a whole number of {}-element blocks",
            block_elems
        );
    }
    let blocks = count / block_elems;
    if data.len() < blocks * block_bytes {
        bail_input!(
            "tensor data is truncated ({} bytes, need {})",
            data.len(),
            blocks * block_bytes
        );
    }
    let mut out = vec![0f32; count];
    let decode: fn(&[u8], &mut [f32]) = match ggml_type {
        ggml_type::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        ggml_type::F16 => |b, y| y[0] = half_at(b, 0),
        ggml_type::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        ggml_type::Q4_0 => q4_0,
        ggml_type::Q4_1 => q4_1,
        ggml_type::Q5_0 => q5_0,
        ggml_type::Q8_0 => q8_0,
        ggml_type::Q4_K => q4_k,
        ggml_type::Q5_K => q5_k,
        ggml_type::Q6_K => q6_k,
        _ => unreachable!("block_layout covers the supported types"),
    };
    out.par_chunks_mut(block_elems)
        .zip(data[..blocks * block_bytes].par_chunks(block_bytes))
        .for_each(|(y, block)| decode(block, y));
    Ok(out)
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Q5_0: an f16 scale, the 32 codes' fifth bits in a little-endian u32, then their
/// low four bits as Q4_0 packs them; value = (code - 16) * scale.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let fifth = |bit: usize| (((high >> bit) & 1) << 4) as i32;
        y[j] = (((qs[j] & 0x0F) as i32 | fifth(j)) - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) as i32 | fifth(j + 16)) - 16) as f32 * d;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` in a K-quant's 12 packed scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - min1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - min2;
        }
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let ql = &qs[32 * j..32 * j + 32];
        let out = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let high1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let high2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * ((ql[l] & 0x0F) + high1) as f32 - min1;
            out[l + 32] = d2 * ((ql[l] >> 4) + high2) as f32 - min2;
        }
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let scales = &b[192..208];
    let d = half_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[64 * half..64 * half + 64];
        let qh = &qh_all[32 * half..32 * half + 32];
        let sc = &scales[8 * half..8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}
