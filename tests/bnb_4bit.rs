//! amthal's bitsandbytes 4-bit codec against bitsandbytes 0.50 itself
//! (tests/golden/bnb_4bit.safetensors, from scripts/golden/make_bnb_goldens.py): NF4
//! and FP4, blocks of 64, with and without double quantization, f32 and bf16 weights,
//! a ragged last block and zero / constant blocks. Codes, absmaxes (and the double
//! quantization's codes, absmaxes and offset) and the dequantized weights are equal,
//! bit for bit. Also LLM.int8's row-wise weight storage against
//! tests/golden/bnb_int8.safetensors (`int8_vectorwise_quant` / `_dequant`).

mod common;

use std::collections::HashMap;

use amthal::model::bnb4::{Absmax, Quant4, quantize};
use amthal::model::int8::quantize_rows;
use common::*;
use tch::{Kind, Tensor};

fn goldens() -> HashMap<String, Tensor> {
    golden_file("bnb_4bit.safetensors")
}

fn golden_file(name: &str) -> HashMap<String, Tensor> {
    let path = repo_root().join("tests/golden").join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (scripts/golden/make_bnb_goldens.py writes it)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn assert_equal(name: &str, ours: &Tensor, theirs: &Tensor) {
    assert_eq!(ours.kind(), theirs.kind(), "{name}: dtype");
    assert_eq!(ours.size(), theirs.size(), "{name}: shape");
    if !ours.equal(theirs) {
        let differ = ours
            .to_kind(Kind::Float)
            .ne_tensor(&theirs.to_kind(Kind::Float))
            .sum(Kind::Int64)
            .int64_value(&[]);
        panic!("{name}: {differ} of {} values differ", ours.numel());
    }
}

#[test]
fn nf4_and_fp4_equal_bitsandbytes_bit_for_bit() {
    let golden = goldens();
    let mut checked = 0;
    for name in ["w", "ragged", "flat"] {
        for dtype in ["f32", "bf16"] {
            let input = &golden[&format!("{name}.{dtype}.input")];
            for (quant, quant_name) in [(Quant4::Nf4, "nf4"), (Quant4::Fp4, "fp4")] {
                for double in [false, true] {
                    let key = format!(
                        "{name}.{dtype}.{quant_name}.{}",
                        if double { "double" } else { "single" }
                    );
                    let q = quantize(input, quant, double);
                    assert_equal(
                        &format!("{key}.packed"),
                        &q.packed,
                        &golden[&format!("{key}.packed")],
                    );
                    match &q.absmax {
                        Absmax::Plain(absmax) => assert_equal(
                            &format!("{key}.absmax"),
                            absmax,
                            &golden[&format!("{key}.absmax")],
                        ),
                        Absmax::Double {
                            codes,
                            absmax,
                            offset,
                        } => {
                            assert_equal(
                                &format!("{key}.absmax_codes"),
                                codes,
                                &golden[&format!("{key}.absmax_codes")],
                            );
                            assert_equal(
                                &format!("{key}.absmax2"),
                                absmax,
                                &golden[&format!("{key}.absmax2")],
                            );
                            let their_offset =
                                golden[&format!("{key}.offset")].double_value(&[0]) as f32;
                            assert_eq!(offset.to_bits(), their_offset.to_bits(), "{key}.offset");
                        }
                    }
                    assert_equal(
                        &format!("{key}.dequantized"),
                        &q.dequantize(input.kind()),
                        &golden[&format!("{key}.dequantized")],
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 24);
}

/// 4 bits per weight plus the statistics: a 7B projection's 16.8 M values take 8.4 MB
/// of codes, and double quantization cuts the absmaxes from 4 bytes per 64 values to
/// ~1 byte.
#[test]
fn storage_is_about_half_a_byte_per_weight() {
    let x = Tensor::ones([4096, 64], (Kind::Float, tch::Device::Cpu));
    let single = quantize(&x, Quant4::Nf4, false).bytes();
    let double = quantize(&x, Quant4::Nf4, true).bytes();
    let values = 4096 * 64;
    assert_eq!(single, values / 2 + values / 64 * 4);
    assert!(double < values / 2 + values / 64 * 2, "{double}");
}

#[test]
fn int8_rows_equal_bitsandbytes_bit_for_bit() {
    let golden = golden_file("bnb_int8.safetensors");
    let mut checked = 0;
    for name in ["w", "ragged"] {
        for dtype in ["f32", "bf16"] {
            let key = format!("{name}.{dtype}");
            let input = &golden[&format!("{key}.input")];
            let q = quantize_rows(input);
            assert_equal(
                &format!("{key}.codes"),
                &q.codes,
                &golden[&format!("{key}.codes")],
            );
            assert_equal(
                &format!("{key}.row_absmax"),
                &q.row_absmax,
                &golden[&format!("{key}.row_absmax")],
            );
            assert_equal(
                &format!("{key}.dequantized"),
                &q.dequantize(input.kind()),
                &golden[&format!("{key}.dequantized")],
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4);
}
