//! The model layer against transformers (+ PEFT) goldens from
//! scripts/golden/make_model_golden.py: a tiny random Llama (GQA, tied embeddings,
//! llama3 rope scaling, other rope types) and SmolLM2-135M-Instruct from its GGUF.

mod common;

use std::path::{Path, PathBuf};

use amthal::batch::Batch;
use amthal::encode::Encoded;
use amthal::gguf::GgufFile;
use amthal::loss::answer_token_losses;
use amthal::model::checkpoint::{save_hf_folder, save_hf_folder_sharded};
use amthal::model::dequant::dequantize;
use amthal::model::lora::{
    LoraConfig, attach_new, load_adapter, merge_adapters, named_adapter_tensors, save_adapter,
};
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use amthal::tokenizer::ModelTokenizer;
use common::*;
use tch::{Device, Kind, Tensor};

fn tiny_source() -> ModelSource {
    ModelSource::HfFolder(fixture("tiny-llama"))
}

fn load_tiny() -> Llama {
    load_llama(&tiny_source(), LoadOptions::default()).unwrap()
}

fn golden_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = repo_root().join("tests").join("golden").join(name);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn tiny_golden() -> serde_json::Value {
    golden("tiny_llama.json")
}

fn sequences() -> Vec<Vec<i64>> {
    tiny_golden()["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn encoded_rows() -> Vec<Encoded> {
    let golden = tiny_golden();
    sequences()
        .into_iter()
        .zip(golden["labels"].as_array().unwrap())
        .map(|(ids, labels)| {
            let labels: Vec<i64> = labels
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            Encoded {
                input_ids: ids.iter().map(|&i| i as u32).collect(),
                prompt_len: labels.iter().take_while(|&&l| l == -100).count(),
                labels,
                truncated: false,
            }
        })
        .collect()
}

/// Logits of each row run alone.
fn row_logits(model: &Llama, row: &[i64]) -> Tensor {
    let ids = Tensor::from_slice(row).unsqueeze(0);
    let positions = Tensor::arange(row.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    tch::no_grad(|| model.forward(&ids, &positions, None)).squeeze_dim(0)
}

/// Every row's logits against the golden [rows, width, vocab], valid positions only.
fn assert_matches_golden(model: &Llama, golden: &Tensor, tolerance: f64) {
    for (i, row) in sequences().iter().enumerate() {
        let ours = row_logits(model, row);
        let theirs = golden.get(i as i64).narrow(0, 0, row.len() as i64);
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff <= tolerance,
            "row {i}: max abs logit difference {diff:e}"
        );
    }
}

fn batch_loss(model: &Llama) -> (f64, i64) {
    let rows = encoded_rows();
    let refs: Vec<&Encoded> = rows.iter().collect();
    let batch = Batch::from_encoded(&refs, Device::Cpu);
    let losses = tch::no_grad(|| answer_token_losses(model, &batch, false));
    (
        losses.sum().double_value(&[]) / losses.count() as f64,
        losses.count(),
    )
}

fn assert_relative(ours: f64, theirs: f64, tolerance: f64, what: &str) {
    let relative = ((ours - theirs) / theirs).abs();
    assert!(
        relative <= tolerance,
        "{what}: {ours} vs {theirs} (relative {relative:e})"
    );
}

#[test]
fn tiny_llama_logits_and_loss_match_transformers() {
    let model = load_tiny();
    assert_eq!(model.config.num_key_value_heads, 2);
    assert!(model.config.tie_word_embeddings && model.lm_head.is_none());
    let golden = golden_tensors("tiny_llama.safetensors");
    assert_matches_golden(&model, &golden["base"], 1e-4);
    let (loss, count) = batch_loss(&model);
    let expected = tiny_golden();
    assert_eq!(count, expected["answer_tokens"].as_i64().unwrap());
    assert_relative(
        loss,
        expected["base_loss"].as_f64().unwrap(),
        1e-5,
        "tiny loss",
    );
}

/// HF Trainer's label_smoothing_factor: transformers' LabelSmoother on the golden rows
/// (scripts/golden/make_label_smoothing_golden.py), normalised by the step's answer
/// tokens, whether the rows come as one padded batch, as micro-batches or packed.
#[test]
fn label_smoothing_matches_transformers_label_smoother() {
    let model = load_tiny();
    let golden = golden("label_smoothing.json");
    let rows = encoded_rows();
    let tokens = golden["answer_tokens"].as_i64().unwrap();
    let smoothed_sum = |indices: &[usize], packed: bool, factor: f64| -> (f64, i64) {
        let refs: Vec<&Encoded> = indices.iter().map(|&i| &rows[i]).collect();
        let batch = Batch::build(&refs, Device::Cpu, packed).with_label_smoothing(factor);
        let losses = tch::no_grad(|| answer_token_losses(&model, &batch, false));
        (losses.sum().double_value(&[]), losses.count())
    };
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    let mut previous: Option<f64> = None;
    for case in cases {
        let factor = case["epsilon"].as_f64().unwrap();
        let expected = case["loss"].as_f64().unwrap();
        for packed in [false, true] {
            let (sum, count) = smoothed_sum(&[0, 1, 2], packed, factor);
            assert_eq!(count, tokens);
            let what = format!("epsilon {factor}, one batch, packed {packed}");
            assert_relative(sum / tokens as f64, expected, 2e-6, &what);
        }
        let (first, _) = smoothed_sum(&[0, 1], false, factor);
        let (second, _) = smoothed_sum(&[2], false, factor);
        assert_relative(
            (first + second) / tokens as f64,
            case["micro_batches_loss"].as_f64().unwrap(),
            2e-6,
            &format!("epsilon {factor}, micro-batches"),
        );
        // The golden factors rise, and so does the loss of this model: each factor
        // is a different number, not the plain cross-entropy again.
        if let Some(previous) = previous {
            assert!(expected > previous + 1e-4, "{expected} after {previous}");
        }
        previous = Some(expected);
    }
}

#[test]
fn padded_batches_equal_rows_one_by_one() {
    let model = load_tiny();
    let rows = sequences();
    let width = rows.iter().map(Vec::len).max().unwrap();
    // Right padding (training) and left padding with per-row positions (generation).
    for left in [false, true] {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        let mut positions = Vec::new();
        for row in &rows {
            let pad = width - row.len();
            let (real, pads) = (row.iter().copied(), std::iter::repeat_n(0i64, pad));
            let real_mask = std::iter::repeat_n(true, row.len());
            let pad_mask = std::iter::repeat_n(false, pad);
            if left {
                ids.extend(pads.chain(real));
                mask.extend(pad_mask.chain(real_mask));
                positions.extend(std::iter::repeat_n(0i64, pad).chain(0..row.len() as i64));
            } else {
                ids.extend(real.chain(pads));
                mask.extend(real_mask.chain(pad_mask));
                positions.extend((0..row.len() as i64).chain(std::iter::repeat_n(0i64, pad)));
            }
        }
        let shape = [rows.len() as i64, width as i64];
        let logits = tch::no_grad(|| {
            model.forward(
                &Tensor::from_slice(&ids).view(shape),
                &Tensor::from_slice(&positions).view(shape),
                Some(&Tensor::from_slice(&mask).view(shape)),
            )
        });
        assert!(
            logits.isfinite().all().int64_value(&[]) == 1,
            "padding stays finite"
        );
        for (i, row) in rows.iter().enumerate() {
            let start = if left { (width - row.len()) as i64 } else { 0 };
            let batched = logits.get(i as i64).narrow(0, start, row.len() as i64);
            let alone = row_logits(&model, row);
            let diff = max_abs_diff(&batched, &alone);
            assert!(diff < 1e-5, "left={left} row {i}: {diff:e}");
        }
    }
}

/// Prefill + one token at a time through the cache equals a full forward, with the
/// growing cache and with the static one (preallocated, written in place), and the two
/// caches give identical logits.
#[test]
fn kv_cache_decoding_equals_a_full_forward() {
    let model = load_tiny();
    let row = &sequences()[2];
    let full = row_logits(&model, row);
    let split = 7;
    let mut per_cache = Vec::new();
    for mut cache in [
        amthal::model::KvCache::default(),
        amthal::model::KvCache::with_capacity(row.len() as i64 + 3),
    ] {
        let prefill_ids = Tensor::from_slice(&row[..split]).unsqueeze(0);
        let prefill_pos = Tensor::arange(split as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let mut steps = Vec::new();
        tch::no_grad(|| {
            let hidden =
                model.forward_hidden(&prefill_ids, &prefill_pos, None, Some(&mut cache), false);
            let logits = model.logits(&hidden).squeeze_dim(0);
            assert!(max_abs_diff(&logits, &full.narrow(0, 0, split as i64)) < 1e-5);
            for (t, &token) in row.iter().enumerate().skip(split) {
                let ids = Tensor::from_slice(&[token]).unsqueeze(0);
                let pos = Tensor::from_slice(&[t as i64]).unsqueeze(0);
                let hidden = model.forward_hidden(&ids, &pos, None, Some(&mut cache), false);
                let step = model.logits(&hidden).squeeze_dim(0).squeeze_dim(0);
                let diff = max_abs_diff(&step, &full.get(t as i64));
                assert!(
                    diff < 1e-5,
                    "static={} step {t}: {diff:e}",
                    cache.is_static()
                );
                steps.push(step);
            }
        });
        assert_eq!(cache.len(), row.len() as i64);
        per_cache.push(Tensor::stack(&steps, 0));
    }
    assert_eq!(max_abs_diff(&per_cache[0], &per_cache[1]), 0.0);
}

/// A copy of the tiny model folder with another config.json.
fn tiny_with_config(name: &str, config: &serde_json::Value) -> TestDir {
    let dir = temp_dir(name);
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("tiny-llama").join(file), dir.join(file)).unwrap();
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn every_rope_type_matches_transformers() {
    let golden = tiny_golden();
    let tensors = golden_tensors("tiny_llama.safetensors");
    let row: Vec<i64> = golden["long_row"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    for (name, config) in golden["rope_variants"].as_object().unwrap() {
        let dir = tiny_with_config(&format!("rope-{name}"), config);
        let model = load_llama(
            &ModelSource::HfFolder(dir.to_path_buf()),
            LoadOptions::default(),
        )
        .unwrap();
        let diff = max_abs_diff(&row_logits(&model, &row), &tensors[&format!("rope_{name}")]);
        assert!(
            diff < 1e-4,
            "rope {name}: max abs logit difference {diff:e}"
        );
    }
}

#[test]
fn peft_adapter_loads_with_the_same_logits() {
    let mut model = load_tiny();
    let config = load_adapter(&mut model, &fixture("tiny-llama-adapter")).unwrap();
    assert_eq!((config.r, config.alpha), (4, 8.0));
    assert_eq!(named_adapter_tensors(&model).len(), 2 * 7 * 2);
    let golden = golden_tensors("tiny_llama.safetensors");
    assert_matches_golden(&model, &golden["adapter"], 1e-4);
    let (loss, _) = batch_loss(&model);
    assert_relative(
        loss,
        tiny_golden()["adapter_loss"].as_f64().unwrap(),
        1e-5,
        "adapter loss",
    );
}

#[test]
fn adapter_round_trip_and_merge_keep_the_logits() {
    let mut model = load_tiny();
    load_adapter(&mut model, &fixture("tiny-llama-adapter")).unwrap();
    let golden = golden_tensors("tiny_llama.safetensors");
    // Saved by amthal, loaded again: the same tensors and logits. AMTHAL_EXPORT_DIR keeps
    // the files for scripts/golden/check_exports.py (PEFT and transformers load them).
    let export = std::env::var_os("AMTHAL_EXPORT_DIR").map(PathBuf::from);
    let scratch = export.is_none().then(|| temp_dir("adapter-round-trip"));
    let dir = export
        .clone()
        .unwrap_or_else(|| scratch.as_ref().unwrap().to_path_buf());
    let adapter_dir = dir.join("adapter");
    let (config, _, _) =
        amthal::model::lora::read_adapter_config(&fixture("tiny-llama-adapter")).unwrap();
    save_adapter(&model, &config, "tiny-llama", &adapter_dir).unwrap();
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for (key, value) in [
        ("peft_type", "LORA"),
        ("task_type", "CAUSAL_LM"),
        ("bias", "none"),
        ("base_model_name_or_path", "tiny-llama"),
    ] {
        assert_eq!(written[key], value, "{key}");
    }
    assert_eq!(written["r"], 4);
    assert_eq!(written["fan_in_fan_out"], false);
    let keys: Vec<String> = Tensor::read_safetensors(adapter_dir.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.contains(
            &"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string()
        )
    );
    assert!(
        keys.contains(&"base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".to_string())
    );
    let mut reloaded = load_tiny();
    load_adapter(&mut reloaded, &adapter_dir).unwrap();
    for ((name, a), (_, b)) in named_adapter_tensors(&model)
        .into_iter()
        .zip(named_adapter_tensors(&reloaded))
    {
        assert!(a.equal(b), "{name} differs after the round trip");
    }
    assert_matches_golden(&reloaded, &golden["adapter"], 1e-4);

    // Merged == unmerged, and the merged HF folder (sharded or not) loads with the same logits.
    merge_adapters(&mut model);
    assert!(named_adapter_tensors(&model).is_empty());
    assert_matches_golden(&model, &golden["adapter"], 1e-4);
    let tokenizer = ModelTokenizer::from_hf_folder(&fixture("tiny-llama")).unwrap();
    let merged_dir = dir.join("merged");
    save_hf_folder(&model, &tokenizer, &merged_dir).unwrap();
    let merged = load_llama(
        &ModelSource::HfFolder(merged_dir.clone()),
        LoadOptions::default(),
    )
    .unwrap();
    assert_matches_golden(&merged, &golden["adapter"], 1e-4);
    let sharded_dir = dir.join("sharded");
    save_hf_folder_sharded(&model, &tokenizer, &sharded_dir, 100_000).unwrap();
    assert!(sharded_dir.join("model.safetensors.index.json").is_file());
    let shards: Vec<String> = std::fs::read_dir(&sharded_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model-") && n.ends_with(".safetensors"))
        .collect();
    assert!(shards.len() >= 3, "shards: {shards:?}");
    let suffix = format!("-of-{:05}.safetensors", shards.len());
    assert!(shards.iter().all(|n| n.ends_with(&suffix)), "{shards:?}");
    let sharded = load_llama(
        &ModelSource::HfFolder(sharded_dir.clone()),
        LoadOptions::default(),
    )
    .unwrap();
    assert_matches_golden(&sharded, &golden["adapter"], 1e-4);
    // The saved tokenizer is the same tokenizer.
    let saved = ModelTokenizer::from_hf_folder(&merged_dir).unwrap();
    assert_eq!(
        saved.encode("يضرب المثل", true).unwrap(),
        tokenizer.encode("يضرب المثل", true).unwrap()
    );
    assert_eq!(saved.chat_template, tokenizer.chat_template);
    if export.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn new_adapters_start_at_the_base_model_and_freeze_the_base() {
    tch::manual_seed(1);
    let mut model = load_tiny();
    let config = LoraConfig {
        r: 8,
        targets: vec!["q_proj".into(), "v_proj".into()],
        ..LoraConfig::default()
    };
    attach_new(&mut model, &config).unwrap();
    assert_eq!(named_adapter_tensors(&model).len(), 2 * 2 * 2);
    assert!(!model.embed_tokens.requires_grad());
    assert!(
        !model.layers[0]
            .self_attn
            .q_proj
            .weight
            .expect_dense()
            .requires_grad()
    );
    let a = &model.layers[0].self_attn.q_proj.lora.as_ref().unwrap().a;
    assert!(a.requires_grad());
    let bound = 1.0 / (64f64).sqrt();
    assert!(a.abs().max().double_value(&[]) <= bound);
    // B = 0, so the adapted model computes what the base computes.
    assert_matches_golden(
        &model,
        &golden_tensors("tiny_llama.safetensors")["base"],
        1e-4,
    );
    // A backward pass reaches the adapter and nothing else.
    let rows = encoded_rows();
    let batch = Batch::from_encoded(&rows.iter().collect::<Vec<_>>(), Device::Cpu);
    let loss = answer_token_losses(&model, &batch, true).sum();
    loss.backward();
    let b = &model.layers[0].self_attn.q_proj.lora.as_ref().unwrap().b;
    assert!(b.grad().defined() && b.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    assert!(
        !model.layers[0]
            .self_attn
            .q_proj
            .weight
            .expect_dense()
            .grad()
            .defined()
    );
    let bad = LoraConfig {
        targets: vec!["lm_head".into()],
        ..LoraConfig::default()
    };
    assert!(format!("{:#}", attach_new(&mut load_tiny(), &bad).unwrap_err()).contains("'lm_head'"));
}

#[test]
fn smollm2_gguf_logits_match_transformers() {
    let model = load_llama(&ModelSource::Gguf(smollm2()), LoadOptions::default()).unwrap();
    assert_eq!(model.config.num_hidden_layers, 30);
    assert!(model.config.tie_word_embeddings);
    let golden = golden_tensors("smollm2_logits.safetensors");
    let ids: Vec<i64> = Vec::try_from(&golden["input_ids"]).unwrap();
    let positions = &golden["positions"];
    let logits = row_logits(&model, &ids).index_select(0, positions);
    let diff = max_abs_diff(&logits, &golden["logits"]);
    assert!(diff <= 1e-3, "SmolLM2 max abs logit difference {diff:e}");
}

#[test]
fn every_gguf_quantization_dequantizes_like_the_gguf_package() {
    let gguf = GgufFile::open(&fixture("quants.gguf")).unwrap();
    let bytes = std::fs::read(fixture("quants.gguf")).unwrap();
    let read = |name: &str| -> Vec<f32> {
        let info = gguf
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name}"));
        let count = info.dims.iter().product::<u64>() as usize;
        let start = (gguf.data_offset + info.offset) as usize;
        dequantize(info.ggml_type, &bytes[start..], count).unwrap()
    };
    let names = [
        "f32", "f16", "bf16", "q4_0", "q4_1", "q8_0", "q4_k", "q5_k", "q6_k",
    ];
    for name in names {
        let (ours, expected) = (read(name), read(&format!("expected.{name}")));
        assert_eq!(ours.len(), expected.len(), "{name}");
        let worst = ours
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst == 0.0, "{name}: max difference {worst}");
    }
}

/// `amthal loss` on the benchmark Validation split (SmolLM2 GGUF, f32, plain) equals
/// transformers' loss on the same token ids.
#[test]
fn cli_loss_matches_transformers_on_the_validation_split() {
    let golden = golden("smollm2_loss.json");
    let data = benchmark_dir().join("Validation_data.csv");
    let model = smollm2();
    let output = amthal(&[
        "loss",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--prompt-format",
        "plain",
        "--precision",
        "f32",
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(summary["answer_tokens"], golden["answer_tokens"]);
    assert_relative(
        summary["loss"].as_f64().unwrap(),
        golden["loss"].as_f64().unwrap(),
        1e-4,
        "validation loss",
    );
}

fn tiny_config_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap())
        .unwrap()
}

fn loss_error(model: &Path, adapter: Option<&Path>) -> String {
    let data = repo_root().join("examples/data/Validation_data.csv");
    let mut args = vec![
        "loss",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    if let Some(adapter) = adapter {
        args.extend(["--adapter", adapter.to_str().unwrap()]);
    }
    let output = amthal(&args);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
    stderr(&output)
}

#[test]
fn broken_models_and_adapters_are_clear_errors() {
    let mut config = tiny_config_json();
    config["num_hidden_layers"] = serde_json::json!(3);
    let message = loss_error(&tiny_with_config("missing-tensor", &config), None);
    assert!(
        message.contains("missing tensor model.layers.2.input_layernorm.weight"),
        "{message}"
    );

    let mut config = tiny_config_json();
    config["intermediate_size"] = serde_json::json!(100);
    let message = loss_error(&tiny_with_config("wrong-shape", &config), None);
    assert!(
        message.contains("model.layers.0.mlp.gate_proj.weight has shape [96, 64]"),
        "{message}"
    );
    assert!(message.contains("[100, 64]"), "{message}");

    let mut config = tiny_config_json();
    config["model_type"] = serde_json::json!("mixtral");
    config["architectures"] = serde_json::json!(["MixtralForCausalLM"]);
    let message = loss_error(&tiny_with_config("architecture", &config), None);
    assert!(message.contains("model_type 'mixtral'"), "{message}");

    let mut config = tiny_config_json();
    config["num_hidden_layers"] = serde_json::json!(1);
    let message = loss_error(&tiny_with_config("unexpected", &config), None);
    assert!(
        message.contains("unexpected tensor(s)") && message.contains("model.layers.1."),
        "{message}"
    );

    // An adapter for another base model (the tiny adapter on SmolLM2): shape mismatch.
    let message = loss_error(&smollm2(), Some(&fixture("tiny-llama-adapter")));
    assert!(
        message.contains("an adapter for another base model"),
        "{message}"
    );
    let message = loss_error(
        &fixture("tiny-llama"),
        Some(Path::new("/nonexistent/adapter")),
    );
    assert!(message.contains("/nonexistent/adapter"), "{message}");

    let dir = temp_dir("pickle-only");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&tiny_config_json()).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("pytorch_model.bin"), b"not loaded").unwrap();
    std::fs::copy(
        fixture("tiny-llama/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let message = loss_error(&dir, None);
    assert!(message.contains("never loads"), "{message}");
}

#[test]
fn cli_merge_writes_a_folder_that_loads_with_the_adapters_logits() {
    let scratch = temp_dir("cli-merge");
    let out = scratch.join("merged");
    let output = amthal(&[
        "merge",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--adapter",
        fixture("tiny-llama-adapter").to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    for file in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let merged = load_llama(&ModelSource::HfFolder(out), LoadOptions::default()).unwrap();
    assert_matches_golden(
        &merged,
        &golden_tensors("tiny_llama.safetensors")["adapter"],
        1e-4,
    );
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let f32_model = load_tiny();
    let bf16_model = load_llama(
        &tiny_source(),
        LoadOptions {
            device: Device::Cpu,
            kind: Kind::BFloat16,
            quantize: None,
        },
    )
    .unwrap();
    assert_eq!(bf16_model.embed_tokens.kind(), Kind::BFloat16);
    let (f32_loss, _) = batch_loss(&f32_model);
    let (bf16_loss, _) = batch_loss(&bf16_model);
    assert_relative(bf16_loss, f32_loss, 2e-2, "bf16 vs f32 loss");
    assert!(bf16_loss != f32_loss, "bf16 really computed in bf16");
}

/// The linear a golden's module path ("model.layers.1.mlp.down_proj") names.
fn linear_at<'a>(model: &'a Llama, module: &str) -> &'a amthal::model::linear::Linear {
    let rest = module.strip_prefix("model.layers.").unwrap();
    let (layer, path) = rest.split_once('.').unwrap();
    let layer = &model.layers[layer.parse::<usize>().unwrap()];
    layer
        .linears()
        .into_iter()
        .find(|(p, _)| *p == path)
        .unwrap()
        .1
}

/// PEFT's residual initialisations (init_lora_weights "pissa" and "olora", goldens from
/// scripts/golden/make_pissa_golden.py): the same initial factors (each singular or QR
/// direction up to its sign, which LAPACK builds may choose differently) and residual
/// weights; after the factors move, the same logits in memory, and the adapter amthal
/// saves is PEFT's converted one (rank 2r, alpha doubled or x sqrt(2) with rslora),
/// which gives those logits on the original base.
#[test]
fn pissa_and_olora_start_and_convert_as_peft() {
    use amthal::model::lora_init::LoraInit;
    let expected_tensors = golden_tensors("tiny_llama_pissa.safetensors");
    let meta = golden("tiny_llama_pissa.json");
    let modules: Vec<String> = serde_json::from_value(meta["modules"].clone()).unwrap();
    let dir = temp_dir("pissa");
    for (name, init) in [("pissa", LoraInit::Pissa), ("olora", LoraInit::Olora)] {
        let settings = &meta["inits"][name]["settings"];
        let config = LoraConfig {
            r: settings["r"].as_i64().unwrap(),
            alpha: settings["lora_alpha"].as_f64().unwrap(),
            dropout: 0.0,
            rslora: settings["use_rslora"].as_bool().unwrap(),
            init,
            ..LoraConfig::default()
        };
        let mut model = load_tiny();
        attach_new(&mut model, &config).unwrap();
        for module in &modules {
            let linear = linear_at(&model, module);
            let lora = linear.lora.as_ref().unwrap();
            let (a, b) = (
                &expected_tensors[&format!("{name}.{module}.lora_A")],
                &expected_tensors[&format!("{name}.{module}.lora_B")],
            );
            for i in 0..config.r {
                let sign = lora.a.get(i).dot(&a.get(i)).double_value(&[]).signum();
                let a_diff = max_abs_diff(&(lora.a.get(i) * sign), &a.get(i));
                let b_diff = max_abs_diff(&(lora.b.select(1, i) * sign), &b.select(1, i));
                assert!(
                    a_diff < 1e-4 && b_diff < 1e-4,
                    "{name} {module} direction {i}: {a_diff:e} {b_diff:e}"
                );
            }
            let residual = linear.weight.dense().unwrap();
            let diff = max_abs_diff(
                residual,
                &expected_tensors[&format!("{name}.{module}.residual")],
            );
            assert!(diff < 1e-5, "{name} {module} residual: {diff:e}");
        }
        // Move every factor as the golden script does, as training would.
        tch::no_grad(|| {
            for layer in model.layers.iter_mut() {
                for (_, linear) in layer.linears_mut() {
                    let lora = linear.lora.as_mut().unwrap();
                    for (tensor, cosine) in [(&mut lora.a, false), (&mut lora.b, true)] {
                        let wave =
                            Tensor::arange(tensor.numel() as i64, (Kind::Float, Device::Cpu));
                        let wave = if cosine { wave.cos() } else { wave.sin() };
                        let _ = tensor.g_add_(&(wave.view(tensor.size().as_slice()) * 0.01));
                    }
                }
            }
        });
        let trained = &expected_tensors[&format!("{name}.trained_logits")];
        assert_matches_golden(&model, trained, 1e-4);
        let out = dir.join(name);
        save_adapter(&model, &config, "tiny", &out).unwrap();
        let saved: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let expected = &meta["inits"][name]["converted_config"];
        assert_eq!(saved["r"], expected["r"]);
        assert!(
            (saved["lora_alpha"].as_f64().unwrap() - expected["lora_alpha"].as_f64().unwrap())
                .abs()
                < 1e-12
        );
        assert_eq!(saved["init_lora_weights"], true);
        let tensors: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(out.join("adapter_model.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        for module in &modules {
            for part in ["lora_A", "lora_B"] {
                let ours = &tensors[&format!("base_model.model.{module}.{part}.weight")];
                let theirs = &expected_tensors[&format!("{name}.converted.{module}.{part}")];
                assert_eq!(ours.size(), theirs.size());
            }
            // Up to each direction's sign: compare the change B' A' they make.
            let product =
                |source: &dyn Fn(&str) -> Tensor| source("lora_B").matmul(&source("lora_A"));
            let ours = product(&|part| {
                tensors[&format!("base_model.model.{module}.{part}.weight")].shallow_clone()
            });
            let theirs = product(&|part| {
                expected_tensors[&format!("{name}.converted.{module}.{part}")].shallow_clone()
            });
            let diff = max_abs_diff(&ours, &theirs);
            assert!(
                diff < 1e-5,
                "{name} {module}: converted B'A' differs by {diff:e}"
            );
        }
        // The converted adapter on the original base gives the trained logits.
        let mut original = load_tiny();
        load_adapter(&mut original, &out).unwrap();
        assert_matches_golden(&original, trained, 1e-4);
    }
}

/// `--init-lora-weights gaussian` (PEFT's "gaussian"): A normal with standard deviation
/// 1 / r, B zeros, so the new adapter changes nothing; the default's A is uniform in
/// +-1/sqrt(in).
#[test]
fn gaussian_adapters_draw_a_with_deviation_one_over_r() {
    use amthal::model::lora_init::LoraInit;
    tch::manual_seed(3);
    let mut model = load_tiny();
    let config = LoraConfig {
        r: 8,
        init: LoraInit::Gaussian,
        ..LoraConfig::default()
    };
    attach_new(&mut model, &config).unwrap();
    let a: Vec<Tensor> = named_adapter_tensors(&model)
        .into_iter()
        .filter(|(name, _)| name.contains("lora_A"))
        .map(|(_, t)| t.flatten(0, -1))
        .collect();
    let a = Tensor::cat(&a, 0);
    let deviation = a.std(true).double_value(&[]);
    assert!((deviation - 0.125).abs() < 0.01, "{deviation}");
    assert!(
        a.abs().max().double_value(&[]) > 0.3,
        "not a bounded uniform draw"
    );
    for (name, tensor) in named_adapter_tensors(&model) {
        if name.contains("lora_B") {
            assert_eq!(tensor.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
    assert_matches_golden(
        &model,
        &golden_tensors("tiny_llama.safetensors")["base"],
        1e-4,
    );
}

/// PEFT adapters saved with per-module settings load as PEFT loads them (fixtures and
/// logits from scripts/golden/make_pattern_golden.py): `rank_pattern` and
/// `alpha_pattern` with `use_rslora` and a regular expression for `target_modules`;
/// and `layers_to_transform` (adapters on layer 1 only).
#[test]
fn peft_adapters_with_patterns_and_chosen_layers_give_pefts_logits() {
    let golden = golden_tensors("tiny_llama_patterns.safetensors");
    for name in ["patterns", "layers"] {
        let mut model = load_tiny();
        let config = load_adapter(&mut model, &fixture(&format!("tiny-llama-{name}"))).unwrap();
        assert_matches_golden(&model, &golden[name], 1e-4);
        let adapted: Vec<(usize, &str, i64)> = model
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, layer)| {
                layer
                    .linears()
                    .into_iter()
                    .filter_map(move |(path, linear)| {
                        linear.lora.as_ref().map(|lora| (i, path, lora.a.size()[0]))
                    })
            })
            .collect();
        if name == "patterns" {
            // Every layer's four targets; q_proj with r 2, layer 1's down_proj with 6.
            assert_eq!(adapted.len(), 8);
            assert!(adapted.contains(&(0, "self_attn.q_proj", 2)));
            assert!(adapted.contains(&(1, "mlp.down_proj", 6)));
            assert!(adapted.contains(&(0, "mlp.down_proj", 4)));
            let mut targets = config.targets.clone();
            targets.sort();
            assert_eq!(targets, ["down_proj", "gate_proj", "q_proj", "v_proj"]);
            // alpha_pattern: v_proj's alpha 3 over sqrt(r = 4) (rslora).
            let v = model.layers[0].self_attn.v_proj.lora.as_ref().unwrap();
            assert!((v.scaling - 1.5).abs() < 1e-12, "{}", v.scaling);
        } else {
            assert_eq!(adapted.len(), 4);
            assert!(adapted.iter().all(|&(layer, _, _)| layer == 1));
        }
    }
    // What amthal cannot apply exactly is refused by name: full copies of other
    // modules, and an adapter PEFT saved for the residual base of a PiSSA start.
    let dir = temp_dir("refused-adapters");
    for (key, value, expected) in [
        (
            "modules_to_save",
            serde_json::json!(["lm_head", "model.norm"]),
            "modules_to_save entry \"model.norm\" is not supported",
        ),
        (
            "init_lora_weights",
            serde_json::json!("pissa_niter_4"),
            "residual base",
        ),
    ] {
        let copy = dir.join(key);
        std::fs::create_dir_all(&copy).unwrap();
        let source = fixture("tiny-llama-patterns");
        std::fs::copy(
            source.join("adapter_model.safetensors"),
            copy.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(source.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        config[key] = value;
        std::fs::write(copy.join("adapter_config.json"), config.to_string()).unwrap();
        let error = format!("{:#}", load_adapter(&mut load_tiny(), &copy).unwrap_err());
        assert!(error.contains(expected), "{key}: {error}");
    }
}

/// PEFT adapters with `modules_to_save` (full copies of embed_tokens and lm_head beside
/// the factors; fixtures and logits from scripts/golden/make_modules_to_save_golden.py)
/// give PEFT's logits: on the tied tiny Llama a saved embed_tokens changes the
/// embeddings only, as in PEFT. Merged into an HF folder, they load back untied with
/// the same logits.
#[test]
fn peft_adapters_with_saved_embeddings_and_head_give_pefts_logits() {
    let golden = golden_tensors("tiny_llama_saved_modules.safetensors");
    let dir = temp_dir("saved-modules");
    for name in ["both", "embed"] {
        let mut model = load_tiny();
        let base_embed = model.embed_tokens.copy();
        load_adapter(&mut model, &fixture(&format!("tiny-llama-saved-{name}"))).unwrap();
        assert_matches_golden(&model, &golden[name], 1e-4);
        assert!(!model.config.tie_word_embeddings);
        let head = model.lm_head.as_ref().expect("untied");
        assert_eq!(head.equal(&base_embed), name == "embed", "{name}");
        assert!(!model.embed_tokens.equal(&base_embed));
        // `amthal merge` writes both matrices and tie_word_embeddings false.
        let merged = dir.join(name);
        let output = amthal(&[
            "merge",
            "--model",
            fixture("tiny-llama").to_str().unwrap(),
            "--adapter",
            fixture(&format!("tiny-llama-saved-{name}"))
                .to_str()
                .unwrap(),
            "--output-dir",
            merged.to_str().unwrap(),
            "--precision",
            "f32",
            "--device",
            "cpu",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let reloaded = load_llama(&ModelSource::HfFolder(merged), LoadOptions::default()).unwrap();
        assert!(reloaded.lm_head.is_some());
        assert_matches_golden(&reloaded, &golden[name], 1e-4);
    }
    // Variants of the embed-only adapter's config: with PEFT's ensure_weight_tying the
    // one saved matrix serves both ends (the model stays tied); a listed module the file
    // lacks is refused; a copy the config does not list (save_embedding_layers) loads.
    let source = fixture("tiny-llama-saved-embed");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("adapter_config.json")).unwrap())
            .unwrap();
    let variant = |name: &str, change: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let copy = dir.join(name);
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::copy(
            source.join("adapter_model.safetensors"),
            copy.join("adapter_model.safetensors"),
        )
        .unwrap();
        let mut changed = config.clone();
        change(&mut changed);
        std::fs::write(copy.join("adapter_config.json"), changed.to_string()).unwrap();
        copy
    };
    let tied = variant("tied", &|c| {
        c["ensure_weight_tying"] = serde_json::json!(true)
    });
    let mut model = load_tiny();
    load_adapter(&mut model, &tied).unwrap();
    assert!(model.lm_head.is_none() && model.config.tie_word_embeddings);
    let saved = Tensor::read_safetensors(tied.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .find(|(name, _)| name.contains("embed_tokens"))
        .unwrap()
        .1;
    assert!(model.embed_tokens.equal(&saved));
    let missing = variant("missing", &|c| {
        c["modules_to_save"] = serde_json::json!(["embed_tokens", "lm_head"])
    });
    let error = format!(
        "{:#}",
        load_adapter(&mut load_tiny(), &missing).unwrap_err()
    );
    assert!(
        error.contains("lists lm_head but the file has no tensor"),
        "{error}"
    );
    let unlisted = variant("unlisted", &|c| {
        c["modules_to_save"] = serde_json::Value::Null
    });
    assert_eq!(
        amthal::model::lora::saved_modules(&unlisted).unwrap(),
        ["embed_tokens"]
    );
    let mut model = load_tiny();
    load_adapter(&mut model, &unlisted).unwrap();
    assert_matches_golden(&model, &golden["embed"], 1e-4);
}

/// `--init-lora-weights pissa_niter_K` (goldens from
/// scripts/golden/make_pissa_niter_golden.py): from the random start torch drew for a
/// projection, amthal's randomised SVD makes PEFT's factors, for K = 0, 2 and 4 and every
/// projection shape of the tiny Llama (wide k/v, tall gate/up, square q/o).
#[test]
fn pissa_niter_starts_as_peft_from_the_same_random_start() {
    let golden = golden_tensors("tiny_llama_pissa_niter.safetensors");
    let model = load_tiny();
    let layer = &model.layers[0];
    let mut compared = 0;
    for iterations in [0u32, 2, 4] {
        for (path, linear) in layer.linears() {
            let key = format!("{iterations}.{path}");
            let weight = linear.weight.expect_dense();
            let (a, b) = amthal::model::lora_init::lowrank_factors(
                weight,
                &golden[&format!("{key}.start")],
                iterations,
                2.0,
            );
            let (want_a, want_b) = (
                &golden[&format!("{key}.lora_A")],
                &golden[&format!("{key}.lora_B")],
            );
            assert_eq!(a.size(), want_a.size(), "{key}");
            assert!(
                max_abs_diff(&a, want_a) < 1e-5,
                "{key} A: {}",
                max_abs_diff(&a, want_a)
            );
            assert!(
                max_abs_diff(&b, want_b) < 1e-5,
                "{key} B: {}",
                max_abs_diff(&b, want_b)
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 21);
}
