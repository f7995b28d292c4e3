//! BERTScore and sentence-embedding cosines against bert_score 0.3.12 and
//! sentence-transformers (tests/golden/embeddings.json, from
//! scripts/golden/make_embedding_golden.py), within 1e-5.

mod common;

use std::path::{Path, PathBuf};

use amthal::model::bert::BertModel;
use amthal::score::bertscore::{BertScoreOptions, BertScorer, Prf, known_model_layer};
use amthal::score::encoder_model::resolve_encoder_folder;
use amthal::score::sentence_embedding::SentenceEncoder;
use common::{fixture, golden, minilm, temp_dir};
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

struct Pairs {
    hypotheses: Vec<String>,
    references: Vec<String>,
    kinds: Vec<String>,
}

fn pairs(g: &serde_json::Value) -> Pairs {
    let list = g["pairs"].as_array().unwrap();
    let field = |k: &str| -> Vec<String> {
        list.iter()
            .map(|p| p[k].as_str().unwrap().to_string())
            .collect()
    };
    Pairs {
        hypotheses: field("hypothesis"),
        references: field("reference"),
        kinds: field("kind"),
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Python's NaN is null in the golden file.
fn close(actual: f64, expected: &serde_json::Value) -> bool {
    match expected.as_f64() {
        Some(e) => (actual - e).abs() <= TOLERANCE,
        None => actual.is_nan(),
    }
}

fn check_prf(name: &str, kinds: &[String], actual: &[Prf], expected: &serde_json::Value) -> f64 {
    let expected = expected.as_array().unwrap();
    assert_eq!(actual.len(), expected.len(), "{name}: row count");
    let mut worst = 0.0f64;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        for (value, key) in [(a.p, "p"), (a.r, "r"), (a.f, "f")] {
            assert!(
                close(value, &e[key]),
                "{name}: row {i} ({}) {key}: amthal {value}, bert_score {}",
                kinds.get(i).map(String::as_str).unwrap_or("-"),
                e[key]
            );
            if let Some(x) = e[key].as_f64() {
                worst = worst.max((value - x).abs());
            }
        }
    }
    worst
}

fn setting_options(setting: &serde_json::Value) -> (PathBuf, BertScoreOptions) {
    let model = match setting["model_type"].as_str().unwrap() {
        "tiny-bert" => fixture("tiny-bert"),
        "all-MiniLM-L6-v2" => minilm(),
        other => panic!("unknown model {other}"),
    };
    let options = BertScoreOptions {
        layer: setting["num_layers"].as_u64().map(|l| l as usize),
        idf: setting["idf"].as_bool().unwrap_or(false),
        baseline: setting["baseline_path"].as_str().map(fixture),
        batch_size: setting["batch_size"].as_u64().unwrap_or(64) as usize,
    };
    (model, options)
}

#[test]
fn bertscore_matches_bert_score_package() {
    let g = golden("embeddings.json");
    let p = pairs(&g);
    let (hyps, refs) = (strs(&p.hypotheses), strs(&p.references));
    for (name, setting) in g["settings"].as_object().unwrap() {
        let (model, options) = setting_options(setting);
        let scorer = BertScorer::load(&model, options, Device::Cpu).unwrap();
        let scores = scorer.score(&hyps, &refs).unwrap();
        let worst = check_prf(name, &p.kinds, &scores, &g["bertscore"][name]);
        eprintln!("{name}: max abs diff {worst:.2e}");
    }
}

#[test]
fn bertscore_zero_idf_gives_nan_like_bert_score() {
    let g = golden("embeddings.json");
    let z = &g["zero_idf"];
    let list = |k: &str| -> Vec<&str> {
        z[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    let options = BertScoreOptions {
        layer: Some(3),
        idf: true,
        baseline: None,
        batch_size: 64,
    };
    let scorer = BertScorer::load(&fixture("tiny-bert"), options, Device::Cpu).unwrap();
    let scores = scorer
        .score(&list("hypotheses"), &list("references"))
        .unwrap();
    check_prf("zero_idf", &[], &scores, &z["scores"]);
    assert!(scores[0].p.is_nan() && scores[0].f == 0.0);
}

#[test]
fn bertscore_zeroes_padded_similarities_per_batch_like_bert_score() {
    let g = golden("embeddings.json");
    let case = &g["padding"];
    let list = |k: &str| -> Vec<&str> {
        case[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect()
    };
    let (hyps, refs) = (list("hypotheses"), list("references"));
    let mut results = Vec::new();
    for batch_size in [1usize, 2] {
        let options = BertScoreOptions {
            layer: Some(0),
            idf: false,
            baseline: None,
            batch_size,
        };
        let scorer = BertScorer::load(&fixture("tiny-bert-signed"), options, Device::Cpu).unwrap();
        let scores = scorer.score(&hyps, &refs).unwrap();
        let name = format!("scores_b{batch_size}");
        let worst = check_prf(&name, &[], &scores, &case[&name]);
        eprintln!("padding {name}: max abs diff {worst:.2e}");
        results.push(scores);
    }
    assert!(
        results[0]
            .iter()
            .zip(&results[1])
            .any(|(a, b)| (a.f - b.f).abs() > 1e-4),
        "the case should exercise the padded max"
    );
}

#[test]
fn sentence_cosines_match_sentence_transformers() {
    let g = golden("embeddings.json");
    let p = pairs(&g);
    let (hyps, refs) = (strs(&p.hypotheses), strs(&p.references));
    for (name, folder) in [
        ("minilm", minilm()),
        ("tiny_st_cls", fixture("tiny-st-cls")),
        ("tiny_st_max", fixture("tiny-st-max")),
    ] {
        let encoder = SentenceEncoder::load(&folder, Device::Cpu).unwrap();
        let cosines = encoder.cosine_similarities(&hyps, &refs).unwrap();
        let expected = g["sas"][name].as_array().unwrap();
        assert_eq!(cosines.len(), expected.len());
        let mut worst = 0.0f64;
        for (i, (a, e)) in cosines.iter().zip(expected).enumerate() {
            let e = e.as_f64().unwrap();
            assert!(
                (a - e).abs() <= TOLERANCE,
                "{name}: row {i} ({}): amthal {a}, sentence-transformers {e}",
                p.kinds[i]
            );
            worst = worst.max((a - e).abs());
        }
        eprintln!("sas {name}: max abs diff {worst:.2e}");
    }
}

#[test]
fn results_do_not_depend_on_batching() {
    let g = golden("embeddings.json");
    let p = pairs(&g);
    let (hyps, refs) = (strs(&p.hypotheses), strs(&p.references));
    let encoder = SentenceEncoder::load(&fixture("tiny-st-max"), Device::Cpu).unwrap();
    let together = encoder.embed(&hyps).unwrap();
    for (i, text) in hyps.iter().enumerate() {
        let alone = encoder.embed(&[text]).unwrap();
        let diff = (alone.get(0) - together.get(i as i64))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "row {i}: embedding alone differs by {diff}");
    }
    // BERTScore: one pair at a time (batch_size 1, every pair its own batch) equals the
    // package's batch of 1; the same pair scored alone through `score` agrees too.
    let options = |batch_size| BertScoreOptions {
        layer: Some(2),
        idf: false,
        baseline: None,
        batch_size,
    };
    let one = BertScorer::load(&fixture("tiny-bert"), options(1), Device::Cpu).unwrap();
    let all = one.score(&hyps, &refs).unwrap();
    for i in [0, 3, 7, hyps.len() - 4] {
        let alone = one.score(&[hyps[i]], &[refs[i]]).unwrap()[0];
        assert!((alone.f - all[i].f).abs() < 1e-6 && (alone.p - all[i].p).abs() < 1e-6);
    }
}

#[test]
fn bert_weights_load_with_or_without_the_bert_prefix() {
    let dir = temp_dir("bert-prefix");
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-bert").join(file), dir.join(file)).unwrap();
    }
    let named = Tensor::read_safetensors(fixture("tiny-bert").join("model.safetensors")).unwrap();
    let prefixed: Vec<(String, Tensor)> = named
        .into_iter()
        .map(|(name, t)| (format!("bert.{name}"), t))
        .collect();
    Tensor::write_safetensors(&prefixed, dir.join("model.safetensors")).unwrap();
    let plain = BertModel::load(&fixture("tiny-bert"), Device::Cpu).unwrap();
    let with_prefix = BertModel::load(&dir, Device::Cpu).unwrap();
    assert_eq!(plain.num_layers(), 3);
    let ids = Tensor::from_slice(&[2i64, 100, 101, 102, 3, 0]).view([1, 6]);
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0]).view([1, 6]);
    let a = plain.hidden_states(&ids, &mask);
    let b = with_prefix.hidden_states(&ids, &mask);
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.size(), vec![1, 6, 32]);
        assert_eq!(x.kind(), Kind::Float);
        assert!(x.equal(y));
    }
}

