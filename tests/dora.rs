//! DoRA adapters (PEFT's `use_dora`) against PEFT: a DoRA adapter PEFT saved loads
//! with PEFT's logits and gradients, folds into the weights as `merge_and_unload`
//! does, starts from the base model when new, round-trips through amthal's files, and
//! trains from the command line (goldens from scripts/golden/make_dora_golden.py).

mod common;

use std::collections::HashMap;

use amthal::model::linear::{Linear, Lora, LoraDropout};
use amthal::model::lora::{
    LoraConfig, attach_new, fold_adapters, load_adapter, named_adapter_tensors,
    read_adapter_config, save_adapter,
};
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use common::*;
use tch::{Device, Kind, Tensor};

fn load_tiny() -> Llama {
    load_llama(
        &ModelSource::HfFolder(fixture("tiny-llama")),
        LoadOptions::default(),
    )
    .unwrap()
}

fn goldens() -> HashMap<String, Tensor> {
    let path = repo_root().join("tests/golden/tiny_llama_dora.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn sequences() -> Vec<Vec<i64>> {
    serde_json::from_value(golden("tiny_llama.json")["sequences"].clone()).unwrap()
}

/// Logits [T, vocab] of one unpadded row.
fn row_logits(model: &Llama, row: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(row).unsqueeze(0);
    let positions = Tensor::arange(row.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    model.forward(&ids, &positions, None).squeeze_dim(0)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Every golden row's logits within `tolerance` of `golden` [rows, width, vocab].
fn assert_logits(model: &Llama, golden: &Tensor, tolerance: f64, what: &str) {
    for (i, row) in sequences().iter().enumerate() {
        let ours = tch::no_grad(|| row_logits(model, row));
        let theirs = golden.get(i as i64).narrow(0, 0, row.len() as i64);
        let difference = max_abs_diff(&ours, &theirs);
        assert!(difference <= tolerance, "{what}, row {i}: {difference:e}");
    }
}

#[test]
fn a_peft_dora_adapter_gives_peft_logits_and_gradients() {
    let mut model = load_tiny();
    let config = load_adapter(&mut model, &fixture("tiny-llama-dora")).unwrap();
    assert!(config.use_dora);
    // A, B and a magnitude on each of the 7 projections of both layers.
    assert_eq!(named_adapter_tensors(&model).len(), 2 * 7 * 3);
    let golden = goldens();
    assert_logits(&model, &golden["dora"], 1e-4, "DoRA logits");
    // Without the magnitudes' effect the logits would differ from PEFT's by far more.
    let mut plain = load_tiny();
    load_adapter(&mut plain, &fixture("tiny-llama-dora")).unwrap();
    for layer in plain.layers.iter_mut() {
        for (_, linear) in layer.linears_mut() {
            linear.lora.as_mut().unwrap().magnitude = None;
        }
    }
    let row = &sequences()[0];
    let off = tch::no_grad(|| row_logits(&plain, row));
    let theirs = golden["dora"].get(0).narrow(0, 0, row.len() as i64);
    assert!(max_abs_diff(&off, &theirs) > 1e-2);

    // Gradients of sum(logits * sin(0, 1, ...)) for the first row.
    let logits = row_logits(&model, row);
    let probe = Tensor::arange(logits.numel() as i64, (Kind::Float, Device::Cpu))
        .sin()
        .view(logits.size().as_slice());
    (logits * probe).sum(Kind::Float).backward();
    let named: HashMap<String, Tensor> = named_adapter_tensors(&model)
        .into_iter()
        .map(|(name, t)| (name, t.shallow_clone()))
        .collect();
    let mut compared = 0;
    for (key, expected) in &golden {
        let Some(short) = key.strip_prefix("grad.") else {
            continue;
        };
        let name = match short.strip_suffix(".lora_magnitude_vector") {
            Some(_) => format!("base_model.model.{short}"),
            None => format!("base_model.model.{short}.weight"),
        };
        let grad = named[&name].grad();
        let scale = expected.abs().max().double_value(&[]);
        let difference = max_abs_diff(&grad, expected) / scale;
        assert!(difference < 1e-4, "{name}: relative {difference:e}");
        compared += 1;
    }
    assert_eq!(compared, 6);
}

#[test]
fn folding_a_dora_adapter_keeps_peft_logits() {
    let mut model = load_tiny();
    load_adapter(&mut model, &fixture("tiny-llama-dora")).unwrap();
    assert_eq!(fold_adapters(&mut model), 14);
    assert!(named_adapter_tensors(&model).is_empty());
    let golden = goldens();
    assert_logits(
        &model,
        &golden["dora_merged"],
        1e-4,
        "folded vs PEFT merged",
    );
    assert_logits(&model, &golden["dora"], 1e-4, "folded vs PEFT unmerged");
}

#[test]
fn a_new_dora_adapter_starts_at_the_base_model_and_round_trips() {
    tch::manual_seed(2);
    let base = load_tiny();
    let mut model = load_tiny();
    let config = LoraConfig {
        r: 4,
        targets: vec!["q_proj".into(), "down_proj".into()],
        use_dora: true,
        init: Default::default(),
        ..LoraConfig::default()
    };
    attach_new(&mut model, &config).unwrap();
    // B = 0 and m = ||W||_row: the base model's logits.
    let row = &sequences()[0];
    let before = tch::no_grad(|| row_logits(&base, row));
    let after = tch::no_grad(|| row_logits(&model, row));
    assert!(max_abs_diff(&before, &after) < 1e-5);
    let q = &model.layers[0].self_attn.q_proj;
    let magnitude = q.lora.as_ref().unwrap().magnitude.as_ref().unwrap();
    assert!(magnitude.requires_grad());
    let norms = q
        .weight
        .expect_dense()
        .norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    assert!(max_abs_diff(magnitude, &norms) < 1e-6);

    // Moved off its start, saved, read back: the same tensors and the config's flag.
    tch::no_grad(|| {
        for (_, tensor) in named_adapter_tensors(&model) {
            let _ = tensor.shallow_clone().g_add_(&(tensor.randn_like() * 0.1));
        }
    });
    let dir = temp_dir("dora-round-trip");
    save_adapter(&model, &config, "tiny-llama", &dir.join("adapter")).unwrap();
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(written["use_dora"], true);
    let (read, _, _) = read_adapter_config(&dir.join("adapter")).unwrap();
    assert_eq!(read, config);
    let mut reloaded = load_tiny();
    load_adapter(&mut reloaded, &dir.join("adapter")).unwrap();
    let saved = named_adapter_tensors(&model);
    let loaded = named_adapter_tensors(&reloaded);
    assert_eq!(saved.len(), 2 * 2 * 3);
    assert!(
        saved
            .iter()
            .any(|(name, _)| name.ends_with("mlp.down_proj.lora_magnitude_vector"))
    );
    for ((a_name, a), (b_name, b)) in saved.iter().zip(&loaded) {
        assert_eq!(a_name, b_name);
        assert_eq!(max_abs_diff(a, b), 0.0, "{a_name}");
    }

    // A DoRA config whose file lacks the magnitudes is refused, naming the missing one.
    let lacking = dir.join("lacking");
    std::fs::create_dir_all(&lacking).unwrap();
    std::fs::copy(
        dir.join("adapter/adapter_config.json"),
        lacking.join("adapter_config.json"),
    )
    .unwrap();
    let without: Vec<(String, Tensor)> =
        Tensor::read_safetensors(dir.join("adapter/adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(name, _)| !name.ends_with("lora_magnitude_vector"))
            .collect();
    Tensor::write_safetensors(&without, lacking.join("adapter_model.safetensors")).unwrap();
    let message = format!(
        "{:#}",
        load_adapter(&mut load_tiny(), &lacking).unwrap_err()
    );
    assert!(
        message.contains("use_dora is set but") && message.contains("lora_magnitude_vector"),
        "{message}"
    );

    // A plain LoRA adapter config with the magnitudes in its file is refused.
    let config_path = dir.join("adapter/adapter_config.json");
    let mut plain = written.clone();
    plain["use_dora"] = serde_json::Value::Bool(false);
    std::fs::write(&config_path, plain.to_string()).unwrap();
    let message = format!(
        "{:#}",
        load_adapter(&mut load_tiny(), &dir.join("adapter")).unwrap_err()
    );
    assert!(message.contains("use_dora"), "{message}");
}

/// With dropout, DoRA takes the base product again on the dropped input, as PEFT's
/// DoraLinearLayer does: y + (f - 1) x'W^T + f s x'A^T B^T, f = m / ||W + s B A||.
#[test]
fn dora_with_dropout_is_pefts_formula() {
    tch::manual_seed(5);
    let options = (Kind::Float, Device::Cpu);
    let weight = Tensor::randn([6, 5], options);
    let bias = Tensor::randn([6], options);
    let (a, b) = (
        Tensor::randn([2, 5], options),
        Tensor::randn([6, 2], options),
    );
    let magnitude = Tensor::rand([6], options) + 0.5;
    let (scaling, p) = (1.5, 0.3);
    let mut linear = Linear::new(weight.shallow_clone(), Some(bias.shallow_clone()));
    linear.lora = Some(Lora {
        a: a.shallow_clone(),
        b: b.shallow_clone(),
        scaling,
        dropout: p,
        magnitude: Some(magnitude.shallow_clone()),
        frozen_factor: None,
        residual_init: None,
    });
    let x = Tensor::randn([3, 4, 5], options);
    tch::manual_seed(9);
    let ours = linear.forward(&x, LoraDropout::AsInput);
    tch::manual_seed(9);
    let dropped = x.dropout(p, true);
    let norm = (&weight + b.matmul(&a) * scaling).norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    let factor = magnitude / norm;
    let y = x.linear(&weight, Some(&bias));
    let expected = &y
        + (&factor - 1.0) * dropped.linear::<&Tensor>(&weight, None)
        + &factor
            * dropped
                .linear::<&Tensor>(&a, None)
                .linear::<&Tensor>(&b, None)
            * scaling;
    assert!(max_abs_diff(&ours, &expected) < 1e-5);
    // Without dropout the same formula, from the one base product.
    let off = linear.forward(&x, LoraDropout::Off);
    let expected_off = &y
        + (&factor - 1.0) * x.linear::<&Tensor>(&weight, None)
        + &factor * x.linear::<&Tensor>(&a, None).linear::<&Tensor>(&b, None) * scaling;
    assert!(max_abs_diff(&off, &expected_off) < 1e-5);
    assert!(max_abs_diff(&ours, &off) > 1e-3);
}

/// In bf16 the DoRA term is formed in f32 and rounded once: a factor 0.3 % above 1
/// (which bf16 would round to exactly 1) still scales the output, without bias.
#[test]
fn dora_in_bf16_keeps_a_factor_near_one() {
    tch::manual_seed(6);
    let options = (Kind::Float, Device::Cpu);
    let weight = Tensor::randn([48, 32], options).to_kind(Kind::BFloat16);
    let (a, b) = (
        Tensor::randn([4, 32], options) * 0.01,
        Tensor::randn([48, 4], options) * 0.01,
    );
    let scaling = 2.0;
    let merged = weight.to_kind(Kind::Float) + b.matmul(&a) * scaling;
    let norms = merged.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    let mut linear = Linear::new(weight.shallow_clone(), None);
    linear.lora = Some(Lora {
        a: a.shallow_clone(),
        b: b.shallow_clone(),
        scaling,
        dropout: 0.0,
        magnitude: Some(&norms * 1.003),
        frozen_factor: None,
        residual_init: None,
    });
    let x = Tensor::randn([64, 32], options).to_kind(Kind::BFloat16);
    let ours = linear.forward(&x, LoraDropout::Off).to_kind(Kind::Float);
    let reference = x.to_kind(Kind::Float).linear::<&Tensor>(&merged, None) * 1.003;
    let large = reference.abs().gt(0.5);
    let relative = ((&ours - &reference) / &reference).masked_select(&large);
    let bias = relative.mean(Kind::Float).double_value(&[]);
    assert!(relative.numel() > 1000);
    assert!(bias.abs() < 5e-4, "mean relative error {bias:e}");
}

/// `amthal train --lora --use-dora` on the tiny model and the sample data (f32, CPU,
/// lr 1e-2, batches of 2, no previews) with `extra` flags; panics if it fails.
fn train_dora(out: &std::path::Path, extra: &[&str]) {
    let model = fixture("tiny-llama");
    let data = repo_root().join("examples/data");
    let mut args = vec![
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--lora",
        "--use-dora",
        "--lr",
        "1e-2",
        "--bsz",
        "2",
        "--previews",
        "0",
        "--precision",
        "f32",
        "--device",
        "cpu",
    ];
    args.extend(extra);
    let output = amthal(&args);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// `train --lora --use-dora` writes a DoRA adapter that trained its magnitudes, which
/// `loss` reads back.
#[test]
fn train_use_dora_trains_the_magnitudes_and_saves_them() {
    let dir = temp_dir("dora-train");
    let out = dir.join("out");
    let data = repo_root().join("examples/data");
    train_dora(
        &out,
        &[
            "--max-steps",
            "3",
            "--grad-accum",
            "1",
            "--eval-strategy",
            "no",
        ],
    );
    let (config, _, _) = read_adapter_config(&out).unwrap();
    assert!(config.use_dora);
    let mut model = load_tiny();
    let mut fresh = load_tiny();
    load_adapter(&mut model, &out).unwrap();
    attach_new(&mut fresh, &config).unwrap();
    // The magnitudes moved off the base weight's row norms they start from.
    let moved = named_adapter_tensors(&model)
        .into_iter()
        .zip(named_adapter_tensors(&fresh))
        .filter(|((name, _), _)| name.ends_with("lora_magnitude_vector"))
        .map(|((_, trained), (_, start))| max_abs_diff(trained, start))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "{moved}");
    let output = amthal(&[
        "loss",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--data",
        data.join("Validation_data.csv").to_str().unwrap(),
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
}

/// A DoRA run with LoRA dropout and NEFTune noise, resumed from its first checkpoint
/// in a fresh output folder, ends bit-identical to the run that went through: the
/// magnitudes' optimizer state is saved, and every random draw follows the run's
/// position.
#[test]
fn a_dora_run_with_dropout_and_neftune_resumes_exactly() {
    let dir = temp_dir("dora-resume");
    let run = |out: &std::path::Path, resume: Option<&str>| {
        let mut extra = vec![
            "--lora-dropout",
            "0.1",
            "--neftune-noise-alpha",
            "5",
            "--max-steps",
            "4",
            "--grad-accum",
            "2",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "2",
        ];
        if let Some(checkpoint) = resume {
            extra.extend(["--resume", checkpoint]);
        }
        train_dora(out, &extra);
    };
    let whole = dir.join("whole");
    run(&whole, None);
    let resumed = dir.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoint-2")).unwrap();
    for entry in std::fs::read_dir(whole.join("checkpoint-2")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(
            &path,
            resumed.join("checkpoint-2").join(path.file_name().unwrap()),
        )
        .unwrap();
    }
    run(&resumed, Some("checkpoint-2"));
    let read = |dir: &std::path::Path| {
        let mut all =
            Tensor::read_safetensors(dir.join("final/adapter_model.safetensors")).unwrap();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    let (a, b) = (read(&whole), read(&resumed));
    assert_eq!(a.len(), 2 * 7 * 3);
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(x.equal(y), "{name} differs after resuming");
    }
}
