//! `--optim adafactor` against transformers' Adafactor (HF Trainer's settings):
//! goldens from scripts/golden/make_adafactor_golden.py, six steps of a decayed matrix,
//! an undecayed matrix and a vector, with a changing learning rate.

mod common;

use std::collections::BTreeMap;

use amthal::train::moments::OptimKind;
use amthal::train::optim::AdamW;
use tch::{Kind, Tensor};

fn golden() -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(common::repo_root().join("tests/golden/adafactor.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

const NAMES: [(&str, bool); 3] = [("decayed", true), ("matrix", false), ("vector", false)];

/// The golden's parameters (from their start) in an Adafactor optimizer.
fn optimizer(golden: &BTreeMap<String, Tensor>) -> (Vec<Tensor>, AdamW) {
    let params: Vec<Tensor> = NAMES
        .iter()
        .map(|(name, _)| {
            golden[&format!("{name}.start")]
                .copy()
                .set_requires_grad(true)
        })
        .collect();
    let weight_decay = golden["weight_decay"].double_value(&[]);
    let named = NAMES
        .iter()
        .zip(&params)
        .map(|((name, decayed), p)| (name.to_string(), p.shallow_clone(), *decayed))
        .collect();
    (
        params,
        AdamW::with_kind(named, weight_decay, OptimKind::Adafactor),
    )
}

/// Step `step` (from 1): the golden's gradients (d/dp of sum(p * g) is g exactly),
/// then the update.
fn take_step(golden: &BTreeMap<String, Tensor>, params: &[Tensor], optim: &mut AdamW, step: i64) {
    optim.zero_grad();
    let loss = NAMES
        .iter()
        .zip(params)
        .map(|((name, _), p)| (p * &golden[&format!("{name}.grad.{step}")]).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
    optim.step(golden["lr"].double_value(&[step - 1]));
}

#[test]
fn adafactor_takes_transformers_steps() {
    let golden = golden();
    let (params, mut optim) = optimizer(&golden);
    let mut worst: f64 = 0.0;
    for step in 1..=6 {
        take_step(&golden, &params, &mut optim, step);
        for ((name, _), p) in NAMES.iter().zip(&params) {
            let expected = &golden[&format!("{name}.after.{step}")];
            let difference = (p - expected).abs().max().double_value(&[]);
            let scale = expected.abs().max().double_value(&[]);
            worst = worst.max(difference / scale);
            assert!(
                difference <= 1e-6 * scale,
                "step {step}, {name}: {difference:e} from transformers (values up to {scale})"
            );
        }
    }
    eprintln!("largest difference from transformers, relative to the values: {worst:e}");
    // The weights moved (the golden's first step has learning rate 0: they did not).
    let start = &golden["decayed.start"];
    assert!((&params[0] - start).abs().max().double_value(&[]) > 1e-3);
    assert!(
        golden["decayed.after.1"].equal(start),
        "lr 0 leaves the weights"
    );
}

/// The state a checkpoint holds (a row and a column per matrix, the vector's second
/// moment; no first moment) restores into a fresh optimizer that then takes the same
/// steps bit for bit.
#[test]
fn adafactor_state_round_trips() {
    let golden = golden();
    let (params, mut optim) = optimizer(&golden);
    for step in 1..=3 {
        take_step(&golden, &params, &mut optim, step);
    }
    let state = optim.state_tensors();
    let mut names: Vec<&str> = state.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "exp_avg_sq.decayed.col",
            "exp_avg_sq.decayed.row",
            "exp_avg_sq.matrix.col",
            "exp_avg_sq.matrix.row",
            "exp_avg_sq.vector",
            "optimizer_step",
        ]
    );
    assert_eq!(state["exp_avg_sq.decayed.row"].size(), [5]);
    assert_eq!(state["exp_avg_sq.decayed.col"].size(), [7]);

    let saved: BTreeMap<String, Tensor> =
        state.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
    let weights: Vec<Tensor> = params.iter().map(|p| p.detach().copy()).collect();
    let (resumed, mut restored) = optimizer(&golden);
    tch::no_grad(|| {
        for (p, w) in resumed.iter().zip(&weights) {
            p.shallow_clone().copy_(w);
        }
    });
    // The saved count wins over the caller's (the trainer's global step, which runs
    // ahead of it after an f16 overflow skipped an update).
    restored.load_state(&saved, 5).unwrap();
    assert_eq!(restored.step, 3);
    for step in 4..=6 {
        take_step(&golden, &params, &mut optim, step);
        take_step(&golden, &resumed, &mut restored, step);
    }
    for (a, b) in params.iter().zip(&resumed) {
        assert!(a.equal(b), "a restored Adafactor takes the same steps");
    }
    // AdamW's checkpoint does not restore into Adafactor.
    let named = NAMES
        .iter()
        .map(|(name, d)| {
            (
                name.to_string(),
                golden[&format!("{name}.start")].copy(),
                *d,
            )
        })
        .collect();
    let mut adamw = AdamW::with_kind(named, 0.0, OptimKind::AdamW);
    let error = adamw.load_state(&saved, 3).unwrap_err().to_string();
    assert!(error.contains("another --optim"), "{error}");
}

/// A matrix updated a block of rows at a time (as a 7B's embedding is, so its f32
/// temporaries stay small) takes the steps of one block within f32 rounding, for f32
/// weights and for bf16 weights with their Kahan compensation.
#[test]
fn adafactor_by_row_blocks_equals_one_block() {
    tch::manual_seed(7);
    for kind in [Kind::Float, Kind::BFloat16] {
        let start = Tensor::randn([37, 11], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
        let grads: Vec<Tensor> = (0..4)
            .map(|_| Tensor::randn([37, 11], (Kind::Float, tch::Device::Cpu)).to_kind(kind))
            .collect();
        let run = |chunk: i64| {
            let param = start.copy().set_requires_grad(true);
            let mut optim = AdamW::with_kind(
                vec![("w".into(), param.shallow_clone(), true)],
                0.1,
                OptimKind::Adafactor,
            );
            optim.update_chunk = chunk;
            for (step, grad) in grads.iter().enumerate() {
                optim.zero_grad();
                (&param * grad).sum(Kind::Float).backward();
                optim.step(1e-2 * (step + 1) as f64);
            }
            param.detach().to_kind(Kind::Float)
        };
        let whole = run(1 << 24);
        assert!(
            (&whole - start.to_kind(Kind::Float))
                .abs()
                .max()
                .double_value(&[])
                > 1e-3
        );
        for chunk in [256, 55, 1] {
            let blocks = run(chunk);
            let difference = (&blocks - &whole).abs().max().double_value(&[]);
            // bf16: a value on a rounding boundary may land one bf16 step apart
            // (1/64 for values under 4).
            let bound = if kind == Kind::Float {
                1e-6
            } else {
                1.0 / 64.0
            };
            eprintln!("{kind:?}, blocks of {chunk} values: {difference:e} from one block");
            assert!(
                difference <= bound,
                "{kind:?}, blocks of {chunk} values: {difference:e} from one block"
            );
        }
    }
}
