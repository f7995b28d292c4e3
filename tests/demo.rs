//! The README's main job, end to end on the tiny random model (fast): zero-shot
//! explanations, a short LoRA fine-tune, explanations again, losses, both runs scored,
//! the report and the summary.

mod common;

use common::*;

#[test]
fn demo_runs_the_whole_loop() {
    let scratch = temp_dir("demo");
    let out = scratch.join("demo");
    let output = amthal(&[
        "demo",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "4",
        "--max-new-tokens",
        "6",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    for file in [
        "zero_shot.csv",
        "fine_tuned.csv",
        "summary.json",
        "lora/adapter_model.safetensors",
        "lora/loss.svg",
        "report/report.md",
        "report/report.html",
        "report/charts/chrf_pp.svg",
        "report/charts/loss.png",
        "report/scores/zero-shot.scores.csv",
        "report/scores/fine-tuned.scores.csv",
    ] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let before = summary["validation_loss_zero_shot"].as_f64().unwrap();
    let after = summary["validation_loss_fine_tuned"].as_f64().unwrap();
    assert!(
        before.is_finite() && after.is_finite() && after != before,
        "{before} -> {after}"
    );
    let rows = amthal::predictions::read_predictions(&out.join("fine_tuned.csv")).unwrap();
    assert_eq!(rows.len(), 10, "every sample test row");
    let printed = stdout(&output);
    let samples: Vec<&str> = printed
        .lines()
        .skip_while(|l| !l.starts_with("| proverb | reference | zero-shot | fine-tuned |"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(
        samples.len(),
        2 + 5,
        "header, rule and five rows: {printed}"
    );
    // The scores of both runs: printed, in the summary and in the report.
    assert!(
        printed.contains("| metric | zero-shot | fine-tuned |"),
        "{printed}"
    );
    for (key, run) in [
        ("scores_zero_shot", "zero-shot"),
        ("scores_fine_tuned", "fine-tuned"),
    ] {
        let lines = summary[key].as_array().expect(key);
        let chrf = lines
            .iter()
            .find(|l| l["metric"] == "chrf++")
            .expect("chrf++");
        let value = chrf["corpus"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&value), "{run}: {value}");
        let printed_line = printed
            .lines()
            .find(|l| l.starts_with("| chrf++ |"))
            .unwrap();
        assert!(
            printed_line.contains(&format!("{value:.4}")),
            "{printed_line}"
        );
    }
    let report = std::fs::read_to_string(out.join("report/report.md")).unwrap();
    assert!(
        report.contains("| metric | zero-shot | fine-tuned |"),
        "{report}"
    );
    assert!(
        report.contains("charts/loss.svg"),
        "the training loss curve is in the report"
    );
}
