//! Generation: greedy output equals transformers' greedy generate token for token
//! (goldens from scripts/golden/make_model_golden.py), batched equals one by one,
//! seeded sampling is reproducible, --resume keeps finished rows, bad input leaves
//! no file behind.

mod common;

use std::path::{Path, PathBuf};

use amthal::generate::{GenerationRequest, SamplingConfig, generate_batch};
use amthal::model::{LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use amthal::predictions::read_predictions;
use common::*;

/// Compares ours with the golden; a divergence is accepted only where transformers'
/// own top two logits were within 1e-4 (none are in the current goldens).
fn assert_same_greedy(ours: &[u32], case: &serde_json::Value, what: &str) {
    let theirs = ids(&case["generated"]);
    let gaps: Vec<f64> = case["top2_gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_f64().unwrap())
        .collect();
    // transformers' list includes the EOS it stopped on; ours stops before it.
    let theirs_without_stop: Vec<u32> = theirs.iter().copied().filter(|&t| t != 2).collect();
    for (step, (a, b)) in ours.iter().zip(&theirs_without_stop).enumerate() {
        if a != b {
            assert!(
                gaps[step] < 1e-4,
                "{what}: step {step}: {a} vs {b} with a top-2 gap of {}",
                gaps[step]
            );
            return;
        }
    }
    assert_eq!(ours.len(), theirs_without_stop.len(), "{what}: lengths");
}

#[test]
fn greedy_equals_transformers_alone_and_batched() {
    let golden = golden("smollm2_greedy.json");
    let cases = golden["cases"].as_array().unwrap();
    let model = load_llama(&ModelSource::Gguf(smollm2()), LoadOptions::default()).unwrap();
    let config = SamplingConfig {
        max_new_tokens: golden["max_new_tokens"].as_u64().unwrap() as usize,
        ..SamplingConfig::default()
    };
    let requests: Vec<GenerationRequest> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| GenerationRequest {
            prompt_ids: ids(&c["prompt_ids"]),
            row_number: i as u64,
        })
        .collect();
    let batched = generate_batch(&model, &requests, &[2], &config).unwrap();
    for (i, (case, generation)) in cases.iter().zip(&batched).enumerate() {
        assert_same_greedy(&generation.tokens, case, &format!("batched row {i}"));
        let alone =
            generate_batch(&model, std::slice::from_ref(&requests[i]), &[2], &config).unwrap();
        assert_eq!(alone[0], *generation, "row {i}: one by one == batched");
    }
    // The sanity case: SmolLM2 knows its capitals.
    let last = batched.last().unwrap();
    assert!(last.stopped);
    let tokenizer = ModelSource::Gguf(smollm2()).tokenizer().unwrap();
    assert_eq!(
        tokenizer.decode(&last.tokens).unwrap(),
        "The capital of France is Paris."
    );
}

fn tiny() -> String {
    fixture("tiny-llama").to_string_lossy().into_owned()
}

fn sample_test() -> String {
    repo_root()
        .join("examples/data/Test_data.csv")
        .to_string_lossy()
        .into_owned()
}

fn evaluate(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "evaluate",
        "--model",
        &tiny(),
        "--test-path",
        &sample_test(),
        "--out-path",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    amthal(&refs)
}

fn generated(out: &Path) -> Vec<String> {
    read_predictions(out)
        .unwrap()
        .into_iter()
        .map(|r| r.generated)
        .collect()
}

#[test]
fn predictions_csv_has_the_seed_layout_and_a_sidecar() {
    let scratch = temp_dir("layout");
    let out = scratch.join("preds.csv");
    let output = evaluate(&out, &["--limit", "3", "--batch-size", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        bytes.starts_with(b"\xEF\xBB\xBFProverb,Reference_Explanation,Generated_Explanation\n")
    );
    let rows = read_predictions(&out).unwrap();
    let test = amthal::data::read_examples(
        Path::new(&sample_test()),
        amthal::data::References::Optional,
        Default::default(),
    )
    .unwrap();
    assert_eq!(rows.len(), 3);
    for (row, example) in rows.iter().zip(&test.examples) {
        assert_eq!(row.proverb, example.proverb);
        assert_eq!(Some(&row.reference), example.reference.as_ref());
        assert_eq!(row.generated, row.generated.trim());
    }
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(sidecar["sampling"]["max_new_tokens"], 12);
    assert_eq!(sidecar["prompt_format"], "chat");
    assert_eq!(sidecar["precision"], "f32");
    // Never replaced without --overwrite.
    let before = std::fs::read(&out).unwrap();
    let output = evaluate(&out, &["--limit", "3"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--resume") && stderr(&output).contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn seeded_sampling_is_reproducible_across_batch_sizes() {
    let dir = temp_dir("sampling");
    let run = |name: &str, extra: &[&str]| -> Vec<String> {
        let out = dir.join(name);
        let mut args = vec!["--limit", "4", "--top-p", "0.95", "--top-k", "50"];
        args.extend_from_slice(extra);
        let output = evaluate(&out, &args);
        assert!(output.status.success(), "{}", stderr(&output));
        generated(&out)
    };
    let sample = ["--temperature", "0.9"];
    let one = run(
        "a.csv",
        &[&sample[..], &["--seed", "7", "--batch-size", "1"]].concat(),
    );
    let four = run(
        "b.csv",
        &[&sample[..], &["--seed", "7", "--batch-size", "4"]].concat(),
    );
    let other = run(
        "c.csv",
        &[&sample[..], &["--seed", "8", "--batch-size", "4"]].concat(),
    );
    assert_eq!(one, four, "same seed, same outputs whatever the batch size");
    assert_ne!(one, other, "another seed, other outputs");
    let greedy = run("d.csv", &["--temperature", "0"]);
    assert_ne!(greedy, one);
}

#[test]
fn resume_keeps_finished_rows() {
    let dir = temp_dir("resume");
    let out = dir.join("p.csv");
    assert!(evaluate(&out, &["--limit", "2"]).status.success());
    // Mark the finished rows: a resumed run must keep them as they are.
    let mut rows = read_predictions(&out).unwrap();
    for row in rows.iter_mut() {
        row.generated = format!("KEPT {}", row.proverb);
    }
    amthal::predictions::write_predictions(&out, &rows).unwrap();
    let output = evaluate(&out, &["--limit", "5", "--resume"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let after = read_predictions(&out).unwrap();
    assert_eq!(after.len(), 5);
    assert_eq!(&after[..2], &rows[..]);
    assert!(after[2..].iter().all(|r| !r.generated.starts_with("KEPT")));
    // A fresh run of the same rows gives what the resumed run generated for rows 3-5.
    let fresh = dir.join("fresh.csv");
    assert!(evaluate(&fresh, &["--limit", "5"]).status.success());
    assert_eq!(generated(&fresh)[2..], generated(&out)[2..]);
    // --resume on a file from another test file is refused.
    let other = dir.join("other.csv");
    let mut wrong = rows.clone();
    wrong[0].proverb = "مثل آخر".into();
    amthal::predictions::write_predictions(&other, &wrong).unwrap();
    let output = evaluate(&other, &["--limit", "5", "--resume"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("same test file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn seed_flag_spellings_and_few_shot() {
    let dir = temp_dir("seed-flags");
    let out = dir.join("p.csv");
    let output = amthal(&[
        "evaluate",
        "--base_id",
        &tiny(),
        "--adapter_dir",
        fixture("tiny-llama-adapter").to_str().unwrap(),
        "--test_path",
        &sample_test(),
        "--out_path",
        out.to_str().unwrap(),
        "--max_new_tokens",
        "6",
        "--top_p",
        "1.0",
        "--limit",
        "2",
        "--shots",
        "2",
        "--shots-from",
        repo_root()
            .join("examples/data/Train_data.csv")
            .to_str()
            .unwrap(),
        "--prompt-format",
        "plain",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(read_predictions(&out).unwrap().len(), 2);
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(sidecar["shots"], 2);
    assert!(
        sidecar["adapter"]
            .as_str()
            .unwrap()
            .ends_with("tiny-llama-adapter")
    );
    let output = amthal(&[
        "evaluate",
        "--checkpoint_dir",
        &tiny(),
        "--test_path",
        &sample_test(),
        "--out_path",
        dir.join("q.csv").to_str().unwrap(),
        "--max_new_tokens",
        "4",
        "--limit",
        "1",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn few_shot_prompts_put_the_examples_first() {
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let tokenizer = source.tokenizer().unwrap();
    let shots = vec![
        ("مثل أول".to_string(), "شرح أول".to_string()),
        ("مثل ثان".to_string(), "شرح ثان".to_string()),
    ];
    let chat =
        amthal::prompt::PromptBuilder::new(amthal::prompt::PromptFormat::Chat, &tokenizer).unwrap();
    let text = chat.prompt_with_shots("المثل", &shots).unwrap();
    assert_eq!(text.matches("[INST]").count(), 3);
    assert!(
        text.contains("Proverb: مثل أول\nExplanation: [/INST] شرح أول </s>"),
        "{text}"
    );
    assert!(text.ends_with("Proverb: المثل\nExplanation: [/INST]"));
    let plain = amthal::prompt::PromptBuilder::new(amthal::prompt::PromptFormat::Plain, &tokenizer)
        .unwrap();
    let text = plain.prompt_with_shots("المثل", &shots).unwrap();
    assert!(text.starts_with(amthal::prompt::INSTRUCTION));
    assert!(
        text.ends_with("Proverb: مثل ثان\nExplanation: شرح ثان\n\nProverb: المثل\nExplanation:")
    );
}

/// HF's sampling warpers reach generation: each one, set to keep a single token, makes
/// sampling give the greedy answers (min-p 1, top-h and top-p near 0, an epsilon
/// cutoff near 1, top-k 1); typical-p near 0 keeps the single most typical token, so
/// the seed no longer matters; the sidecar records every setting; values outside HF's
/// ranges are refused. (Which tokens each warper keeps is checked against transformers
/// in `logits_warpers`.)
#[test]
fn sampling_warpers_reach_generation() {
    let dir = temp_dir("warpers");
    let run = |name: &str, extra: &[&str]| -> (PathBuf, Vec<String>) {
        let out = dir.join(name);
        let output = evaluate(&out, &[&["--limit", "3"][..], extra].concat());
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let texts = generated(&out);
        (out, texts)
    };
    let (_, greedy) = run("greedy.csv", &[]);
    let sample = ["--temperature", "1.5", "--seed", "3"];
    let (_, free) = run("free.csv", &sample);
    assert_ne!(free, greedy, "sampling at T=1.5 differs from greedy");
    for (name, flag, value) in [
        ("min-p", "--min-p", "1"),
        ("top-h", "--top_h", "1e-9"),
        ("top-p", "--top-p", "1e-9"),
        ("epsilon", "--epsilon-cutoff", "0.999"),
        ("top-k", "--top-k", "1"),
    ] {
        let (_, texts) = run(
            &format!("{name}.csv"),
            &[&sample[..], &[flag, value]].concat(),
        );
        assert_eq!(texts, greedy, "{flag} {value}");
    }
    // HF's do_sample: alone it samples with GenerationConfig's defaults (temperature 1,
    // top-k 50); false decodes greedily; with temperature 0 it is refused, as in HF.
    let (_, hf_defaults) = run(
        "t1.csv",
        &["--temperature", "1", "--top-k", "50", "--seed", "3"],
    );
    let (_, do_sample) = run("do-sample.csv", &["--do_sample", "--seed", "3"]);
    assert_eq!(do_sample, hf_defaults);
    assert_ne!(do_sample, greedy);
    let (_, without_top_k) = run("t1-all.csv", &["--temperature", "1", "--seed", "3"]);
    assert_ne!(
        do_sample, without_top_k,
        "top-k 50 of the tiny vocabulary changes the draws"
    );
    let cold = evaluate(
        &dir.join("cold.csv"),
        &["--do-sample", "--temperature", "0"],
    );
    assert_eq!(cold.status.code(), Some(2), "{}", stderr(&cold));
    let (_, not_sampled) = run(
        "no-sample.csv",
        &["--do-sample", "false", "--temperature", "1.5"],
    );
    assert_eq!(not_sampled, greedy);
    let typical = |seed: &str| {
        run(
            &format!("typical-{seed}.csv"),
            &[
                "--temperature",
                "1.5",
                "--typical-p",
                "1e-9",
                "--seed",
                seed,
            ],
        )
        .1
    };
    assert_eq!(typical("3"), typical("4"));
    let (out, _) = run(
        "all.csv",
        &[
            "--temperature",
            "0.8",
            "--min_p",
            "0.05",
            "--typical_p",
            "0.9",
            "--epsilon_cutoff",
            "3e-4",
            "--eta_cutoff",
            "1e-3",
            "--top-h",
            "0.9",
        ],
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    let sampling = &sidecar["sampling"];
    for (key, value) in [
        ("min_p", 0.05),
        ("typical_p", 0.9),
        ("epsilon_cutoff", 3e-4),
        ("eta_cutoff", 1e-3),
        ("top_h", 0.9),
    ] {
        assert_eq!(sampling[key].as_f64(), Some(value), "{key}: {sampling}");
    }
    for (flag, value) in [
        ("--min-p", "1.5"),
        ("--top-h", "0"),
        ("--typical-p", "0"),
        ("--eta-cutoff", "1"),
        ("--top-p", "1.2"),
    ] {
        let out = dir.join("refused.csv");
        let output = evaluate(&out, &["--temperature", "0.7", flag, value]);
        assert_eq!(output.status.code(), Some(2), "{flag}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(&format!("{flag} must be in")),
            "{}",
            stderr(&output)
        );
        assert!(!out.exists());
    }
}

#[test]
fn bad_input_exits_2_and_leaves_no_file() {
    let dir = temp_dir("eval-bad");
    let check = |name: &str, args: &[&str], expected: &str| {
        let out: PathBuf = dir.join(format!("out-{name}.csv"));
        let mut all = vec![
            "evaluate",
            "--out-path",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "2",
        ];
        all.extend_from_slice(args);
        let output = amthal(&all);
        assert_eq!(output.status.code(), Some(2), "{name}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(expected),
            "{name}: {}",
            stderr(&output)
        );
        assert!(
            !out.exists() && !out.with_extension("json").exists(),
            "{name}: no file left"
        );
    };
    let no_column = write(&dir, "nocol.csv", "Saying,Explanation\nأ,ب\n");
    check(
        "nocol",
        &[
            "--model",
            &tiny(),
            "--test-path",
            no_column.to_str().unwrap(),
        ],
        "no proverb column",
    );
    let broken = dir.join("broken-adapter");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("adapter_config.json"), "{not json").unwrap();
    check(
        "unreadable-adapter",
        &[
            "--model",
            &tiny(),
            "--adapter-dir",
            broken.to_str().unwrap(),
            "--test-path",
            &sample_test(),
        ],
        "invalid JSON",
    );
    let smol = smollm2();
    check(
        "other-base",
        &[
            "--base-id",
            smol.to_str().unwrap(),
            "--adapter-dir",
            fixture("tiny-llama-adapter").to_str().unwrap(),
            "--test-path",
            &sample_test(),
        ],
        "another base model",
    );
    let output = amthal(&[
        "evaluate",
        "--model",
        &tiny(),
        "--test-path",
        &sample_test(),
        "--out-path",
        "/proc/amthal-test/p.csv",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("/proc/amthal-test"),
        "{}",
        stderr(&output)
    );
}

/// Fused q/k/v and gate/up matmuls (evaluate's generation path) compute the separate
/// projections' logits within 1e-5 in f32, hold no second copy of the weights, and step
/// aside when an adapter is attached after fusing.
#[test]
fn fused_projections_give_the_separate_logits() {
    use amthal::model::fuse::fuse_projections;
    use amthal::model::lora::load_adapter;
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let separate = load_llama(&source, LoadOptions::default()).unwrap();
    let mut fused = load_llama(&source, LoadOptions::default()).unwrap();
    assert_eq!(fuse_projections(&mut fused), fused.layers.len());
    let attn = &fused.layers[0].self_attn;
    let qkv = attn.qkv.as_ref().unwrap();
    assert_eq!(
        attn.q_proj.weight.expect_dense().data_ptr(),
        qkv.weight.data_ptr(),
        "q_proj is a view into the fused weight"
    );
    let ids = tch::Tensor::from_slice(&[1i64, 17, 250, 33, 91, 5, 64, 120]).view([1, 8]);
    let positions = tch::Tensor::arange(8, (tch::Kind::Int64, tch::Device::Cpu)).view([1, 8]);
    let logits = |m: &amthal::model::Llama| tch::no_grad(|| m.forward(&ids, &positions, None));
    let difference = (logits(&separate) - logits(&fused))
        .abs()
        .max()
        .double_value(&[]);
    assert!(difference < 1e-5, "fused vs separate: {difference}");

    // An adapter attached after fusing is used (the fused weights would ignore it).
    let mut with_adapter = load_llama(&source, LoadOptions::default()).unwrap();
    load_adapter(&mut with_adapter, &fixture("tiny-llama-adapter")).unwrap();
    load_adapter(&mut fused, &fixture("tiny-llama-adapter")).unwrap();
    let difference = (logits(&with_adapter) - logits(&fused))
        .abs()
        .max()
        .double_value(&[]);
    assert!(difference < 1e-5, "adapter after fusing: {difference}");
}

/// Folding the adapter into the weights (evaluate's default, PEFT's merge_and_unload)
/// computes what the unfolded adapter computes: logits within 1e-5 in f32, the same
/// greedy tokens; `--no-merge-adapter` keeps it beside the weights.
#[test]
fn a_folded_adapter_gives_the_unfolded_logits_and_tokens() {
    use amthal::model::lora::{fold_adapters, load_adapter};
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let base = load_llama(&source, LoadOptions::default()).unwrap();
    let mut unfolded = load_llama(&source, LoadOptions::default()).unwrap();
    load_adapter(&mut unfolded, &fixture("tiny-llama-adapter")).unwrap();
    let mut folded = load_llama(&source, LoadOptions::default()).unwrap();
    load_adapter(&mut folded, &fixture("tiny-llama-adapter")).unwrap();
    let count = fold_adapters(&mut folded);
    assert!(count > 0);
    assert!(
        folded
            .layers
            .iter()
            .all(|l| l.linears().iter().all(|(_, linear)| linear.lora.is_none()))
    );
    let ids = tch::Tensor::from_slice(&[1i64, 17, 250, 33, 91, 5, 64, 120]).view([1, 8]);
    let positions = tch::Tensor::arange(8, (tch::Kind::Int64, tch::Device::Cpu)).view([1, 8]);
    let logits = |m: &amthal::model::Llama| tch::no_grad(|| m.forward(&ids, &positions, None));
    let (u, f, b) = (logits(&unfolded), logits(&folded), logits(&base));
    let difference = (&u - &f).abs().max().double_value(&[]);
    assert!(difference < 1e-5, "folded vs unfolded: {difference}");
    let adapter_effect = (&u - &b).abs().max().double_value(&[]);
    assert!(
        adapter_effect > 1e-3,
        "the adapter changes the logits ({adapter_effect})"
    );

    let requests = vec![GenerationRequest {
        prompt_ids: vec![1, 17, 250, 33],
        row_number: 0,
    }];
    let config = SamplingConfig {
        max_new_tokens: 12,
        ..SamplingConfig::default()
    };
    assert_eq!(
        generate_batch(&folded, &requests, &[2], &config).unwrap(),
        generate_batch(&unfolded, &requests, &[2], &config).unwrap()
    );

    let dir = temp_dir("folded");
    let adapter = fixture("tiny-llama-adapter");
    let mut texts = Vec::new();
    for (name, extra) in [("folded", None), ("beside", Some("--no-merge-adapter"))] {
        let out = dir.join(format!("{name}.csv"));
        let mut args = vec!["--adapter-dir", adapter.to_str().unwrap(), "--limit", "3"];
        args.extend(extra);
        let output = evaluate(&out, &args);
        assert!(output.status.success(), "{}", stderr(&output));
        let sidecar: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
                .unwrap();
        assert_eq!(sidecar["adapter_folded"], extra.is_none(), "{name}");
        texts.push(generated(&out));
    }
    assert_eq!(texts[0], texts[1]);
}

/// `--no-repeat-ngram-size` and `--repetition-penalty` as transformers applies them
/// (goldens from scripts/golden/make_ngram_golden.py): the banned ids of random
/// sequences, and greedy generations of the tiny Llama, alone and batched.
#[test]
fn no_repeat_ngrams_and_repetition_penalty_match_transformers() {
    use amthal::generate::repeated_ngram_endings;
    let golden = golden("no_repeat_ngram.json");
    for case in golden["bans"].as_array().unwrap() {
        let sequence = ids(&case["sequence"]);
        let n = case["n"].as_u64().unwrap() as usize;
        assert_eq!(
            repeated_ngram_endings(&sequence, n),
            ids(&case["banned"]),
            "{sequence:?} n={n}"
        );
    }
    let model = load_llama(
        &ModelSource::HfFolder(fixture("tiny-llama")),
        LoadOptions::default(),
    )
    .unwrap();
    let cases = golden["generations"].as_array().unwrap();
    let config_of = |case: &serde_json::Value| SamplingConfig {
        max_new_tokens: golden["max_new_tokens"].as_u64().unwrap() as usize,
        no_repeat_ngram_size: case["no_repeat_ngram_size"].as_u64().unwrap() as usize,
        repetition_penalty: case["repetition_penalty"].as_f64().unwrap(),
        ..SamplingConfig::default()
    };
    let mut changed_by_the_rule = 0;
    for (i, case) in cases.iter().enumerate() {
        let request = GenerationRequest {
            prompt_ids: ids(&case["prompt_ids"]),
            row_number: i as u64,
        };
        let config = config_of(case);
        let ours = generate_batch(&model, std::slice::from_ref(&request), &[2], &config).unwrap();
        assert_same_greedy(&ours[0].tokens, case, &format!("case {i}"));
        let plain = SamplingConfig {
            max_new_tokens: config.max_new_tokens,
            ..SamplingConfig::default()
        };
        let without = generate_batch(&model, std::slice::from_ref(&request), &[2], &plain).unwrap();
        changed_by_the_rule += usize::from(without[0].tokens != ours[0].tokens);
    }
    assert!(
        changed_by_the_rule > 0,
        "the goldens exercise the processors"
    );
    // Batched (left-padded prompts of different lengths) equals one by one.
    let same_config: Vec<&serde_json::Value> = cases
        .iter()
        .filter(|c| c["no_repeat_ngram_size"] == 2 && c["repetition_penalty"] == 1.0)
        .collect();
    let requests: Vec<GenerationRequest> = same_config
        .iter()
        .enumerate()
        .map(|(i, c)| GenerationRequest {
            prompt_ids: ids(&c["prompt_ids"]),
            row_number: i as u64,
        })
        .collect();
    let batched = generate_batch(&model, &requests, &[2], &config_of(same_config[0])).unwrap();
    for (case, generation) in same_config.iter().zip(&batched) {
        assert_same_greedy(&generation.tokens, case, "batched");
    }
}

/// Continuous batching (a finished row's slot refilled from the waiting prompts, each
/// row with its own cache length) gives every prompt what it gets alone: greedy, with
/// the n-gram rule, seeded sampling, and forced lengths; rows are reported as they end.
/// Both decode modes: eager, and the graph mode's static input buffers (on the CPU the
/// recorded step is re-run over the same buffers; a step that held on to its first
/// inputs would repeat the first step's tokens).
#[test]
fn continuous_batching_gives_each_prompt_its_output_alone() {
    use amthal::decode_step::DecodeMode;
    use amthal::generate::{Generation, generate_continuous};
    let model = load_llama(
        &ModelSource::HfFolder(fixture("tiny-llama")),
        LoadOptions::default(),
    )
    .unwrap();
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 17, 250, 33],
        vec![1, 300, 301, 302, 17, 40, 41, 350],
        vec![1, 5],
        vec![1, 5, 6, 7, 5, 6, 9, 9, 12, 40, 41],
        vec![1, 99, 98],
        vec![1, 310, 320, 330],
        vec![1, 7, 7, 7, 7],
    ];
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p.clone(),
            row_number: i as u64,
        })
        .collect();
    let configs = [
        SamplingConfig {
            max_new_tokens: 20,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            max_new_tokens: 16,
            no_repeat_ngram_size: 2,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            max_new_tokens: 16,
            temperature: 0.8,
            top_p: 0.9,
            seed: 11,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            max_new_tokens: 12,
            min_new_tokens: 12,
            ..SamplingConfig::default()
        },
    ];
    // A token the model emits early in one row becomes a stop id too, so rows end at
    // different steps and slots are refilled while others are mid-answer.
    let plain = generate_batch(
        &model,
        std::slice::from_ref(&requests[1]),
        &[2],
        &configs[0],
    )
    .unwrap()
    .remove(0);
    let stops = [2, plain.tokens[4]];
    for config in &configs {
        let alone: Vec<Generation> = requests
            .iter()
            .map(|r| {
                generate_batch(&model, std::slice::from_ref(r), &stops, config)
                    .unwrap()
                    .remove(0)
            })
            .collect();
        let lengths: Vec<usize> = alone.iter().map(|g| g.tokens.len()).collect();
        if config.is_greedy() && config.min_new_tokens == 0 {
            assert!(
                lengths.iter().any(|&l| l != lengths[0]),
                "{config:?}: rows end at different steps {lengths:?}"
            );
        }
        for (slots, mode) in [1, 3, 8]
            .into_iter()
            .flat_map(|s| [(s, DecodeMode::Eager), (s, DecodeMode::Graph)])
        {
            let mut order = Vec::new();
            let mut results: Vec<Option<Generation>> = vec![None; requests.len()];
            let report = generate_continuous(
                &model,
                &requests,
                &stops,
                config,
                slots,
                mode,
                &mut |i, g| {
                    order.push(i);
                    results[i] = Some(g);
                    Ok(())
                },
            )
            .unwrap();
            assert!(!report.cuda_graph, "no CUDA graph on the CPU");
            assert_eq!(order.len(), requests.len(), "each row reported once");
            // Each row's first token comes from its prefill, every later one from a
            // decode step, and the decode steps are timed (nothing recorded on the CPU).
            let from_decode: usize = results
                .iter()
                .map(|g| g.as_ref().unwrap().tokens.len().saturating_sub(1))
                .sum();
            assert_eq!(
                report.decode_tokens, from_decode,
                "{config:?} slots={slots}"
            );
            assert!(report.decode_steps * slots >= from_decode);
            assert_eq!(report.decode_seconds > 0.0, report.decode_steps > 0);
            for (i, (result, expected)) in results.iter().zip(&alone).enumerate() {
                assert_eq!(
                    result.as_ref().unwrap(),
                    expected,
                    "{config:?} slots={slots} {mode:?} row {i}"
                );
            }
        }
    }
}

/// `--num-beams`: the CSV holds each prompt's beam-search answer (unlike greedy's), the
/// same whether prompts are searched one at a time or together; the sidecar records
/// the setting; beam sampling is refused before anything is written.
#[test]
fn evaluate_with_beams_gives_the_same_answers_at_any_batch_size() {
    let dir = temp_dir("beams");
    let one = dir.join("one.csv");
    // 3 slots: one prompt (3 beams) at a time; 12: all four prompts together.
    let output = evaluate(
        &one,
        &["--num-beams", "3", "--batch-size", "3", "--limit", "4"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let together = dir.join("together.csv");
    let output = evaluate(
        &together,
        &["--num_beams", "3", "--batch-size", "12", "--limit", "4"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(generated(&one).len(), 4);
    assert_eq!(generated(&one), generated(&together));
    assert!(generated(&one).iter().any(|text| !text.is_empty()));
    let greedy = dir.join("greedy.csv");
    let output = evaluate(&greedy, &["--limit", "4"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_ne!(generated(&greedy), generated(&one));
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(sidecar["sampling"]["num_beams"], 3);
    assert_eq!(sidecar["sampling"]["early_stopping"], "false");

    let refused = dir.join("refused.csv");
    let output = evaluate(&refused, &["--num-beams", "2", "--temperature", "0.7"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("beam sampling"),
        "{}",
        stderr(&output)
    );
    assert!(!refused.exists());
}

/// `evaluate` takes what the flags leave out from the model folder's
/// generation_config.json, as HF's `generate` does; flags win, and
/// `--generation-config none|FILE` chooses another source.
#[test]
fn generation_config_json_supplies_the_settings_flags_leave_out() {
    let dir = temp_dir("generation-config");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let sampling = serde_json::json!({"bos_token_id": 1, "eos_token_id": 2,
        "do_sample": true, "temperature": 1.5, "top_k": 40, "max_new_tokens": 9});
    let config = write(&dir, "sampling.json", sampling.to_string());
    std::fs::copy(&config, model.join("generation_config.json")).unwrap();
    let run = |name: &str, model: &Path, extra: &[&str]| -> (Vec<String>, serde_json::Value) {
        let out = dir.join(name);
        let mut args = vec![
            "evaluate",
            "--model",
            model.to_str().unwrap(),
            "--test-path",
        ];
        let test = sample_test();
        args.extend([test.as_str(), "--out-path", out.to_str().unwrap()]);
        args.extend([
            "--precision",
            "f32",
            "--device",
            "cpu",
            "--limit",
            "3",
            "--seed",
            "3",
        ]);
        args.extend(extra);
        let output = amthal(&args);
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let sidecar = std::fs::read_to_string(out.with_extension("json")).unwrap();
        (generated(&out), serde_json::from_str(&sidecar).unwrap())
    };
    let (from_file, sidecar) = run("from-file.csv", &model, &[]);
    assert_eq!(
        sidecar["from_generation_config"],
        serde_json::json!(["do_sample", "temperature", "top_k", "max_new_tokens"])
    );
    assert_eq!(sidecar["sampling"]["temperature"], 1.5);
    assert_eq!(sidecar["sampling"]["top_k"], 40);
    assert_eq!(sidecar["sampling"]["max_new_tokens"], 9);
    // The same settings as flags on the fixture (whose file sets none of them).
    let flags = [
        "--temperature",
        "1.5",
        "--top-k",
        "40",
        "--max-new-tokens",
        "9",
    ];
    let (as_flags, _) = run("flags.csv", &fixture("tiny-llama"), &flags);
    assert_eq!(from_file, as_flags);
    let (given_file, sidecar) = run(
        "given-file.csv",
        &fixture("tiny-llama"),
        &["--generation-config", config.to_str().unwrap()],
    );
    assert_eq!(given_file, from_file);
    assert_eq!(sidecar["generation_config"], config.display().to_string());
    // Flags win over the file; `none` ignores it.
    let (greedy, _) = run(
        "greedy.csv",
        &fixture("tiny-llama"),
        &["--max-new-tokens", "9"],
    );
    let (flag_greedy, sidecar) = run("do-sample-false.csv", &model, &["--do-sample", "false"]);
    assert_eq!(flag_greedy, greedy);
    assert_eq!(
        sidecar["from_generation_config"],
        serde_json::json!(["max_new_tokens"])
    );
    let (ignored, sidecar) = run(
        "none.csv",
        &model,
        &["--generation-config", "none", "--max-new-tokens", "9"],
    );
    assert_eq!(ignored, greedy);
    assert_eq!(sidecar["generation_config"], serde_json::Value::Null);
    assert_ne!(from_file, greedy, "sampling at T=1.5 differs from greedy");
    // A model merged from it keeps the file (as save_pretrained keeps
    // model.generation_config), so it generates as the base + adapter did.
    let merged = dir.join("merged");
    let output = amthal(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        fixture("tiny-llama-adapter").to_str().unwrap(),
        "--output-dir",
        merged.to_str().unwrap(),
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let kept: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("generation_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "do_sample",
        "temperature",
        "top_k",
        "max_new_tokens",
        "eos_token_id",
    ] {
        assert_eq!(kept[key], sampling[key], "{key}: {kept}");
    }
    let (adapted, _) = run(
        "adapted.csv",
        &model,
        &[
            "--adapter-dir",
            fixture("tiny-llama-adapter").to_str().unwrap(),
        ],
    );
    let (merged_texts, sidecar) = run("merged.csv", &merged, &[]);
    assert_eq!(sidecar["sampling"]["temperature"], 1.5);
    assert_eq!(merged_texts, adapted);
    // A file that asks for what HF refuses fails before any row is written.
    std::fs::write(
        model.join("generation_config.json"),
        r#"{"do_sample": true, "temperature": 0}"#,
    )
    .unwrap();
    let out = dir.join("refused.csv");
    let output = amthal(&[
        "evaluate",
        "--model",
        model.to_str().unwrap(),
        "--test-path",
        &sample_test(),
        "--out-path",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("generation_config.json: temperature is 0"),
        "{}",
        stderr(&output)
    );
    assert!(!out.exists());
}
