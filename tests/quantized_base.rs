//! `--quantize nf4|fp4|int8`: a model whose frozen projections are stored as
//! bitsandbytes stores them (the codecs themselves are checked against bitsandbytes in
//! tests/bnb_4bit.rs) computes exactly what the same model computes with those
//! projections dequantized; gradients reach a LoRA adapter through the quantized
//! projections' recomputing backward exactly as through dense ones; and the CLI trains
//! an ordinary PEFT adapter on a 4-bit base, which then loads on the dense base.

mod common;

use amthal::batch::Batch;
use amthal::encode::Encoded;
use amthal::loss::answer_token_losses;
use amthal::model::fuse::fuse_projections;
use amthal::model::linear::{Weight, dequantization_count};
use amthal::model::lora::{LoraConfig, attach_new, fold_adapters, named_adapter_tensors};
use amthal::model::quantized::{QuantKind, Quantization};
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use common::*;
use tch::{Device, Kind, Tensor};

fn tiny(quantize: Option<Quantization>) -> Llama {
    let options = LoadOptions {
        quantize,
        ..LoadOptions::default()
    };
    load_llama(&ModelSource::HfFolder(fixture("tiny-llama")), options).unwrap()
}

/// Every storage the flags offer.
fn storages() -> Vec<Quantization> {
    let q = |kind, double_quant| Quantization { kind, double_quant };
    vec![
        q(QuantKind::Nf4, false),
        q(QuantKind::Nf4, true),
        q(QuantKind::Fp4, true),
        q(QuantKind::Int8, false),
    ]
}

/// The dense model with each projection replaced by the quantized model's
/// dequantized weight.
fn dequantized_twin(quantized: &Llama) -> Llama {
    let mut dense = tiny(None);
    for (layer, twin) in quantized.layers.iter().zip(dense.layers.iter_mut()) {
        for ((name, q), (_, d)) in layer.linears().into_iter().zip(twin.linears_mut()) {
            let Weight::Quantized(storage) = &q.weight else {
                panic!("{name} is not quantized");
            };
            d.weight = Weight::Dense(storage.dequantize(Kind::Float));
        }
    }
    dense
}

/// Deterministic token rows with answer labels (no random generator: tests run in
/// parallel and share torch's global one).
fn batch() -> Batch {
    let rows: Vec<Encoded> = (0..3u32)
        .map(|r| {
            let ids: Vec<u32> = (0..12).map(|i| (r * 37 + i * 11) % 380).collect();
            let prompt_len = 5;
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < prompt_len { -100 } else { t as i64 })
                .collect();
            Encoded {
                input_ids: ids,
                prompt_len,
                labels,
                truncated: false,
            }
        })
        .collect();
    Batch::from_encoded(&rows.iter().collect::<Vec<_>>(), Device::Cpu)
}

fn logits(model: &Llama) -> Tensor {
    let batch = batch();
    let positions = Tensor::arange(12, (Kind::Int64, Device::Cpu))
        .unsqueeze(0)
        .repeat([3, 1]);
    tch::no_grad(|| model.forward(&batch.input_ids, &positions, None))
}

#[test]
fn quantized_projections_compute_what_their_dequantized_weights_compute() {
    for storage in storages() {
        let quantized = tiny(Some(storage));
        assert_eq!(quantized.quantization, Some(storage));
        // Projections quantized; embeddings and norms dense, in the compute dtype.
        for layer in &quantized.layers {
            for (name, linear) in layer.linears() {
                assert!(
                    linear.weight.dense().is_none(),
                    "{storage}: {name} is dense"
                );
            }
        }
        assert_eq!(quantized.embed_tokens.kind(), Kind::Float);
        let twin = dequantized_twin(&quantized);
        let (ours, theirs) = (logits(&quantized), logits(&twin));
        assert!(ours.equal(&theirs), "{storage}: logits differ");
        // And the quantization changed the model (it is not a dense pass-through).
        assert!(!ours.equal(&logits(&tiny(None))), "{storage}: no rounding?");
        // Generation's q/k/v and gate/up fusion leaves quantized projections alone.
        let mut unfused = tiny(Some(storage));
        assert_eq!(fuse_projections(&mut unfused), 0, "{storage}");
        assert!(logits(&unfused).equal(&ours));
    }
}

