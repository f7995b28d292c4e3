//! Data-parallel training over c10d's Gloo process group, two workers on the loopback
//! address (`amthal train --nproc-per-node 2`): after a few steps the adapter and the
//! fully fine-tuned weights equal one process's with the same global batch (also with
//! gradient checkpointing, where the sums overlap the backward pass, and with
//! `--cuda-graphs`' fixed-width step, and with the update inside the backward pass); a worker
//! killed mid-run stops the run with a message naming it; the checkpoint it left
//! resumes in a single process and ends where an uninterrupted run ends.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use tch::Tensor;

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let data = repo_root().join("examples/data");
    let mut args: Vec<String> = [
        "train",
        "--model",
        fixture("tiny-llama").to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--batch-size",
        "1",
        "--cutoff-len",
        "256",
        "--device",
        "cpu",
        "--precision",
        "f32",
        "--previews",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run(out: &Path, extra: &[&str]) {
    run_args(out, train_args(out, extra));
}

fn run_args(out: &Path, args: Vec<String>) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = amthal(&refs);
    assert!(
        output.status.success(),
        "{}: {args:?}: {}",
        out.display(),
        stderr(&output)
    );
}

fn weights(file: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .into_iter()
        .collect()
}

/// The training losses a run logged (rank 0's `log.jsonl`), step by step.
fn logged_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// Largest absolute difference over every tensor of two safetensors files.
fn max_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, x)| (x - &b[name]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

#[test]
fn two_gloo_workers_train_what_one_process_trains() {
    let dir = temp_dir("dp-equal");
    for (mode, flags, file) in [
        (
            "lora",
            &["--lora", "--lora-dropout", "0.1", "--lr", "1e-3"][..],
            "adapter_model.safetensors",
        ),
        ("full", &["--lr", "1e-3"][..], "model.safetensors"),
        // Gradient checkpointing: each layer's sum starts while the layers below are
        // still in their backward pass (src/train/rank_sums.rs).
        (
            "lora-checkpointed",
            &[
                "--lora",
                "--lora-dropout",
                "0.1",
                "--lr",
                "1e-3",
                "--gradient-checkpointing",
            ][..],
            "adapter_model.safetensors",
        ),
        (
            "full-checkpointed",
            &["--lr", "1e-3", "--gradient-checkpointing"][..],
            "model.safetensors",
        ),
        // --cuda-graphs' fixed-width step (no graph on the CPU): the sums follow the
        // window, and dropout's seeds the global micro-batch position.
        (
            "lora-graphs",
            &[
                "--lora",
                "--lora-dropout",
                "0.1",
                "--lr",
                "1e-3",
                "--cuda-graphs",
            ][..],
            "adapter_model.safetensors",
        ),
        (
            "full-graphs-checkpointed",
            &["--lr", "1e-3", "--cuda-graphs", "--gradient-checkpointing"][..],
            "model.safetensors",
        ),
        // The update inside the backward pass: each stage's gradients summed across
        // the ranks before its tensors are updated; clipped (two passes, each summing)
        // and unclipped (one pass).
        (
            "full-in-backward",
            &["--lr", "1e-3", "--optim-in-backward"][..],
            "model.safetensors",
        ),
        (
            "lora-in-backward-unclipped",
            &[
                "--lora",
                "--lora-dropout",
                "0.1",
                "--lr",
                "1e-3",
                "--optim-in-backward",
                "--max-grad-norm",
                "0",
            ][..],
            "adapter_model.safetensors",
        ),
    ] {
        let common = [
            flags,
            &[
                "--max-steps",
                "3",
                "--eval-strategy",
                "steps",
                "--eval-steps",
                "3",
            ][..],
        ]
        .concat();
        let single = dir.join(format!("{mode}-single"));
        run(&single, &[&common[..], &["--grad-accum", "4"]].concat());
        let two = dir.join(format!("{mode}-two"));
        run(
            &two,
            &[&common[..], &["--grad-accum", "2", "--nproc-per-node", "2"]].concat(),
        );
        let difference = max_difference(&single.join(file), &two.join(file));
        eprintln!("{mode}: 2 workers vs 1 process, max abs weight difference {difference:e}");
        assert!(difference <= 1e-6, "{mode}: {difference:e}");
        // Rank 0 wrote the log; its losses are the single process's.
        let (a, b) = (logged_losses(&single), logged_losses(&two));
        assert_eq!(a.len(), 3);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "{mode}: loss {x} vs {y}");
        }
        // The evaluation, split across the ranks, gives the single process's loss.
        let eval = |d: &Path| -> f64 {
            let summary: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(d.join("train_summary.json")).unwrap(),
            )
            .unwrap();
            summary["final_eval_loss"].as_f64().unwrap()
        };
        let (x, y) = (eval(&single), eval(&two));
        assert!(
            (x - y).abs() <= 1e-6 * x.abs(),
            "{mode}: eval loss {x} vs {y}"
        );
    }
}

