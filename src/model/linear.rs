//! A linear projection with an optional LoRA adapter beside it; its weight dense or
//! quantized (`--quantize`). Dense projections run through the ops library's autograd
//! nodes (csrc/linear_nodes.h): with an adapter, one node for base and adapter; f32 on
//! the CPU, oneDNN's matmul instead of MKL's.

use std::ffi::{c_int, c_void};

use tch::{Kind, Tensor};

use super::quantized::QuantizedWeight;
use crate::torch_ops::{LoraProjection, float_kind_from_scalar_type, into_raw_handle, ops};

/// `y = x W^T + b`, plus `scaling * dropout(x) A^T B^T` when a LoRA adapter is attached.
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// A projection's weight: a tensor in the compute dtype, or frozen quantized storage
/// dequantized at each use. Boxed so that its address, which a backward pass may hold
/// (`QuantizedWeight::linear`), never moves.
pub enum Weight {
    Dense(Tensor),
    Quantized(Box<QuantizedWeight>),
}

impl Weight {
    /// [out, in].
    pub fn size(&self) -> Vec<i64> {
        match self {
            Weight::Dense(w) => w.size(),
            Weight::Quantized(q) => q.shape(),
        }
    }

    /// The dense tensor; None for a quantized weight.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }

    /// The dense tensor of a model that is not quantized. Callers reach this only for
    /// dense models (a quantized base is refused up front where whole weights are
    /// needed: full fine-tuning, saving an HF folder, merging).
    pub fn expect_dense(&self) -> &Tensor {
        self.dense()
            .expect("a dense weight (quantized models are refused before this point)")
    }

    /// The weight in f32 (a quantized one dequantized), without a gradient: what
    /// DoRA's norms are taken from.
    pub fn to_f32(&self) -> Tensor {
        tch::no_grad(|| match self {
            Weight::Dense(w) => w.to_kind(Kind::Float),
            Weight::Quantized(q) => q.dequantize(Kind::Float),
        })
    }
}

/// The L2 norm of each row of a matrix [out, in] -> [out], without a gradient.
pub fn row_norms(matrix: &Tensor) -> Tensor {
    tch::no_grad(|| matrix.norm_scalaropt_dim(2.0, [1i64].as_slice(), false))
}

impl QuantizedWeight {
    /// `x W^T`, dequantizing W into x's dtype in the forward pass and again in the
    /// backward pass (never kept by autograd; see `crate::torch_ops`). Falls back to a
    /// plain matmul on a dequantized copy (which autograd keeps) if the ops library is
    /// unavailable.
    pub fn linear(&self, x: &Tensor) -> Tensor {
        let Some(ops) = ops() else {
            return x.linear::<&Tensor>(&self.dequantize(x.kind()), None);
        };
        let state = self as *const QuantizedWeight as *const c_void;
        // SAFETY: `state` points into the model's boxed weight, which outlives every
        // graph built from it (amthal backpropagates or drops each graph within the step
        // that borrowed the model); `dequantize_for_ops` only reads it.
        unsafe { ops.recomputed_linear(x, dequantize_for_ops, state) }
            .unwrap_or_else(|message| panic!("quantized projection: {message}"))
    }
}

/// `x W^T + bias` for a dense weight: f32 on the CPU through the ops library's node
/// (oneDNN's matmul, see `crate::torch_ops`), anything else through libtorch's linear.
pub fn dense_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    if x.device() == tch::Device::Cpu
        && x.kind() == Kind::Float
        && let Some(ops) = ops()
    {
        return ops
            .dense_linear(x, weight, bias)
            .unwrap_or_else(|message| panic!("projection: {message}"));
    }
    x.linear(weight, bias)
}

/// How many times a quantized projection has been dequantized for a matmul on this
/// thread: a forward pass dequantizes each projection once and its backward pass once
/// more (a CPU backward runs on the calling thread; tests check that it recomputes the
/// weight rather than keeps it).
pub fn dequantization_count() -> usize {
    DEQUANTIZATIONS.with(|count| count.get())
}

