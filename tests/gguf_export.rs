//! `amthal export --format gguf`: the file amthal writes reads back (through amthal's
//! own GGUF reader, which is checked against transformers and the gguf package) as the
//! same model: logits within f16's rounding (1e-2) for an f16 export, within a
//! reported error for q8_0 and q4_k_m; the tokenizer rebuilt from the file's metadata
//! encodes as the source tokenizer does; an adapter is folded in; a GGUF source keeps
//! its tokenizer keys verbatim; the Ollama Modelfile names the file and stop tokens.
//! The block encoders give the gguf package's bytes where it has a quantizer.

mod common;

use std::path::{Path, PathBuf};

use amthal::gguf::GgufFile;
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use common::*;
use tch::{Device, Kind, Tensor};

/// The tiny model with default rope (llama.cpp stores llama3 scaling as a
/// `rope_freqs` tensor, which amthal's reader, like transformers', does not apply).
fn tiny_default_rope(dir: &Path) -> PathBuf {
    let folder = dir.join("tiny");
    std::fs::create_dir_all(&folder).unwrap();
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("tiny-llama").join(file), folder.join(file)).unwrap();
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap(),
    )
    .unwrap();
    config["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": 10000.0});
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    folder
}

fn export(model: &Path, out: &Path, quant: &str, extra: &[&str]) {
    let mut args = vec![
        "export",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quant",
        quant,
    ];
    args.extend_from_slice(extra);
    let output = amthal(&args);
    assert!(output.status.success(), "{quant}: {}", stderr(&output));
}

