//! Frozen projections kept quantized (`--quantize nf4|fp4|int8`, QLoRA's base model):
//! which storage, and one weight in it. The forward pass dequantizes a projection into
//! the compute dtype just before its matmul and drops it right after; the backward pass
//! dequantizes it again rather than keeping it (`crate::torch_ops::recomputed_linear`).
//! Embeddings, norms and lm_head stay in the compute dtype, as bitsandbytes leaves them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::bnb4::{Quant4, Quantized4, quantize};
use super::int8::{Int8Rows, quantize_rows};

/// How the frozen projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantKind {
    /// bitsandbytes NF4 (QLoRA's choice), blocks of 64.
    Nf4,
    /// bitsandbytes FP4, blocks of 64.
    Fp4,
    /// LLM.int8's row-wise int8 (weights only; see `super::int8`).
    Int8,
}

impl FromStr for QuantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "nf4" => Ok(QuantKind::Nf4),
            "fp4" => Ok(QuantKind::Fp4),
            "int8" | "8bit" => Ok(QuantKind::Int8),
            other => Err(format!("unknown quantization {other:?} (nf4, fp4 or int8)")),
        }
    }
}

impl fmt::Display for QuantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantKind::Nf4 => "nf4",
            QuantKind::Fp4 => "fp4",
            QuantKind::Int8 => "int8",
        })
    }
}

/// The storage of a model's frozen projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization {
    pub kind: QuantKind,
    /// 4-bit only: the block absmaxes in 8 bits (`bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Quantization {
    /// From the flags or the TOML keys: `kind` None is a dense model. Double
    /// quantization applies to 4-bit storage only.
    pub fn from_settings(
        kind: Option<QuantKind>,
        double_quant: bool,
    ) -> anyhow::Result<Option<Quantization>> {
        match kind {
            None if double_quant => crate::bail_input!(
                "--double-quant needs a 4-bit --quantize (nf4 or fp4, or --load-in-4bit)"
            ),
            Some(QuantKind::Int8) if double_quant => {
                crate::bail_input!("--double-quant applies to 4-bit storage (nf4, fp4), not int8")
            }
            None => Ok(None),
            Some(kind) => Ok(Some(Quantization { kind, double_quant })),
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        if self.double_quant && self.kind != QuantKind::Int8 {
            f.write_str(" (double quantization)")?;
        }
        Ok(())
    }
}

/// One projection's weight in quantized storage.
pub enum QuantizedWeight {
    FourBit(Quantized4),
    Int8(Int8Rows),
}

impl QuantizedWeight {
    /// Quantizes a [out, in] weight (computed on its device).
    pub fn new(weight: &Tensor, quantization: Quantization) -> QuantizedWeight {
        match quantization.kind {
            QuantKind::Nf4 => {
                QuantizedWeight::FourBit(quantize(weight, Quant4::Nf4, quantization.double_quant))
            }
            QuantKind::Fp4 => {
                QuantizedWeight::FourBit(quantize(weight, Quant4::Fp4, quantization.double_quant))
            }
            QuantKind::Int8 => QuantizedWeight::Int8(quantize_rows(weight)),
        }
    }

    /// The weight in `kind` (a fresh tensor, not part of any autograd graph).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        match self {
            QuantizedWeight::FourBit(q) => q.dequantize(kind),
            QuantizedWeight::Int8(q) => q.dequantize(kind),
        }
    }

    pub fn shape(&self) -> Vec<i64> {
        match self {
            QuantizedWeight::FourBit(q) => q.shape.clone(),
            QuantizedWeight::Int8(q) => q.shape(),
        }
    }

    /// Bytes the storage takes on the device.
    pub fn bytes(&self) -> i64 {
        match self {
            QuantizedWeight::FourBit(q) => q.bytes(),
            QuantizedWeight::Int8(q) => q.bytes(),
        }
    }
}
