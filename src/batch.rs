//! Encoded examples into tensors for training and loss.
//!
//! - Packed (training's default; transformers' DataCollatorWithFlattening): the rows
//!   one after another in a single row, positions restarting at 0 for each document,
//!   and the documents' spans recorded so attention runs per document. No position is
//!   spent on padding.
//! - Right-padded (`--no-packing`, and the loss and evaluation batches, which are
//!   sorted by length): real tokens first, then pad id 0 with label -100 (the pad id
//!   never reaches the loss, so it does not matter that it may equal EOS). No
//!   attention mask is needed: with right padding, causal attention is exact for every
//!   real token (see `loss::answer_token_losses`).
//!
//! `--cuda-graphs` lays a packed batch out at a fixed width (`FixedWidthLayout`), the
//! shapes a recorded graph replays.

use tch::{Device, Kind, Tensor};

use crate::encode::{Encoded, IGNORE_INDEX};
use crate::model::linear::PaddedLayout;

/// A right-padded or packed batch.
pub struct Batch {
    /// [B, T] int64
    pub input_ids: Tensor,
    /// [B, T] int64, 0.. per row
    pub positions: Tensor,
    /// Packed batches: where the documents are.
    pub packing: Option<Packing>,
    /// Where the loss is computed, found on the host so the training step needs no
    /// device-to-host sync for it: the flat positions (row x width + t) whose next
    /// token is trained, each one's row, and that next token.
    pub answers: Answers,
}

/// Where a packed batch's documents are.
pub struct Packing {
    /// Each document's (start, length) in the single row: attention runs per document.
    pub segments: Vec<(i64, i64)>,
    /// Where each token would sit in the padded batch of the same rows: LoRA dropout
    /// draws its masks in that shape, so packing changes no mask. CPU batches only
    /// (`LoraDropout::Padded` says why).
    pub padded_layout: Option<PaddedLayout>,
}

/// The trained positions of a batch (see `Batch::answers`).
pub struct Answers {
    /// [N] int64 indices into the batch flattened to [B x T].
    pub positions: Tensor,
    /// [N] int64 row of each.
    pub rows: Tensor,
    /// [N] int64 the token each position is trained to predict.
    pub targets: Tensor,
    /// Label smoothing (HF Trainer's label_smoothing_factor): each position's loss is
    /// (1 - e) x its cross-entropy + e x the mean over the vocabulary of -log p, as
    /// transformers' `LabelSmoother` and torch's `label_smoothing` compute it. 0: plain
    /// cross-entropy (every batch starts so; `Batch::with_label_smoothing` sets it).
    pub label_smoothing: f64,
}

impl Answers {
    /// From labels [rows x width] (row-major): position t is trained on label t + 1.
    fn from_labels(labels: &[i64], width: usize, device: Device) -> Answers {
        let (mut positions, mut rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for (row, row_labels) in labels.chunks(width.max(1)).enumerate() {
            for (t, &label) in row_labels.iter().enumerate().skip(1) {
                if label != IGNORE_INDEX {
                    positions.push((row * width + t - 1) as i64);
                    rows.push(row as i64);
                    targets.push(label);
                }
            }
        }
        let tensor = |values: &[i64]| Tensor::from_slice(values).to_device(device);
        Answers {
            positions: tensor(&positions),
            rows: tensor(&rows),
            targets: tensor(&targets),
            label_smoothing: 0.0,
        }
    }
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
            packing: None,
            answers: Answers::from_labels(&labels, width, device),
        }
    }

    /// The rows packed into one row [1, sum of lengths], no padding.
    pub fn packed(rows: &[&Encoded], device: Device) -> Batch {
        let packed = PackedRows::new(rows);
        let total = packed.ids.len();
        let shape = [1, total as i64];
        Batch {
            input_ids: Tensor::from_slice(&packed.ids)
                .view(shape)
                .to_device(device),
            positions: Tensor::from_slice(&packed.positions)
                .view(shape)
                .to_device(device),
            packing: Some(Packing {
                padded_layout: (device == Device::Cpu)
                    .then(|| padded_layout(&packed.segments, device)),
                segments: packed.segments,
            }),
            answers: Answers::from_labels(&packed.labels, total, device),
        }
    }

    /// The batch with its loss label-smoothed by `factor` (`Answers::label_smoothing`).
    pub fn with_label_smoothing(mut self, factor: f64) -> Batch {
        self.answers.label_smoothing = factor;
        self
    }

    /// A padded batch, or a packed one when `packing`.
    pub fn build(rows: &[&Encoded], device: Device, packing: bool) -> Batch {
        if packing {
            Batch::packed(rows, device)
        } else {
            Batch::from_encoded(rows, device)
        }
    }

    /// Positions the model computes (padding included).
    pub fn positions_computed(&self) -> i64 {
        self.input_ids.numel() as i64
    }
}

