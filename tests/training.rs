//! Training on the tiny random Llama: overfitting reproduces the references, a run
//! killed with SIGKILL and resumed ends bit-identical to an uninterrupted one, LoRA
//! leaves the base untouched, accumulation equals a bigger batch, the best checkpoint
//! survives save_total_limit, NaN stops the run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use amthal::batch::Batch;
use amthal::encode::Encoded;
use amthal::model::lora::{load_adapter, named_adapter_tensors};
use amthal::model::{LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use amthal::train::micro_step;
use amthal::train::step::Draws;
use common::*;
use tch::{Device, Kind, Tensor};

fn tiny() -> String {
    fixture("tiny-llama").to_string_lossy().into_owned()
}

fn sample_data() -> String {
    repo_root()
        .join("examples/data")
        .to_string_lossy()
        .into_owned()
}

fn train_command(out: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_amthal"));
    command.args([
        "train",
        "--model",
        &tiny(),
        "--output-dir",
        out.to_str().unwrap(),
        "--precision",
        "f32",
        "--device",
        "cpu",
    ]);
    command.args(extra);
    command
}

fn run_train(out: &Path, extra: &[&str]) -> std::process::Output {
    train_command(out, extra).output().unwrap()
}

/// A LoRA run on the sample data, one micro-batch a step, no previews, with a test's
/// `settings` and then one run's `extra` flags.
fn run_lora(out: &Path, settings: &[&str], extra: &[&str]) -> std::process::Output {
    let data = sample_data();
    let mut args = vec![
        "--data-dir",
        &data,
        "--lora",
        "--grad-accum",
        "1",
        "--previews",
        "0",
    ];
    args.extend(settings);
    args.extend(extra);
    run_train(out, &args)
}

fn log_of(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut all = Tensor::read_safetensors(path).unwrap();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn overfitting_a_few_examples_reproduces_their_references() {
    let dir = temp_dir("overfit");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let csv = "Proverbs,Explanation\nالصبر مفتاح الفرج,يضرب في الحث على الصبر\nمن جد وجد,يقال لمن يجتهد فينال\nالجار قبل الدار,اختر جارك أولا\n";
    for split in ["Train_data.csv", "Validation_data.csv", "Test_data.csv"] {
        std::fs::write(data.join(split), csv).unwrap();
    }
    let out = dir.join("out");
    let output = run_train(
        &out,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--lr",
            "3e-3",
            "--max-steps",
            "150",
            "--bsz",
            "3",
            "--grad-accum",
            "1",
            "--eval-strategy",
            "no",
            "--prompt-format",
            "plain",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let last = log_of(&out).last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < 0.1, "loss {last}");
    // OUT is an HF folder: generate from it with the seed's evaluate command.
    let predictions = dir.join("p.csv");
    let output = amthal(&[
        "evaluate",
        "--checkpoint_dir",
        out.to_str().unwrap(),
        "--test_path",
        data.join("Test_data.csv").to_str().unwrap(),
        "--out_path",
        predictions.to_str().unwrap(),
        "--prompt-format",
        "plain",
        "--precision",
        "f32",
        "--max_new_tokens",
        "40",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    for row in amthal::predictions::read_predictions(&predictions).unwrap() {
        assert_eq!(row.generated, row.reference, "{}", row.proverb);
    }
    assert!(out.join("loss.svg").is_file() && out.join("loss.png").is_file());
    assert!(out.join("final").join("model.safetensors").is_file());
}

const RESUME_ARGS: [&str; 14] = [
    "--lora",
    "--lr",
    "2e-3",
    "--bsz",
    "1",
    "--grad-accum",
    "2",
    "--max-steps",
    "30",
    "--eval-strategy",
    "steps",
    "--eval-steps",
    "5",
    "--previews",
];

fn resume_args(data: &str) -> Vec<String> {
    let mut args: Vec<String> = RESUME_ARGS.iter().map(|s| s.to_string()).collect();
    args.extend(["0".to_string(), "--data-dir".to_string(), data.to_string()]);
    args
}

fn final_eval(out: &Path) -> f64 {
    log_of(out)
        .iter()
        .rev()
        .find_map(|e| e["eval_loss"].as_f64())
        .unwrap()
}

#[test]
fn a_sigkilled_run_resumes_to_the_same_result() {
    let dir = temp_dir("resume");
    let data = sample_data();
    let args = resume_args(&data);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let whole = dir.join("whole");
    let output = run_train(&whole, &args);
    assert!(output.status.success(), "{}", stderr(&output));

    let killed = dir.join("killed");
    let mut child = train_command(&killed, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("checkpoint-10").is_dir() {
        assert!(Instant::now() < deadline, "no checkpoint-10 appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "killed mid-run");
    assert!(!killed.join("checkpoint-30").exists());

    let mut resumed_args = args.clone();
    resumed_args.push("--resume");
    let output = run_train(&killed, &resumed_args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        final_eval(&killed),
        final_eval(&whole),
        "bit-identical final eval loss"
    );
    for ((name, a), (_, b)) in tensors(&whole.join("adapter_model.safetensors"))
        .iter()
        .zip(tensors(&killed.join("adapter_model.safetensors")).iter())
    {
        assert!(a.equal(b), "{name} differs");
    }
    // Resuming from a named checkpoint works too, and so does the state it recorded.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(killed.join("checkpoint-30/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], 30);
}

#[test]
fn lora_training_leaves_the_base_bit_identical_and_accumulation_equals_a_bigger_batch() {
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let fresh = load_llama(&source, LoadOptions::default()).unwrap();
    let mut model = load_llama(&source, LoadOptions::default()).unwrap();
    load_adapter(&mut model, &fixture("tiny-llama-adapter")).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let prompts =
        amthal::prompt::PromptBuilder::new(amthal::prompt::PromptFormat::Plain, &tokenizer)
            .unwrap();
    let encoder = amthal::encode::Encoder::new(&tokenizer, &prompts).unwrap();
    let examples = amthal::sample_data::sample_split(amthal::data::Split::Train)
        .unwrap()
        .examples;
    let (encoded, _) = encoder.encode_all(&examples[..4], None).unwrap();
    let tokens: i64 = encoded.iter().map(|e| e.trained_tokens() as i64).sum();

    let gradients = |batches: Vec<Vec<&Encoded>>| -> (f64, Vec<Tensor>) {
        for (_, t) in named_adapter_tensors(&model) {
            let mut t = t.shallow_clone();
            t.zero_grad();
        }
        let mut total = 0.0;
        for (i, rows) in batches.iter().enumerate() {
            let batch = Batch::from_encoded(rows, Device::Cpu);
            total += micro_step(
                &model,
                &batch,
                1.0 / tokens as f64,
                Draws::new(1, i as u64),
                false,
                false,
            )
            .unwrap();
        }
        let grads = named_adapter_tensors(&model)
            .iter()
            .map(|(_, t)| t.grad().copy())
            .collect();
        (total / tokens as f64, grads)
    };
    let rows: Vec<&Encoded> = encoded.iter().collect();
    let (loss_one_batch, grads_one_batch) = gradients(vec![rows.clone()]);
    let (loss_accumulated, grads_accumulated) = gradients(rows.iter().map(|r| vec![*r]).collect());
    assert!(
        (loss_one_batch - loss_accumulated).abs() < 1e-5,
        "{loss_one_batch} vs {loss_accumulated}"
    );
    for (a, b) in grads_one_batch.iter().zip(&grads_accumulated) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "gradient difference {diff}");
        assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
    // An optimizer step changes the adapter and leaves every base tensor bit-identical.
    let mut optimizer = amthal::train::optim::AdamW::new(
        named_adapter_tensors(&model)
            .into_iter()
            .map(|(n, t)| (n, t.shallow_clone(), true))
            .collect(),
        0.01,
    );
    let before: Vec<Tensor> = named_adapter_tensors(&model)
        .iter()
        .map(|(_, t)| t.copy())
        .collect();
    optimizer.step(1e-2);
    let after: Vec<Tensor> = named_adapter_tensors(&model)
        .iter()
        .map(|(_, t)| t.copy())
        .collect();
    assert!(before.iter().zip(&after).any(|(a, b)| !a.equal(b)));
    for ((name, a), (_, b)) in model
        .named_tensors()
        .iter()
        .zip(fresh.named_tensors().iter())
    {
        assert!(a.equal(b), "base tensor {name} changed");
        assert!(!a.grad().defined(), "base tensor {name} got a gradient");
    }
}

#[test]
fn the_best_checkpoint_survives_save_total_limit() {
    let scratch = temp_dir("best");
    let out = scratch.join("out");
    let output = run_train(
        &out,
        &[
            "--data-dir",
            &sample_data(),
            "--lora",
            "--lr",
            "3e-2",
            "--bsz",
            "4",
            "--grad-accum",
            "1",
            "--max-steps",
            "8",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "1",
            "--save-total-limit",
            "1",
            "--previews",
            "1",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    let evals: Vec<(i64, f64)> = log_of(&out)
        .iter()
        .filter_map(|e| Some((e["step"].as_i64()?, e["eval_loss"].as_f64()?)))
        .collect();
    assert_eq!(evals.len(), 8);
    let (best_step, best) = evals.iter().fold(
        (0, f64::MAX),
        |acc, &(s, l)| if l < acc.1 { (s, l) } else { acc },
    );
    assert_eq!(state["best_metric"].as_f64().unwrap(), best);
    assert_eq!(state["best_step"].as_i64().unwrap(), best_step);
    let mut kept: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    kept.sort();
    let mut expected = vec![
        format!("checkpoint-{best_step}"),
        "checkpoint-8".to_string(),
    ];
    expected.sort();
    expected.dedup();
    assert_eq!(kept, expected);
    // OUT holds the best adapter.
    let best_dir = out.join(format!("checkpoint-{best_step}"));
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(best_dir.join("adapter_model.safetensors")).unwrap()
    );
    assert!(stdout(&output).contains("best eval loss"));
}

#[test]
fn a_diverging_run_stops_on_nan_and_names_the_last_good_checkpoint() {
    let scratch = temp_dir("nan");
    let out = scratch.join("out");
    let output = run_train(
        &out,
        &[
            "--data-dir",
            &sample_data(),
            "--lr",
            "1e12",
            "--max-grad-norm",
            "0",
            "--bsz",
            "4",
            "--grad-accum",
            "1",
            "--max-steps",
            "40",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "1",
            "--previews",
            "0",
        ],
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("the loss became"), "{message}");
    assert!(message.contains("checkpoint-"), "{message}");
}

#[test]
fn config_file_flags_and_refusing_to_mix_runs() {
    let dir = temp_dir("config");
    let config = dir.join("train.toml");
    std::fs::write(&config, format!("data_dir = \"{}\"\nlora = true\nlora_r = 4\nlr = 0.5\nmax_steps = 1\neval_strategy = \"no\"\nprevious = 0\n", sample_data())).unwrap();
    let out: PathBuf = dir.join("out");
    let output = run_train(&out, &["--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "unknown keys are named");
    assert!(stderr(&output).contains("previous"), "{}", stderr(&output));
    std::fs::write(&config, format!("data_dir = \"{}\"\nlora = true\nlora_r = 4\nlr = 0.5\nmax_steps = 1\neval_strategy = \"no\"\npreviews = 0\n", sample_data())).unwrap();
    let output = run_train(
        &out,
        &[
            "--config",
            config.to_str().unwrap(),
            "--lr",
            "1e-4",
            "--bsz",
            "3",
            "--data-order",
            "file",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let saved = std::fs::read_to_string(out.join("training_config.toml")).unwrap();
    assert!(
        saved.contains("lr = 0.0001")
            && saved.contains("lora_r = 4")
            && saved.contains("batch_size = 3")
            && saved.contains("data_order = \"file\""),
        "{saved}"
    );
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["r"], 4);
    // A second run into the same folder must say --resume (nothing is overwritten).
    let output = run_train(&out, &["--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--resume"), "{}", stderr(&output));
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let tokenizer = source.tokenizer().unwrap();
    let prompts =
        amthal::prompt::PromptBuilder::new(amthal::prompt::PromptFormat::Chat, &tokenizer).unwrap();
    let encoder = amthal::encode::Encoder::new(&tokenizer, &prompts).unwrap();
    let examples = amthal::sample_data::sample_split(amthal::data::Split::Train)
        .unwrap()
        .examples;
    let (encoded, _) = encoder.encode_all(&examples[..3], None).unwrap();
    let batch = Batch::from_encoded(&encoded.iter().collect::<Vec<_>>(), Device::Cpu);
    for full in [false, true] {
        let mut model = load_llama(&source, LoadOptions::default()).unwrap();
        if full {
            amthal::train::trainables::unfreeze_all(&model);
        } else {
            load_adapter(&mut model, &fixture("tiny-llama-adapter")).unwrap();
        }
        let trainable = |m: &amthal::model::Llama| -> Vec<(String, Tensor)> {
            if full {
                m.named_tensors()
                    .into_iter()
                    .map(|(n, t)| (n, t.shallow_clone()))
                    .collect()
            } else {
                named_adapter_tensors(m)
                    .into_iter()
                    .map(|(n, t)| (n, t.shallow_clone()))
                    .collect()
            }
        };
        let grads = |checkpointing: bool| -> (f64, Vec<(String, Tensor)>) {
            for (_, mut t) in trainable(&model) {
                t.zero_grad();
            }
            let loss =
                micro_step(&model, &batch, 0.01, Draws::new(3, 0), checkpointing, full).unwrap();
            (
                loss,
                trainable(&model)
                    .into_iter()
                    .map(|(n, t)| (n, t.grad().copy()))
                    .collect(),
            )
        };
        let (plain_loss, plain) = grads(false);
        let (checkpointed_loss, checkpointed) = grads(true);
        assert!((plain_loss - checkpointed_loss).abs() < 1e-6);
        for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "full={full} {name}: {diff}");
        }
        assert!(plain.iter().all(|(_, g)| g.defined()));
    }
}

/// The seed's --fp16: f16 compute with torch.amp.GradScaler's dynamic loss scaling.
/// A scale so large that every gradient overflows skips each step (the adapter's B
/// stays zero) and halves the scale; the default scale (65536) trains.
#[test]
fn fp16_loss_scaling_skips_overflowing_steps_and_halves_the_scale() {
    let dir = temp_dir("fp16");
    let data = sample_data();
    let run = |name: &str, extra: &[&str]| -> (Vec<serde_json::Value>, PathBuf) {
        let out = dir.join(name);
        // Not train_command: its --precision f32 would conflict with --fp16.
        let output = Command::new(env!("CARGO_BIN_EXE_amthal"))
            .args([
                "train",
                "--model",
                &tiny(),
                "--device",
                "cpu",
                "--fp16",
                "--lora",
            ])
            .args(["--output-dir", out.to_str().unwrap(), "--data-dir", &data])
            .args(["--lr", "1e-2", "--max-steps", "3", "--eval-strategy", "no"])
            .args(["--previews", "0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        (log_of(&out), out)
    };
    let (log, out) = run(
        "overflow",
        &["--loss-scale-init", "1267650600228229401496703205376"],
    ); // 2^100
    let scales: Vec<f64> = log
        .iter()
        .map(|e| e["loss_scale"].as_f64().unwrap())
        .collect();
    assert_eq!(scales, [2f64.powi(99), 2f64.powi(98), 2f64.powi(97)]);
    assert!(
        log.iter()
            .all(|e| e["step_skipped"] == true && e["grad_norm"].is_null())
    );
    let b_norm: f64 = tensors(&out.join("final/adapter_model.safetensors"))
        .iter()
        .filter(|(name, _)| name.contains("lora_B"))
        .map(|(_, t)| t.abs().sum(Kind::Double).double_value(&[]))
        .sum();
    assert_eq!(b_norm, 0.0, "no step was applied, so B is still zero");

    let (log, out) = run("default", &[]);
    assert!(
        log.iter()
            .all(|e| e["step_skipped"] == false && e["loss_scale"] == 65536.0)
    );
    let b_norm: f64 = tensors(&out.join("final/adapter_model.safetensors"))
        .iter()
        .filter(|(name, _)| name.contains("lora_B"))
        .map(|(_, t)| t.abs().sum(Kind::Double).double_value(&[]))
        .sum();
    assert!(b_norm > 0.0, "the default scale trains");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("checkpoint-3/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["loss_scaler"]["scale"], 65536.0);
    assert_eq!(state["loss_scaler"]["growth_tracker"], 3);
}

/// Runs `amthal train` on the tiny Llama (bf16, full fine-tune) and returns its output.
fn train_bf16(out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args([
            "train",
            "--model",
            &tiny(),
            "--device",
            "cpu",
            "--precision",
            "bf16",
        ])
        .args([
            "--output-dir",
            out.to_str().unwrap(),
            "--data-dir",
            &sample_data(),
        ])
        .args([
            "--lr",
            "1e-3",
            "--max-steps",
            "8",
            "--eval-strategy",
            "steps",
        ])
        .args(["--eval-steps", "4", "--previews", "0", "--batch-size", "2"])
        .args(extra)
        .output()
        .unwrap()
}

/// A new output folder holding a copy of `checkpoint` (to resume from it there).
fn copy_checkpoint(checkpoint: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let copy = Command::new("cp")
        .args(["-r", checkpoint.to_str().unwrap(), into.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(copy.success());
}

fn summary_of(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap()
}

/// adamw-bf16, adamw-8bit and adafactor save their state (bf16 or 8-bit moments,
/// Adafactor's factored second moment, Kahan compensation) in checkpoints: a run
/// resumed from checkpoint-4 ends bit-identical to the uninterrupted run, as `adamw`
/// does. Their checkpoints are smaller, in that order.
#[test]
fn smaller_optimizer_states_resume_exactly_and_save_less() {
    let dir = temp_dir("optimizers");
    let mut sizes = Vec::new();
    for optim in ["adamw", "adamw-bf16", "adamw-8bit", "adafactor"] {
        let whole = dir.join(format!("{optim}-whole"));
        let output = train_bf16(&whole, &["--optim", optim]);
        assert!(
            output.status.success(),
            "{optim}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let state = tensors(&whole.join("checkpoint-4/optimizer.safetensors"));
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        match optim {
            "adamw" => assert!(names.iter().any(|n| n.starts_with("master."))),
            "adamw-bf16" => assert!(names.iter().any(|n| n.starts_with("compensation."))),
            "adamw-8bit" => assert!(names.iter().any(|n| n.ends_with(".codes"))),
            _ => assert!(
                names.iter().any(|n| n.ends_with(".row"))
                    && !names.iter().any(|n| n.starts_with("exp_avg."))
            ),
        }
        sizes.push(
            std::fs::metadata(whole.join("checkpoint-4/optimizer.safetensors"))
                .unwrap()
                .len(),
        );
        // The disk check's estimate (from the shapes, before loading) is what the
        // checkpoint's files take, but for the safetensors headers.
        let estimated = &summary_of(&whole)["checkpoint_bytes_estimated"];
        for (file, estimate) in [
            ("model.safetensors", &estimated[0]),
            ("optimizer.safetensors", &estimated[1]),
        ] {
            let actual = std::fs::metadata(whole.join("checkpoint-4").join(file))
                .unwrap()
                .len() as f64;
            let estimate = estimate.as_f64().unwrap();
            assert!(
                (actual - estimate).abs() <= 0.03 * actual + 16384.0,
                "{optim} {file}: {actual} bytes, estimated {estimate}"
            );
        }

        let resumed = dir.join(format!("{optim}-resumed"));
        copy_checkpoint(&whole.join("checkpoint-4"), &resumed);
        let output = train_bf16(&resumed, &["--optim", optim, "--resume"]);
        assert!(
            output.status.success(),
            "{optim}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            summary_of(&resumed)["final_eval_loss"],
            summary_of(&whole)["final_eval_loss"],
            "{optim}: resumed and uninterrupted runs end with the same eval loss"
        );
        assert_eq!(
            std::fs::read(resumed.join("final/model.safetensors")).unwrap(),
            std::fs::read(whole.join("final/model.safetensors")).unwrap(),
            "{optim}: the same final weights"
        );
    }
    assert!(
        sizes.windows(2).all(|pair| pair[1] < pair[0]),
        "checkpoint sizes {sizes:?}"
    );
    // A checkpoint is resumed only with the optimizer it was saved with.
    let output = train_bf16(
        &dir.join("adamw-whole"),
        &["--optim", "adamw-8bit", "--resume"],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("optim"));
}

/// --async-checkpoint: the checkpoints written on another thread while training goes on
/// are byte for byte the synchronous ones (weights and optimizer state of the step they
/// were taken at), the run ends with the same model, and a run resumed from one ends
/// as the uninterrupted run does.
#[test]
fn async_checkpoints_equal_synchronous_ones_and_resume() {
    let dir = temp_dir("async-checkpoint");
    let (sync, background) = (dir.join("sync"), dir.join("async"));
    for (out, extra) in [(&sync, &[][..]), (&background, &["--async-checkpoint"][..])] {
        let output = train_bf16(out, extra);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    for file in [
        "checkpoint-4/model.safetensors",
        "checkpoint-4/optimizer.safetensors",
        "checkpoint-8/model.safetensors",
        "checkpoint-8/optimizer.safetensors",
        "final/model.safetensors",
    ] {
        assert_eq!(
            std::fs::read(background.join(file)).unwrap(),
            std::fs::read(sync.join(file)).unwrap(),
            "{file}"
        );
    }
    // No temp folder left behind; the summary times the background writes.
    let leftovers: Vec<_> = std::fs::read_dir(&background)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        summary_of(&background)["slowest_checkpoint_write_seconds"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(summary_of(&sync)["slowest_checkpoint_write_seconds"].is_null());

    let resumed = dir.join("resumed");
    copy_checkpoint(&background.join("checkpoint-4"), &resumed);
    let output = train_bf16(&resumed, &["--async-checkpoint", "--resume"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        std::fs::read(resumed.join("final/model.safetensors")).unwrap(),
        std::fs::read(sync.join("final/model.safetensors")).unwrap(),
    );
}

/// --save-only-model: checkpoints without optimizer state; resuming warns and starts
/// AdamW afresh instead of failing.
#[test]
fn save_only_model_skips_optimizer_state() {
    let dir = temp_dir("save-only-model");
    let out = dir.join("out");
    let output = train_bf16(&out, &["--save-only-model"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in [4, 8] {
        let checkpoint = out.join(format!("checkpoint-{step}"));
        assert!(checkpoint.join("model.safetensors").is_file());
        assert!(!checkpoint.join("optimizer.safetensors").exists());
    }
    std::fs::remove_dir_all(out.join("checkpoint-8")).unwrap();
    let output = train_bf16(&out, &["--save-only-model", "--resume"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("a fresh optimizer state"));
    // The disk check counts no optimizer state for these checkpoints.
    assert_eq!(summary_of(&out)["checkpoint_bytes_estimated"][1], 0);
}

/// `--save-strategy`: `steps` saves every --save-steps steps and at each new best eval
/// loss (so the published best exists), `no` writes only the final model (without
/// optimizer state), `best` needs evaluations.
#[test]
fn save_strategies_write_the_checkpoints_they_name() {
    let dir = temp_dir("save-strategy");
    let run = |name: &str, extra: &[&str]| -> (PathBuf, std::process::Output) {
        let out = dir.join(name);
        let output = run_lora(&out, &["--bsz", "4"], extra);
        (out, output)
    };
    let checkpoints = |out: &Path| -> Vec<i64> {
        let mut steps: Vec<i64> = std::fs::read_dir(out)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                name.strip_prefix("checkpoint-")?.parse().ok()
            })
            .collect();
        steps.sort();
        steps
    };
    let state_of = |out: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap()
    };

    let (steps, output) = run(
        "steps",
        &[
            "--save-strategy",
            "steps",
            "--save-steps",
            "3",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "2",
            "--max-steps",
            "7",
            "--lr",
            "3e-2",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    // Evaluations at 2, 4, 6 and 7; the ones that lowered the best loss are saved too.
    let mut best = f64::MAX;
    let mut expected = vec![3, 6, 7];
    for entry in log_of(&steps) {
        if let (Some(step), Some(loss)) = (entry["step"].as_i64(), entry["eval_loss"].as_f64())
            && loss < best
        {
            best = loss;
            expected.push(step);
        }
    }
    expected.sort();
    expected.dedup();
    assert_eq!(checkpoints(&steps), expected);
    let state = state_of(&steps);
    let best_step = state["best_step"].as_i64().unwrap();
    assert_eq!(
        state["best_model_checkpoint"].as_str().unwrap(),
        format!("checkpoint-{best_step}")
    );
    assert_eq!(
        std::fs::read(steps.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(steps.join(format!("checkpoint-{best_step}/adapter_model.safetensors")))
            .unwrap()
    );

    // A run whose best evaluation is not its last (a high rate, a short memory).
    let (no, output) = run(
        "no",
        &[
            "--save-strategy",
            "no",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "1",
            "--max-steps",
            "3",
            "--lr",
            "3e-1",
            "--adam-beta1",
            "0.5",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(checkpoints(&no), [3]);
    assert!(no.join("checkpoint-3/adapter_model.safetensors").is_file());
    assert!(!no.join("checkpoint-3/optimizer.safetensors").exists());
    // The published model is the final one; the best evaluation, never saved, is not
    // named as a checkpoint.
    let state = state_of(&no);
    assert_ne!(state["best_step"].as_i64(), Some(3), "{state}");
    assert!(state["best_model_checkpoint"].is_null(), "{state}");
    assert_eq!(
        std::fs::read(no.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(no.join("checkpoint-3/adapter_model.safetensors")).unwrap()
    );

    let (_, output) = run(
        "best-without-evaluations",
        &[
            "--save-strategy",
            "best",
            "--eval-strategy",
            "no",
            "--max-steps",
            "2",
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("--save-strategy best"),
        "{}",
        stderr(&output)
    );
}

/// HF's AdamW settings reach the optimizer (the defaults spelled out give the same
/// adapter bit for bit, another beta1 another one), a resume must keep them, and
/// `--load-best-model-at-end false` leaves the last model in OUT.
#[test]
fn adam_settings_and_load_best_model_at_end_reach_the_run() {
    let dir = temp_dir("adam-settings");
    let settings = ["--lr", "3e-1", "--bsz", "4", "--max-steps", "3"];
    let evaluations = ["--eval-strategy", "steps", "--eval-steps", "1"];
    let run = |name: &str, extra: &[&str]| -> (PathBuf, std::process::Output) {
        let out = dir.join(name);
        let extra = [&evaluations[..], extra].concat();
        let output = run_lora(&out, &settings, &extra);
        (out, output)
    };
    let adapter = |out: &Path| std::fs::read(out.join("final/adapter_model.safetensors")).unwrap();
    let (default, output) = run("default", &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let (spelled, output) = run(
        "spelled-out",
        &[
            "--adam_beta1",
            "0.9",
            "--adam_beta2",
            "0.999",
            "--adam_epsilon",
            "1e-8",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(adapter(&default), adapter(&spelled));
    let (other, output) = run(
        "other-beta",
        &["--adam-beta1", "0.5", "--load-best-model-at-end", "false"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert_ne!(adapter(&default), adapter(&other));
    for (name, flag, value) in [
        ("other-beta2", "--adam-beta2", "0.5"),
        ("other-epsilon", "--adam-epsilon", "1e-2"),
    ] {
        let (changed, output) = run(name, &[flag, value]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert_ne!(
            adapter(&default),
            adapter(&changed),
            "{flag} changed nothing"
        );
    }
    // OUT holds the last model, not the best one (this run's best is an earlier step).
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("trainer_state.json")).unwrap())
            .unwrap();
    let best_step = state["best_step"].as_i64().unwrap();
    assert_ne!(best_step, 3);
    assert_ne!(
        std::fs::read(other.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(other.join(format!("checkpoint-{best_step}/adapter_model.safetensors")))
            .unwrap()
    );
    assert_eq!(
        std::fs::read(other.join("adapter_model.safetensors")).unwrap(),
        adapter(&other)
    );
    // Resuming with other AdamW settings is refused.
    std::fs::remove_dir_all(other.join("checkpoint-3")).unwrap();
    let output = run_lora(&other, &settings, &["--resume"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("adam betas and epsilon"),
        "{}",
        stderr(&output)
    );
}

/// `--warmup-steps` and `--lr-scheduler` reach the loop (the logged rate of each step is
/// transformers': linear with 2 warmup steps of 4; constant never warms up), and so does
/// `--neftune-noise-alpha` (the same run with noise trains another adapter).
#[test]
fn warmup_schedules_and_neftune_reach_the_training_loop() {
    let dir = temp_dir("warmup");
    let settings = [
        "--lr",
        "1e-3",
        "--max-steps",
        "4",
        "--bsz",
        "2",
        "--eval-strategy",
        "no",
    ];
    let run = |name: &str, extra: &[&str]| -> std::path::PathBuf {
        let out = dir.join(name);
        let output = run_lora(&out, &settings, extra);
        assert!(output.status.success(), "{}", stderr(&output));
        out
    };
    let rates = |out: &Path| -> Vec<f64> {
        log_of(out)
            .iter()
            .filter_map(|entry| entry["learning_rate"].as_f64())
            .collect()
    };
    let linear = run("linear", &["--warmup-steps", "2"]);
    assert_eq!(rates(&linear), vec![0.0, 5e-4, 1e-3, 5e-4]);
    let constant = run(
        "constant",
        &["--warmup_steps", "2", "--lr_scheduler_type", "constant"],
    );
    assert_eq!(rates(&constant), vec![1e-3; 4]);
    let warm = run(
        "constant-with-warmup",
        &[
            "--warmup-steps",
            "0.5",
            "--lr-scheduler",
            "constant_with_warmup",
        ],
    );
    assert_eq!(rates(&warm), vec![0.0, 5e-4, 1e-3, 1e-3]);
    // A schedule with settings of its own: the loop's rates are the schedule's.
    let with_minimum = run(
        "cosine-with-min-lr",
        &[
            "--lr-scheduler",
            "cosine_with_min_lr",
            "--lr_scheduler_kwargs",
            r#"{"min_lr_rate": 0.5}"#,
        ],
    );
    let kwargs = amthal::train::lr_schedule::SchedulerKwargs {
        min_lr_rate: Some(0.5),
        ..Default::default()
    };
    let expected: Vec<f64> = (0..4)
        .map(|step| {
            amthal::train::lr_schedule::learning_rate(
                amthal::train::lr_schedule::Schedule::CosineWithMinLr,
                &kwargs,
                1e-3,
                step,
                0,
                4,
            )
        })
        .collect();
    // serde_json reads floats to within an ulp (its exact parser is a feature not
    // enabled here), so the comparison allows that much.
    let logged = rates(&with_minimum);
    assert_eq!(logged.len(), expected.len());
    for (a, b) in logged.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-15 * b, "{logged:?} vs {expected:?}");
    }
    assert!(expected[3] > 5e-4 && expected[3] < expected[1]);
    let noisy = run(
        "neftune",
        &["--warmup-steps", "2", "--neftune-noise-alpha", "5"],
    );
    let differs = tensors(&linear.join("adapter_model.safetensors"))
        .iter()
        .zip(tensors(&noisy.join("adapter_model.safetensors")).iter())
        .any(|((_, a), (_, b))| !a.equal(b));
    assert!(differs, "NEFTune changed nothing");
}

/// `--label-smoothing-factor` reaches the training loss, the evaluation loss and the
/// gradients, and a resume with another factor is refused. A label-smoothed loss is
/// (1 - e) x cross-entropy + e x the vocabulary's mean -log p, linear in e: with the
/// first step's rate 0 (warmup) every run scores the same model, so the logged losses
/// at e = 0.5 differ from e = 0's by 5 times those at e = 0.1. (The formula itself is
/// checked against transformers' LabelSmoother in tests/model_layer.rs.)
#[test]
fn label_smoothing_reaches_the_losses_and_the_gradients() {
    let dir = temp_dir("label-smoothing");
    let settings = [
        "--bsz",
        "2",
        "--max-steps",
        "1",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "1",
    ];
    let run = |name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let extra = [&["--warmup-steps", "5"][..], extra].concat();
        let output = run_lora(&out, &settings, &extra);
        assert!(output.status.success(), "{}", stderr(&output));
        out
    };
    let losses = |out: &Path| -> (f64, f64) {
        let log = log_of(out);
        let value = |key: &str| {
            log.iter()
                .find_map(|entry| entry[key].as_f64())
                .unwrap_or_else(|| panic!("no {key} in {log:?}"))
        };
        (value("loss"), value("eval_loss"))
    };
    let (plain_train, plain_eval) = losses(&run("plain", &[]));
    let tenth = run("tenth", &["--label-smoothing-factor", "0.1"]);
    let (tenth_train, tenth_eval) = losses(&tenth);
    let (half_train, half_eval) = losses(&run("half", &["--label_smoothing_factor", "0.5"]));
    for (what, plain, tenth, half) in [
        ("train loss", plain_train, tenth_train, half_train),
        ("eval loss", plain_eval, tenth_eval, half_eval),
    ] {
        let step = tenth - plain;
        assert!(step.abs() > 1e-4, "{what}: smoothing changed nothing");
        let ratio = (half - plain) / step;
        assert!((ratio - 5.0).abs() < 0.1, "{what}: {plain} {tenth} {half}");
    }
    // The gradients: one step at a real rate trains another adapter.
    let adapter = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let extra = [&["--lr", "1e-2"][..], extra].concat();
        let output = run_lora(&out, &settings, &extra);
        assert!(output.status.success(), "{}", stderr(&output));
        tensors(&out.join("adapter_model.safetensors"))
    };
    let differs = adapter("trained-plain", &[])
        .iter()
        .zip(adapter("trained-smoothed", &["--label-smoothing-factor", "0.5"]).iter())
        .any(|((_, a), (_, b))| !a.equal(b));
    assert!(differs, "label smoothing changed no gradient");
    // Resuming with another factor is refused: it changes what the losses mean.
    std::fs::remove_dir_all(tenth.join("final")).ok();
    let output = run_lora(&tenth, &settings, &["--warmup-steps", "5", "--resume"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("label_smoothing_factor"),
        "{}",
        stderr(&output)
    );
}

/// `--lr-scheduler reduce_lr_on_plateau` (HF's; torch's ReduceLROnPlateau stepped with
/// eval_loss after each evaluation): with an absolute threshold no later eval loss can
/// meet (the first always beats torch's infinite start), the rate halves after every
/// evaluation but the first, no warmup applies, a run resumed from
/// a checkpoint keeps the lowered rate (the same final adapter), and a run that never
/// evaluates is refused.
#[test]
fn reduce_lr_on_plateau_lowers_the_rate_after_evaluations_and_resumes() {
    metric_driven_schedule_runs_and_resumes(
        "reduce_lr_on_plateau",
        r#"{"patience": 0, "factor": 0.5, "threshold": 100, "threshold_mode": "abs"}"#,
        &[1e-3, 1e-3, 5e-4, 2.5e-4],
    );
}

/// `--lr-scheduler greedy` (transformers' GreedyLR, its arithmetic checked against
/// transformers in `greedy_lr.rs`) in a run: the first evaluation improves on the
/// infinite start and doubles the rate, the others (never better by 100) halve it; a
/// resumed run keeps the state and ends with the same adapter.
#[test]
fn greedy_schedule_follows_evaluations_and_resumes() {
    metric_driven_schedule_runs_and_resumes(
        "greedy",
        r#"{"patience": 0, "factor": 0.5, "threshold": 100, "min_lr": 1e-6}"#,
        &[1e-3, 2e-3, 1e-3, 5e-4],
    );
}

/// A schedule stepped by the eval loss, with an evaluation after every step: the rates
/// the log shows, a resume from checkpoint-2 that keeps them and ends on the same
/// adapter, and a run without evaluations refused.
fn metric_driven_schedule_runs_and_resumes(schedule: &str, kwargs: &str, expected: &[f64]) {
    let dir = temp_dir(schedule);
    let settings = [
        "--lr",
        "1e-3",
        "--bsz",
        "2",
        "--max-steps",
        "4",
        "--warmup-steps",
        "2",
        "--lr-scheduler",
        schedule,
        "--lr-scheduler-kwargs",
        kwargs,
    ];
    let evaluations = ["--eval-strategy", "steps", "--eval-steps", "1"];
    let whole = dir.join("whole");
    let output = run_lora(&whole, &settings, &evaluations);
    assert!(output.status.success(), "{}", stderr(&output));
    let rates: Vec<f64> = log_of(&whole)
        .iter()
        .filter_map(|entry| entry["learning_rate"].as_f64())
        .collect();
    assert_eq!(rates, expected);

    let resumed = dir.join("resumed");
    copy_checkpoint(&whole.join("checkpoint-2"), &resumed);
    let output = run_lora(
        &resumed,
        &settings,
        &[&evaluations[..], &["--resume"]].concat(),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let resumed_rates: Vec<f64> = log_of(&resumed)
        .iter()
        .filter_map(|entry| entry["learning_rate"].as_f64())
        .collect();
    // The log carries the checkpoint's history, then the steps after it.
    assert_eq!(resumed_rates, rates);
    assert_eq!(
        std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap(),
        std::fs::read(whole.join("final/adapter_model.safetensors")).unwrap()
    );

    let output = run_lora(&dir.join("never"), &settings, &["--eval-strategy", "no"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains(schedule), "{}", stderr(&output));
}

/// `--train-on-inputs` (axolotl's train_on_inputs) trains the prompt's tokens too: the
/// first step's trained tokens are those `amthal tokenize --train-on-inputs` labels for
/// its two rows (every token but the first), the losses change, and a resume without
/// the flag is refused.
#[test]
fn train_on_inputs_trains_the_prompt_tokens() {
    let dir = temp_dir("train-on-inputs");
    let settings = [
        "--bsz",
        "2",
        "--max-steps",
        "1",
        "--data-order",
        "file",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "1",
    ];
    let run = |name: &str, extra: &[&str]| -> (PathBuf, i64, f64) {
        let out = dir.join(name);
        let output = run_lora(&out, &settings, extra);
        assert!(output.status.success(), "{}", stderr(&output));
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        let eval_loss = log_of(&out)
            .iter()
            .find_map(|entry| entry["eval_loss"].as_f64())
            .unwrap();
        (out, state["trained_tokens"].as_i64().unwrap(), eval_loss)
    };
    let (_, answers_only, plain_eval) = run("answers", &[]);
    let (both, with_prompts, prompts_eval) = run("prompts", &["--train-on-inputs"]);
    let train_file = repo_root().join("examples/data/Train_data.csv");
    let output = amthal(&[
        "tokenize",
        "--model",
        &tiny(),
        "--data",
        train_file.to_str().unwrap(),
        "--jsonl",
        "--limit",
        "2",
        "--train-on-inputs",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let labelled: i64 = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            row["input_ids"].as_array().unwrap().len() as i64 - 1
        })
        .sum();
    assert_eq!(with_prompts, labelled);
    assert!(
        with_prompts > answers_only,
        "{with_prompts} vs {answers_only}"
    );
    assert_ne!(prompts_eval, plain_eval);
    std::fs::remove_dir_all(both.join("final")).ok();
    let output = run_lora(&both, &settings, &["--resume"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("train_on_inputs"),
        "{}",
        stderr(&output)
    );
}

/// `--init-lora-weights pissa|olora` (PEFT's residual initialisations): the adapter
/// saved in OUT is converted for the original base (rank 2r, alpha doubled), so
/// `amthal loss` with it on the original model gives the eval loss the run computed on
/// its residual model; a run resumed from a checkpoint (whose converted adapter holds
/// the initial factors) ends with the same adapter; DoRA and a quantized base are
/// refused. (The factors themselves are checked against PEFT in tests/model_layer.rs.)
#[test]
fn pissa_and_olora_adapters_are_saved_for_the_original_base_and_resume() {
    let dir = temp_dir("pissa-train");
    let validation = repo_root().join("examples/data/Validation_data.csv");
    for init in ["pissa", "olora", "pissa_niter_2"] {
        let settings = [
            "--lora-r",
            "4",
            "--lr",
            "1e-2",
            "--bsz",
            "2",
            "--max-steps",
            "3",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "1",
            "--load-best-model-at-end",
            "false",
            "--init-lora-weights",
            init,
        ];
        let whole = dir.join(init);
        let output = run_lora(&whole, &settings, &[]);
        assert!(output.status.success(), "{init}: {}", stderr(&output));
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(whole.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (config["r"].as_i64(), config["lora_alpha"].as_f64()),
            (Some(8), Some(64.0))
        );
        let output = amthal(&[
            "loss",
            "--model",
            &tiny(),
            "--adapter",
            whole.to_str().unwrap(),
            "--data",
            validation.to_str().unwrap(),
            "--precision",
            "f32",
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let scored: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
        let loss = scored["loss"].as_f64().unwrap();
        let last_eval = final_eval(&whole);
        assert!(
            ((loss - last_eval) / last_eval).abs() < 1e-6,
            "{init}: the original base with the saved adapter scores {loss}, the run {last_eval}"
        );

        let resumed = dir.join(format!("{init}-resumed"));
        copy_checkpoint(&whole.join("checkpoint-1"), &resumed);
        let output = run_lora(&resumed, &settings, &["--resume"]);
        assert!(output.status.success(), "{init}: {}", stderr(&output));
        // Bit-identical in 100 of 100 loops on a 2-core AVX-512 Xeon since amthal pins
        // MKL to its AVX2 kernels (`device::pin_mkl_code_path`; 96 of 100 before). The
        // bound stays because CI runs on other CPUs, where another threaded kernel
        // could round differently from process to process.
        let difference = tensors(&resumed.join("final/adapter_model.safetensors"))
            .iter()
            .zip(tensors(&whole.join("final/adapter_model.safetensors")).iter())
            .map(|((_, a), (_, b))| (a - b).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        eprintln!("{init}: resumed vs uninterrupted adapter, max abs difference {difference:e}");
        assert!(
            difference <= 1e-6,
            "{init}: the resumed run ends {difference:e} from the uninterrupted one"
        );
    }
    for (extra, expected) in [
        (&["--use-dora"][..], "--use-dora"),
        (&["--quantize", "nf4"][..], "--quantize"),
    ] {
        let flags = [
            &["--init-lora-weights", "pissa", "--max-steps", "1"][..],
            extra,
        ]
        .concat();
        let output = run_lora(&dir.join("refused"), &flags, &[]);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
    }
}

/// HF's eval_on_start, logging_first_step and data_seed: an evaluation logged at step 0
/// before anything trains, which neither becomes the best checkpoint nor steps
/// reduce_lr_on_plateau (at a rate too small to change the model every evaluation
/// gives the same loss, so the start's would be the best and would lower the rate at
/// step 2); the first step logged though --logging-steps is 3; and the data order
/// follows --data-seed, not --seed (the same first batch, by its input tokens, under
/// another --seed).
#[test]
fn eval_on_start_logging_first_step_and_data_seed_reach_the_run() {
    let dir = temp_dir("hf-conveniences");
    let out = dir.join("logged");
    let settings = [
        "--lr-scheduler",
        "reduce_lr_on_plateau",
        "--lr-scheduler-kwargs",
        r#"{"patience": 0, "factor": 0.5}"#,
        "--lr",
        "1e-30",
        "--bsz",
        "2",
        "--max-steps",
        "4",
        "--eval-strategy",
        "steps",
        "--eval-steps",
        "2",
        "--logging-steps",
        "3",
        "--data-order",
        "shuffled",
    ];
    let output = run_lora(
        &out,
        &settings,
        &["--eval_on_start", "--logging_first_step"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let log = log_of(&out);
    let evaluated: Vec<i64> = log
        .iter()
        .filter(|e| e["eval_loss"].is_number())
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(evaluated, vec![0, 2, 4]);
    assert!(
        log[0]["eval_loss"].is_number(),
        "the start's evaluation comes first"
    );
    let logged: Vec<i64> = log
        .iter()
        .filter(|e| e["loss"].is_number())
        .map(|e| e["step"].as_i64().unwrap())
        .collect();
    assert_eq!(logged, vec![1, 3, 4]);
    let losses: Vec<f64> = log.iter().filter_map(|e| e["eval_loss"].as_f64()).collect();
    assert!(losses.iter().all(|&l| l == losses[0]), "{losses:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["best_step"], 2);
    let rates: Vec<f64> = log
        .iter()
        .filter_map(|e| e["learning_rate"].as_f64())
        .collect();
    // (serde_json reads floats to within an ulp.)
    assert_eq!(rates.len(), 3);
    assert!(
        rates.iter().all(|r| (r - 1e-30).abs() < 1e-44),
        "the plateau's first evaluation is step 2's: {rates:?}"
    );

    let first_batch_tokens = |name: &str, seeds: &[&str]| -> i64 {
        let out = dir.join(name);
        let extra = [&["--max-steps", "1", "--eval-strategy", "no"][..], seeds].concat();
        let output = run_lora(&out, &["--bsz", "2", "--data-order", "shuffled"], &extra);
        assert!(output.status.success(), "{}", stderr(&output));
        log_of(&out)[0]["input_tokens"].as_i64().unwrap()
    };
    let a = first_batch_tokens("a", &["--seed", "1", "--data-seed", "5"]);
    let b = first_batch_tokens("b", &["--seed", "2", "--data-seed", "5"]);
    assert_eq!(a, b, "the same --data-seed, the same first batch");
    let others: Vec<i64> = ["6", "7", "8"]
        .iter()
        .map(|seed| first_batch_tokens(&format!("c{seed}"), &["--seed", "1", "--data_seed", seed]))
        .collect();
    assert!(others.iter().any(|&t| t != a), "{a} vs {others:?}");
    let refused = run_lora(
        &dir.join("refused"),
        &["--eval-on-start", "--eval-strategy", "no"],
        &[],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("--eval-on-start"),
        "{}",
        stderr(&refused)
    );
}

/// `--adapter-dir` (PEFT's is_trainable=True, axolotl's lora_model_dir) continues a
/// trained PEFT adapter: the run starts from it (its loss before the first step is
/// `amthal loss` with it), trains it, and saves it with its own r and alpha; an adapter
/// with per-module patterns and a new initialisation are refused.
#[test]
fn adapter_dir_continues_training_a_peft_adapter() {
    let dir = temp_dir("continue-adapter");
    let adapter = fixture("tiny-llama-adapter");
    let out = dir.join("continued");
    let data = sample_data();
    let output = run_train(
        &out,
        &[
            "--data-dir",
            &data,
            "--adapter-dir",
            adapter.to_str().unwrap(),
            "--lr",
            "1e-2",
            "--bsz",
            "2",
            "--grad-accum",
            "1",
            "--max-steps",
            "2",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "1",
            "--eval-on-start",
            "--previews",
            "0",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let validation = repo_root().join("examples/data/Validation_data.csv");
    let output = amthal(&[
        "loss",
        "--model",
        &tiny(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        validation.to_str().unwrap(),
        "--precision",
        "f32",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let scored: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    let start = log_of(&out)[0]["eval_loss"].as_f64().unwrap();
    let loss = scored["loss"].as_f64().unwrap();
    assert!(((start - loss) / loss).abs() < 1e-6, "{start} vs {loss}");
    assert!(
        final_eval(&out) < start,
        "training went on from the adapter"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (config["r"].as_i64(), config["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    let trained = tensors(&out.join("adapter_model.safetensors"));
    let original = tensors(&adapter.join("adapter_model.safetensors"));
    assert_eq!(trained.len(), original.len());
    assert!(
        trained
            .iter()
            .zip(&original)
            .any(|((_, a), (_, b))| !a.equal(b))
    );

    let with_patterns = fixture("tiny-llama-patterns");
    let with_saved_modules = fixture("tiny-llama-saved-both");
    for (extra, expected) in [
        (
            vec!["--adapter-dir", with_patterns.to_str().unwrap()],
            "rank_pattern",
        ),
        (
            vec!["--adapter-dir", with_saved_modules.to_str().unwrap()],
            "modules_to_save",
        ),
        (
            vec![
                "--adapter-dir",
                adapter.to_str().unwrap(),
                "--init-lora-weights",
                "pissa",
            ],
            "--init-lora-weights",
        ),
    ] {
        let flags = [&["--data-dir", &data, "--max-steps", "1"][..], &extra].concat();
        let output = run_train(&dir.join("refused"), &flags);
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
    }
}