/// Today's training options across ranks: a PiSSA start (each rank decomposes its own
/// copy of the weights, the same on one kind of device), label smoothing, prompts
/// trained and reduce_lr_on_plateau (stepped with the eval loss the ranks split and
/// sum) give one process's losses, rates and adapter. The adapter's entries are of
/// order 1 (PiSSA's square-rooted singular values) and each AdamW step moves them by up
/// to the rate, 1e-2, so its bound is 5e-5 (0.5 % of one step): the ranks' sums in
/// another order, 2e-6 to 6e-6 measured.
#[test]
fn two_gloo_workers_train_pissa_with_smoothing_and_a_plateau_as_one_process() {
    let dir = temp_dir("dp-pissa");
    let common = [
        "--lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0",
        "--init-lora-weights",
        "pissa",
        "--label-smoothing-factor",
        "0.1",
        "--train-on-inputs",
        "--lr-scheduler",
        "reduce_lr_on_plateau",
        "--lr-scheduler-kwargs",
        r#"{"patience": 0, "factor": 0.5, "threshold": 10}"#,
        "--lr",
        "1e-2",
        "--max-steps",
        "4",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "1",
    ];
    let single = dir.join("single");
    run(&single, &[&common[..], &["--grad-accum", "4"]].concat());
    let two = dir.join("two");
    run(
        &two,
        &[&common[..], &["--grad-accum", "2", "--nproc-per-node", "2"]].concat(),
    );
    let (a, b) = (logged_losses(&single), logged_losses(&two));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "loss {x} vs {y}");
    }
    let rates = |out: &Path| -> Vec<f64> {
        std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["learning_rate"].as_f64())
            .collect()
    };
    assert_eq!(rates(&single), rates(&two));
    assert!(rates(&single)[3] < 1e-2, "the plateau lowered the rate");
    let file = "adapter_model.safetensors";
    let difference = max_difference(&single.join(file), &two.join(file));
    eprintln!("pissa: 2 workers vs 1 process, max abs adapter difference {difference:e}");
    assert!(difference <= 5e-5, "{difference:e}");
}

/// `--optim-in-backward` when a short last window leaves a rank without a micro-batch:
/// 40 rows in micro-batches of 6 make 7, so the 4th step's window of 2 holds one, and
/// rank 1 runs it at weight 0 (its gradients and loss count for nothing).
#[test]
fn a_rank_without_a_micro_batch_adds_nothing_inside_the_backward_pass() {
    let dir = temp_dir("dp-in-backward-short");
    // Unclipped: clipping would hide a doubled gradient in a step whose norm is over 1.
    let common = [
        "--lr",
        "1e-3",
        "--optim-in-backward",
        "--max-grad-norm",
        "0",
        "--epochs",
        "1",
        "--eval-strategy",
        "no",
    ];
    // train_args' batch size is 1: micro-batches of 6 here.
    let with_batch_of_6 = |out: &Path, extra: &[&str]| {
        let mut args = train_args(out, &[&common[..], extra].concat());
        let at = args.iter().position(|a| a == "--batch-size").unwrap();
        args[at + 1] = "6".into();
        run_args(out, args);
    };
    let single = dir.join("single");
    with_batch_of_6(&single, &["--grad-accum", "2"]);
    let two = dir.join("two");
    with_batch_of_6(&two, &["--grad-accum", "1", "--nproc-per-node", "2"]);
    let (a, b) = (logged_losses(&single), logged_losses(&two));
    assert_eq!(a.len(), 4, "7 micro-batches in windows of 2");
    assert_eq!(b.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-6 * x.abs(), "loss {x} vs {y}");
    }
    let difference = max_difference(
        &single.join("model.safetensors"),
        &two.join("model.safetensors"),
    );
    assert!(difference <= 1e-6, "{difference:e}");
}

