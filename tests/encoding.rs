//! Prompt + answer encoding: ids equal transformers' on all 533 benchmark rows with the
//! SmolLM2 GGUF (plain and chat), labels mask exactly the prompt, EOS / end-of-turn is
//! trained, cutoff truncates the answer and never the prompt.

mod common;

use amthal::data::{Example, Location, References, read_examples};
use amthal::encode::{Encoder, IGNORE_INDEX};
use amthal::gguf::GgufFile;
use amthal::prompt::{PromptBuilder, PromptFormat};
use amthal::tokenizer::ModelTokenizer;
use common::*;

fn smollm2_tokenizer() -> ModelTokenizer {
    ModelTokenizer::from_gguf(&GgufFile::open(&smollm2()).unwrap()).unwrap()
}

fn benchmark_examples() -> Vec<Example> {
    let dir = benchmark_dir();
    ["Train", "Validation", "Test"]
        .iter()
        .flat_map(|split| {
            read_examples(
                &dir.join(format!("{split}_data.csv")),
                References::Required,
                Default::default(),
            )
            .unwrap()
            .examples
        })
        .collect()
}

fn check_benchmark(format: PromptFormat, prompt_key: &str, answer_key: &str) {
    let golden = golden("smollm2_tokenize.json");
    let rows = golden["rows"].as_array().unwrap();
    let tokenizer = smollm2_tokenizer();
    let prompts = PromptBuilder::new(format, &tokenizer).unwrap();
    let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
    let examples = benchmark_examples();
    assert_eq!(examples.len(), 533);
    assert_eq!(rows.len(), 533);
    let end_id = encoder.end_id();
    for (example, row) in examples.iter().zip(rows) {
        let encoded = encoder.encode(example, None).unwrap().unwrap();
        let prompt = ids(&row[prompt_key]);
        let answer = ids(&row[answer_key]);
        assert_eq!(
            &encoded.input_ids[..encoded.prompt_len],
            &prompt[..],
            "prompt ids of {} {}",
            row["split"],
            example.location
        );
        assert_eq!(
            &encoded.input_ids[encoded.prompt_len..encoded.input_ids.len() - 1],
            &answer[..],
            "answer ids of {} {}",
            row["split"],
            example.location
        );
        assert_eq!(*encoded.input_ids.last().unwrap(), end_id);
        // Label invariants: -100 exactly on the prompt; the answer + end token trained.
        assert_eq!(encoded.trained_tokens(), answer.len() + 1);
        assert!(
            encoded.labels[..encoded.prompt_len]
                .iter()
                .all(|&l| l == IGNORE_INDEX)
        );
        let trained: Vec<i64> = encoded.input_ids[encoded.prompt_len..]
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(&encoded.labels[encoded.prompt_len..], &trained[..]);
    }
}

#[test]
fn plain_format_matches_transformers_on_all_benchmark_rows() {
    check_benchmark(PromptFormat::Plain, "plain_prompt", "plain_answer");
}

#[test]
fn chat_format_matches_transformers_on_all_benchmark_rows() {
    check_benchmark(PromptFormat::Chat, "chat_prompt", "chat_answer");
}

#[test]
fn end_tokens_are_eos_for_plain_and_end_of_turn_for_chat() {
    let tokenizer = smollm2_tokenizer();
    let im_end = tokenizer.token_id("<|im_end|>").unwrap();
    for format in [PromptFormat::Plain, PromptFormat::Chat, PromptFormat::Auto] {
        let prompts = PromptBuilder::new(format, &tokenizer).unwrap();
        let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
        assert_eq!(encoder.end_id(), im_end, "{format:?}");
    }
    assert!(
        PromptBuilder::new(PromptFormat::Auto, &tokenizer)
            .unwrap()
            .is_chat()
    );

    // A Llama-2 style model: the end-of-turn is "</s>" and the answer follows "[/INST]" after a space.
    let mut spm =
        ModelTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-spm.gguf")).unwrap()).unwrap();
    spm.chat_template = Some(std::fs::read_to_string(fixture("templates/llama2.jinja")).unwrap());
    let prompts = PromptBuilder::new(PromptFormat::Chat, &spm).unwrap();
    let encoder = Encoder::new(&spm, &prompts).unwrap();
    assert_eq!(encoder.end_id(), spm.token_id("</s>").unwrap());
    assert_eq!(prompts.answer("مثل"), " مثل");
    // The sentencepiece word-start marker is not doubled by the leading space.
    assert_eq!(
        encoder.answer_ids(" مثل").unwrap(),
        spm.encode("مثل", false).unwrap()
    );
    let prompt = prompts.prompt("مثل").unwrap();
    assert!(
        prompt.starts_with("<s>[INST] You are") && prompt.ends_with("Explanation: [/INST]"),
        "{prompt}"
    );
}

#[test]
fn a_chat_format_without_a_template_is_bad_input() {
    let spm =
        ModelTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-spm.gguf")).unwrap()).unwrap();
    let error = PromptBuilder::new(PromptFormat::Chat, &spm).unwrap_err();
    assert_eq!(amthal::error::exit_code(&error), 2);
    assert!(
        !PromptBuilder::new(PromptFormat::Auto, &spm)
            .unwrap()
            .is_chat()
    );
}

