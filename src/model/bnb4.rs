//! bitsandbytes' 4-bit weight storage (QLoRA's `load_in_4bit`), bit for bit:
//! NF4 or FP4 codes in blocks of 64 values with one f32 absmax per block, two codes
//! per byte (high nibble first), and optionally "double quantization"
//! (`bnb_4bit_use_double_quant`): the absmaxes minus their mean, themselves stored in
//! 8 bits with the dynamic map in blocks of 256 plus one f32 absmax per block.
//!
//! `quantize` and `dequantize` equal `bitsandbytes.functional.quantize_4bit` /
//! `dequantize_4bit` (0.50, its CPU backend) on the goldens in
//! tests/golden/bnb_4bit.safetensors (scripts/golden/make_bnb_goldens.py). A model
//! loaded with `--quantize nf4|fp4` keeps its frozen projections this way
//! (`super::quantized`) and dequantizes one projection at a time.
//!
//! Dequantization reads only tensors already on the weight's device (the code table
//! as a 256-entry byte -> value-pair table, the dynamic map): nothing is copied from
//! the host, so a CUDA graph can capture it.

use tch::{Kind, Tensor};

use crate::train::code_map::CodeMap;
use crate::train::moments::{BLOCK as ABSMAX_BLOCK, bnb_dynamic_map, quantize_blockwise};

/// Values per 4-bit block (bitsandbytes' default blocksize).
pub const BLOCK: i64 = 64;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant4 {
    /// NormalFloat4: 16 quantiles of N(0, 1), normalized to [-1, 1].
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bits), normalized to [-1, 1].
    Fp4,
}

impl Quant4 {
    /// The 16 code values in code order, as bitsandbytes' `get_4bit_type` builds them.
    pub fn code(self) -> [f32; 16] {
        match self {
            Quant4::Nf4 => [
                -1.0,
                -0.696_192_8,
                -0.525_073_05,
                -0.394_917_5,
                -0.284_441_38,
                -0.184_773_43,
                -0.091_050_036,
                0.0,
                0.079_580_3,
                0.160_930_2,
                0.246_112_3,
                0.337_915_24,
                0.440_709_83,
                0.562_617,
                0.722_956_84,
                1.0,
            ],
            Quant4::Fp4 => {
                let raw = [
                    0.0f32, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0,
                    -4.0, -6.0, -2.0, -3.0,
                ];
                raw.map(|v| v / 12.0)
            }
        }
    }
}

/// How the per-block absmaxes are kept.
pub enum Absmax {
    /// One f32 per block.
    Plain(Tensor),
    /// Double quantization: 8-bit codes into the signed dynamic map, one f32 absmax per
    /// 256 of them, and the mean that was subtracted first.
    Double {
        codes: Tensor,
        absmax: Tensor,
        offset: f32,
    },
}

/// A tensor in bitsandbytes' 4-bit storage.
pub struct Quantized4 {
    pub quant: Quant4,
    /// Two codes per byte, high nibble first: [ceil(numel / 2)] u8.
    pub packed: Tensor,
    pub absmax: Absmax,
    pub shape: Vec<i64>,
    /// Every byte's two code values, [256, 2] f32, on the weight's device.
    pair_values: Tensor,
    /// bitsandbytes' signed dynamic map, [256] f32, on the device (double quantization).
    dynamic_map: Tensor,
}

/// bitsandbytes' quantize_blockwise: per-block absmax, values scaled into [-1, 1],
/// clamped, and the code of the nearest value (ties to the lower one).
fn block_scaled(flat: &Tensor, block: i64) -> (Tensor, Tensor) {
    let n = flat.numel() as i64;
    let full = n - n % block;
    let mut absmax = Vec::new();
    let mut scaled = Vec::new();
    if full > 0 {
        let blocks = flat.narrow(0, 0, full).view([-1, block]);
        let max = blocks.abs().amax([1], false);
        // 1 / absmax, then a multiply (bitsandbytes' order; a zero block stays 0).
        let inverse = max.clamp_min(1e-38).reciprocal();
        scaled.push((blocks * inverse.unsqueeze(1)).clamp(-1.0, 1.0).view([-1]));
        absmax.push(max);
    }
    if full < n {
        // The last, shorter block: its absmax is clamped and it divides.
        let rest = flat.narrow(0, full, n - full);
        let max = rest.abs().max().clamp_min(1e-38);
        scaled.push((&rest / &max).clamp(-1.0, 1.0));
        absmax.push(max.view([1]));
    }
    (Tensor::cat(&scaled, 0), Tensor::cat(&absmax, 0))
}

