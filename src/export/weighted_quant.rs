//! The block encoders with an importance matrix (llama-quantize's `--imatrix`): ggml's
//! `quantize_row_q4_K_impl`, `quantize_row_q6_K_impl` and `quantize_row_q5_0_impl`,
//! which choose each block's scales for the least squared error weighted by how large
//! each input column's activations run (`importance`, one value per column of the
//! weight, from `imatrix.rs`), instead of by the weights' own magnitudes. Q8_0 has no
//! weighted route in ggml (its reference is used either way), nor do F16 / BF16.
//! Checked byte for byte against ggml's `ggml_quantize_chunk` with the same importance
//! row (tests/gguf_export.rs).

use rayon::prelude::*;

use super::ggml_quant::{
    GROUP_MAX_EPS, QK_K, QKX3, encode, ggml_type, make_qkx_quants, make_qx_quants, nearest,
    pack_q4_k, pack_q5_0, q6_k_weighted,
};
use crate::model::dequant::block_layout;

/// Encodes `values`, rows of `row_len`, as `ggml_type` with each row's blocks weighted
/// by `importance` (`row_len` values); types without a weighted route as `encode` does.
pub fn encode_with_importance(
    ggml_type: u32,
    values: &[f32],
    row_len: usize,
    importance: &[f32],
) -> Vec<u8> {
    assert_eq!(importance.len(), row_len, "one importance per column");
    assert_eq!(values.len() % row_len, 0, "whole rows");
    // Each block from its values, their importances and the row's mean square (only
    // Q5_0 weighs by the row's; Q4_K takes its own block's).
    let block_encoder: fn(&[f32], &[f32], f32, &mut [u8]) = match ggml_type {
        ggml_type::Q4_K => q4_k,
        ggml_type::Q6_K => |x, w, _, out| q6_k_weighted(x, Some(w), out),
        ggml_type::Q5_0 => q5_0,
        _ => return encode(ggml_type, values),
    };
    let (size, bytes) = block_layout(ggml_type).expect("a block type");
    let row_bytes = row_len / size * bytes;
    let mut out = vec![0u8; values.len() / size * bytes];
    out.par_chunks_mut(row_bytes)
        .zip(values.par_chunks(row_len))
        .for_each(|(encoded, row)| {
            let sigma2 = row.iter().map(|v| v * v).sum::<f32>() / row_len as f32;
            for ((x, w), block) in row
                .chunks(size)
                .zip(importance.chunks(size))
                .zip(encoded.chunks_mut(bytes))
            {
                block_encoder(x, w, sigma2, block);
            }
        });
    out
}

/// `quantize_row_q4_K_impl`: each sub-block's scale and min by `make_qkx3_quants` with
/// weights importance * sqrt(sigma2 + x^2) (sigma2 twice the block's mean square), then
/// the 6-bit sub-block scales and mins by `make_qp_quants`, weighted by each sub-block's
/// total weight.
fn q4_k(x: &[f32], importance: &[f32], _row_sigma2: f32, out: &mut [u8]) {
    let sigma2 = 2.0 * x.iter().map(|v| v * v).sum::<f32>() / QK_K as f32;
    let (mut scales, mut mins, mut sub_weights) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    let mut codes = [0u8; QK_K];
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let range = 32 * j..32 * j + 32;
        for ((w, &q), &v) in weights
            .iter_mut()
            .zip(&importance[range.clone()])
            .zip(&x[range.clone()])
        {
            *w = q * (sigma2 + v * v).sqrt();
        }
        sub_weights[j] = weights.iter().sum();
        (scales[j], mins[j]) =
            make_qkx_quants(15, &x[range.clone()], &weights, &mut codes[range], QKX3);
    }
    let (d, ls) = make_qp_quants(63, &scales, &sub_weights);
    let (dmin, lm) = make_qp_quants(63, &mins, &sub_weights);
    pack_q4_k(
        x,
        (half::f16::from_f32(d), ls),
        (half::f16::from_f32(dmin), lm),
        &mut codes,
        out,
    );
}

/// `quantize_row_q5_0_impl`: the block's scale by `make_qx_quants` (codes -16..15)
/// with weights importance * sqrt(sigma2 + x^2), sigma2 the row's mean square.
fn q5_0(x: &[f32], importance: &[f32], sigma2: f32, out: &mut [u8]) {
    let mut weights = [0f32; 32];
    for ((w, &q), &v) in weights.iter_mut().zip(importance).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
    }
    let mut codes = [0u8; 32];
    let d = make_qx_quants(16, x, Some(&weights), &mut codes);
    pack_q5_0(d, &codes, out);
}

/// ggml's `make_qp_quants`: unsigned codes 0..=nmax for the 8 non-negative sub-block
/// scales (or mins) of a Q4_K block, `x ~ scale * code`, the scale chosen among 9
/// candidates for the least weighted squared error and then refined code by code (up to
/// 5 passes). Returns (scale, codes).
fn make_qp_quants(nmax: i32, x: &[f32; 8], weights: &[f32; 8]) -> (f32, [u8; 8]) {
    let max = x.iter().fold(0f32, |m, &v| m.max(v));
    if max < GROUP_MAX_EPS {
        return (0.0, [0; 8]);
    }
    let mut iscale = nmax as f32 / max;
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..8 {
        // The first candidate's codes are not capped at nmax (as in ggml).
        let diff = x[i] - scale * nearest(iscale * x[i]) as f32;
        best_mse += weights[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax as f32) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..8 {
            let l = nearest(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut codes = [0i32; 8];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..8 {
        codes[i] = nearest(iscale * x[i]).min(nmax);
        let l = codes[i] as f32;
        sumlx += weights[i] * x[i] * l;
        suml2 += weights[i] * l * l;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..8 {
            let (w, l) = (weights[i], codes[i] as f32);
            let mut slx = sumlx - w * x[i] * l;
            let mut sl2 = suml2 - w * l * l;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest(x[i] * sl2 / slx).min(nmax);
                if new_l != codes[i] {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        codes[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    let scale = if suml2 > 0.0 { sumlx / suml2 } else { 0.0 };
    (scale, codes.map(|c| c as u8))
}
