//! `amthal score` and `amthal report` through the binary: per-row files that are the
//! input plus metric columns, summaries that agree with the per-row numbers and the
//! library's corpus scores, rows without references reported, clear errors that leave
//! nothing behind, and reports comparing runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use amthal::score::chrf::{ChrfConfig, corpus_chrf, sentence_chrf};
use common::*;

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(b"\xEF\xBB\xBF"), "written with a BOM");
    let mut reader = csv::Reader::from_reader(&bytes[3..]);
    let headers = reader.headers().unwrap().iter().map(String::from).collect();
    let rows = reader
        .records()
        .map(|r| r.unwrap().iter().map(String::from).collect())
        .collect();
    (headers, rows)
}

/// Runs `amthal score --pred PRED --out DIR/rows.csv --summary DIR/summary.json ARGS...`,
/// checks that it succeeded, and returns its output and the two files' paths.
fn score_ok(dir: &Path, pred: &Path, args: &[&str]) -> (Output, PathBuf, PathBuf) {
    let (out, summary) = (dir.join("rows.csv"), dir.join("summary.json"));
    let mut all = vec![
        "score",
        "--pred",
        pred.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
    ];
    all.extend(args);
    let output = amthal(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    (output, out, summary)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn summary_line<'a>(summary: &'a serde_json::Value, metric: &str) -> &'a serde_json::Value {
    summary["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} in {summary}"))
}

