//! Projections that read the same input, fused into one matmul for generation:
//! q/k/v (one `[q + k + v, hidden]` weight) and gate/up (`[2 x intermediate, hidden]`),
//! as vLLM and llama.cpp lay them out. A decode step then launches 4 matmuls per layer
//! instead of 7, and each is wider (a batch-1 matmul reads its weight at a better
//! share of the memory bandwidth when it has more output columns to spread over the
//! GPU). The separate projections become views into the fused weight, so nothing is
//! held twice and every name still reads its own tensor.
//!
//! Only for inference with plain dense projections: a quantized one, an attached
//! (unfolded) LoRA adapter, or a weight replaced after fusing, makes the forward use the separate projections again
//! (`Fused::is_current`).

use tch::Tensor;

use super::linear::{Linear, Weight, dense_linear};
use super::llama::Llama;

/// Several projections' weights (and biases) stacked along the output dimension.
pub struct Fused {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Output rows of each part, in order.
    pub rows: Vec<i64>,
}

impl Fused {
    /// Stacks `parts` and turns each into a view of the stacked weight. `None` when a
    /// part has an adapter attached or the parts disagree on having a bias.
    fn stack(parts: &mut [&mut Linear]) -> Option<Fused> {
        if parts
            .iter()
            .any(|p| p.lora.is_some() || p.weight.dense().is_none())
            || !(parts.iter().all(|p| p.bias.is_some()) || parts.iter().all(|p| p.bias.is_none()))
        {
            return None;
        }
        let weight = Tensor::cat(
            &parts
                .iter()
                .map(|p| p.weight.expect_dense())
                .collect::<Vec<_>>(),
            0,
        );
        let bias = parts[0].bias.is_some().then(|| {
            Tensor::cat(
                &parts
                    .iter()
                    .map(|p| p.bias.as_ref().expect("checked above"))
                    .collect::<Vec<_>>(),
                0,
            )
        });
        let rows: Vec<i64> = parts.iter().map(|p| p.weight.size()[0]).collect();
        let mut start = 0;
        for (part, &n) in parts.iter_mut().zip(&rows) {
            part.weight = Weight::Dense(weight.narrow(0, start, n));
            if let Some(bias) = &bias {
                part.bias = Some(bias.narrow(0, start, n));
            }
            start += n;
        }
        Some(Fused { weight, bias, rows })
    }

    /// Whether `parts` are still the plain views this fusion made (no adapter attached
    /// since, no weight replaced).
    pub fn is_current(&self, parts: &[&Linear]) -> bool {
        let element = self.weight.kind().elt_size_in_bytes() as i64 * self.weight.size()[1];
        let base = self.weight.data_ptr() as i64;
        let mut start = 0;
        parts.iter().zip(&self.rows).all(|(part, &n)| {
            let here = part.lora.is_none()
                && part
                    .weight
                    .dense()
                    .is_some_and(|w| w.data_ptr() as i64 == base + start * element);
            start += n;
            here
        })
    }

    /// The parts' outputs side by side along the last dimension, from one matmul.
    pub fn forward_whole(&self, x: &Tensor) -> Tensor {
        dense_linear(x, &self.weight, self.bias.as_ref())
    }

    /// The parts' outputs for input `x` from one matmul: views along the last dimension.
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let all = self.forward_whole(x);
        let mut start = 0;
        self.rows
            .iter()
            .map(|&n| {
                let part = all.narrow(-1, start, n);
                start += n;
                part
            })
            .collect()
    }
}

/// Fuses q/k/v and gate/up in every layer where the projections are plain, and turns
/// on the fused RMSNorm kernel and the decode step's folds on GPUs (`Llama::fused_norm`,
/// `Llama::decode_folds`); returns how many layers were fused. For generation only.
pub fn fuse_projections(model: &mut Llama) -> usize {
    model.fused_norm = true;
    // AMTHAL_DECODE_FOLDS: 0 keeps the unfolded step, 1 folds on the CPU too (to
    // compare there); unset, GPUs only (the CPU is not bound by kernel launches).
    model.decode_folds = match std::env::var("AMTHAL_DECODE_FOLDS").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => model.device != tch::Device::Cpu,
    };
    tch::no_grad(|| {
        let mut fused = 0;
        for layer in model.layers.iter_mut() {
            let attn = &mut layer.self_attn;
            attn.qkv = Fused::stack(&mut [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj]);
            let mlp = &mut layer.mlp;
            mlp.gate_up = Fused::stack(&mut [&mut mlp.gate_proj, &mut mlp.up_proj]);
            if attn.qkv.is_some() && mlp.gate_up.is_some() {
                fused += 1;
            }
        }
        fused
    })
}
