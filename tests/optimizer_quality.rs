//! `--optim adamw-bf16` and `adamw-8bit` train as well as f32 `adamw`: 50 full
//! fine-tune steps of SmolLM2-135M in bf16 (the default model, the benchmark's Train
//! and Validation splits from `data/`, batch 4, answers cut at 96 tokens, lr 5e-5) end
//! with an eval loss within 1 % of adamw's.
//!
//! Why this setup and not batch 1 on the 40-row sample data (the check's first form):
//! there the check could not see 1 %. A 0.2 % change of the learning rate moved f32
//! `adamw`'s own result by -0.8 to +1.4 % (2-core Xeon, seeds 42 and 0), because 50
//! single-row steps over 40 rows memorize them and tiny differences grow; the same
//! optimizer passed or failed by machine. Batches of 4 from the 333-row split, scored
//! on its validation rows, take that spread to +0.3 / +0.5 % (README, "Training").
//! Slow on a 2-core CPU (the 8-bit quantization runs over every parameter each step;
//! about 12 minutes for the three runs); the 8-bit state is meant for GPUs.

mod common;

use std::process::Command;

use common::*;

fn final_eval_loss(optim: &str) -> f64 {
    let out = temp_dir(&format!("quality-{optim}"));
    let data = repo_root().join("data");
    let output = Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args([
            "train",
            "--model",
            smollm2().to_str().unwrap(),
            "--optim",
            optim,
        ])
        .args(["--data-dir", data.to_str().unwrap(), "--output-dir"])
        .arg(out.join("run"))
        .args(["--lr", "5e-5", "--max-steps", "50", "--batch-size", "4"])
        .args([
            "--grad-accum",
            "1",
            "--cutoff-len",
            "96",
            "--precision",
            "bf16",
        ])
        .args([
            "--device",
            "cpu",
            "--previews",
            "0",
            "--eval-strategy",
            "steps",
        ])
        .args(["--eval-steps", "50", "--save-total-limit", "1"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{optim}: {}", stderr(&output));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run/train_summary.json")).unwrap())
            .unwrap();
    summary["final_eval_loss"].as_f64().unwrap()
}

#[test]
fn bf16_and_8bit_optimizers_reach_the_f32_eval_loss_within_1_percent() {
    let reference = final_eval_loss("adamw");
    // Both runs before judging either, so a failure reports both.
    let results: Vec<(&str, f64)> = ["adamw-bf16", "adamw-8bit"]
        .into_iter()
        .map(|optim| (optim, final_eval_loss(optim)))
        .collect();
    for (optim, loss) in &results {
        let relative = (loss - reference) / reference;
        eprintln!(
            "{optim}: eval loss {loss:.6} vs adamw {reference:.6} ({:+.2} %)",
            relative * 100.0
        );
    }
    for (optim, loss) in results {
        let relative = (loss - reference).abs() / reference;
        assert!(
            relative <= 0.01,
            "{optim}: eval loss {loss} vs adamw {reference}: {:.2} % apart",
            relative * 100.0
        );
    }
}