/// Quantizes `x` (any float dtype, computed in f32) as bitsandbytes' `quantize_4bit`
/// with blocksize 64; `double` for compress_statistics.
pub fn quantize(x: &Tensor, quant: Quant4, double: bool) -> Quantized4 {
    tch::no_grad(|| {
        let device = x.device();
        let flat = x.to_kind(Kind::Float).reshape([-1]);
        let (mut scaled, absmax) = block_scaled(&flat, BLOCK);
        if scaled.numel() % 2 == 1 {
            scaled = scaled.constant_pad_nd([0, 1]);
        }
        // The code whose value is nearest: bucketize over the midpoints of the sorted
        // values (a value on a midpoint goes to the lower code), then FP4's sorted
        // position back to its bit pattern.
        let code = quant.code();
        let mut order: Vec<usize> = (0..16).collect();
        // A stable sort in which -0.0 equals 0.0, as torch.argsort orders FP4's two
        // zeros (code 0 before code 8): values just below zero get code 0, just above
        // code 8, exactly as bitsandbytes assigns them.
        order.sort_by(|&a, &b| code[a].partial_cmp(&code[b]).expect("no NaN in a code"));
        let midpoints: Vec<f32> = order
            .windows(2)
            .map(|w| (code[w[0]] + code[w[1]]) / 2.0)
            .collect();
        let position = scaled.bucketize(
            &Tensor::from_slice(&midpoints).to_device(device),
            false,
            false,
        );
        let order_tensor = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>())
            .to_device(device);
        let codes = order_tensor.index_select(0, &position).to_kind(Kind::Uint8);
        let pairs = codes.view([-1, 2]);
        let packed = pairs
            .select(1, 0)
            .bitwise_left_shift_tensor_scalar(4)
            .bitwise_or_tensor(&pairs.select(1, 1));
        let map = CodeMap::shared(bnb_dynamic_map(true), device);
        let absmax = if double {
            let offset = absmax.mean(Kind::Float);
            let (codes, block_absmax) = quantize_blockwise(&(&absmax - &offset), &map);
            let blocks = absmax.numel() as i64;
            Absmax::Double {
                codes: codes.narrow(0, 0, blocks),
                absmax: block_absmax,
                offset: offset.double_value(&[]) as f32,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Quantized4 {
            quant,
            packed,
            absmax,
            shape: x.size(),
            pair_values: pair_values(quant).to_device(device),
            dynamic_map: map.values,
        }
    })
}

/// The values of a byte's two codes (high nibble, low nibble) for all 256 bytes:
/// dequantization looks up pairs instead of unpacking nibbles.
fn pair_values(quant: Quant4) -> Tensor {
    let code = quant.code();
    let pairs: Vec<f32> = (0..256usize)
        .flat_map(|byte| [code[byte >> 4], code[byte & 0x0F]])
        .collect();
    Tensor::from_slice(&pairs).view([256, 2])
}

impl Quantized4 {
    /// The f32 absmax of every 64-value block.
    pub fn block_absmax(&self) -> Tensor {
        match &self.absmax {
            Absmax::Plain(absmax) => absmax.shallow_clone(),
            Absmax::Double {
                codes,
                absmax,
                offset,
            } => {
                let n = codes.numel() as i64;
                let values = self.dynamic_map.index_select(0, &codes.to_kind(Kind::Int));
                let padded = (n + ABSMAX_BLOCK - 1) / ABSMAX_BLOCK * ABSMAX_BLOCK;
                let scaled = (values
                    .constant_pad_nd([0, padded - n])
                    .view([-1, ABSMAX_BLOCK])
                    * absmax.unsqueeze(1))
                .view([-1])
                .narrow(0, 0, n);
                scaled + *offset as f64
            }
        }
    }

    /// The weights in `kind`: code value x block absmax in f32, then one cast
    /// (bitsandbytes' `dequantize_4bit`). The product is written straight into a
    /// `kind` tensor (`mul_out` computes in f32 and rounds once on the store): the same
    /// numbers as multiplying then casting, without the f32 product's round trip
    /// through memory (~14.5 instead of ~22.5 bytes of traffic per weight; the forward
    /// and backward passes of a 4-bit base run this for every projection).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        tch::no_grad(|| {
            let n: i64 = self.shape.iter().product();
            let values = self
                .pair_values
                .index_select(0, &self.packed.to_kind(Kind::Int))
                .view([-1]);
            let absmax = self.block_absmax();
            let blocks = absmax.size()[0];
            let values = if n == blocks * BLOCK {
                values
            } else {
                // A ragged last block: pad the codes' values to whole blocks.
                values
                    .narrow(0, 0, n)
                    .constant_pad_nd([0, blocks * BLOCK - n])
            };
            let out = Tensor::empty([blocks, BLOCK], (kind, values.device()));
            let _ = values
                .view([blocks, BLOCK])
                .mul_out(&out, &absmax.unsqueeze(1));
            let flat = out.view([-1]);
            let flat = if n == blocks * BLOCK {
                flat
            } else {
                flat.narrow(0, 0, n)
            };
            flat.view(self.shape.as_slice())
        })
    }

    /// Bytes this storage takes (codes, absmaxes and their statistics).
    pub fn bytes(&self) -> i64 {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => a.numel() as i64 * 4,
            Absmax::Double { codes, absmax, .. } => {
                codes.numel() as i64 + absmax.numel() as i64 * 4 + 4
            }
        };
        self.packed.numel() as i64 + absmax
    }
}
