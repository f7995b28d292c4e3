//! `evaluate` takes settings not given as flags from the model's generation_config.json,
//! as transformers' `generate` merges its keyword arguments over
//! `model.generation_config` (goldens from scripts/golden/make_generation_config_golden.py:
//! what `_prepare_generation_config` resolves), and refuses what HF refuses or amthal
//! does not build, naming the flag or the file's key.

mod common;

use amthal::cli::GenerationArgs;
use amthal::generate::{EarlyStopping, SamplingConfig};
use amthal::generation_settings::{GenerationConfigFile, ResolvedGeneration, resolve};
use common::*;
use serde_json::Value;

/// generate()'s keyword arguments as the flags that spell them.
fn flags_from_kwargs(kwargs: &Value) -> GenerationArgs {
    let f = |key: &str| kwargs.get(key).and_then(Value::as_f64);
    let n = |key: &str| kwargs.get(key).and_then(Value::as_u64).map(|v| v as usize);
    GenerationArgs {
        do_sample: kwargs.get("do_sample").and_then(Value::as_bool),
        temperature: f("temperature"),
        top_k: n("top_k"),
        top_p: f("top_p"),
        min_p: f("min_p"),
        repetition_penalty: f("repetition_penalty"),
        no_repeat_ngram_size: n("no_repeat_ngram_size"),
        num_beams: n("num_beams"),
        max_new_tokens: n("max_new_tokens"),
        early_stopping: kwargs.get("early_stopping").map(early_stopping),
        ..GenerationArgs::default()
    }
}

fn early_stopping(value: &Value) -> EarlyStopping {
    match value {
        Value::Bool(false) => EarlyStopping::Heuristic,
        Value::Bool(true) => EarlyStopping::WhenFull,
        Value::String(word) if word == "never" => EarlyStopping::Never,
        other => panic!("early_stopping {other}"),
    }
}

fn resolve_with_file(
    dir: &std::path::Path,
    file: &Value,
    flags: &GenerationArgs,
) -> ResolvedGeneration {
    let path = write(dir, "generation_config.json", file.to_string());
    let file = GenerationConfigFile::read(&path).unwrap();
    resolve(flags, Some(&file), 42).unwrap()
}

fn refusal(dir: &std::path::Path, file: &Value, flags: &GenerationArgs) -> String {
    let path = write(dir, "generation_config.json", file.to_string());
    let file = GenerationConfigFile::read(&path).unwrap();
    format!("{:#}", resolve(flags, Some(&file), 42).unwrap_err())
}

#[test]
fn flags_over_the_file_over_defaults_as_transformers_merges_them() {
    let dir = temp_dir("generation-config-golden");
    let golden = golden("generation_config.json");
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 15);
    for case in cases {
        let context = format!("file {} kwargs {}", case["file"], case["kwargs"]);
        let want = &case["resolved"];
        let got: SamplingConfig =
            resolve_with_file(&dir, &case["file"], &flags_from_kwargs(&case["kwargs"])).sampling;
        let sampling = want["do_sample"].as_bool().unwrap();
        assert_eq!(!got.is_greedy(), sampling, "{context}");
        let num = |key: &str| want[key].as_f64();
        if sampling {
            assert_eq!(Some(got.temperature), num("temperature"), "{context}");
            assert_eq!(Some(got.top_k as f64), num("top_k"), "{context}");
            assert_eq!(Some(got.top_p), num("top_p"), "{context}");
            assert_eq!(got.min_p, num("min_p"), "{context}");
            assert_eq!(Some(got.typical_p), num("typical_p"), "{context}");
            assert_eq!(Some(got.epsilon_cutoff), num("epsilon_cutoff"), "{context}");
            assert_eq!(Some(got.eta_cutoff), num("eta_cutoff"), "{context}");
            assert_eq!(got.top_h, num("top_h"), "{context}");
        }
        assert_eq!(
            Some(got.repetition_penalty),
            num("repetition_penalty"),
            "{context}"
        );
        assert_eq!(
            Some(got.no_repeat_ngram_size as f64),
            num("no_repeat_ngram_size"),
            "{context}"
        );
        assert_eq!(Some(got.num_beams as f64), num("num_beams"), "{context}");
        assert_eq!(Some(got.length_penalty), num("length_penalty"), "{context}");
        assert_eq!(
            got.early_stopping,
            early_stopping(&want["early_stopping"]),
            "{context}"
        );
        assert_eq!(
            got.min_new_tokens as f64,
            num("min_new_tokens").unwrap_or(0.0),
            "{context}"
        );
        // HF's max_length fallback (20 tokens in all) is not copied: amthal's default is 256.
        assert_eq!(
            got.max_new_tokens as f64,
            num("max_new_tokens").unwrap_or(256.0),
            "{context}"
        );
    }
}

