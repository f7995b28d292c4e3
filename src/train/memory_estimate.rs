//! How much GPU memory a training setup needs, estimated from the config before any
//! weight is loaded, so a setup that cannot fit the card is refused at once with the
//! estimate and the flag that would fit (instead of an out-of-memory error minutes
//! in). Weights, gradients and optimizer state are counted exactly from the shapes;
//! activations roughly (layer inputs kept under gradient checkpointing, or about 34
//! hidden-sized values per token and layer without it, plus one layer's working set
//! and the f32 logits of the answer tokens). It is a guide, not a promise: the
//! caching allocator's fragmentation comes on top.

use tch::Kind;

use super::moments::{BLOCK, MIN_8BIT_NUMEL, OptimKind};
use crate::model::config::LlamaConfig;
use crate::model::load::{expected_tensors, is_projection_weight};
use crate::model::quantized::{QuantKind, Quantization};

/// What training holds on the device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    /// Optimizer state kept in host memory (`--offload-optimizer`), not on the device.
    pub host_optimizer: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }

    pub fn describe(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        let host = if self.host_optimizer > 0 {
            format!(
                ", and {:.1} GB of optimizer state in host memory",
                gb(self.host_optimizer)
            )
        } else {
            String::new()
        };
        format!(
            "~{:.1} GB (weights {:.1}, gradients {:.1}, optimizer {:.1}, activations ~{:.1}){host}",
            gb(self.total()),
            gb(self.weights),
            gb(self.gradients),
            gb(self.optimizer),
            gb(self.activations)
        )
    }
}

/// The training setup the estimate is for.
#[derive(Debug, Clone)]
pub struct Setup<'a> {
    pub config: &'a LlamaConfig,
    /// Compute dtype of the weights.
    pub kind: Kind,
    /// LoRA rank and target projections, or None for a full fine-tune.
    pub lora: Option<(i64, &'a [String])>,
    /// `--use-dora`: a magnitude per output row beside each adapter, and DoRA's
    /// working set (see `estimate`).
    pub dora: bool,
    pub optim: OptimKind,
    pub batch_size: usize,
    pub tokens_per_row: usize,
    pub gradient_checkpointing: bool,
    /// `--optim-in-backward`: one layer's gradients at a time, and every micro-batch
    /// of the accumulation window keeps its layer inputs.
    pub optim_in_backward: bool,
    pub grad_accum: usize,
    /// `--quantize`: the decoder projections' storage (LoRA only).
    pub quantize: Option<Quantization>,
    /// `--zero 1`: the optimizer state is split over this many ranks (1: not split).
    pub optimizer_shards: usize,
    /// `--offload-optimizer`: the state in host memory; the device holds one update
    /// chunk's copy of it.
    pub offload_optimizer: bool,
}

/// Bytes per weight of a quantized projection with `columns` inputs: 4-bit codes and
/// a block absmax per 64 (f32, or 8 bits plus an f32 per 256 blocks doubly
/// quantized), or 8-bit codes and an f32 per row.
fn quantized_bytes_per_weight(quantization: Quantization, columns: u64) -> f64 {
    match (quantization.kind, quantization.double_quant) {
        (QuantKind::Int8, _) => 1.0 + 4.0 / columns as f64,
        (_, false) => 0.5 + 4.0 / 64.0,
        (_, true) => 0.5 + 1.0 / 64.0 + 4.0 / (64.0 * 256.0),
    }
}

/// Optimizer bytes per trained parameter (beyond the parameter and its gradient).
fn optimizer_bytes_per_parameter(optim: OptimKind, kind: Kind) -> f64 {
    let master = if kind == Kind::Float { 0.0 } else { 4.0 };
    let compensation = if kind == Kind::BFloat16 { 2.0 } else { 0.0 };
    match optim {
        OptimKind::AdamW => 8.0 + master,
        OptimKind::AdamWBf16 => 4.0 + compensation,
        // Two 8-bit codes and one f32 absmax per 256 values each.
        OptimKind::AdamW8bit => 2.0 + 8.0 / 256.0 + compensation,
        // A row and a column per matrix (f32): megabytes for a 7B, counted as nothing.
        OptimKind::Adafactor => compensation,
    }
}

/// Parameters of the model, all of them (dense count, whatever their storage).
fn model_parameters(config: &LlamaConfig) -> u64 {
    expected_tensors(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<i64>() as u64)
        .sum()
}

