//! The README's main job, end to end on the tiny random model (fast): zero-shot
//! explanations, a short LoRA fine-tune, explanations again, losses, summary.

mod common;

use common::*;

#[test]
fn demo_runs_the_whole_loop() {
    let out = temp_dir("demo").join("demo");
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
    assert!(stdout(&output).contains("| proverb | reference | zero-shot | fine-tuned |"));
    let table_lines = stdout(&output)
        .lines()
        .filter(|l| l.starts_with('|'))
        .count();
    assert_eq!(table_lines, 2 + 5, "header, rule and five rows");
}
