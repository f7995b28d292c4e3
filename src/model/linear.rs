//! A linear projection with an optional LoRA adapter beside it.

use tch::{Kind, Tensor};

/// `y = x W^T + b`, plus `scaling * dropout(x) A^T B^T` when a LoRA adapter is attached.
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// LoRA matrices for one projection: A [r, in], B [out, r], as PEFT stores them.
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.linear(&self.weight, self.bias.as_ref());
        match &self.lora {
            None => y,
            Some(lora) => {
                // Trainable A/B are kept in f32 and cast to the activations' dtype, as autocast does.
                let kind = x.kind();
                let x = if train && lora.dropout > 0.0 {
                    x.dropout(lora.dropout, true)
                } else {
                    x.shallow_clone()
                };
                let update = x
                    .linear::<&Tensor>(&lora.a.to_kind(kind), None)
                    .linear::<&Tensor>(&lora.b.to_kind(kind), None);
                y + update * lora.scaling
            }
        }
    }

    /// The weight with the adapter folded in: W + scaling * B A (computed in f32).
    pub fn merged_weight(&self) -> Tensor {
        match &self.lora {
            None => self.weight.shallow_clone(),
            Some(lora) => {
                let delta = lora
                    .b
                    .to_kind(Kind::Float)
                    .matmul(&lora.a.to_kind(Kind::Float))
                    * lora.scaling;
                (self.weight.to_kind(Kind::Float) + delta).to_kind(self.weight.kind())
            }
        }
    }
}