#[test]
fn cutoff_truncates_the_answer_never_the_prompt() {
    let tokenizer = smollm2_tokenizer();
    let prompts = PromptBuilder::new(PromptFormat::Plain, &tokenizer).unwrap();
    let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
    let example = Example {
        proverb: "الصبر مفتاح الفرج".into(),
        reference: Some("يضرب في الحث على الصبر عند الشدائد لأن عاقبته الفرج والخلاص".into()),
        location: Location::JsonlLine(1),
    };
    let full = encoder.encode(&example, None).unwrap().unwrap();
    let prompt_len = full.prompt_len;
    assert!(!full.truncated);

    let cutoff = prompt_len + 3;
    let cut = encoder.encode(&example, Some(cutoff)).unwrap().unwrap();
    assert!(cut.truncated);
    assert_eq!(cut.input_ids.len(), cutoff);
    assert_eq!(
        &cut.input_ids[..],
        &full.input_ids[..cutoff],
        "a prefix of the full encoding"
    );
    assert_eq!(cut.prompt_len, prompt_len);
    assert_eq!(cut.trained_tokens(), 3);

    // Exactly enough room: nothing truncated.
    let exact = encoder
        .encode(&example, Some(full.input_ids.len()))
        .unwrap()
        .unwrap();
    assert!(!exact.truncated);
    // The prompt alone fills the cutoff: skipped and counted.
    assert!(
        encoder
            .encode(&example, Some(prompt_len))
            .unwrap()
            .is_none()
    );
    let (kept, stats) = encoder
        .encode_all(&[example.clone(), example.clone()], Some(prompt_len))
        .unwrap();
    assert!(kept.is_empty());
    assert_eq!((stats.kept, stats.truncated, stats.skipped), (0, 0, 2));
    let (_, stats) = encoder
        .encode_all(std::slice::from_ref(&example), Some(cutoff))
        .unwrap();
    assert_eq!((stats.kept, stats.truncated, stats.skipped), (1, 1, 0));
}

#[test]
fn test_rows_without_reference_encode_as_prompt_only() {
    let tokenizer = smollm2_tokenizer();
    let prompts = PromptBuilder::new(PromptFormat::Chat, &tokenizer).unwrap();
    let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
    let example = Example {
        proverb: "مثل".into(),
        reference: None,
        location: Location::JsonlLine(1),
    };
    let encoded = encoder.encode(&example, None).unwrap().unwrap();
    assert_eq!(encoded.trained_tokens(), 0);
    assert_eq!(encoded.input_ids, encoder.prompt_ids("مثل").unwrap());
}

/// `amthal tokenize --jsonl` on the benchmark Test split equals transformers id for id.
#[test]
fn cli_tokenize_jsonl_matches_transformers() {
    let golden = golden("smollm2_tokenize.json");
    let rows: Vec<&serde_json::Value> = golden["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["split"] == "Test")
        .collect();
    let test = benchmark_dir().join("Test_data.csv");
    let model = smollm2();
    let output = amthal(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
        "--prompt-format",
        "plain",
        "--jsonl",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 100);
    let eos = golden["eos_id"].as_u64().unwrap() as u32;
    for (line, row) in lines.iter().zip(rows) {
        let mut expected = ids(&row["plain_prompt"]);
        let prompt_len = expected.len();
        expected.extend(ids(&row["plain_answer"]));
        expected.push(eos);
        assert_eq!(ids(&line["input_ids"]), expected);
        let labels: Vec<i64> = line["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert!(labels[..prompt_len].iter().all(|&l| l == -100));
        assert_eq!(labels[prompt_len..].len(), expected.len() - prompt_len);
    }
    assert!(
        stderr(&output).contains("100 encoded"),
        "{}",
        stderr(&output)
    );

    // The human view marks trained tokens.
    let output = amthal(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
        "--limit",
        "2",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let view = stdout(&output);
    assert_eq!(view.matches("── row").count(), 2);
    assert!(
        view.contains("⟦2:<|im_end|>⟧"),
        "the end-of-turn token is marked as trained"
    );
    assert!(view.contains("<|im_start|>assistant"));

    // --train-on-inputs labels the prompt too: every token but the first (which no
    // position predicts) is its own label, as HF's language-modelling collator makes it.
    let output = amthal(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--data",
        test.to_str().unwrap(),
        "--prompt-format",
        "plain",
        "--jsonl",
        "--limit",
        "5",
        "--train_on_inputs",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let encoded: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(encoded.len(), 5);
    for (line, plain) in encoded.iter().zip(&lines) {
        assert_eq!(line["input_ids"], plain["input_ids"]);
        let ids = ids(&line["input_ids"]);
        let labels: Vec<i64> = serde_json::from_value(line["labels"].clone()).unwrap();
        assert_eq!(labels[0], -100);
        for (label, id) in labels[1..].iter().zip(&ids[1..]) {
            assert_eq!(*label, *id as i64);
        }
    }
}