/// Each packed token's index in the padded batch of the same documents: document d's
/// token t sits at d x longest + t.
fn padded_layout(segments: &[(i64, i64)], device: Device) -> PaddedLayout {
    let longest = segments
        .iter()
        .map(|&(_, length)| length)
        .max()
        .unwrap_or(0);
    let index: Vec<i64> = segments
        .iter()
        .enumerate()
        .flat_map(|(document, &(_, length))| {
            (0..length).map(move |t| document as i64 * longest + t)
        })
        .collect();
    PaddedLayout {
        shape: [segments.len() as i64, longest],
        index: Tensor::from_slice(&index).to_device(device),
    }
}

/// Rows one after another in a single row (`Batch::packed`, `FixedWidthLayout`).
struct PackedRows {
    ids: Vec<i64>,
    /// 0.. within each document.
    positions: Vec<i64>,
    /// Each position's label (a document's first one always ignored).
    labels: Vec<i64>,
    /// Each document's (start, length).
    segments: Vec<(i64, i64)>,
}

impl PackedRows {
    fn new(rows: &[&Encoded]) -> PackedRows {
        let total: usize = rows.iter().map(|r| r.input_ids.len()).sum();
        let mut packed = PackedRows {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            labels: Vec::with_capacity(total),
            segments: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            packed
                .segments
                .push((packed.ids.len() as i64, row.input_ids.len() as i64));
            packed.ids.extend(row.input_ids.iter().map(|&i| i as i64));
            packed.positions.extend(0..row.input_ids.len() as i64);
            // The last token of one document must not be trained to predict the first
            // of the next: its first label is always ignored (prompts are never
            // trained anyway, but this does not depend on it).
            packed.labels.push(IGNORE_INDEX);
            packed.labels.extend(row.labels.iter().skip(1).copied());
        }
        packed
    }
}

/// A packed micro-batch laid out at a fixed width (`--cuda-graphs`): a recorded graph
/// replays the same shapes, so everything that varies from batch to batch is a value
/// in a tensor of the width's size rather than a shape or a host-side list.
/// - The rows are packed as `Batch::packed` packs them, then padded to `width` with
///   token 0 at positions 0.., which form a document of their own (so each padded
///   query still attends to itself; a fully masked row would be NaN).
/// - `documents`: each position's document index; attention stays within one.
/// - `targets`: the token each position is trained to predict, or IGNORE_INDEX: what
///   `Answers` lists by position, spread over the whole width.
#[derive(Debug, PartialEq)]
pub struct FixedWidthLayout {
    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub documents: Vec<i64>,
    pub targets: Vec<i64>,
}

impl FixedWidthLayout {
    /// `rows` must fit `width` (see `bucket_width`).
    pub fn new(rows: &[&Encoded], width: usize) -> FixedWidthLayout {
        let packed = PackedRows::new(rows);
        let used = packed.ids.len();
        assert!(used <= width, "{used} tokens do not fit a width of {width}");
        let padding = width - used;
        let mut documents = Vec::with_capacity(width);
        for (document, &(_, length)) in packed.segments.iter().enumerate() {
            documents.extend(std::iter::repeat_n(document as i64, length as usize));
        }
        documents.extend(std::iter::repeat_n(packed.segments.len() as i64, padding));
        let mut positions = packed.positions;
        positions.extend(0..padding as i64);
        let mut input_ids = packed.ids;
        input_ids.extend(std::iter::repeat_n(0, padding));
        // Position t is trained on label t + 1 (as `Answers::from_labels`).
        let mut targets: Vec<i64> = packed.labels.into_iter().skip(1).collect();
        targets.resize(width, IGNORE_INDEX);
        FixedWidthLayout {
            input_ids,
            positions,
            documents,
            targets,
        }
    }
}

