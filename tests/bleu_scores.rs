//! BLEU equals the Python packages per row (1e-9): sacrebleu 13a and intl sentence and
//! corpus BLEU, NLTK sentence BLEU with method4 smoothing, on the benchmark Test
//! references against perturbed hypotheses plus edge pairs (goldens from
//! scripts/golden/make_bleu_golden.py).

mod common;

use amthal::score::bleu::{
    BleuTokenizer, corpus_bleu, intl_classes, nltk_sentence_bleu, sentence_bleu,
};
use common::*;

fn text<'a>(pair: &'a serde_json::Value, key: &str) -> &'a str {
    pair[key].as_str().unwrap()
}

#[test]
fn bleu_equals_sacrebleu_and_nltk() {
    let golden = golden("bleu.json");
    let pairs = golden["pairs"].as_array().unwrap();
    let mut compared = 0;
    let mut texts = Vec::new();
    for pair in pairs {
        let (hyp, reference) = (text(pair, "hypothesis"), text(pair, "reference"));
        texts.push((hyp, reference));
        let ours = [
            (
                "bleu_13a",
                sentence_bleu(hyp, reference, BleuTokenizer::Thirteen13a),
            ),
            (
                "bleu_intl",
                sentence_bleu(hyp, reference, BleuTokenizer::Intl),
            ),
            ("nltk_bleu", nltk_sentence_bleu(hyp, reference)),
        ];
        for (kind, value) in ours {
            // null: Python raised; amthal scores the pair 0 (none raise at present).
            let theirs = pair[kind].as_f64().unwrap_or(0.0);
            assert!(
                (value - theirs).abs() <= 1e-9,
                "{kind} of {} row {}: {value} vs {theirs}\nhyp: {hyp:?}\nref: {reference:?}",
                pair["kind"],
                pair["row"]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 3 * pairs.len());
    assert!(pairs.len() > 800, "{}", pairs.len());
    for tokenizer in [BleuTokenizer::Thirteen13a, BleuTokenizer::Intl] {
        let key = format!("bleu_{}", tokenizer.name());
        let ours = corpus_bleu(&texts, tokenizer);
        let theirs = golden["corpus"][&key].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() <= 1e-9,
            "corpus {key}: {ours} vs {theirs}"
        );
    }
}

#[test]
fn tokenizer_names() {
    assert_eq!(BleuTokenizer::Thirteen13a.name(), "13a");
    assert_eq!(BleuTokenizer::Intl.name(), "intl");
}

/// The intl tokenizer's \p{N}, \p{P}, \p{S} equal the Python `regex` module's at every
/// code point (surrogates aside: Rust strings cannot hold them).
#[test]
fn intl_unicode_classes_equal_python_regex() {
    let golden = golden("bleu.json");
    let mut python = vec![[false; 3]; 0x110000];
    for (i, name) in ["N", "P", "S"].iter().enumerate() {
        let ranges = golden["unicode"][name].as_array().unwrap();
        assert!(ranges.len() > 100, "{name}: {} ranges", ranges.len());
        for range in ranges {
            let (start, end) = (range[0].as_u64().unwrap(), range[1].as_u64().unwrap());
            for cp in start..=end {
                python[cp as usize][i] = true;
            }
        }
    }
    let mut checked = 0;
    for cp in 0..0x110000u32 {
        let Some(c) = char::from_u32(cp) else {
            continue;
        };
        assert_eq!(intl_classes(c), python[cp as usize], "U+{cp:04X} [N, P, S]");
        checked += 1;
    }
    assert_eq!(checked, 0x110000 - 0x800);
}