#[test]
fn the_file_records_which_keys_it_set_and_sampling_keys_only_when_sampling() {
    let dir = temp_dir("generation-config-keys");
    let file = serde_json::json!({"do_sample": true, "temperature": 0.6, "top_p": 0.9,
        "repetition_penalty": 1.1, "eos_token_id": 2});
    let sampled = resolve_with_file(&dir, &file, &GenerationArgs::default());
    assert_eq!(
        sampled.from_file,
        ["do_sample", "temperature", "top_p", "repetition_penalty"]
    );
    let greedy = resolve_with_file(
        &dir,
        &file,
        &GenerationArgs {
            do_sample: Some(false),
            ..GenerationArgs::default()
        },
    );
    assert_eq!(greedy.from_file, ["repetition_penalty"]);
    assert_eq!(
        greedy.sampling.top_p, 1.0,
        "unused sampling keys stay at their defaults"
    );
    // amthal's own rule: a lone --temperature decides, over the file's do_sample.
    let zero = resolve_with_file(
        &dir,
        &file,
        &GenerationArgs {
            temperature: Some(0.0),
            ..GenerationArgs::default()
        },
    );
    assert!(zero.sampling.is_greedy());
    // Without any file, a lone temperature samples with top-k off (amthal's rule).
    let alone = resolve(
        &GenerationArgs {
            temperature: Some(0.7),
            ..GenerationArgs::default()
        },
        None,
        1,
    )
    .unwrap();
    assert_eq!((alone.sampling.temperature, alone.sampling.top_k), (0.7, 0));
    assert!(alone.from_file.is_empty());
}

#[test]
fn what_hf_refuses_or_amthal_does_not_build_is_refused_naming_its_origin() {
    let dir = temp_dir("generation-config-refusals");
    let path = dir.join("generation_config.json").display().to_string();
    let none = GenerationArgs::default();
    for (file, flags, wanted) in [
        (
            serde_json::json!({"do_sample": true, "temperature": 0.0}),
            &none,
            format!("{path}: temperature is 0 while sampling"),
        ),
        (
            serde_json::json!({"do_sample": true, "num_beams": 3}),
            &none,
            format!("{path}: num_beams is 3 while sampling"),
        ),
        (
            serde_json::json!({"do_sample": true, "top_p": 1.5}),
            &none,
            format!("{path}: top_p must be in [0, 1], not 1.5"),
        ),
        (
            serde_json::json!({"repetition_penalty": 0.0}),
            &none,
            format!("{path}: repetition_penalty must be positive"),
        ),
        (
            serde_json::json!({"num_beams": 2, "early_stopping": "sometimes"}),
            &none,
            format!("{path}: early_stopping must be true, false or \"never\""),
        ),
        (
            serde_json::json!({"do_sample": true}),
            &GenerationArgs {
                top_p: Some(1.5),
                ..GenerationArgs::default()
            },
            "--top-p must be in [0, 1], not 1.5".to_string(),
        ),
        (
            serde_json::json!({}),
            &GenerationArgs {
                do_sample: Some(true),
                temperature: Some(0.0),
                ..GenerationArgs::default()
            },
            "--temperature is 0 while sampling".to_string(),
        ),
    ] {
        let message = refusal(&dir, &file, flags);
        assert!(message.contains(&wanted), "{file}: {message}");
    }
    // A key of the wrong type names the file.
    let bad = write(&dir, "bad.json", r#"{"top_k": "many"}"#);
    let message = format!("{:#}", GenerationConfigFile::read(&bad).unwrap_err());
    assert!(
        message.contains("bad.json") && message.contains("top_k"),
        "{message}"
    );
    // A file's sampling keys are not checked when they are not used (HF only warns).
    let unused = resolve_with_file(
        &dir,
        &serde_json::json!({"do_sample": false, "top_p": 1.5}),
        &GenerationArgs::default(),
    );
    assert!(unused.sampling.is_greedy());
    // Keys HF applies and amthal does not are named in a warning, unless at their default.
    let other = resolve_with_file(
        &dir,
        &serde_json::json!({"num_return_sequences": 1, "min_length": 5, "bad_words_ids": [[3]],
            "suppress_tokens": [], "max_length": 4096}),
        &GenerationArgs::default(),
    );
    assert_eq!(other.warnings.len(), 1, "{:?}", other.warnings);
    assert!(
        other.warnings[0].contains("min_length, bad_words_ids set"),
        "{:?}",
        other.warnings
    );
}