/// The environment of a running process (Linux), to tell the workers apart.
fn environ(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
        .unwrap_or_default()
}

fn children(pid: u32) -> Vec<u32> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
        return Vec::new();
    };
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_killed_worker_stops_the_run_and_its_checkpoint_resumes_in_one_process() {
    let dir = temp_dir("dp-kill");
    let flags = [
        "--lora",
        "--lora-dropout",
        "0",
        "--lr",
        "1e-2",
        "--max-steps",
        "30",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "2",
    ];
    let killed = dir.join("killed");
    let args = train_args(
        &killed,
        &[&flags[..], &["--grad-accum", "1", "--nproc-per-node", "2"]].concat(),
    );
    let launcher = Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first checkpoint is there, kill rank 1.
    let mut victim = None;
    for _ in 0..6000 {
        if killed.join("checkpoint-2/trainer_state.json").exists() {
            victim = children(launcher.id())
                .into_iter()
                .find(|&pid| environ(pid).lines().any(|l| l == "RANK=1"));
            if victim.is_some() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let victim = victim.expect("rank 1 running after checkpoint-2");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let output = launcher.wait_with_output().unwrap();
    let message = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "the run should fail");
    assert!(
        message.contains("worker rank 1 was killed by a signal"),
        "{message}"
    );
    assert!(!killed.join("train_summary.json").exists());
    // One process resumes the two workers' checkpoint (2 x 1 accumulation = 2) and ends
    // where an uninterrupted single process ends.
    run(
        &killed,
        &[&flags[..], &["--grad-accum", "2", "--resume"]].concat(),
    );
    let whole = dir.join("whole");
    run(&whole, &[&flags[..], &["--grad-accum", "2"]].concat());
    let difference = max_difference(
        &whole.join("adapter_model.safetensors"),
        &killed.join("adapter_model.safetensors"),
    );
    assert!(difference <= 1e-6, "{difference:e}");
}

/// `--zero 1`: each rank keeps the optimizer state of about half the tensors; the
/// weights still equal one process's, the checkpoint holds one shard per rank (which
/// together are the single process's state), and one process resumes from them.
#[test]
fn zero_1_shards_the_optimizer_state_and_trains_what_one_process_trains() {
    let dir = temp_dir("dp-zero");
    let flags = [
        "--lr",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "2",
    ];
    let zero = dir.join("zero");
    run(
        &zero,
        &[
            &flags[..],
            &[
                "--max-steps",
                "2",
                "--grad-accum",
                "1",
                "--nproc-per-node",
                "2",
                "--zero",
                "1",
            ],
        ]
        .concat(),
    );
    let single = dir.join("single");
    run(
        &single,
        &[&flags[..], &["--max-steps", "4", "--grad-accum", "2"]].concat(),
    );
    let checkpoint = zero.join("checkpoint-2");
    assert!(!checkpoint.join("optimizer.safetensors").exists());
    let shards: Vec<HashMap<String, Tensor>> = (0..2)
        .map(|rank| weights(&checkpoint.join(format!("optimizer-{rank}-of-2.safetensors"))))
        .collect();
    let reference = weights(&single.join("checkpoint-2/optimizer.safetensors"));
    assert!(!shards[0].is_empty() && !shards[1].is_empty());
    // Every shard holds the optimizer's step count; the rest is split between them.
    let step = |state: &HashMap<String, Tensor>| state["optimizer_step"].int64_value(&[]);
    assert!(shards.iter().all(|shard| step(shard) == step(&reference)));
    assert_eq!(shards[0].len() + shards[1].len() - 1, reference.len());
    for (name, value) in shards.iter().flatten() {
        let difference = (value - &reference[name]).abs().max().double_value(&[]);
        assert!(difference <= 1e-6, "{name}: {difference:e}");
    }
    let difference = max_difference(
        &checkpoint.join("model.safetensors"),
        &single.join("checkpoint-2/model.safetensors"),
    );
    assert!(difference <= 1e-6, "after 2 steps: {difference:e}");
    // One process resumes the two shards and ends where the single run ends.
    run(
        &zero,
        &[
            &flags[..],
            &["--max-steps", "4", "--grad-accum", "2", "--resume"],
        ]
        .concat(),
    );
    let difference = max_difference(
        &zero.join("model.safetensors"),
        &single.join("model.safetensors"),
    );
    assert!(difference <= 1e-6, "after resuming: {difference:e}");
}

/// Workers started by another launcher (torchrun's variables set by hand here, no
/// --nproc-per-node) join the same way and train what one process trains; with
/// WORLD_SIZE=1 (`torchrun --nproc-per-node 1`) a group of one trains exactly that.
#[test]
fn workers_started_with_torchrun_variables_join_the_group() {
    let dir = temp_dir("dp-torchrun");
    let flags = [
        "--lora",
        "--lr",
        "1e-3",
        "--max-steps",
        "2",
        "--eval-strategy",
        "no",
    ];
    let single = dir.join("single");
    run(&single, &[&flags[..], &["--grad-accum", "2"]].concat());
    for world in [2usize, 1] {
        let out = dir.join(format!("world-{world}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let accumulation = (2 / world).to_string();
        let args = train_args(
            &out,
            &[&flags[..], &["--grad-accum", accumulation.as_str()]].concat(),
        );
        let workers: Vec<_> = (0..world)
            .map(|rank| {
                Command::new(env!("CARGO_BIN_EXE_amthal"))
                    .args(&args)
                    .env("RANK", rank.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let outputs: Vec<_> = workers
            .into_iter()
            .map(|w| w.wait_with_output().unwrap())
            .collect();
        for (rank, output) in outputs.iter().enumerate() {
            assert!(
                output.status.success(),
                "world {world}, rank {rank}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        // Only rank 0 reports.
        assert!(String::from_utf8_lossy(&outputs[0].stdout).contains("training done"));
        for output in &outputs[1..] {
            assert!(!String::from_utf8_lossy(&output.stdout).contains("training done"));
        }
        let config = std::fs::read_to_string(out.join("training_config.toml")).unwrap();
        assert!(
            config.contains(&format!("world_size = {world}")),
            "{config}"
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
                .unwrap();
        // On the CPU, --dist-backend auto is Gloo.
        assert_eq!(
            summary["data_parallel"],
            serde_json::json!({"world_size": world, "backend": "gloo"})
        );
        let difference = max_difference(
            &single.join("adapter_model.safetensors"),
            &out.join("adapter_model.safetensors"),
        );
        // A group of one sums nothing: the same numbers as the plain run.
        let limit = if world == 1 { 0.0 } else { 1e-6 };
        assert!(difference <= limit, "world {world}: {difference:e}");
    }
}

#[test]
fn what_data_parallelism_cannot_do_yet_is_refused() {
    let dir = temp_dir("dp-refused");
    for (extra, message) in [
        (&["--zero", "2"][..], "only stage 1"),
        (&["--optim-in-backward", "--zero", "1"][..], "choose one"),
        (&["--dist-backend", "nccl"][..], "sums CUDA tensors"),
    ] {
        let out = dir.join("run");
        let args = train_args(
            &out,
            &[extra, &["--max-steps", "1", "--nproc-per-node", "2"]].concat(),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = amthal(&refs);
        assert_refused(&output, &format!("{extra:?}"), message);
        assert!(!out.exists(), "{extra:?} left an output folder");
    }
}