thread_local! {
    static DEQUANTIZATIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// `WeightFn` for `recomputed_linear`: the weight behind `state` dequantized into the
/// dtype `scalar_type`. Never unwinds into C++: a panic becomes a null result.
unsafe extern "C" fn dequantize_for_ops(state: *const c_void, scalar_type: c_int) -> *mut c_void {
    let made = std::panic::catch_unwind(|| {
        // SAFETY: `state` is the `&QuantizedWeight` that `QuantizedWeight::linear` passed.
        let weight = unsafe { &*(state as *const QuantizedWeight) };
        let kind = float_kind_from_scalar_type(scalar_type)?;
        DEQUANTIZATIONS.with(|count| count.set(count.get() + 1));
        Some(weight.dequantize(kind))
    });
    match made {
        Ok(Some(tensor)) => into_raw_handle(tensor),
        _ => std::ptr::null_mut(),
    }
}

/// Where the tokens of a packed row (training's default) sit in the padded batch of the
/// same documents ([documents, longest document], `batch::Batch::from_encoded`'s
/// layout). Built for CPU batches only (see `LoraDropout::Padded`).
pub struct PaddedLayout {
    /// [documents, longest document].
    pub shape: [i64; 2],
    /// [tokens] int64: each packed token's index in the padded batch flattened to
    /// [documents x longest].
    pub index: Tensor,
}

impl PaddedLayout {
    pub fn shallow_clone(&self) -> PaddedLayout {
        PaddedLayout {
            shape: self.shape,
            index: self.index.shallow_clone(),
        }
    }

    /// The packed tokens' rows of `drawn` [documents x longest, width], values drawn
    /// for every position of the padded batch (all of them when no document is
    /// shorter than the longest).
    pub fn tokens_of(&self, drawn: Tensor) -> Tensor {
        let [rows, longest] = self.shape;
        if self.index.size()[0] == rows * longest {
            drawn
        } else {
            drawn.index_select(0, &self.index)
        }
    }
}

/// How a forward pass applies LoRA dropout to a projection's input.
#[derive(Clone, Copy)]
pub enum LoraDropout<'a> {
    /// Inference: no dropout.
    Off,
    /// Masks of the input's own shape (a padded batch, or a fixed-width graphed one).
    AsInput,
    /// A packed row on the CPU: the masks are drawn in the padded batch's shape and the
    /// packed tokens' rows of them kept. The generator then hands out exactly what it
    /// hands a padded micro-batch (the same draws, and the same count of them, so every
    /// later layer's masks agree too): packing changes no dropout mask, and a packed
    /// run equals a padded one to f32 rounding with dropout as without it. Costs a mask
    /// of the padded shape per projection, as the padded batch's own dropout does.
    ///
    /// Not on a GPU, where a packed row draws masks of its own shape (`AsInput`): an
    /// eager GPU step is bound by kernel launches, and this costs ~4 more per
    /// projection (a 7B LoRA micro-batch: ~900 more in the forward pass alone); and CUDA's
    /// fused dropout scales in f32 with one rounding, which dropout of ones in bf16
    /// cannot reproduce. There, packed and padded runs agree in distribution only, as
    /// `--cuda-graphs`' fixed-width rows do.
    Padded(&'a PaddedLayout),
}

impl LoraDropout<'_> {
    /// `x` with dropout at probability `p`, or `None` when nothing is dropped.
    fn apply(self, x: &Tensor, p: f64) -> Option<Tensor> {
        if p <= 0.0 {
            return None;
        }
        match self {
            LoraDropout::Off => None,
            LoraDropout::AsInput => Some(x.dropout(p, true)),
            LoraDropout::Padded(layout) => {
                let width = *x.size().last().expect("a projection's input has a width");
                let [rows, longest] = layout.shape;
                // On the CPU, dropout of ones is its noise (bernoulli / (1 - p) in x's
                // dtype) bit for bit, drawn as libtorch draws it for a padded input:
                // `x * noise` is then what the padded batch computes.
                let masks = Tensor::ones([rows, longest, width], (x.kind(), x.device()))
                    .dropout(p, true)
                    .view([-1, width]);
                Some(x * layout.tokens_of(masks).view(x.size().as_slice()))
            }
        }
    }
}

