//! The decode step's kernel folds (`Llama::decode_folds`) against the unfolded step.
//! A test binary of its own: it counts operators with the ops library's counter,
//! which counts every thread's, so no other test may run beside it.

mod common;

use amthal::model::{LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use common::*;

/// The decode step's folds (`Llama::decode_folds`, on by default on GPUs: rotary as one
/// matmul per layer, residual adds inside the o/down matmuls) give the unfolded step's
/// logits within 1e-5 in f32 over several steps of two slots at different positions,
/// and issue 5 kernels a layer fewer (the residual adds become `addmm_`), 2 more a step.
#[test]
fn decode_folds_give_the_unfolded_logits_with_fewer_kernels() {
    use amthal::model::KvCache;
    use amthal::model::fuse::fuse_projections;
    use tch::{Device, Kind, Tensor};
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let load = |folds: bool| {
        let mut model = load_llama(&source, LoadOptions::default()).unwrap();
        fuse_projections(&mut model);
        if std::env::var_os("AMTHAL_DECODE_FOLDS").is_none() {
            assert!(!model.decode_folds, "off on the CPU unless asked");
        }
        model.decode_folds = folds;
        model
    };
    let (plain, folded) = (load(false), load(true));
    let layers = plain.layers.len() as u64;
    let ops = amthal::torch_ops::ops().expect("the ops library");
    ops.start_counting_ops().unwrap();
    // Slot 0 starts at position 0, slot 1 three tokens later (its first positions are
    // written by the first steps too: each slot attends only to its own positions).
    let tokens = [[1i64, 40], [17, 41], [250, 42], [33, 43], [91, 44], [5, 45]];
    let run = |model: &amthal::model::Llama| {
        let mut cache = KvCache::slots(model, 2, 16);
        let mut all = Vec::new();
        let mut kernels = Vec::new();
        for (step, ids) in tokens.iter().enumerate() {
            let ids = Tensor::from_slice(ids).view([2, 1]);
            let positions = Tensor::from_slice(&[step as i64, (step as i64 + 3) % 6]).view([2, 1]);
            ops.take_op_counts().unwrap();
            let hidden = tch::no_grad(|| model.decode_slots(&ids, &positions, &mut cache));
            kernels.push(ops.take_op_counts().unwrap());
            all.push(model.logits(&hidden).to_kind(Kind::Float));
        }
        (Tensor::stack(&all, 0), kernels)
    };
    let ((plain_logits, plain_kernels), (folded_logits, folded_kernels)) =
        (run(&plain), run(&folded));
    let difference = (&plain_logits - &folded_logits)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        difference < 1e-5,
        "folded vs unfolded decode steps: {difference}"
    );
    assert!(
        plain_logits.abs().max().double_value(&[]) > 1e-3,
        "real logits"
    );
    assert_eq!(plain_logits.device(), Device::Cpu);
    let count = |counts: &[(String, u64)], name: &str| {
        counts
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, c)| c)
            .sum::<u64>()
    };
    let total = |counts: &[(String, u64)]| counts.iter().map(|(_, c)| c).sum::<u64>();
    for (plain, folded) in plain_kernels.iter().zip(&folded_kernels) {
        assert_eq!(count(folded, "aten::addmm_"), 2 * layers, "{folded:?}");
        assert_eq!(count(plain, "aten::addmm_"), 0, "{plain:?}");
        // Per layer: rotary's two muls and add, and the two residual adds; per step,
        // two kernels build the rotation matrices.
        assert_eq!(
            total(plain) - total(folded),
            5 * layers - 2,
            "folded {folded:?}\nunfolded {plain:?}"
        );
    }
}