/// The tiny model with `storage` and its dequantized dense twin, each with the same
/// fresh r4 adapter (DoRA when `dora`), no dropout.
fn adapted_pair(storage: Quantization, dora: bool) -> (Llama, Llama) {
    let mut quantized = tiny(Some(storage));
    let mut twin = dequantized_twin(&quantized);
    let config = LoraConfig {
        r: 4,
        dropout: 0.0,
        use_dora: dora,
        init: Default::default(),
        ..LoraConfig::default()
    };
    tch::manual_seed(3);
    attach_new(&mut quantized, &config).unwrap();
    tch::manual_seed(3);
    attach_new(&mut twin, &config).unwrap();
    (quantized, twin)
}

/// Every adapter tensor of `quantized` has a gradient within `limit` (relative to the
/// largest value) of its twin's in `dense`; `count` tensors in all.
fn assert_same_gradients(
    storage: impl std::fmt::Display,
    quantized: &Llama,
    dense: &Llama,
    limit: f64,
    count: usize,
) {
    let mut compared = 0;
    for ((name, ours), (_, theirs)) in named_adapter_tensors(quantized)
        .into_iter()
        .zip(named_adapter_tensors(dense))
    {
        let (g, h) = (ours.grad(), theirs.grad());
        assert!(g.defined(), "{storage}: {name} has no gradient");
        let diff = (&g - &h).abs().max().double_value(&[]);
        let scale = h.abs().max().double_value(&[]);
        assert!(
            diff <= limit * scale.max(1e-6),
            "{storage}: {name}: gradient differs by {diff:e} (scale {scale:e})"
        );
        compared += 1;
    }
    assert_eq!(compared, count);
}

/// The adapter's gradients through a quantized base (the weight dequantized again in
/// the backward pass, never saved) equal those through the dequantized dense twin.
#[test]
fn lora_gradients_through_a_quantized_base_equal_the_dense_ones() {
    // The recomputing backward lives in the embedded ops library: it must load here.
    assert!(amthal::torch_ops::ops().is_some());
    for storage in storages() {
        let (quantized, twin) = adapted_pair(storage, false);
        // Nonzero B (fresh adapters start at B = 0), the same in both, so every
        // adapter's A gets a gradient through the layers above it.
        for ((_, a), (_, b)) in named_adapter_tensors(&quantized)
            .into_iter()
            .zip(named_adapter_tensors(&twin))
        {
            tch::no_grad(|| {
                let values = Tensor::arange(a.numel() as i64, (Kind::Float, Device::Cpu))
                    .sin()
                    .view(a.size().as_slice())
                    * 0.05;
                a.shallow_clone().copy_(&values);
                b.shallow_clone().copy_(&values);
            });
        }
        let batch = batch();
        // Each of the 14 projections is dequantized once in the forward pass and once
        // more in the backward pass (recomputed, not kept), except layer 0's q, k and v:
        // their input (the embeddings) needs no gradient, so no backward runs there.
        let before = dequantization_count();
        let loss = answer_token_losses(&quantized, &batch, true).sum();
        let forward = dequantization_count() - before;
        loss.backward();
        let backward = dequantization_count() - before - forward;
        assert_eq!((forward, backward), (14, 11), "{storage}: dequantizations");
        answer_token_losses(&twin, &batch, true).sum().backward();
        assert_same_gradients(storage, &quantized, &twin, 1e-6, 2 * 7 * 2);
    }
}

#[test]
fn cli_trains_a_peft_adapter_on_a_4bit_base_that_loads_on_the_dense_base() {
    let dir = temp_dir("qlora");
    let model = fixture("tiny-llama");
    let data = repo_root().join("examples/data");
    let out = dir.join("run");
    let output = amthal(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--lora",
        "--load_in_4bit",
        "--bnb_4bit_use_double_quant",
        "--gradient-checkpointing",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--cutoff-len",
        "256",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
        "--previews",
        "0",
        "--eval-strategy",
        "no",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let config = std::fs::read_to_string(out.join("training_config.toml")).unwrap();
    assert!(config.contains("quantize = \"nf4\""), "{config}");
    assert!(config.contains("double_quant = true"), "{config}");
    let adapter_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter_config["peft_type"], "LORA");
    // The adapter loads on the dense base, and on the 4-bit base again.
    let validation = data.join("Validation_data.csv");
    let loss = |extra: &[&str]| {
        let mut args = vec![
            "loss",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            validation.to_str().unwrap(),
            "--device",
            "cpu",
            "--cutoff-len",
            "256",
        ];
        args.extend_from_slice(extra);
        let output = amthal(&args);
        assert!(output.status.success(), "{extra:?}: {}", stderr(&output));
        stdout(&output)
    };
    let dense = loss(&[]);
    let four_bit = loss(&["--quantize", "nf4", "--double-quant"]);
    assert!(
        dense.contains("loss") && four_bit.contains("loss"),
        "{dense}"
    );
    assert_ne!(dense, four_bit, "the 4-bit base should round the weights");
}