/// A projection's (inputs, outputs) by its name ("q_proj", ...).
fn projection_shape(config: &LlamaConfig, projection: &str) -> (u64, u64) {
    let h = config.hidden_size as u64;
    let i = config.intermediate_size as u64;
    let q = (config.num_attention_heads * config.head_dim) as u64;
    let kv = (config.num_key_value_heads * config.head_dim) as u64;
    match projection {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "down_proj" => (i, h),
        _ => (h, i),
    }
}

/// The value count of every tensor training updates: the whole model's, or the LoRA
/// matrices' (A [r, in] and B [out, r] per targeted projection and layer, and DoRA's
/// magnitude [out]).
fn trained_tensor_sizes(setup: &Setup) -> Vec<u64> {
    trained_tensor_shapes(setup)
        .iter()
        .map(|shape| shape.iter().product())
        .collect()
}

/// The shape of every tensor training updates (see `trained_tensor_sizes`).
fn trained_tensor_shapes(setup: &Setup) -> Vec<Vec<u64>> {
    let config = setup.config;
    match setup.lora {
        None => expected_tensors(config)
            .iter()
            .map(|(_, shape)| shape.iter().map(|&d| d as u64).collect())
            .collect(),
        Some((rank, targets)) => {
            let rank = rank as u64;
            let per_layer: Vec<Vec<u64>> = targets
                .iter()
                .flat_map(|t| {
                    let (inputs, outputs) = projection_shape(config, t);
                    let magnitude = setup.dora.then(|| vec![outputs]);
                    [vec![rank, inputs], vec![outputs, rank]]
                        .into_iter()
                        .chain(magnitude)
                })
                .collect();
            (0..config.num_hidden_layers)
                .flat_map(|_| per_layer.iter().cloned())
                .collect()
        }
    }
}

/// Adafactor's state of one tensor in bytes (`moments.rs`): a row and a column of f32
/// means for a matrix, an f32 value per element for a vector; plus `compensation`
/// bytes per element.
fn adafactor_state_bytes(shape: &[u64], compensation: u64) -> u64 {
    let values: u64 = shape.iter().product();
    let second_moment = match shape {
        [leading @ .., rows, columns] => {
            let leading: u64 = leading.iter().product();
            leading * (rows + columns)
        }
        _ => values,
    };
    4 * second_moment + compensation * values
}

/// The parameters training updates, and the bytes each takes: the whole model in the
/// compute dtype, or the LoRA matrices (kept in f32).
fn trained_parameters(setup: &Setup) -> (u64, u64) {
    let element = match setup.lora {
        None => setup.kind.elt_size_in_bytes() as u64,
        Some(_) => 4,
    };
    (trained_tensor_sizes(setup).iter().sum(), element)
}

/// The optimizer state of all trained tensors, in bytes, tensor by tensor as
/// `moments.rs` lays it out: 8-bit moments in whole blocks of 256 values, and f32
/// moments for tensors under 4096 values (as bitsandbytes does).
fn optimizer_state_bytes(setup: &Setup) -> u64 {
    let trained_kind = match setup.lora {
        None => setup.kind,
        Some(_) => Kind::Float,
    };
    let per_parameter = optimizer_bytes_per_parameter(setup.optim, trained_kind);
    let compensation = if trained_kind == Kind::BFloat16 { 2 } else { 0 };
    if setup.optim == OptimKind::Adafactor {
        return trained_tensor_shapes(setup)
            .iter()
            .map(|shape| adafactor_state_bytes(shape, compensation))
            .sum();
    }
    trained_tensor_sizes(setup)
        .iter()
        .map(|&values| match setup.optim {
            OptimKind::AdamW8bit if values < MIN_8BIT_NUMEL as u64 => values * (8 + compensation),
            OptimKind::AdamW8bit => {
                let blocks = values.div_ceil(BLOCK as u64);
                2 * blocks * (BLOCK as u64 + 4) + values * compensation
            }
            _ => (values as f64 * per_parameter) as u64,
        })
        .sum()
}

/// The bytes of one checkpoint's two big parts: the model files (the whole model in
/// the compute dtype, or the adapter in f32) and the optimizer state of every rank
/// (none with `--save-only-model`). Config, tokenizer and trainer-state files come on
/// top (megabytes).
pub fn checkpoint_bytes(setup: &Setup, save_only_model: bool) -> (u64, u64) {
    let (trained, element) = trained_parameters(setup);
    let optimizer = if save_only_model {
        0
    } else {
        optimizer_state_bytes(setup)
    };
    (trained * element, optimizer)
}