fn error_text(result: anyhow::Result<impl Sized>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            assert_eq!(amthal::error::exit_code(&e), 2, "bad input: {e:#}");
            format!("{e:#}")
        }
    }
}

fn copy_tiny_bert(dir: &Path, skip: &[&str]) {
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        if !skip.contains(&file) {
            std::fs::copy(fixture("tiny-bert").join(file), dir.join(file)).unwrap();
        }
    }
}

#[test]
fn broken_folders_fail_naming_the_file() {
    let no_config = temp_dir("no-config");
    copy_tiny_bert(&no_config, &["config.json"]);
    let message = error_text(BertModel::load(&no_config, Device::Cpu));
    assert!(message.contains("config.json"), "{message}");
    let message = error_text(resolve_encoder_folder(no_config.to_str().unwrap()));
    assert!(message.contains("config.json"), "{message}");

    let pickle = temp_dir("pickle-only");
    copy_tiny_bert(&pickle, &["model.safetensors"]);
    std::fs::write(pickle.join("pytorch_model.bin"), b"not loaded").unwrap();
    let message = error_text(BertScorer::load(
        &pickle,
        BertScoreOptions::default(),
        Device::Cpu,
    ));
    assert!(
        message.contains("pytorch_model.bin") && message.contains("safetensors"),
        "{message}"
    );

    let unknown = temp_dir("unknown-module");
    copy_tiny_bert(&unknown, &[]);
    std::fs::write(
        unknown.join("modules.json"),
        r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]"#,
    )
    .unwrap();
    std::fs::create_dir_all(unknown.join("1_Pooling")).unwrap();
    std::fs::write(
        unknown.join("1_Pooling").join("config.json"),
        r#"{"pooling_mode": "mean"}"#,
    )
    .unwrap();
    let message = error_text(SentenceEncoder::load(&unknown, Device::Cpu));
    assert!(
        message.contains("modules.json") && message.contains("sentence_transformers.models.Dense"),
        "{message}"
    );

    let gelu_new = temp_dir("gelu-new");
    copy_tiny_bert(&gelu_new, &["config.json"]);
    let config = std::fs::read_to_string(fixture("tiny-bert").join("config.json")).unwrap();
    std::fs::write(
        gelu_new.join("config.json"),
        config.replace("\"gelu\"", "\"gelu_new\""),
    )
    .unwrap();
    let message = error_text(BertModel::load(&gelu_new, Device::Cpu));
    assert!(message.contains("hidden_act"), "{message}");

    let bad_layer = BertScoreOptions {
        layer: Some(4),
        ..BertScoreOptions::default()
    };
    let message = error_text(BertScorer::load(
        &fixture("tiny-bert"),
        bad_layer,
        Device::Cpu,
    ));
    assert!(message.contains("layer 4"), "{message}");
}

#[test]
fn encoder_folders_resolve() {
    let local = fixture("tiny-bert");
    assert_eq!(
        resolve_encoder_folder(local.to_str().unwrap()).unwrap(),
        Some(local.clone())
    );
    let setup = minilm();
    assert_eq!(
        resolve_encoder_folder("sentence-transformers/all-MiniLM-L6-v2").unwrap(),
        Some(setup.clone())
    );
    assert_eq!(
        resolve_encoder_folder("all-MiniLM-L6-v2").unwrap(),
        Some(setup)
    );
    assert_eq!(
        resolve_encoder_folder("no-such-encoder-anywhere").unwrap(),
        None
    );
    assert_eq!(known_model_layer(&local), None);
    assert_eq!(
        known_model_layer(Path::new(
            "/hub/models--google-bert--bert-base-multilingual-cased/snapshots/abc"
        )),
        Some(9)
    );
    // layer None on an unknown model: the last layer.
    let scorer = BertScorer::load(&local, BertScoreOptions::default(), Device::Cpu).unwrap();
    assert_eq!(scorer.layer(), 3);
}