/// LoRA matrices for one projection: A [r, in], B [out, r], as PEFT stores them.
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    /// DoRA (PEFT's `use_dora`, Liu et al. 2024): a trainable magnitude per output row
    /// [out], f32. The projection's weight becomes `m * V / ||V||_row` with V = W +
    /// scaling B A, the norm treated as a constant in the backward pass (the paper's
    /// section 4.3, as PEFT does). None: plain LoRA.
    pub magnitude: Option<Tensor>,
    /// DoRA beside a quantized weight, which cannot hold the folded sum: the factor
    /// m / ||V||_row computed once for generation (`lora::fold_adapters`), instead of
    /// from the dequantized weight at every decoded token. None: computed per forward.
    pub frozen_factor: Option<Tensor>,
    /// PiSSA / OLoRA (`lora_init`): the factors (A0, B0) this adapter started from,
    /// which the base weight gave up (it holds W - scaling B0 A0). Saving converts the
    /// adapter with them into a plain one on the original base. None: a plain adapter.
    pub residual_init: Option<(Tensor, Tensor)>,
}

impl Lora {
    /// B A [out, in] in f32, the adapter's change to the weight before scaling.
    fn product(&self) -> Tensor {
        self.b
            .to_kind(Kind::Float)
            .matmul(&self.a.to_kind(Kind::Float))
    }