/// The width a packed micro-batch of `tokens` is laid out at: the next multiple of
/// `bucket` (one recorded graph per width).
pub fn bucket_width(tokens: usize, bucket: usize) -> usize {
    tokens.max(1).div_ceil(bucket) * bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(ids: &[u32], labels: &[i64]) -> Encoded {
        Encoded {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            prompt_len: labels.iter().take_while(|&&l| l == IGNORE_INDEX).count(),
            truncated: false,
        }
    }

    #[test]
    fn packing_restarts_positions_and_never_trains_across_documents() {
        let a = encoded(&[5, 6, 7], &[IGNORE_INDEX, 6, 7]);
        let b = encoded(&[8, 9], &[8, 9]);
        let batch = Batch::packed(&[&a, &b], Device::Cpu);
        let values = |t: &Tensor| Vec::<i64>::try_from(t.view([-1])).unwrap();
        assert_eq!(values(&batch.input_ids), vec![5, 6, 7, 8, 9]);
        assert_eq!(values(&batch.positions), vec![0, 1, 2, 0, 1]);
        let packing = batch.packing.as_ref().unwrap();
        assert_eq!(packing.segments, vec![(0, 3), (3, 2)]);
        let layout = packing.padded_layout.as_ref().unwrap();
        assert_eq!(layout.shape, [2, 3]);
        assert_eq!(
            Vec::<i64>::try_from(&layout.index).unwrap(),
            vec![0, 1, 2, 3, 4]
        );
        // The shorter document first: its padding is skipped.
        let reordered = Batch::packed(&[&b, &a], Device::Cpu).packing.unwrap();
        assert_eq!(
            Vec::<i64>::try_from(&reordered.padded_layout.unwrap().index).unwrap(),
            vec![0, 1, 3, 4, 5]
        );
        // Positions 0 and 1 predict 6 and 7; position 3 predicts 9. Never position 2:
        // b's first label (8) would make a's last token predict b's first.
        assert_eq!(values(&batch.answers.positions), vec![0, 1, 3]);
        assert_eq!(values(&batch.answers.targets), vec![6, 7, 9]);
        assert_eq!(batch.positions_computed(), 5);
        let padded = Batch::from_encoded(&[&a, &b], Device::Cpu);
        assert_eq!(padded.positions_computed(), 6);
        // Rows of width 3: a's positions 0, 1; b's position 0 (flat 3) predicts 9.
        assert_eq!(values(&padded.answers.positions), vec![0, 1, 3]);
        assert_eq!(values(&padded.answers.rows), vec![0, 0, 1]);
        assert_eq!(values(&padded.answers.targets), vec![6, 7, 9]);
    }

    /// The fixed-width layout holds the packed batch's tokens, positions and trained
    /// positions, and the padding is a document of its own that trains nothing.
    #[test]
    fn the_fixed_width_layout_is_the_packed_batch_padded() {
        let a = encoded(&[5, 6, 7], &[IGNORE_INDEX, 6, 7]);
        let b = encoded(&[8, 9], &[8, 9]);
        let layout = FixedWidthLayout::new(&[&a, &b], 8);
        let x = IGNORE_INDEX;
        assert_eq!(layout.input_ids, vec![5, 6, 7, 8, 9, 0, 0, 0]);
        assert_eq!(layout.positions, vec![0, 1, 2, 0, 1, 0, 1, 2]);
        assert_eq!(layout.documents, vec![0, 0, 0, 1, 1, 2, 2, 2]);
        assert_eq!(layout.targets, vec![6, 7, x, 9, x, x, x, x]);
        // The same trained positions and targets as the packed batch's answers.
        let packed = Batch::packed(&[&a, &b], Device::Cpu);
        let values = |t: &Tensor| Vec::<i64>::try_from(t.view([-1])).unwrap();
        let trained: Vec<(i64, i64)> = (0..)
            .zip(layout.targets.iter().copied())
            .filter(|&(_, target)| target != x)
            .collect();
        let answers: Vec<(i64, i64)> = values(&packed.answers.positions)
            .into_iter()
            .zip(values(&packed.answers.targets))
            .collect();
        assert_eq!(trained, answers);
        // Exactly full: no padding document.
        let full = FixedWidthLayout::new(&[&a, &b], 5);
        assert_eq!(full.documents, vec![0, 0, 0, 1, 1]);
        assert_eq!(full.targets, vec![6, 7, x, 9, x]);
        assert_eq!(bucket_width(5, 4), 8);
        assert_eq!(bucket_width(8, 4), 8);
        assert_eq!(bucket_width(0, 4), 4);
    }
}