#[test]
fn quantize_flags_that_cannot_apply_are_clear_errors() {
    let dir = temp_dir("quantize-errors");
    let model = fixture("tiny-llama");
    let data = repo_root().join("examples/data");
    let train = |extra: &[&str]| {
        let out = dir.join("run");
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-steps",
            "1",
        ];
        args.extend_from_slice(extra);
        amthal(&args)
    };
    for (extra, message) in [
        (&["--quantize", "nf4"][..], "add --lora"),
        (
            &["--lora", "--quantize", "int8", "--double-quant"][..],
            "not int8",
        ),
        (
            &["--lora", "--double-quant"][..],
            "needs a 4-bit --quantize",
        ),
        (&["--lora", "--quantize", "nf3"][..], "nf3"),
    ] {
        let output = train(extra);
        assert_refused(&output, &format!("{extra:?}"), message);
        assert!(!dir.join("run").exists(), "{extra:?} left an output folder");
    }
}

/// QDoRA: a DoRA adapter on a quantized base (its norms taken from the dequantized
/// weights) has the dense twin's magnitudes and gradients.
#[test]
fn dora_on_a_quantized_base_equals_the_dense_twin() {
    for storage in storages() {
        let (mut quantized, twin) = adapted_pair(storage, true);
        for ((name, a), (_, b)) in named_adapter_tensors(&quantized)
            .into_iter()
            .zip(named_adapter_tensors(&twin))
        {
            // The magnitudes start at the same row norms.
            let start = (a - b).abs().max().double_value(&[]);
            assert!(start <= 1e-6, "{storage}: {name} starts {start:e} apart");
            tch::no_grad(|| {
                let wave = Tensor::arange(a.numel() as i64, (Kind::Float, Device::Cpu))
                    .sin()
                    .view(a.size().as_slice());
                let values = if name.ends_with("lora_magnitude_vector") {
                    a * (wave * 0.1 + 1.0)
                } else {
                    wave * 0.05
                };
                a.shallow_clone().copy_(&values);
                b.shallow_clone().copy_(&values);
            });
        }
        let batch = batch();
        answer_token_losses(&quantized, &batch, true)
            .sum()
            .backward();
        answer_token_losses(&twin, &batch, true).sum().backward();
        assert_same_gradients(storage, &quantized, &twin, 1e-5, 2 * 7 * 3);
        // Generation: the quantized projections cannot fold, and keep DoRA beside them
        // with its factor taken once; the logits stay those of the factor per forward.
        let before = logits(&quantized);
        assert_eq!(fold_adapters(&mut quantized), 0, "{storage}");
        let frozen = quantized
            .layers
            .iter()
            .flat_map(|layer| layer.linears())
            .filter(|(_, linear)| {
                linear
                    .lora
                    .as_ref()
                    .is_some_and(|lora| lora.frozen_factor.is_some())
            })
            .count();
        assert_eq!(frozen, 14, "{storage}");
        let after = logits(&quantized);
        let difference = (&after - &before).abs().max().double_value(&[]);
        assert!(difference <= 1e-6, "{storage}: {difference:e}");
        // And the forward reads the kept factor (not the weight again).
        let q = &mut quantized.layers[0].self_attn.q_proj;
        let lora = q.lora.as_mut().unwrap();
        lora.frozen_factor = lora.frozen_factor.as_ref().map(|f| f * 2.0);
        assert!(
            !logits(&quantized).allclose(&after, 1e-3, 1e-3, false),
            "{storage}"
        );
    }
}