    /// DoRA's per-row factor m / ||W + scaling B A||_row in f32, [out], without a
    /// gradient through the norm (PEFT's `weight_norm.detach()`); `weight`: the base
    /// weight in any dtype. The norm is taken in f32 (PEFT takes it in the
    /// activations' dtype: the same in f32, rounding apart in bf16).
    pub fn dora_factor(&self, magnitude: &Tensor, weight: &Tensor) -> Tensor {
        let merged = tch::no_grad(|| weight.to_kind(Kind::Float) + self.product() * self.scaling);
        magnitude.to_kind(Kind::Float) / row_norms(&merged)
    }
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight: Weight::Dense(weight),
            bias,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor, dropout: LoraDropout) -> Tensor {
        if let (Some(lora), Weight::Dense(weight), Some(ops)) = (&self.lora, &self.weight, ops())
            && lora.magnitude.is_none()
        {
            let frozen = !weight.requires_grad()
                && self.bias.as_ref().is_none_or(|bias| !bias.requires_grad());
            if frozen {
                let dropped = dropout.apply(x, lora.dropout);
                return ops
                    .lora_linear(
                        x,
                        dropped.as_ref(),
                        LoraProjection {
                            weight,
                            bias: self.bias.as_ref(),
                            a: &lora.a,
                            b: &lora.b,
                            scaling: lora.scaling,
                        },
                    )
                    .unwrap_or_else(|message| panic!("LoRA projection: {message}"));
            }
        }
        self.forward_unfused(x, dropout)
    }

    /// The same sum through autograd's own operations: a quantized base, trainable
    /// base weights, a DoRA adapter, or no ops library (and the reference the fused
    /// node is tested against).
    pub fn forward_unfused(&self, x: &Tensor, dropout: LoraDropout) -> Tensor {
        let y = match &self.weight {
            Weight::Dense(w) => dense_linear(x, w, self.bias.as_ref()),
            Weight::Quantized(q) => match &self.bias {
                Some(bias) => q.linear(x) + bias,
                None => q.linear(x),
            },
        };
        let Some(lora) = &self.lora else {
            return y;
        };
        // Trainable A/B are kept in f32 and cast to the activations' dtype, as autocast does.
        let kind = x.kind();
        let dropped = dropout.apply(x, lora.dropout);
        let lora_input = dropped.as_ref().unwrap_or(x);
        let update = lora_input
            .linear::<&Tensor>(&lora.a.to_kind(kind), None)
            .linear::<&Tensor>(&lora.b.to_kind(kind), None);
        let Some(magnitude) = &lora.magnitude else {
            return y + update * lora.scaling;
        };
        // DoRA, as PEFT's DoraLinearLayer.forward adds it to the base output:
        // (factor - 1) * x'W^T + factor * scaling * x'A^T B^T, where x' is the dropped
        // input (with dropout the base product is taken again on it, as PEFT does).
        // The term is formed in f32 (PEFT's f32 magnitudes promote it) and rounded
        // once: in bf16 a factor within ~0.3 % of 1 would round to exactly 1.
        let factor = match &lora.frozen_factor {
            Some(factor) => factor.shallow_clone(),
            None => lora.dora_factor(magnitude, &self.weight.to_f32()),
        };
        let base = match (&dropped, &self.bias) {
            (None, None) => y.shallow_clone(),
            (None, Some(bias)) => &y - bias,
            (Some(dropped), _) => self.base_product(dropped),
        };
        let term = (&factor - 1.0) * base.to_kind(Kind::Float)
            + factor * update.to_kind(Kind::Float) * lora.scaling;
        y + term.to_kind(kind)
    }

    /// `x W^T` without the bias.
    fn base_product(&self, x: &Tensor) -> Tensor {
        match &self.weight {
            Weight::Dense(w) => dense_linear(x, w, None),
            Weight::Quantized(q) => q.linear(x),
        }
    }

    /// The dense weight with the adapter folded in: W + scaling * B A (computed in
    /// f32), and for DoRA that times m / ||W + scaling * B A||_row (PEFT's merge).
    /// Dense weights only (a quantized one cannot hold the sum).
    pub fn merged_weight(&self) -> Tensor {
        let weight = self.weight.expect_dense();
        match &self.lora {
            None => weight.shallow_clone(),
            Some(lora) => {
                let merged = weight.to_kind(Kind::Float) + lora.product() * lora.scaling;
                let merged = match &lora.magnitude {
                    None => merged,
                    Some(magnitude) => {
                        (magnitude.to_kind(Kind::Float) / row_norms(&merged)).unsqueeze(1) * &merged
                    }
                };
                merged.to_kind(weight.kind())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A projection [5 -> 7] with a rank-3 adapter whose B is not zero.
    fn projection(kind: Kind, bias: bool) -> Linear {
        tch::manual_seed(7);
        let options = (Kind::Float, Device::Cpu);
        let weight = Tensor::randn([7, 5], options).to_kind(kind);
        let bias = bias.then(|| Tensor::randn([7], options).to_kind(kind));
        let mut linear = Linear::new(weight, bias);
        linear.lora = Some(Lora {
            a: Tensor::randn([3, 5], options).set_requires_grad(true),
            b: Tensor::randn([7, 3], options).set_requires_grad(true),
            scaling: 2.5,
            dropout: 0.0,
            magnitude: None,
            frozen_factor: None,
            residual_init: None,
        });
        linear
    }

    /// Output and the gradients of x, A and B after a backward pass of `y * probe`.
    fn run(linear: &Linear, x: &Tensor, fused: bool, seed: i64) -> Vec<Tensor> {
        let lora = linear.lora.as_ref().unwrap();
        for t in [&lora.a, &lora.b] {
            if t.grad().defined() {
                ops().unwrap().clear_grads(&[t]).unwrap();
            }
        }
        let x = x.detach().set_requires_grad(true);
        tch::manual_seed(seed);
        let y = if fused {
            linear.forward(&x, LoraDropout::AsInput)
        } else {
            linear.forward_unfused(&x, LoraDropout::AsInput)
        };
        let probe = Tensor::arange(y.numel() as i64, (Kind::Float, Device::Cpu))
            .view(y.size().as_slice())
            .sin();
        (y.to_kind(Kind::Float) * probe).sum(Kind::Float).backward();
        vec![
            y.to_kind(Kind::Float),
            x.grad().to_kind(Kind::Float),
            lora.a.grad(),
            lora.b.grad(),
        ]
    }

    fn max_relative_difference(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1e-12);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// The fused LoRA node (csrc/torch_ops.cpp) gives autograd's output and gradients:
    /// f32 within 1e-6, with and without a bias and dropout, on [B, T, in] inputs; in
    /// bf16 (A and B in f32, as training keeps them) within bf16's rounding.
    #[test]
    fn fused_lora_node_matches_autograd() {
        for (kind, bias, dropout, limit) in [
            (Kind::Float, false, 0.0, 1e-6),
            (Kind::Float, true, 0.0, 1e-6),
            (Kind::Float, true, 0.3, 1e-6),
            (Kind::BFloat16, false, 0.0, 2e-2),
        ] {
            let mut linear = projection(kind, bias);
            linear.lora.as_mut().unwrap().dropout = dropout;
            let x = Tensor::randn([2, 4, 5], (Kind::Float, Device::Cpu)).to_kind(kind);
            let fused = run(&linear, &x, true, 11);
            let reference = run(&linear, &x, false, 11);
            for (name, (a, b)) in ["y", "x.grad", "A.grad", "B.grad"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                assert_eq!(a.size(), b.size(), "{name}");
                assert_eq!(a.kind(), b.kind(), "{name}");
                let difference = max_relative_difference(a, b);
                assert!(
                    difference < limit,
                    "{kind:?} bias={bias} dropout={dropout}: {name} differs by {difference}"
                );
            }
            // Dropout really masked something (the fused path saw a dropped input).
            if dropout > 0.0 {
                let undropped = {
                    linear.lora.as_mut().unwrap().dropout = 0.0;
                    run(&linear, &x, true, 11)
                };
                assert!(max_relative_difference(&undropped[0], &fused[0]) > 1e-3);
            }
        }
    }

    /// `dense_linear` (the ops library's node: oneDNN's f32 matmul on the CPU) gives
    /// libtorch's linear, forward and backward, to within f32 rounding: output and the
    /// gradients of x, W and the bias on a [B, T, in] input, and of x alone when W and
    /// the bias are frozen.
    #[test]
    fn dense_node_matches_libtorch_linear() {
        tch::manual_seed(3);
        let options = (Kind::Float, Device::Cpu);
        let x = Tensor::randn([2, 9, 40], options);
        let weight = Tensor::randn([70, 40], options);
        let bias = Tensor::randn([70], options);
        let probe = Tensor::randn([2, 9, 70], options);
        for train_weight in [true, false] {
            let run = |fused: bool| {
                let x = x.detach().set_requires_grad(true);
                let [weight, bias] =
                    [&weight, &bias].map(|t| t.detach().set_requires_grad(train_weight));
                let y = if fused {
                    dense_linear(&x, &weight, Some(&bias))
                } else {
                    x.linear(&weight, Some(&bias))
                };
                (&y * &probe).sum(Kind::Float).backward();
                let mut out = vec![y.detach(), x.grad()];
                if train_weight {
                    out.extend([weight.grad(), bias.grad()]);
                } else {
                    assert!(!weight.grad().defined() && !bias.grad().defined());
                }
                out
            };
            let (node, reference) = (run(true), run(false));
            for (name, (a, b)) in ["y", "x.grad", "W.grad", "bias.grad"]
                .iter()
                .zip(node.iter().zip(&reference))
            {
                assert_eq!(a.size(), b.size(), "{name}");
                let scale = b.abs().max().double_value(&[]);
                let difference = (a - b).abs().max().double_value(&[]) / scale;
                assert!(
                    difference < 1e-6,
                    "{name} (trained W: {train_weight}) differs by {difference}"
                );
            }
        }
    }
}
