//! The optimizer step's variants against their references, on the tiny random Llama
//! in f32: a packed (padding-free) batch gives the padded batch's losses and
//! gradients; the update inside the backward pass takes the same steps as the update
//! after it, for every optimizer, with and without clipping, with gradient
//! accumulation, a loss scaler, and a tied or untied lm_head; and a run that uses both
//! resumes exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use amthal::batch::Batch;
use amthal::encode::Encoded;
use amthal::train::graphed_step::{GraphedSteps, optimizer_step_graphed};
use amthal::train::loss_scale::LossScaler;
use amthal::train::micro_step;
use amthal::train::moments::OptimKind;
use amthal::train::optim::AdamW;
use amthal::train::step::{Draws, StepSettings, optimizer_step, training_embeddings};
use amthal::train::trainables::trainable_tensors;
use common::tiny::{encoded_rows, model_for, window_tokens};
use common::*;
use tch::{Device, Tensor};

fn max_difference(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn packed_batches_give_the_padded_losses_and_gradients() {
    let rows = encoded_rows();
    let rows: Vec<&Encoded> = rows.iter().take(4).collect();
    let lengths: Vec<usize> = rows.iter().map(|r| r.input_ids.len()).collect();
    assert!(lengths.iter().any(|&l| l != lengths[0]), "{lengths:?}");
    let tokens: i64 = rows.iter().map(|r| r.trained_tokens() as i64).sum();
    let padded = Batch::from_encoded(&rows, Device::Cpu);
    let packed = Batch::packed(&rows, Device::Cpu);
    assert!(packed.positions_computed() < padded.positions_computed());
    // LoRA with dropout too: a packed batch draws the padded batch's masks.
    let mut lora_losses = Vec::new();
    for (full, dropout) in [(false, 0.0), (false, 0.1), (true, 0.0)] {
        for checkpointing in [false, true] {
            let (mut model, mode) = model_for(full, true);
            set_lora_dropout(&mut model, dropout);
            let trainable = trainable_tensors(&model, &mode);
            let run = |batch: &Batch| -> (f64, Vec<Tensor>) {
                for (_, tensor, _) in &trainable {
                    tensor.shallow_clone().zero_grad();
                }
                let loss = micro_step(
                    &model,
                    batch,
                    1.0 / tokens as f64,
                    Draws::new(5, 0),
                    checkpointing,
                    full,
                )
                .unwrap();
                let grads = trainable.iter().map(|(_, t, _)| t.grad().copy()).collect();
                (loss / tokens as f64, grads)
            };
            let (padded_loss, padded_grads) = run(&padded);
            let (packed_loss, packed_grads) = run(&packed);
            if !full {
                lora_losses.push((
                    dropout,
                    checkpointing,
                    padded_loss,
                    padded_grads
                        .iter()
                        .map(Tensor::shallow_clone)
                        .collect::<Vec<_>>(),
                ));
            }
            assert!(
                (padded_loss - packed_loss).abs() < 1e-5,
                "full={full} dropout={dropout} checkpointing={checkpointing}: {padded_loss} vs {packed_loss}"
            );
            for ((name, _, _), (a, b)) in
                trainable.iter().zip(padded_grads.iter().zip(&packed_grads))
            {
                assert!(a.defined() && b.defined(), "{name}");
                let difference = max_difference(a, b);
                assert!(
                    difference < 1e-5,
                    "full={full} dropout={dropout} checkpointing={checkpointing} {name}: {difference}"
                );
            }
            assert!(
                padded_grads
                    .iter()
                    .any(|g| g.abs().max().double_value(&[]) > 1e-4)
            );
        }
    }
    // The dropout really dropped something, and with and without gradient
    // checkpointing the same masks were drawn, in the forward pass (the loss) and in
    // the checkpointed recomputation (the gradients).
    let run_of = |dropout: f64, checkpointing: bool| {
        let (_, _, loss, grads) = lora_losses
            .iter()
            .find(|(d, c, _, _)| *d == dropout && *c == checkpointing)
            .unwrap();
        (*loss, grads)
    };
    assert!((run_of(0.1, false).0 - run_of(0.0, false).0).abs() > 1e-4);
    let (plain, checkpointed) = (run_of(0.1, false), run_of(0.1, true));
    assert!((plain.0 - checkpointed.0).abs() < 1e-6);
    for (a, b) in plain.1.iter().zip(checkpointed.1) {
        let difference = max_difference(a, b);
        assert!(
            difference < 1e-6,
            "checkpointed vs plain gradients: {difference}"
        );
    }
}

/// NEFTune (`--neftune-noise-alpha`): the embeddings get uniform noise within HF's
/// bound alpha / sqrt(L x hidden), L the longest example (for a packed batch too, not
/// the packed row's length); drawn from the micro-batch's place in the run, so the
/// plain, checkpointed and in-backward routes train alike and a resume redraws it.
#[test]
fn neftune_noise_is_bounded_reproducible_and_the_same_on_every_route() {
    let rows = encoded_rows();
    let rows: Vec<&Encoded> = rows.iter().take(4).collect();
    let longest = rows.iter().map(|r| r.input_ids.len()).max().unwrap() as i64;
    let (model, mode) = model_for(false, true);
    let hidden = model.config.hidden_size as i64;
    let alpha = 5.0;
    let bound = amthal::train::step::neftune_bound(alpha, longest, hidden);
    assert!((bound - alpha / ((longest * hidden) as f64).sqrt()).abs() < 1e-15);
    let draws = Draws {
        neftune_noise_alpha: Some(alpha),
        ..Draws::new(7, 3)
    };
    let padded = Batch::from_encoded(&rows, Device::Cpu);
    let packed = Batch::packed(&rows, Device::Cpu);
    let mut noises = Vec::new();
    for (name, batch) in [("padded", &padded), ("packed", &packed)] {
        let plain = model.embed(&batch.input_ids);
        let noise = training_embeddings(&model, batch, Some(draws)) - &plain;
        let largest = noise.abs().max().double_value(&[]);
        let mean = noise.abs().mean(tch::Kind::Float).double_value(&[]);
        // Uniform in [-bound, bound]: the largest of thousands near the bound, the mean
        // magnitude near half of it. A packed batch scaled by its whole row's length
        // would stay under 0.6 x the bound here.
        assert!(
            largest <= bound * (1.0 + 1e-6),
            "{name}: {largest} > {bound}"
        );
        assert!(largest > 0.95 * bound, "{name}: {largest} vs {bound}");
        assert!(
            (mean / bound - 0.5).abs() < 0.05,
            "{name}: mean {mean} vs {bound}"
        );
        // The same place in the run draws the same noise; another place other noise.
        let again = training_embeddings(&model, batch, Some(draws)) - &plain;
        assert_eq!(max_difference(&noise, &again), 0.0, "{name}");
        let elsewhere = Draws { micro: 4, ..draws };
        let other = training_embeddings(&model, batch, Some(elsewhere)) - &plain;
        assert!(max_difference(&noise, &other) > 0.5 * bound, "{name}");
        // Without NEFTune, the embeddings themselves.
        let off = training_embeddings(&model, batch, Some(Draws::new(7, 3)));
        assert_eq!(max_difference(&off, &plain), 0.0, "{name}");
        noises.push(noise);
    }
    // On the CPU a packed row draws the padded batch's noise: each token gets the noise
    // its position in the padded batch gets (as LoRA dropout's masks).
    let layout = packed
        .packing
        .as_ref()
        .unwrap()
        .padded_layout
        .as_ref()
        .unwrap();
    let padded_at_tokens = noises[0].view([-1, hidden]).index_select(0, &layout.index);
    assert_eq!(
        max_difference(&padded_at_tokens, &noises[1].view([-1, hidden])),
        0.0
    );

    // The plain and checkpointed passes see the same noise: equal losses and gradients.
    let tokens: i64 = rows.iter().map(|r| r.trained_tokens() as i64).sum();
    let trainable = trainable_tensors(&model, &mode);
    let run = |draws: Draws, checkpointing: bool| -> (f64, Vec<Tensor>) {
        for (_, tensor, _) in &trainable {
            tensor.shallow_clone().zero_grad();
        }
        let loss = micro_step(
            &model,
            &packed,
            1.0 / tokens as f64,
            draws,
            checkpointing,
            false,
        )
        .unwrap();
        let grads = trainable.iter().map(|(_, t, _)| t.grad().copy()).collect();
        (loss, grads)
    };
    let (plain_loss, plain_grads) = run(draws, false);
    let (checkpointed_loss, checkpointed_grads) = run(draws, true);
    let (quiet_loss, _) = run(Draws::new(7, 3), false);
    assert!((plain_loss - checkpointed_loss).abs() < 1e-6 * plain_loss.abs());
    for (a, b) in plain_grads.iter().zip(&checkpointed_grads) {
        assert!(max_difference(a, b) < 1e-6);
    }
    assert!(
        (plain_loss - quiet_loss).abs() > 1e-4 * quiet_loss.abs(),
        "the noise changed the loss: {plain_loss} vs {quiet_loss}"
    );

    // The update inside the backward pass (its own forward route) takes the update
    // after it's step.
    let step = |in_backward: bool, neftune: Option<f64>| -> Vec<Tensor> {
        let (model, mode) = model_for(false, true);
        let mut optimizer =
            AdamW::with_kind(trainable_tensors(&model, &mode), 0.01, OptimKind::AdamW);
        let batches: Vec<Batch> = [&rows[..2], &rows[2..]]
            .iter()
            .map(|micro| Batch::packed(micro, Device::Cpu))
            .collect();
        let settings = StepSettings {
            seed: 7,
            first_micro: 0,
            checkpointing: true,
            full: false,
            in_backward,
            max_grad_norm: 0.0,
            lr: 1e-3,
            token_scale: 1.0 / tokens as f64,
            micro_offset: 0,
            micro_stride: 1,
            padding_only: false,
            neftune_noise_alpha: neftune,
        };
        optimizer_step(&model, &mut optimizer, &batches, &settings, None, None).unwrap();
        optimizer.params.iter().map(|p| p.param.copy()).collect()
    };
    let after = step(false, Some(alpha));
    let inside = step(true, Some(alpha));
    let quiet = step(false, None);
    for (a, b) in after.iter().zip(&inside) {
        assert!(max_difference(a, b) < 1e-6);
    }
    assert!(
        after
            .iter()
            .zip(&quiet)
            .any(|(a, b)| max_difference(a, b) > 1e-6)
    );
}

/// Sets every LoRA projection's dropout probability.
fn set_lora_dropout(model: &mut amthal::model::llama::Llama, p: f64) {
    for layer in &mut model.layers {
        let attention = &mut layer.self_attn;
        let mlp = &mut layer.mlp;
        for projection in [
            &mut attention.q_proj,
            &mut attention.k_proj,
            &mut attention.v_proj,
            &mut attention.o_proj,
            &mut mlp.gate_proj,
            &mut mlp.up_proj,
            &mut mlp.down_proj,
        ] {
            if let Some(lora) = projection.lora.as_mut() {
                lora.dropout = p;
            }
        }
    }
}

/// How `three_steps` runs a step.
#[derive(Clone, Copy, PartialEq)]
enum Route {
    /// `optimizer_step`, the update after the (checkpointed) backward pass.
    After,
    /// `optimizer_step` with `--optim-in-backward`.
    InBackward,
    /// `optimizer_step_graphed` (`--cuda-graphs`'s fixed-width step; no graph on the
    /// CPU), with or without gradient checkpointing.
    FixedWidth { checkpointing: bool },
}

/// Trains three optimizer steps of two micro-batches each, the loss label-smoothed by
/// `label_smoothing`; returns the trained tensors and the reported gradient norms.
fn three_steps(
    full: bool,
    tied: bool,
    optim: OptimKind,
    (max_grad_norm, label_smoothing): (f64, f64),
    scaled: bool,
    route: Route,
) -> (Vec<(String, Tensor)>, Vec<f64>) {
    let rows = encoded_rows();
    let (model, mode) = model_for(full, tied);
    let mut optimizer = AdamW::with_kind(trainable_tensors(&model, &mode), 0.01, optim);
    let mut scaler = scaled.then(|| LossScaler::new(1024.0));
    let mut graphs = match route {
        Route::FixedWidth { checkpointing } => {
            optimizer.keep_grads = true;
            Some(GraphedSteps::new(
                Device::Cpu,
                checkpointing,
                full,
                label_smoothing,
            ))
        }
        _ => None,
    };
    let mut norms = Vec::new();
    for step in 0..3u64 {
        let window: Vec<Vec<&Encoded>> = (0..2)
            .map(|micro| {
                let first = (step as usize * 2 + micro) * 2 % rows.len();
                vec![&rows[first], &rows[(first + 1) % rows.len()]]
            })
            .collect();
        let tokens = window_tokens(&window);
        let batches: Vec<Batch> = window
            .iter()
            .map(|micro| {
                Batch::from_encoded(micro, Device::Cpu).with_label_smoothing(label_smoothing)
            })
            .collect();
        let settings = StepSettings {
            seed: 7,
            first_micro: step * 2,
            checkpointing: true,
            full,
            in_backward: route == Route::InBackward,
            max_grad_norm,
            lr: 1e-3,
            token_scale: 1.0 / tokens as f64,
            micro_offset: 0,
            micro_stride: 1,
            padding_only: false,
            neftune_noise_alpha: None,
        };
        let outcome = match graphs.as_mut() {
            Some(graphs) => optimizer_step_graphed(
                &model,
                &mut optimizer,
                graphs,
                &window,
                &settings,
                scaler.as_mut(),
                None,
            ),
            None => optimizer_step(
                &model,
                &mut optimizer,
                &batches,
                &settings,
                scaler.as_mut(),
                None,
            ),
        }
        .unwrap();
        assert!(outcome.nonfinite_loss.is_none());
        norms.push(outcome.grad_norm.expect("the step was taken"));
    }
    let trained = optimizer
        .params
        .iter()
        .map(|p| (p.name.clone(), p.param.copy()))
        .collect();
    (trained, norms)
}

#[test]
fn the_update_inside_the_backward_pass_takes_the_same_steps() {
    let cases = [
        // (full, tied lm_head, optimizer, (max_grad_norm, label smoothing), loss scaler)
        (false, true, OptimKind::AdamW, (0.0, 0.0), false),
        (false, true, OptimKind::AdamW, (0.05, 0.0), false),
        (false, true, OptimKind::AdamW, (0.0, 0.3), false),
        (true, true, OptimKind::AdamW, (0.0, 0.0), false),
        (true, true, OptimKind::AdamW, (0.05, 0.0), false),
        (true, false, OptimKind::AdamW, (0.05, 0.0), false),
        (true, false, OptimKind::AdamW, (0.0, 0.0), true),
        (true, false, OptimKind::AdamW, (0.05, 0.3), true),
        (true, true, OptimKind::AdamWBf16, (0.05, 0.0), false),
        (true, false, OptimKind::AdamW8bit, (0.05, 0.0), false),
        (false, true, OptimKind::AdamW8bit, (0.0, 0.0), false),
    ];
    for (full, tied, optim, (max_grad_norm, smoothing), scaled) in cases {
        let case = format!(
            "full={full} tied={tied} {optim:?} clip={max_grad_norm} smoothing={smoothing} \
             scaled={scaled}"
        );
        let settings = (max_grad_norm, smoothing);
        let (after, after_norms) = three_steps(full, tied, optim, settings, scaled, Route::After);
        let (inside, inside_norms) =
            three_steps(full, tied, optim, settings, scaled, Route::InBackward);
        for (a, b) in after_norms.iter().zip(&inside_norms) {
            assert!(
                (a - b).abs() <= 1e-5 * a,
                "{case}: gradient norms {a} vs {b}"
            );
        }
        if max_grad_norm > 0.0 {
            assert!(
                after_norms.iter().all(|&n| n > max_grad_norm),
                "{case}: clipping engaged"
            );
        }
        // f32 moments: the same steps up to summation order. bf16 and 8-bit moments:
        // a gradient summed in another order can round a moment to the neighbouring
        // code, so compare the mean difference with how far the weights moved.
        let (source_model, source_mode) = model_for(full, tied);
        let before = trainable_tensors(&source_model, &source_mode);
        for (((name, a), (_, b)), (_, start, _)) in after.iter().zip(&inside).zip(&before) {
            let moved = (a - start).abs().mean(tch::Kind::Float).double_value(&[]);
            assert!(moved > 1e-6, "{case} {name}: the weights moved ({moved})");
            if optim == OptimKind::AdamW {
                let difference = max_difference(a, b);
                assert!(difference < 1e-6, "{case} {name}: {difference}");
            } else {
                let difference = (a - b).abs().mean(tch::Kind::Float).double_value(&[]);
                assert!(
                    difference < 0.01 * moved,
                    "{case} {name}: mean difference {difference}, moved {moved}"
                );
            }
        }
    }
}

/// `--cuda-graphs`'s fixed-width micro-batches (what a recorded graph replays; run
/// without a graph on the CPU: the mask built from document indices, cross-entropy
/// over the whole width, gradients added into kept `.grad` tensors, one loss read per
/// step) take the eager step's steps: LoRA and full, tied or not, with and without
/// gradient checkpointing, clipping and an f16 loss scaler.
#[test]
fn the_fixed_width_step_of_cuda_graphs_takes_the_same_steps() {
    let cases = [
        // (full, tied lm_head, (max_grad_norm, label smoothing), loss scaler, checkpointing)
        (false, true, (0.0, 0.0), false, false),
        (false, true, (0.05, 0.0), false, true),
        (false, true, (0.0, 0.3), false, true),
        (true, true, (0.05, 0.0), false, false),
        (true, false, (0.05, 0.0), false, true),
        (true, false, (0.0, 0.0), true, true),
        (true, true, (0.05, 0.3), false, false),
    ];
    for (full, tied, settings, scaled, checkpointing) in cases {
        let case = format!(
            "full={full} tied={tied} (clip, smoothing)={settings:?} scaled={scaled} \
             checkpointing={checkpointing}"
        );
        let optim = OptimKind::AdamW;
        let (eager, eager_norms) = three_steps(full, tied, optim, settings, scaled, Route::After);
        let (fixed, fixed_norms) = three_steps(
            full,
            tied,
            optim,
            settings,
            scaled,
            Route::FixedWidth { checkpointing },
        );
        for (a, b) in eager_norms.iter().zip(&fixed_norms) {
            assert!(
                (a - b).abs() <= 1e-5 * a,
                "{case}: gradient norms {a} vs {b}"
            );
        }
        let (source_model, source_mode) = model_for(full, tied);
        let before = trainable_tensors(&source_model, &source_mode);
        for (((name, a), (_, b)), (_, start, _)) in eager.iter().zip(&fixed).zip(&before) {
            let moved = (a - start).abs().mean(tch::Kind::Float).double_value(&[]);
            assert!(moved > 1e-6, "{case} {name}: the weights moved ({moved})");
            // Attention through a mask instead of per document, and the loss summed in
            // another order: f32 rounding, which AdamW's first steps (updates of about
            // lr whatever the gradient's size) carry to the weights.
            let difference = max_difference(a, b);
            assert!(difference < 1e-5, "{case} {name}: {difference}");
        }
    }
}

/// The step flags most runs below use.
const IN_BACKWARD_PACKED: &[&str] = &["--optim-in-backward", "--packing"];

fn train_tiny(out: &Path, extra: &[&str]) -> std::process::Output {
    train_tiny_with(out, IN_BACKWARD_PACKED, extra)
}

/// Six steps of the tiny model (full fine-tune, bf16), checkpoints every 3, with the
/// step flags `route` and then `extra`.
fn train_tiny_with(out: &Path, route: &[&str], extra: &[&str]) -> std::process::Output {
    // bf16 unless the flags name a precision.
    let precision_named = route.iter().chain(extra).any(|&a| a == "--precision");
    let precision: &[&str] = if precision_named {
        &[]
    } else {
        &["--precision", "bf16"]
    };
    Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args(["train", "--model"])
        .arg(fixture("tiny-llama"))
        .args(["--device", "cpu"])
        .args(precision)
        .arg("--output-dir")
        .arg(out)
        .arg("--data-dir")
        .arg(repo_root().join("examples/data"))
        .args([
            "--lr",
            "1e-3",
            "--max-steps",
            "6",
            "--eval-strategy",
            "steps",
        ])
        .args(["--eval-steps", "3", "--previews", "0", "--batch-size", "2"])
        .args(["--grad-accum", "2"])
        .args(route)
        .args(extra)
        .output()
        .unwrap()
}

/// Copies `run`'s checkpoint-3 into a fresh `resumed` folder and finishes the run there
/// with `--resume` and the step flags `route` (without `run`'s other flags but
/// `--optim`); returns `resumed`.
fn resume_from_checkpoint_3(run: &Path, resumed: &Path, route: &[&str], optim: &str) -> PathBuf {
    std::fs::create_dir_all(resumed).unwrap();
    let copied = Command::new("cp")
        .arg("-r")
        .arg(run.join("checkpoint-3"))
        .arg(resumed)
        .status()
        .unwrap();
    assert!(copied.success());
    let output = train_tiny_with(resumed, route, &["--optim", optim, "--resume"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    resumed.to_path_buf()
}

/// The whole loop, packed (the default) and padded (`--no-packing`), LoRA with dropout
/// in f32: the same adapter within 1e-5 (packing changes neither the losses nor the
/// dropout masks), and each run's config says which it was.
#[test]
fn packed_and_padded_runs_train_the_same_adapter() {
    let dir = temp_dir("packing");
    let lora: &[&str] = &["--lora", "--lora-dropout", "0.1", "--precision", "f32"];
    let packed = dir.join("packed");
    let padded = dir.join("padded");
    for (out, extra) in [(&packed, &[][..]), (&padded, &["--no-packing"][..])] {
        let output = train_tiny_with(out, lora, extra);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let config = |out: &Path| std::fs::read_to_string(out.join("training_config.toml")).unwrap();
    assert!(config(&packed).contains("packing = true"));
    assert!(config(&padded).contains("packing = false"));
    let adapter = |out: &Path| -> Vec<(String, Tensor)> {
        let mut tensors =
            Tensor::read_safetensors(out.join("final/adapter_model.safetensors")).unwrap();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        tensors
    };
    let (a, b) = (adapter(&packed), adapter(&padded));
    assert_eq!(a.len(), b.len());
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let difference = max_difference(x, y);
        assert!(difference < 1e-5, "{name}: {difference}");
    }
}

/// The whole command with both: the log reports gradient norms and the clipping
/// pass, and a run resumed from checkpoint-3 ends bit-identical to the whole run.
#[test]
fn an_in_backward_packed_run_resumes_exactly() {
    let dir = temp_dir("in-backward");
    for optim in ["adamw-bf16", "adamw-8bit", "adafactor"] {
        let whole = dir.join(format!("{optim}-whole"));
        let output = train_tiny(&whole, &["--optim", optim]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let config = std::fs::read_to_string(whole.join("training_config.toml")).unwrap();
        assert!(config.contains("optim_in_backward = true") && config.contains("packing = true"));
        let resumed = resume_from_checkpoint_3(
            &whole,
            &dir.join(format!("{optim}-resumed")),
            IN_BACKWARD_PACKED,
            optim,
        );
        assert_eq!(
            std::fs::read(resumed.join("final/model.safetensors")).unwrap(),
            std::fs::read(whole.join("final/model.safetensors")).unwrap(),
            "{optim}: the same final weights"
        );
        let log = std::fs::read_to_string(whole.join("log.jsonl")).unwrap();
        assert!(
            log.lines().filter(|l| l.contains("\"grad_norm\"")).count() == 6,
            "{log}"
        );
    }
}

/// `--offload-optimizer` (AdamW's state in host memory, updated through copies): the
/// same final weights as state beside the weights, for f32 AdamW with master weights
/// and for 8-bit moments with compensation; its checkpoints resume exactly, also
/// without the flag.
#[test]
fn an_offloaded_optimizer_takes_the_same_steps() {
    let dir = temp_dir("offload");
    for optim in ["adamw", "adamw-8bit"] {
        let run = |name: &str, extra: &[&str]| {
            let out = dir.join(format!("{optim}-{name}"));
            let output = train_tiny(&out, &[&["--optim", optim][..], extra].concat());
            assert!(
                output.status.success(),
                "{optim} {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            (out, String::from_utf8_lossy(&output.stderr).to_string())
        };
        let (plain, _) = run("plain", &[]);
        let (offloaded, stderr) = run("offloaded", &["--offload-optimizer"]);
        assert!(stderr.contains("--offload-optimizer keeps"), "{stderr}");
        let final_weights =
            |out: &Path| std::fs::read(out.join("final/model.safetensors")).unwrap();
        assert_eq!(
            final_weights(&offloaded),
            final_weights(&plain),
            "{optim}: the same final weights"
        );
        let resumed = resume_from_checkpoint_3(
            &offloaded,
            &dir.join(format!("{optim}-resumed")),
            IN_BACKWARD_PACKED,
            optim,
        );
        assert_eq!(
            final_weights(&resumed),
            final_weights(&plain),
            "{optim}: resumed from the offloaded checkpoint"
        );
    }
    // Adafactor's state (megabytes for a 7B) is not offloaded.
    let output = train_tiny(
        &dir.join("adafactor"),
        &["--optim", "adafactor", "--offload-optimizer"],
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("leave out --offload-optimizer"), "{stderr}");
}

/// `--cuda-graphs` from the command line (on the CPU: the fixed-width step without a
/// graph, with a note saying so): it implies packing, refuses what a recorded step
/// cannot do with a message naming the way out, and a run resumed from checkpoint-3
/// ends bit-identical to the whole run, full fine-tune and LoRA with dropout.
#[test]
fn a_cuda_graphs_run_resumes_exactly_and_refuses_what_it_cannot_record() {
    let dir = temp_dir("cuda-graphs");
    let graphs: &[&str] = &["--cuda-graphs"];
    let whole = dir.join("whole");
    let output = train_tiny_with(&whole, graphs, &["--optim", "adamw"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("--cuda-graphs records the step on a GPU"),
        "{stderr}"
    );
    let config = std::fs::read_to_string(whole.join("training_config.toml")).unwrap();
    assert!(config.contains("cuda_graphs = true") && config.contains("packing = true"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("train_summary.json")).unwrap())
            .unwrap();
    let account = &summary["cuda_graphs"];
    let widths = account["widths"].as_array().unwrap();
    assert!(!widths.is_empty(), "{account}");
    assert!(
        widths.iter().all(|w| w.as_u64().unwrap() % 128 == 0),
        "{account}"
    );
    assert_eq!(
        account["recorded_widths"],
        serde_json::json!([]),
        "no graph on the CPU"
    );
    assert!(account["failure"].is_null(), "{account}");
    let resumed = resume_from_checkpoint_3(&whole, &dir.join("resumed"), graphs, "adamw");
    assert_eq!(
        std::fs::read(resumed.join("final/model.safetensors")).unwrap(),
        std::fs::read(whole.join("final/model.safetensors")).unwrap(),
        "the same final weights"
    );
    for (extra, expected) in [
        (
            &["--lora", "--gradient-checkpointing"][..],
            "add --lora-dropout 0",
        ),
        (&["--optim-in-backward"][..], "choose one"),
        // Adafactor's update has no recorded form.
        (&["--optim", "adafactor"][..], "no recorded form"),
        // Graphs replay packed rows laid out at fixed widths.
        (&["--no-packing"][..], "cannot be used with"),
    ] {
        let output = train_tiny_with(&dir.join("refused"), graphs, extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    // LoRA with dropout (no gradient checkpointing): the generator is seeded from each
    // micro-batch's position before its pass, so a resumed run draws the same masks.
    let adapter = |out: &Path| std::fs::read(out.join("final/adapter_model.safetensors")).unwrap();
    let with_dropout: &[&str] = &["--cuda-graphs", "--lora", "--lora-dropout", "0.1"];
    let lora = dir.join("lora-dropout");
    let output = train_tiny_with(&lora, with_dropout, &["--optim", "adamw"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let resumed = resume_from_checkpoint_3(
        &lora,
        &dir.join("lora-dropout-resumed"),
        with_dropout,
        "adamw",
    );
    assert_eq!(adapter(&resumed), adapter(&lora), "resumed with dropout");
    let without: &[&str] = &["--cuda-graphs", "--lora", "--lora-dropout", "0"];
    let output = train_tiny_with(&dir.join("lora"), without, &["--optim", "adamw"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_ne!(
        adapter(&dir.join("lora")),
        adapter(&lora),
        "dropout changed the steps"
    );
}
