//! LLM.int8's weight storage (`load_in_8bit`), bit for bit: each row of a projection
//! as int8 codes `round(w * 127 / absmax)` with the row's absmax in f32, as
//! bitsandbytes' `int8_vectorwise_quant` / `int8_vectorwise_dequant` compute them
//! (goldens in tests/golden/bnb_int8.safetensors, scripts/golden/make_bnb_goldens.py).
//!
//! What amthal does *not* copy from bitsandbytes' `Linear8bitLt`: the outlier split
//! (its threshold 6.0, where input columns with a large value run in 16 bits) and the
//! int8 x int8 matmul. amthal stores the weight in 8 bits and dequantizes it into the
//! compute dtype for an ordinary matmul, which is at least as precise as the int8
//! matmul (the activations are not quantized at all), so no outlier split is needed.

use tch::{Kind, Tensor};

/// bitsandbytes' 1/127, as a double (its `int8_vectorwise_dequant` constant).
const INVERSE_127: f64 = 7.874015718698502e-3;

/// A 2-D weight in LLM.int8's row-wise storage.
pub struct Int8Rows {
    /// [rows, columns] int8.
    pub codes: Tensor,
    /// [rows] f32: each row's largest magnitude.
    pub row_absmax: Tensor,
}

/// Quantizes a [rows, columns] weight (any float dtype) row by row.
pub fn quantize_rows(weight: &Tensor) -> Int8Rows {
    tch::no_grad(|| {
        let row_absmax = weight.abs().amax([1], false).to_kind(Kind::Float);
        // bitsandbytes writes `127.0 / absmax`, which torch computes as
        // `absmax.reciprocal() * 127` (Tensor.__rtruediv__), in f32; then one multiply.
        // An all-zero row would scale by infinity: its scale is 0 and its codes 0.
        let scale = (row_absmax.reciprocal() * 127.0).nan_to_num(0.0, Some(0.0), Some(0.0));
        let codes = (weight * scale.unsqueeze(1)).round().to_kind(Kind::Int8);
        Int8Rows { codes, row_absmax }
    })
}

impl Int8Rows {
    /// The weight in `kind`: code x absmax x (1/127) in f32, then one cast.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        // (codes x absmax) x 1/127 in f32 as bitsandbytes orders it, the last product
        // rounded once straight into `kind` (`mul_out`), without an f32 copy of it.
        tch::no_grad(|| {
            let scaled = &self.codes * self.row_absmax.unsqueeze(1);
            let out = Tensor::empty(scaled.size(), (kind, scaled.device()));
            // Filled on the device, not copied from the host: CUDA graphs may capture it.
            let inverse = Tensor::full([], INVERSE_127, (Kind::Float, scaled.device()));
            let _ = scaled.mul_out(&out, &inverse);
            out
        })
    }

    pub fn shape(&self) -> Vec<i64> {
        self.codes.size()
    }

    /// Bytes this storage takes: one per weight plus 4 per row.
    pub fn bytes(&self) -> i64 {
        self.codes.numel() as i64 + self.row_absmax.numel() as i64 * 4
    }
}