#[test]
fn score_writes_input_columns_plus_metrics_and_a_consistent_summary() {
    let dir = temp_dir("score-files");
    let pred = fixture("predictions/fine_tuned.csv");
    let (output, out, summary) = score_ok(&dir, &pred, &["--metrics", "chrf++,rouge,checks"]);
    let printed = stdout(&output);
    assert!(
        printed.contains("| chrf++ |") && printed.contains("| rougeL_f |"),
        "{printed}"
    );
    assert!(printed.contains("9 of 10 rows scored"), "{printed}");

    let (headers, rows) = read_csv(&out);
    assert_eq!(
        &headers[..3],
        ["Proverb", "Reference_Explanation", "Generated_Explanation"]
    );
    for column in [
        "chrf++",
        "rouge1_f",
        "rouge2_p",
        "rougeL_r",
        "has_latin",
        "empty",
        "words",
    ] {
        assert!(
            headers.iter().any(|h| h == column),
            "{column} in {headers:?}"
        );
    }
    assert_eq!(rows.len(), 10);
    let chrf_column = headers.iter().position(|h| h == "chrf++").unwrap();
    let config = ChrfConfig::chrf_plus_plus();
    let mut pairs = Vec::new();
    let mut values = Vec::new();
    for row in &rows {
        if row[1].is_empty() {
            assert_eq!(
                row[chrf_column], "",
                "a row without a reference is not scored"
            );
            continue;
        }
        let value: f64 = row[chrf_column].parse().unwrap();
        assert_eq!(value, sentence_chrf(&row[2], &row[1], &config));
        pairs.push((row[2].as_str(), row[1].as_str()));
        values.push(value);
    }
    let summary: serde_json::Value = read_json(&summary);
    assert_eq!(summary["rows"], 10);
    assert_eq!(summary["scored_rows"], 9);
    assert_eq!(summary["unscored_rows"], serde_json::json!([1]));
    let line = summary_line(&summary, "chrf++");
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!((line["mean"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert_eq!(
        line["corpus"].as_f64().unwrap(),
        corpus_chrf(&pairs, &config)
    );
    assert_eq!(summary["checks"]["empty"], 0);
    assert_eq!(summary["checks"]["with_latin"], 0);
    assert_eq!(
        summary["sacrebleu_signatures"]["chrf++"],
        "nrefs:1|case:mixed|eff:yes|nc:6|nw:2|space:no|version:2.6.0"
    );
    assert!(
        summary["sacrebleu_signatures"].get("bleu").is_none(),
        "bleu was not asked for"
    );
}

#[test]
fn task_checks_find_latin_and_empty_outputs() {
    let dir = temp_dir("score-checks");
    let pred = fixture("predictions/zero_shot.csv");
    let (_, out, summary) = score_ok(&dir, &pred, &["--metrics", "checks"]);
    let summary: serde_json::Value = read_json(&summary);
    // The fixture cycles English / Arabic / empty outputs over 10 rows.
    assert_eq!(summary["checks"]["with_latin"], 4);
    assert_eq!(summary["checks"]["empty"], 3);
    assert!((summary["checks"]["latin_share"].as_f64().unwrap() - 0.4).abs() < 1e-12);
    let (headers, rows) = read_csv(&out);
    let latin = headers.iter().position(|h| h == "has_latin").unwrap();
    let empty = headers.iter().position(|h| h == "empty").unwrap();
    assert_eq!(rows[0][latin], "1");
    assert_eq!(rows[2][empty], "1");
}

#[test]
fn arabic_normalisation_applies_to_the_string_metrics() {
    let dir = temp_dir("score-normalize");
    let pred = write(
        &dir,
        "pred.csv",
        "Proverb,Reference_Explanation,Generated_Explanation\nمثل,إِنَّ الأمرَ مهمٌّ جدًّا,ان الامر مهم جدا\n",
    );
    let chrf_of = |normalize: &str| -> f64 {
        let summary = dir.join(format!("{normalize}.json"));
        let output = amthal(&[
            "score",
            "--pred",
            pred.to_str().unwrap(),
            "--out",
            dir.join(format!("{normalize}.csv")).to_str().unwrap(),
            "--summary",
            summary.to_str().unwrap(),
            "--metrics",
            "chrf++",
            "--normalize",
            normalize,
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let summary: serde_json::Value = read_json(&summary);
        summary_line(&summary, "chrf++")["mean"].as_f64().unwrap()
    };
    assert_eq!(chrf_of("arabic"), 100.0);
    assert!(chrf_of("none") < 60.0);
}

#[test]
fn bad_inputs_exit_2_naming_the_problem_and_write_nothing() {
    let dir = temp_dir("score-errors");
    let no_column = write(
        &dir,
        "no_column.csv",
        "Proverb,Reference_Explanation\nا,ب\n",
    );
    let out = dir.join("out.csv");
    let output = amthal(&[
        "score",
        "--pred",
        no_column.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(
        message.contains("no_column.csv") && message.contains("generated"),
        "{message}"
    );
    assert!(!out.exists());

    let ragged = write(
        &dir,
        "ragged.csv",
        "Proverb,Reference_Explanation,Generated_Explanation\nا,ب,ج\nا,ب\n",
    );
    let output = amthal(&[
        "score",
        "--pred",
        ragged.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("row 2 (line 3)"),
        "{}",
        stderr(&output)
    );
    assert!(!out.exists());

    let good = fixture("predictions/fine_tuned.csv");
    let output = amthal(&[
        "score",
        "--pred",
        good.to_str().unwrap(),
        "--metrics",
        "bleurt",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("bleurt"));

    let copy = write(&dir, "copy.csv", std::fs::read(&good).unwrap());
    let same_file_spellings = [
        copy.to_str().unwrap().to_string(),
        dir.join(".").join("copy.csv").to_str().unwrap().to_string(),
    ];
    for spelling in &same_file_spellings {
        for flag in ["--out", "--summary"] {
            let output = amthal(&["score", "--pred", copy.to_str().unwrap(), flag, spelling]);
            assert_eq!(output.status.code(), Some(2), "{flag} {spelling}");
            assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&good).unwrap());
        }
    }
    let both = dir.join("both.out");
    let output = amthal(&[
        "score",
        "--pred",
        copy.to_str().unwrap(),
        "--out",
        both.to_str().unwrap(),
        "--summary",
        both.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(!both.exists());

    // Flags that would be ignored, and columns that would clash, are refused.
    for args in [
        vec!["--metrics", "bleu", "--bertscore-idf"],
        vec!["--metrics", "chrf++", "--bertscore-layer", "3"],
        vec![
            "--embedding-model",
            "a/final",
            "--embedding-model",
            "b/final",
        ],
    ] {
        let mut all = vec![
            "score",
            "--pred",
            copy.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(args.iter().copied());
        let output = amthal(&all);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(!out.exists());
    }
}

/// Runs amthal with an empty model cache and an empty, offline Hugging Face cache.
fn amthal_without_models(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args(args)
        .env("AMTHAL_CACHE", dir.join("cache"))
        .env("HF_HOME", dir.join("hf"))
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

#[test]
fn absent_embedding_models_are_skipped_by_default_and_an_error_when_asked_for() {
    let dir = temp_dir("score-absent-models");
    let pred = fixture("predictions/fine_tuned.csv");
    let summary = dir.join("summary.json");
    let output = amthal_without_models(
        &dir,
        &[
            "score",
            "--pred",
            pred.to_str().unwrap(),
            "--out",
            dir.join("rows.csv").to_str().unwrap(),
            "--summary",
            summary.to_str().unwrap(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let summary: serde_json::Value = read_json(&summary);
    let skipped = summary["skipped"].to_string();
    assert!(
        skipped.contains("bertscore") && skipped.contains("cosine"),
        "{skipped}"
    );
    assert!(stderr(&output).contains("skipped"), "{}", stderr(&output));
    summary_line(&summary, "bleu");

    for args in [
        vec!["--metrics", "bertscore"],
        vec![
            "--embedding-model",
            "sentence-transformers/all-MiniLM-L6-v2",
        ],
    ] {
        let mut all = vec!["score", "--pred", pred.to_str().unwrap(), "--out"];
        let out = dir.join("explicit.csv");
        all.push(out.to_str().unwrap());
        all.extend(args);
        let output = amthal_without_models(&dir, &all);
        assert_eq!(output.status.code(), Some(2), "{all:?}");
        assert!(
            stderr(&output).contains("not available"),
            "{}",
            stderr(&output)
        );
        assert!(!out.exists());
    }
}

#[test]
fn report_compares_runs_with_charts_samples_and_loss_curves() {
    let dir = temp_dir("report");
    let log = write(
        &dir,
        "log.jsonl",
        "{\"step\":1,\"epoch\":0.1,\"loss\":2.5}\n{\"step\":2,\"epoch\":0.2,\"loss\":2.1,\"eval_loss\":2.3}\n",
    );
    let out = dir.join("report");
    let output = amthal(&[
        "report",
        fixture("predictions/zero_shot.csv").to_str().unwrap(),
        fixture("predictions/fine_tuned.csv").to_str().unwrap(),
        "--names",
        "zero-shot,fine-tuned",
        "--metrics",
        "bleu,chrf++,rouge,checks",
        "--train-log",
        log.to_str().unwrap(),
        "--samples",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("| metric | zero-shot | fine-tuned |"),
        "{markdown}"
    );
    for chart in ["bleu", "chrf_pp", "rouge1_f", "rougeL_f", "loss"] {
        for extension in ["svg", "png"] {
            let path = out.join("charts").join(format!("{chart}.{extension}"));
            assert!(
                std::fs::metadata(&path).unwrap().len() > 1000,
                "{}",
                path.display()
            );
            assert!(
                markdown.contains(&format!("charts/{chart}.svg")),
                "{chart} linked"
            );
        }
    }
    // The fine-tuned file lists rows in reverse order: samples are matched by proverb.
    let zero = std::fs::read_to_string(fixture("predictions/zero_shot.csv")).unwrap();
    let first_proverb = zero.lines().nth(1).unwrap().split(',').next().unwrap();
    let sample_line = markdown
        .lines()
        .find(|l| l.starts_with(&format!("| {first_proverb} |")))
        .expect("first proverb in the samples");
    let (_, fine) = (
        0,
        std::fs::read_to_string(fixture("predictions/fine_tuned.csv")).unwrap(),
    );
    let fine_output = fine
        .lines()
        .find(|l| l.starts_with(first_proverb))
        .unwrap()
        .rsplit(',')
        .next()
        .unwrap();
    assert!(
        sample_line.ends_with(&format!(" {fine_output} |")),
        "{sample_line}"
    );
    let sample_rows = markdown
        .lines()
        .skip_while(|l| !l.starts_with("## Samples"))
        .filter(|l| l.starts_with("| ") && !l.starts_with("| proverb"))
        .count();
    assert_eq!(sample_rows, 3);
    // Fine-tuned outputs are closer to the references on every string metric.
    let row = |label: &str| -> Vec<f64> {
        let line = markdown
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap();
        line.split('|')
            .skip(2)
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().parse().unwrap())
            .collect()
    };
    for label in ["bleu (corpus)", "chrf++ (corpus)", "rougeL_f (mean)"] {
        let values = row(label);
        assert!(values[1] > values[0], "{label}: {values:?}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<img src=\"charts/chrf_pp.svg\"") && html.contains("fine-tuned"));
    assert!(out.join("scores/fine-tuned.scores.csv").is_file());

    // An earlier report is replaced; a folder with a report.md among other files is not.
    let again = amthal(&[
        "report",
        fixture("predictions/fine_tuned.csv").to_str().unwrap(),
        "--metrics",
        "chrf++",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        !out.join("scores/zero-shot.scores.csv").exists(),
        "replaced whole"
    );
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    write(&docs, "report.md", "# my notes");
    write(&docs, "index.md", "keep");
    let output = amthal(&[
        "report",
        fixture("predictions/zero_shot.csv").to_str().unwrap(),
        "--out",
        docs.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(docs.join("index.md").is_file() && docs.join("report.md").is_file());

    // A folder that is not a report is never replaced.
    let precious = dir.join("precious");
    write(
        &std::fs::create_dir_all(&precious)
            .map(|_| precious.clone())
            .unwrap(),
        "notes.txt",
        "keep",
    );
    let output = amthal(&[
        "report",
        fixture("predictions/zero_shot.csv").to_str().unwrap(),
        "--out",
        precious.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(precious.join("notes.txt").is_file());
}

/// The command end to end on the 802 golden pairs (benchmark Test references against
/// perturbations): every per-row column equals the Python packages' numbers, so the
/// wiring from metric to column is checked, not just the metric functions.
#[test]
fn score_columns_equal_the_python_packages_on_the_benchmark_pairs() {
    let dir = temp_dir("score-golden");
    let strings = golden("scores.json");
    let bleu = golden("bleu.json");
    let pairs = strings["pairs"].as_array().unwrap();
    let mut bytes = Vec::new();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        writer
            .write_record(["Proverb", "Reference_Explanation", "Generated_Explanation"])
            .unwrap();
        for pair in pairs {
            writer
                .write_record([
                    "-",
                    pair["reference"].as_str().unwrap(),
                    pair["hypothesis"].as_str().unwrap(),
                ])
                .unwrap();
        }
    }
    let pred = write(&dir, "pairs.csv", bytes);
    let (_, out, summary) = score_ok(
        &dir,
        &pred,
        &["--metrics", "bleu,bleu-intl,nltk-bleu,rouge,chrf++"],
    );
    let (headers, rows) = read_csv(&out);
    assert_eq!(rows.len(), pairs.len());
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut compared = 0;
    for (index, (row, pair)) in rows.iter().zip(pairs).enumerate() {
        let bleu_pair = &bleu["pairs"][index];
        assert_eq!(bleu_pair["hypothesis"], pair["hypothesis"]);
        let mut expected = vec![
            ("chrf++".to_string(), pair["chrf++"].as_f64().unwrap()),
            ("bleu".to_string(), bleu_pair["bleu_13a"].as_f64().unwrap()),
            (
                "bleu_intl".to_string(),
                bleu_pair["bleu_intl"].as_f64().unwrap(),
            ),
            (
                "nltk_bleu".to_string(),
                bleu_pair["nltk_bleu"].as_f64().unwrap(),
            ),
        ];
        for (variant, key) in [
            ("rouge1", "rouge-1"),
            ("rouge2", "rouge-2"),
            ("rougeL", "rouge-l"),
        ] {
            for stat in ["f", "p", "r"] {
                // The rouge package raises on an empty text; amthal scores 0.
                let value = pair["rouge"][key][stat].as_f64().unwrap_or(0.0);
                expected.push((format!("{variant}_{stat}"), value));
            }
        }
        for (name, theirs) in expected {
            let ours: f64 = row[column(&name)].parse().unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-9,
                "{name} of {} row {}: {ours} vs {theirs}",
                pair["kind"],
                pair["row"]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, pairs.len() * 13);
    let summary: serde_json::Value = read_json(&summary);
    let corpus = summary_line(&summary, "chrf++")["corpus"].as_f64().unwrap();
    assert!((corpus - strings["corpus"]["chrf++"].as_f64().unwrap()).abs() <= 1e-9);
}

/// The embedding metrics through the command: BERTScore (all-MiniLM-L6-v2's encoder at
/// layer 4) and sentence-transformers cosine with two models in one run (MiniLM and a
/// tiny cls-pooling folder) on the golden pairs equal bert_score and
/// sentence_transformers within 1e-5; the row without a reference is left blank.
#[test]
fn embedding_columns_equal_bert_score_and_sentence_transformers() {
    let dir = temp_dir("score-embeddings");
    let golden = golden("embeddings.json");
    assert_eq!(golden["settings"]["minilm_l4"]["num_layers"], 4);
    assert!(golden["settings"]["minilm_l4"]["idf"] != true);
    let pairs = golden["pairs"].as_array().unwrap();
    let mut bytes = Vec::new();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        writer
            .write_record(["Reference_Explanation", "prediction"])
            .unwrap();
        for pair in pairs {
            writer
                .write_record([
                    pair["reference"].as_str().unwrap(),
                    pair["hypothesis"].as_str().unwrap(),
                ])
                .unwrap();
        }
    }
    let pred = write(&dir, "pairs.csv", bytes);
    let minilm = minilm();
    let (_, out, summary) = score_ok(
        &dir,
        &pred,
        &[
            "--metrics",
            "bertscore,cosine",
            "--bertscore-model",
            minilm.to_str().unwrap(),
            "--bertscore-layer",
            "4",
            "--embedding-model",
            minilm.to_str().unwrap(),
            "--embedding-model",
            fixture("tiny-st-cls").to_str().unwrap(),
            "--device",
            "cpu",
        ],
    );
    let (headers, rows) = read_csv(&out);
    let column = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut compared = 0;
    for (index, (row, pair)) in rows.iter().zip(pairs).enumerate() {
        if pair["reference"].as_str().unwrap().trim().is_empty() {
            assert_eq!(row[column("bertscore_f")], "");
            assert_eq!(row[column("cosine_all-MiniLM-L6-v2")], "");
            continue;
        }
        let expected = &golden["bertscore"]["minilm_l4"][index];
        for (name, theirs) in [
            ("bertscore_p", &expected["p"]),
            ("bertscore_r", &expected["r"]),
            ("bertscore_f", &expected["f"]),
            ("cosine_all-MiniLM-L6-v2", &golden["sas"]["minilm"][index]),
            ("cosine_tiny-st-cls", &golden["sas"]["tiny_st_cls"][index]),
        ] {
            let ours: f64 = row[column(name)].parse().unwrap();
            let theirs = theirs.as_f64().unwrap();
            assert!(
                (ours - theirs).abs() <= 1e-5,
                "{name} of {} (pair {index}): {ours} vs {theirs}",
                pair["kind"]
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 5 * (pairs.len() - 1));
    let summary: serde_json::Value = read_json(&summary);
    let models = summary["models"].as_array().unwrap();
    assert_eq!(models.len(), 3, "{models:?}");
    assert_eq!(models[0]["column"], "bertscore");
    assert_eq!(models[0]["layer"], 4, "the layer actually used is recorded");
}

/// Outputs for an unlabelled test set: no reference column. Nothing can be scored
/// against a reference, but the task checks still run and every row is reported.
#[test]
fn a_file_without_references_gets_the_task_checks_only() {
    let dir = temp_dir("score-no-reference");
    let pred = write(
        &dir,
        "unlabelled.csv",
        "Proverb,Generated_Explanation\nمثل,The proverb means\nمثل آخر,يضرب لمن\n",
    );
    let (output, _, summary) = score_ok(&dir, &pred, &[]);
    assert!(
        stderr(&output).contains("no reference column"),
        "{}",
        stderr(&output)
    );
    let summary: serde_json::Value = read_json(&summary);
    assert_eq!(summary["scored_rows"], 0);
    assert_eq!(summary["unscored_rows"], serde_json::json!([1, 2]));
    assert_eq!(summary["summary"], serde_json::json!([]));
    assert_eq!(summary["checks"]["with_latin"], 1);
}
