//! Encoded examples into right-padded tensors for training and loss: real tokens
//! first, then pad id 0 with label -100 (the pad id never reaches the loss, so it does
//! not matter that it may equal EOS). No attention mask is needed: with right padding,
//! causal attention is exact for every real token (see `loss::answer_token_losses`).

use tch::{Device, Kind, Tensor};

use crate::encode::{Encoded, IGNORE_INDEX};

/// A right-padded batch.
pub struct Batch {
    /// [B, T] int64
    pub input_ids: Tensor,
    /// [B, T] int64, 0.. per row
    pub positions: Tensor,
    /// [B, T] int64, -100 on prompt and padding
    pub labels: Tensor,
}

impl Batch {
    pub fn from_encoded(rows: &[&Encoded], device: Device) -> Batch {
        let width = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut labels = Vec::with_capacity(rows.len() * width);
        for row in rows {
            let pad = width - row.input_ids.len();
            ids.extend(row.input_ids.iter().map(|&i| i as i64));
            ids.extend(std::iter::repeat_n(0i64, pad));
            labels.extend(row.labels.iter().copied());
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        let shape = [rows.len() as i64, width as i64];
        let positions = Tensor::arange(width as i64, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .expand(shape, false)
            .contiguous();
        Batch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
            positions: positions.to_device(device),
            labels: Tensor::from_slice(&labels).view(shape).to_device(device),
        }
    }
}