fn logits(model: &Llama, ids: &[i64]) -> Tensor {
    let input = Tensor::from_slice(ids).unsqueeze(0);
    let positions = Tensor::arange(ids.len() as i64, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    tch::no_grad(|| model.forward(&input, &positions, None))
}

fn load(source: ModelSource) -> Llama {
    load_llama(&source, LoadOptions::default()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

const TEXT: &str = "اشرح المثل: الصبر مفتاح الفرج. Explain it in 3 words!";

#[test]
fn tiny_model_round_trips_in_every_quant() {
    let dir = temp_dir("export-tiny");
    let folder = tiny_default_rope(&dir);
    let source = load(ModelSource::HfFolder(folder.clone()));
    let hf_tokenizer = ModelSource::HfFolder(folder.clone()).tokenizer().unwrap();
    let ids: Vec<i64> = hf_tokenizer
        .encode(TEXT, true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let reference = logits(&source, &ids);
    for (quant, tolerance) in [
        ("f16", 1e-2),
        ("bf16", 5e-2),
        ("q8_0", 5e-2),
        ("q4_k_m", 5e-2),
    ] {
        let file = dir.join(format!("tiny-{quant}.gguf"));
        export(&folder, &file, quant, &[]);
        let exported = load(ModelSource::Gguf(file.clone()));
        let diff = max_diff(&logits(&exported, &ids), &reference);
        eprintln!("{quant}: max abs logit difference {diff:.2e}");
        assert!(diff <= tolerance, "{quant}: logits differ by {diff:e}");
        // The tokenizer rebuilt from the file's metadata encodes as the source.
        let gguf = GgufFile::open(&file).unwrap();
        assert_eq!(gguf.get_str("tokenizer.ggml.model"), Some("llama"));
        assert_eq!(gguf.get_str("general.architecture"), Some("llama"));
        let rebuilt = ModelSource::Gguf(file.clone()).tokenizer().unwrap();
        for text in [TEXT, "  spaces  and\nnewlines", "<s> literal"] {
            assert_eq!(
                rebuilt.encode(text, true).unwrap(),
                hf_tokenizer.encode(text, true).unwrap(),
                "{quant}: {text:?}"
            );
        }
        assert_eq!(rebuilt.chat_template, hf_tokenizer.chat_template);
        assert_eq!(
            rebuilt.eos.as_ref().map(|t| t.id),
            hf_tokenizer.eos.as_ref().map(|t| t.id)
        );
    }
}

#[test]
fn an_adapter_is_folded_into_the_export() {
    let dir = temp_dir("export-adapter");
    let folder = tiny_default_rope(&dir);
    let adapter = fixture("tiny-llama-adapter");
    let mut with_adapter = load(ModelSource::HfFolder(folder.clone()));
    amthal::model::lora::load_adapter(&mut with_adapter, &adapter).unwrap();
    let file = dir.join("merged.gguf");
    export(
        &folder,
        &file,
        "f16",
        &["--adapter", adapter.to_str().unwrap()],
    );
    let exported = load(ModelSource::Gguf(file));
    let ids = [1i64, 20, 300, 45, 7, 99, 150];
    let base = load(ModelSource::HfFolder(folder));
    let adapted = logits(&with_adapter, &ids);
    let diff = max_diff(&logits(&exported, &ids), &adapted);
    assert!(diff <= 1e-2, "{diff:e}");
    // The adapter changes the model by more than the f16 rounding.
    assert!(max_diff(&logits(&base, &ids), &adapted) > 10.0 * diff.max(1e-4));
}

#[test]
fn the_default_gguf_model_keeps_its_tokenizer_and_gets_a_modelfile() {
    let dir = temp_dir("export-smollm2");
    let file = dir.join("smollm2-f16.gguf");
    export(&smollm2(), &file, "f16", &["--name", "smollm2-proverbs"]);
    let (source, exported) = (
        GgufFile::open(&smollm2()).unwrap(),
        GgufFile::open(&file).unwrap(),
    );
    let mut compared = 0;
    for (key, value) in source
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(exported.get(key), Some(value), "{key}");
        compared += 1;
    }
    assert!(compared >= 5, "{compared} tokenizer keys");
    assert_eq!(exported.get_str("general.name"), Some("smollm2-proverbs"));
    assert_eq!(exported.get_i64("general.file_type"), Some(1));
    let ids = [1i64, 504, 3458, 28, 9538, 30, 2];
    let diff = max_diff(
        &logits(&load(ModelSource::Gguf(file.clone())), &ids),
        &logits(&load(ModelSource::Gguf(smollm2())), &ids),
    );
    assert!(diff <= 1e-2 * 10.0, "{diff:e}");
    eprintln!("SmolLM2 f16 export: max abs logit difference {diff:.2e}");
    let modelfile = std::fs::read_to_string(dir.join("Modelfile")).unwrap();
    assert!(modelfile.contains("FROM ./smollm2-f16.gguf"), "{modelfile}");
    assert!(
        modelfile.contains("PARAMETER stop \"<|im_end|>\""),
        "{modelfile}"
    );
    assert!(modelfile.contains("<|im_start|>assistant"), "{modelfile}");
}

#[test]
fn a_model_that_cannot_be_exported_is_a_clear_error_and_writes_nothing() {
    let dir = temp_dir("export-errors");
    let out = dir.join("never.gguf");
    let output = amthal(&[
        "export",
        "--model",
        dir.join("missing").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(!out.exists() && !dir.join("Modelfile").exists());
}

/// Q8_0 and Q5_0 blocks byte for byte as the gguf package's `quantize` (its ports of
/// ggml's `quantize_row_q8_0_ref` / `quantize_row_q5_0_ref`) encodes the same values:
/// mixed blocks, ties of the rounding, zeros, a constant, tiny values
/// (`scripts/golden/make_ggml_quant_golden.py`).
#[test]
fn block_encoders_match_the_gguf_package() {
    use amthal::export::ggml_quant::{encode, ggml_type};
    let golden = golden("ggml_quants.json");
    let values: Vec<f32> = golden["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (name, ggml_type) in [("Q8_0", ggml_type::Q8_0), ("Q5_0", ggml_type::Q5_0)] {
        let expected = golden["quants"][name].as_str().unwrap();
        let ours: String = encode(ggml_type, &values)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(ours.len(), expected.len(), "{name}: length");
        let first_difference = ours
            .as_bytes()
            .chunks(2)
            .zip(expected.as_bytes().chunks(2))
            .position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "{name}: first differing byte");
    }
}