pub fn estimate(setup: &Setup) -> Estimate {
    let config = setup.config;
    let element = setup.kind.elt_size_in_bytes() as u64;
    let parameters = model_parameters(config);
    let weights = match setup.quantize {
        None => parameters * element,
        Some(quantization) => expected_tensors(config)
            .iter()
            .map(|(name, shape)| {
                let count = shape.iter().product::<i64>() as u64;
                if is_projection_weight(name) {
                    (count as f64 * quantized_bytes_per_weight(quantization, shape[1] as u64))
                        as u64
                } else {
                    count * element
                }
            })
            .sum(),
    };
    let (trained, trained_element) = trained_parameters(setup);
    let trained_kind = if trained_element == 4 {
        Kind::Float
    } else {
        setup.kind
    };
    let gradients = if setup.optim_in_backward {
        // f32 sums of the largest stage: one decoder layer, or the (tied) embedding.
        let embedding = (config.vocab_size * config.hidden_size) as u64;
        let per_layer = trained / config.num_hidden_layers as u64;
        let largest = if setup.lora.is_some() {
            per_layer
        } else {
            per_layer.max(embedding)
        };
        largest * 4
    } else {
        trained * trained_element
    };
    // The update's scratch: ~10 f32 temporaries of the values updated at a time (a
    // chunk of the largest tensor, `optim::UPDATE_CHUNK`), and for 8-bit moments the
    // quantization's search (int64 positions and f32 distances, ~40 bytes a value).
    let largest_trained = match setup.lora {
        None => expected_tensors(config)
            .iter()
            .map(|(_, shape)| shape.iter().product::<i64>() as u64)
            .max()
            .unwrap_or(0),
        Some((rank, _)) => rank as u64 * config.intermediate_size.max(config.hidden_size) as u64,
    };
    let scratch_per_value = if setup.optim == OptimKind::AdamW8bit {
        80
    } else {
        40
    };
    let chunk = largest_trained.min(super::optim::UPDATE_CHUNK as u64);
    let update_scratch = chunk * scratch_per_value;
    let state_bytes = optimizer_bytes_per_parameter(setup.optim, trained_kind);
    let state = optimizer_state_bytes(setup) / setup.optimizer_shards.max(1) as u64;
    let (optimizer, host_optimizer) = if setup.offload_optimizer {
        // On the device: the update's scratch and the chunk's state copied over.
        (update_scratch + (chunk as f64 * state_bytes) as u64, state)
    } else {
        (state + update_scratch, 0)
    };

    let tokens = (setup.batch_size * setup.tokens_per_row) as u64;
    let h = config.hidden_size as u64;
    let layers = config.num_hidden_layers as u64;
    let mut working_layer = tokens * (10 * h + 3 * config.intermediate_size as u64) * element;
    if setup.quantize.is_some() {
        // One projection dequantized at a time, and its dequantization's f32 scratch.
        working_layer += h * config.intermediate_size as u64 * (element + 8);
    }
    // DoRA keeps two more outputs per adapted projection for the backward pass (the
    // base product and the adapter's, which the magnitude's gradient reads), and takes
    // each projection's norm through f32 copies of W, B A and their sum.
    let mut dora_per_layer = 0;
    if let (true, Some((_, targets))) = (setup.dora, setup.lora) {
        let shapes: Vec<(u64, u64)> = targets
            .iter()
            .map(|t| projection_shape(config, t))
            .collect();
        dora_per_layer = 2 * tokens * shapes.iter().map(|s| s.1).sum::<u64>() * element;
        working_layer += 12 * shapes.iter().map(|(i, o)| i * o).max().unwrap_or(0);
    }
    let kept = if setup.optim_in_backward {
        // Every micro-batch's layer inputs, and its gradient at the current layer.
        (layers + 1) * tokens * h * element * setup.grad_accum.max(1) as u64
    } else if setup.gradient_checkpointing {
        layers * tokens * h * element
    } else {
        layers * (tokens * (34 * h) * element / 2 + dora_per_layer)
    };
    if setup.gradient_checkpointing || setup.optim_in_backward {
        // The recomputed layer's.
        working_layer += dora_per_layer;
    }
    let logits = tokens * config.vocab_size as u64 * 4;
    Estimate {
        weights,
        gradients,
        optimizer,
        activations: kept + working_layer + logits,
        host_optimizer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ALLaM-7B's shape (vocab as the random test model's: 49152).
    fn allam7b() -> LlamaConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2
        });
        LlamaConfig::from_hf_json(&json).unwrap()
    }

    #[test]
    fn full_fine_tune_memory_by_optimizer() {
        let config = allam7b();
        let setup = |optim| Setup {
            config: &config,
            kind: Kind::BFloat16,
            lora: None,
            dora: false,
            optim,
            batch_size: 2,
            tokens_per_row: 1024,
            gradient_checkpointing: true,
            optim_in_backward: false,
            grad_accum: 8,
            quantize: None,
            optimizer_shards: 1,
            offload_optimizer: false,
        };
        let adamw = estimate(&setup(OptimKind::AdamW));
        let bf16 = estimate(&setup(OptimKind::AdamWBf16));
        let eight = estimate(&setup(OptimKind::AdamW8bit));
        // 6.74 B parameters: 13.5 GB of bf16 weights, as many of gradients.
        assert!(
            (13.0e9..14.0e9).contains(&(adamw.weights as f64)),
            "{adamw:?}"
        );
        assert_eq!(adamw.gradients, adamw.weights);
        // f32 master + two f32 moments: 12 bytes per parameter, the 114 GB run measured.
        // (plus the update's scratch for one chunk, under 1.5 GB).
        let scratch = adamw.optimizer - adamw.weights * 6;
        assert!(scratch < 1_500_000_000, "{scratch}");
        assert!(adamw.total() > 100_000_000_000);
        // bf16 moments + Kahan compensation: 6 bytes; fits 80 GB.
        assert!(bf16.optimizer - bf16.weights * 3 < 1_500_000_000);
        assert!(bf16.total() < 80_000_000_000, "{}", bf16.describe());
        assert!(eight.total() < bf16.total());
        // Adafactor: the Kahan compensation (2 bytes) and a row and a column per
        // matrix (~1 MB a layer), plus one block's scratch (as AdamW's chunks).
        let adafactor = estimate(&setup(OptimKind::Adafactor));
        let state = adafactor_state_bytes(&[64000, 4096], 2) - 64000 * 4096 * 2;
        assert_eq!(state, 4 * (64000 + 4096));
        assert!(
            adafactor.optimizer < adafactor.weights * 2,
            "{}",
            adafactor.describe()
        );
        assert!(adafactor.total() < eight.total());
        // With the update in the backward pass: the seed's command under the issue's
        // 40 GB on the card alone (~34 GB: weights 13.8, compensation 13.8, a layer's
        // gradients, activations ~5).
        let adafactor_in_backward = estimate(&Setup {
            optim_in_backward: true,
            ..setup(OptimKind::Adafactor)
        });
        assert!(
            adafactor_in_backward.total() < 40_000_000_000,
            "{}",
            adafactor_in_backward.describe()
        );
        // The seed's command (bsz 2 x accumulation 8, cutoff 1024) with 8-bit moments
        // and the update in the backward pass: one layer's gradients instead of the
        // model's, under 50 GB even with every row at the cutoff (the 40 GB
        // needs a cheaper compensation than any that kept quality; compensation.rs).
        // Measured on an H200 before the update went by chunks: 54.9 GB peak.
        let in_backward = estimate(&Setup {
            optim_in_backward: true,
            ..setup(OptimKind::AdamW8bit)
        });
        assert!(
            in_backward.gradients < 2_000_000_000,
            "{}",
            in_backward.describe()
        );
        assert!(
            in_backward.total() < 50_000_000_000,
            "{}",
            in_backward.describe()
        );
        // 13.8 GB of gradients saved, ~4 GB more kept layer inputs.
        assert!(in_backward.total() + 8_000_000_000 < eight.total());
        // --offload-optimizer: the 8-bit moments and the compensation (~4 bytes a
        // parameter) move to host memory; the seed's command with gradient checkpointing
        // then holds the weights, their gradients and the activations: under the issue's
        // 40 GB without the update inside the backward pass.
        let offloaded = estimate(&Setup {
            offload_optimizer: true,
            ..setup(OptimKind::AdamW8bit)
        });
        assert_eq!(
            offloaded.weights + offloaded.gradients + offloaded.activations,
            eight.weights + eight.gradients + eight.activations
        );
        let state_per_parameter = offloaded.host_optimizer as f64 / (eight.weights / 2) as f64;
        assert!(
            (state_per_parameter - (4.0 + 8.0 / 256.0)).abs() < 1e-3,
            "{state_per_parameter}"
        );
        assert!(
            offloaded.optimizer < 2_000_000_000,
            "{}",
            offloaded.describe()
        );
        assert!(
            offloaded.total() < 40_000_000_000,
            "{}",
            offloaded.describe()
        );
        assert_eq!(eight.host_optimizer, 0);
    }

    #[test]
    fn lora_trains_a_small_fraction() {
        let config = allam7b();
        let targets: Vec<String> = crate::model::llama::PROJECTIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let lora = estimate(&Setup {
            config: &config,
            kind: Kind::BFloat16,
            lora: Some((16, &targets)),
            dora: false,
            optim: OptimKind::AdamW,
            batch_size: 2,
            tokens_per_row: 1024,
            gradient_checkpointing: false,
            optim_in_backward: false,
            grad_accum: 1,
            quantize: None,
            optimizer_shards: 1,
            offload_optimizer: false,
        });
        // r16 on 7 projections of 32 layers: 40 M f32 parameters.
        assert_eq!(
            lora.gradients / 4,
            16 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
        );
        assert!(lora.total() < 40_000_000_000, "{}", lora.describe());
        // DoRA: a magnitude per output row more (q, k, v, o, down: 4096; gate, up:
        // 11008), and two more kept outputs per projection and layer.
        let dora_setup = |gradient_checkpointing| Setup {
            config: &config,
            kind: Kind::BFloat16,
            lora: Some((16, &targets)),
            dora: true,
            optim: OptimKind::AdamW,
            batch_size: 2,
            tokens_per_row: 1024,
            gradient_checkpointing,
            optim_in_backward: false,
            grad_accum: 1,
            quantize: None,
            optimizer_shards: 1,
            offload_optimizer: false,
        };
        let dora = estimate(&dora_setup(false));
        assert_eq!(
            dora.gradients / 4 - lora.gradients / 4,
            32 * (5 * 4096 + 2 * 11008)
        );
        let outputs_per_layer = 5 * 4096 + 2 * 11008;
        let kept_outputs = 32 * 2 * 2048 * outputs_per_layer * 2;
        assert!(dora.activations >= lora.activations + kept_outputs);
        // With gradient checkpointing only the recomputed layer keeps them.
        let checkpointed = estimate(&dora_setup(true));
        assert!(checkpointed.activations < dora.activations / 4);
    }

    /// QLoRA on ALLaM-7B's shape (issue 14's setup: r16 on 7 projections, bsz 2,
    /// cutoff 1024, gradient checkpointing): the estimate is under the 10 GB target, the
    /// 4-bit projections take ~0.52 bytes a weight, and int8 sits between 4-bit and bf16.
    #[test]
    fn quantized_base_fits_a_small_card() {
        let config = allam7b();
        let targets: Vec<String> = crate::model::llama::PROJECTIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let setup = |quantize| Setup {
            config: &config,
            kind: Kind::BFloat16,
            lora: Some((16, &targets)),
            dora: false,
            optim: OptimKind::AdamW,
            batch_size: 2,
            tokens_per_row: 1024,
            gradient_checkpointing: true,
            optim_in_backward: false,
            grad_accum: 8,
            quantize,
            optimizer_shards: 1,
            offload_optimizer: false,
        };
        let nf4 = estimate(&setup(Some(Quantization {
            kind: QuantKind::Nf4,
            double_quant: true,
        })));
        let int8 = estimate(&setup(Some(Quantization {
            kind: QuantKind::Int8,
            double_quant: false,
        })));
        let dense = estimate(&setup(None));
        // 6.48 B projection weights at 0.516 bytes, plus 0.8 GB of bf16 embeddings and
        // lm_head.
        let projections = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) as u64;
        let rest = 2 * 49152 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2;
        let expected = projections as f64 * (0.5 + 1.0 / 64.0 + 4.0 / 16384.0) + rest as f64;
        assert!(
            (nf4.weights as f64 - expected).abs() < 1e6,
            "{} vs {expected}",
            nf4.weights
        );
        assert!(nf4.total() < 10_000_000_000, "{}", nf4.describe());
        assert!(nf4.total() < int8.total() && int8.total() < dense.total());
        assert_eq!(nf4.gradients, dense.gradients);
    }
}
