//! What `--cuda-graphs` records must not read anything back to the host: a recorded
//! graph cannot stop for the host, and a read inside it breaks the recording. Counted
//! on the CPU with the ops library's operator counter (what `AMTHAL_PROFILE_STEP`
//! uses): a graphed optimizer step reads exactly twice, both outside the recorded
//! work (the window's loss and the gradient norm), and issues none of the operators
//! that make CUDA wait for the device; the eager step, for contrast, reads once per
//! micro-batch and more. Alone in its test binary because the counter sees every
//! thread.

mod common;

use amthal::batch::Batch;
use amthal::encode::Encoded;
use amthal::train::graphed_step::{GraphedSteps, optimizer_step_graphed};
use amthal::train::optim::AdamW;
use amthal::train::step::{StepSettings, optimizer_step};
use amthal::train::trainables::trainable_tensors;
use common::tiny::{encoded_rows, model_for, window_tokens};
use tch::Device;

/// Operators that make a CUDA stream wait for the host (a read of a value, or an
/// output whose size depends on values).
const SYNCING: [&str; 8] = [
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::repeat_interleave",
    "aten::_assert_async",
];

fn settings(step: u64, checkpointing: bool, full: bool, tokens: i64) -> StepSettings {
    StepSettings {
        seed: 7,
        first_micro: step * 4,
        checkpointing,
        full,
        in_backward: false,
        max_grad_norm: 0.05,
        lr: 1e-3,
        token_scale: 1.0 / tokens as f64,
        micro_offset: 0,
        micro_stride: 1,
        padding_only: false,
        neftune_noise_alpha: None,
    }
}

#[test]
fn a_graphed_step_reads_the_host_twice_and_the_eager_step_per_micro_batch() {
    let ops = amthal::torch_ops::ops().expect("the embedded ops library loads");
    ops.start_counting_ops().unwrap();
    let rows = encoded_rows();
    let window: Vec<Vec<&Encoded>> = (0..4)
        .map(|micro| vec![&rows[micro * 2], &rows[micro * 2 + 1]])
        .collect();
    let tokens = window_tokens(&window);
    let count = |counts: &[(String, u64)], name: &str| {
        counts
            .iter()
            .find(|(op, _)| op == name)
            .map_or(0, |(_, n)| *n)
    };
    for (full, checkpointing) in [(false, false), (false, true), (true, false), (true, true)] {
        let case = format!("full={full} checkpointing={checkpointing}");
        let (model, mode) = model_for(full, true);
        let mut optimizer = AdamW::new(trainable_tensors(&model, &mode), 0.01);
        optimizer.keep_grads = true;
        // Label-smoothed: the smoothing is a constant of the recording, no host read.
        let mut graphs = GraphedSteps::new(Device::Cpu, checkpointing, full, 0.1);
        for step in 0..2 {
            let _ = ops.take_op_counts().unwrap();
            let outcome = optimizer_step_graphed(
                &model,
                &mut optimizer,
                &mut graphs,
                &window,
                &settings(step, checkpointing, full, tokens),
                None,
                None,
            )
            .unwrap();
            let counts = ops.take_op_counts().unwrap();
            assert!(outcome.grad_norm.is_some(), "{case}: the step was taken");
            assert_eq!(
                count(&counts, "aten::_local_scalar_dense"),
                2,
                "{case} step {step}: the loss and the norm, nothing else: {counts:?}"
            );
            for name in SYNCING.iter().skip(1) {
                assert_eq!(count(&counts, name), 0, "{case} step {step}: {name}");
            }
            assert!(counts.len() > 10, "{case}: the counter saw the step");
        }
        // The eager step reads each micro-batch's loss before its backward pass.
        let (model, mode) = model_for(full, true);
        let mut optimizer = AdamW::new(trainable_tensors(&model, &mode), 0.01);
        let batches: Vec<Batch> = window
            .iter()
            .map(|micro| Batch::packed(micro, Device::Cpu))
            .collect();
        let _ = ops.take_op_counts().unwrap();
        optimizer_step(
            &model,
            &mut optimizer,
            &batches,
            &settings(0, checkpointing, full, tokens),
            None,
            None,
        )
        .unwrap();
        let counts = ops.take_op_counts().unwrap();
        assert!(
            count(&counts, "aten::_local_scalar_dense") >= 5,
            "{case}: eager reads {counts:?}"
        );
    }
}
