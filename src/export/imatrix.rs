//! An importance matrix for `amthal export --imatrix-data`: for every decoder
//! projection, the mean square of each input column over calibration tokens, which the
//! weighted block encoders (`weighted_quant.rs`) use to spend a 4-bit block's precision
//! where the activations are large. This is what llama.cpp's `llama-imatrix` measures
//! (per mul_mat weight, the sum of x^2 over the tokens that reach it divided by their
//! count; the output projection left out, as its default does) and what
//! `llama-quantize --imatrix` passes to ggml. The calibration text here is the task's
//! own: proverbs with their explanations, formatted as `amthal train` formats them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tch::{Kind, Tensor};

use crate::model::Llama;
use crate::model::llama::ProjectionInput;

/// Mean squared input per column, by the HF name of the weight that reads it.
pub struct ImportanceMatrix {
    columns: BTreeMap<String, Vec<f32>>,
    /// Tokens measured (every projection sees each of them).
    pub tokens: usize,
    /// Sequences measured: one forward pass each (llama-imatrix's "chunks" are
    /// n_ctx-token slices of one text; here each example is its own sequence).
    pub sequences: usize,
    /// What was measured, for the file's `quantize.imatrix.dataset`.
    pub dataset: String,
}

impl ImportanceMatrix {
    /// The importances of `hf_name`'s input columns (e.g.
    /// "model.layers.0.self_attn.q_proj.weight"); None for tensors not measured.
    pub fn for_tensor(&self, hf_name: &str) -> Option<&[f32]> {
        self.columns.get(hf_name).map(Vec::as_slice)
    }

    /// How many weights have importances.
    pub fn entries(&self) -> usize {
        self.columns.len()
    }
}

/// Runs `model` over each of `sequences` (token ids, one forward pass each) and
/// averages the squares of every projection's input columns over all their tokens.
/// `dataset` says what the sequences are.
pub fn measure(model: &Llama, sequences: &[Vec<u32>], dataset: &str) -> Result<ImportanceMatrix> {
    // Sums of x^2 per (layer, input) in f64, so that thousands of tokens add up without
    // losing the small ones.
    let sums: Arc<Mutex<BTreeMap<(usize, ProjectionInput), Tensor>>> = Arc::default();
    let recorder = Arc::clone(&sums);
    let observer: crate::model::llama::InputObserver =
        Arc::new(move |layer: usize, input: ProjectionInput, x: &Tensor| {
            let width = *x.size().last().expect("an input has a width");
            let squares = x
                .to_kind(Kind::Double)
                .reshape([-1, width])
                .square()
                .sum_dim_intlist(0, false, Kind::Double);
            let mut sums = recorder.lock().expect("the importance sums");
            match sums.get_mut(&(layer, input)) {
                Some(total) => {
                    let _ = total.g_add_(&squares);
                }
                None => {
                    sums.insert((layer, input), squares);
                }
            }
        });
    let (mut tokens, mut measured) = (0, 0);
    tch::no_grad(|| {
        for ids in sequences.iter().filter(|ids| !ids.is_empty()) {
            let input: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            let input = Tensor::from_slice(&input).unsqueeze(0).to(model.device);
            let positions =
                Tensor::arange(ids.len() as i64, (Kind::Int64, model.device)).unsqueeze(0);
            let mut context = model.context(&input, &positions, None, None);
            context.input_observer = Some(Arc::clone(&observer));
            let _ = model.forward_hidden_in(&input, &context, None, false);
            tokens += ids.len();
            measured += 1;
        }
    });
    let sums = std::mem::take(&mut *sums.lock().expect("the importance sums"));
    let mut columns = BTreeMap::new();
    for ((layer, input), total) in sums {
        let means = Vec::<f64>::try_from(total.to_device(tch::Device::Cpu) / tokens as f64)?;
        // As llama-quantize refuses a matrix with NaN or infinite entries: they would
        // turn a block's scale into NaN and the file into garbage.
        if means.iter().any(|v| !v.is_finite()) {
            crate::bail_input!(
                "the importance matrix of layer {layer}'s {} is not finite: the model's \
                 activations overflow or are NaN (a broken adapter?)",
                input.readers().join(" / ")
            );
        }
        let means: Vec<f32> = means.into_iter().map(|v| v as f32).collect();
        for reader in input.readers() {
            columns.insert(
                format!("model.layers.{layer}.{reader}.weight"),
                means.clone(),
            );
        }
    }
    Ok(ImportanceMatrix {
        columns,
        tokens,
        sequences: measured,
        dataset: dataset.to_string(),
    })
}
