//! Metrics equal the Python packages per row (1e-9) on the benchmark Test references
//! against perturbed hypotheses (goldens from scripts/golden/make_score_golden.py).

mod common;

use amthal::score::chrf::{ChrfConfig, corpus_chrf, sentence_chrf};
use common::*;

#[test]
fn chrf_plus_plus_equals_sacrebleu() {
    let golden = golden("scores.json");
    let pairs = golden["pairs"].as_array().unwrap();
    assert!(pairs.len() > 800);
    let config = ChrfConfig::chrf_plus_plus();
    let mut texts = Vec::new();
    for pair in pairs {
        let (hyp, reference) = (
            pair["hypothesis"].as_str().unwrap(),
            pair["reference"].as_str().unwrap(),
        );
        let ours = sentence_chrf(hyp, reference, &config);
        let theirs = pair["chrf++"].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-9,
            "{} row {}: {ours} vs {theirs}",
            pair["kind"],
            pair["row"]
        );
        texts.push((hyp, reference));
    }
    let corpus = corpus_chrf(&texts, &config);
    let theirs = golden["corpus"]["chrf++"].as_f64().unwrap();
    assert!(
        (corpus - theirs).abs() <= 1e-9,
        "corpus: {corpus} vs {theirs}"
    );
}

#[test]
fn rouge_equals_the_rouge_package() {
    let golden = golden("scores.json");
    let mut compared = 0;
    for pair in golden["pairs"].as_array().unwrap() {
        let (hyp, reference) = (
            pair["hypothesis"].as_str().unwrap(),
            pair["reference"].as_str().unwrap(),
        );
        let ours = amthal::score::rouge::rouge(hyp, reference);
        if pair["rouge"].is_null() {
            assert!(ours.empty, "Python raised for {:?}", pair["kind"]);
            assert_eq!(ours.rouge_1.f, 0.0);
            continue;
        }
        assert!(!ours.empty);
        for (name, score) in [
            ("rouge-1", ours.rouge_1),
            ("rouge-2", ours.rouge_2),
            ("rouge-l", ours.rouge_l),
        ] {
            for (stat, value) in [("f", score.f), ("p", score.p), ("r", score.r)] {
                let theirs = pair["rouge"][name][stat].as_f64().unwrap();
                assert!(
                    (value - theirs).abs() <= 1e-9,
                    "{name} {stat} of {} row {}: {value} vs {theirs}",
                    pair["kind"],
                    pair["row"]
                );
            }
        }
        compared += 1;
    }
    assert!(compared > 700, "{compared}");
}
