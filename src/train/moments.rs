//! How AdamW keeps its state, by `--optim`:
//! - `adamw`: f32 moments, and an f32 master copy of every weight that is not f32
//!   (16 bytes per bf16 parameter with its gradient: what torch.optim.AdamW under
//!   autocast keeps).
//! - `adamw-bf16`: moments in bf16 (rounded to nearest), no master copy; bf16 weights
//!   get a bf16 Kahan compensation buffer instead (`optim.rs`): 10 bytes per parameter
//!   with its gradient. Stochastic rounding of the moments was tried and measured
//!   worse: SmolLM2, 50 full fine-tune steps, eval loss +3.9 % over f32 `adamw`
//!   against -0.45 % with round-to-nearest, in the quality check's first form, whose
//!   own noise was about that size (the README's Training section).
//! - `adamw-8bit`: moments in 8 bits with bitsandbytes' blockwise dynamic quantization
//!   (blocks of 256 values, one f32 absmax per block, codes into bnb's dynamic map:
//!   signed for the first moment, unsigned for the second), bf16 weights with Kahan
//!   compensation (`compensation.rs`): ~8 bytes per parameter with its gradient, ~6
//!   with `--optim-in-backward`. As in bnb, tensors under 4096 values (norms) keep f32
//!   moments.
//!
//! - `adafactor`: transformers' Adafactor as HF Trainer builds it for
//!   `optim="adafactor"` (`adafactor.rs`): no first moment, and the second moment of
//!   a matrix factored into its row and column means (`Moment::Factored`), so the
//!   state is a few megabytes for a 7B; bf16 weights get Kahan compensation as above
//!   (2 bytes per parameter). The update is its own (`adafactor::update`), not
//!   AdamW's.
//!
//! Nothing here is random, so a resumed run repeats the same updates.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use tch::{Device, Kind, Tensor};

use super::code_map::{CodeMap, HostTable};

/// `--optim`: which AdamW state layout.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
pub enum OptimKind {
    /// f32 moments and f32 master weights (torch.optim.AdamW under autocast). QLoRA's
    /// paged_adamw_32bit is this update too: bitsandbytes' paging (moments moved to host
    /// memory when the GPU runs short) is a memory detail amthal does not copy.
    #[default]
    #[value(
        name = "adamw",
        aliases = ["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw-torch", "paged_adamw_32bit", "paged_adamw"]
    )]
    #[serde(
        rename = "adamw",
        alias = "adamw_torch",
        alias = "adamw_torch_fused",
        alias = "adamw_hf",
        alias = "paged_adamw_32bit",
        alias = "paged_adamw"
    )]
    AdamW,
    /// bf16 weights and moments, updated with stochastic rounding (no f32 copy).
    #[value(name = "adamw-bf16", aliases = ["adamw_bf16"])]
    #[serde(rename = "adamw-bf16", alias = "adamw_bf16")]
    AdamWBf16,
    /// 8-bit blockwise moments (bitsandbytes' dynamic map), bf16 weights.
    #[value(name = "adamw-8bit", aliases = ["adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"])]
    #[serde(
        rename = "adamw-8bit",
        alias = "adamw_8bit",
        alias = "adamw_bnb_8bit",
        alias = "paged_adamw_8bit"
    )]
    AdamW8bit,
    /// transformers' Adafactor with HF Trainer's settings (`adafactor.rs`): factored
    /// second moment, no first moment, the schedule's learning rate.
    #[value(name = "adafactor")]
    #[serde(rename = "adafactor")]
    Adafactor,
}

/// Values per quantization block (bitsandbytes' blocksize for 8-bit optimizers).
pub const BLOCK: i64 = 256;
/// bitsandbytes' min_8bit_size: smaller tensors keep f32 moments.
pub const MIN_8BIT_NUMEL: i64 = 4096;

/// One AdamW moment in its storage.
pub enum Moment {
    F32(Tensor),
    Bf16(Tensor),
    /// Codes [blocks * 256] u8 into `map`, absmax [blocks] f32.
    Blockwise8 {
        codes: Tensor,
        absmax: Tensor,
        map: CodeMap,
        shape: Vec<i64>,
    },
    /// No moment kept: Adafactor's first moment with HF's `beta1=None`.
    Absent,
    /// Adafactor's second moment of a tensor with two or more dimensions, factored:
    /// the running mean of g^2 over the last dimension (`row`, shape[..-1]) and over
    /// the one before it (`col`, shape[..-2] + shape[-1..]), f32.
    Factored {
        row: Tensor,
        col: Tensor,
    },
}

/// For the AdamW-only accessors: Adafactor's moments are read and written by
/// `adafactor::update` alone, never chunked.
const ADAFACTOR_OWN_UPDATE: &str = "Adafactor's state is updated by adafactor::update only";

impl Moment {
    /// A zero moment for a parameter of `shape`; `signed`: whether it can be negative
    /// (the first moment) or not (the second).
    pub fn zeros(optim: OptimKind, shape: &[i64], device: Device, signed: bool) -> Moment {
        let numel: i64 = shape.iter().product();
        match optim {
            OptimKind::AdamW => Moment::F32(Tensor::zeros(shape, (Kind::Float, device))),
            OptimKind::AdamWBf16 => Moment::Bf16(Tensor::zeros(shape, (Kind::BFloat16, device))),
            OptimKind::AdamW8bit if numel < MIN_8BIT_NUMEL => {
                Moment::F32(Tensor::zeros(shape, (Kind::Float, device)))
            }
            OptimKind::Adafactor if signed => Moment::Absent,
            OptimKind::Adafactor if shape.len() >= 2 => {
                let (rows, last) = shape.split_at(shape.len() - 1);
                let mut columns = rows[..rows.len() - 1].to_vec();
                columns.extend_from_slice(last);
                Moment::Factored {
                    row: Tensor::zeros(rows, (Kind::Float, device)),
                    col: Tensor::zeros(columns.as_slice(), (Kind::Float, device)),
                }
            }
            OptimKind::Adafactor => Moment::F32(Tensor::zeros(shape, (Kind::Float, device))),
            OptimKind::AdamW8bit => {
                let blocks = (numel + BLOCK - 1) / BLOCK;
                let values = optimizer_map(signed);
                let map = CodeMap::shared(values, device);
                // Code of 0.0 in the map, so zeros dequantize to exactly 0.
                let zero = values
                    .iter()
                    .position(|&v| v == 0.0)
                    .expect("the map holds 0") as i64;
                Moment::Blockwise8 {
                    codes: Tensor::full([blocks * BLOCK], zero, (Kind::Uint8, device)),
                    absmax: Tensor::zeros([blocks], (Kind::Float, device)),
                    map,
                    shape: shape.to_vec(),
                }
            }
        }
    }

    /// The moment as f32 values of the parameter's shape.
    pub fn get(&self) -> Tensor {
        match self {
            Moment::F32(t) => t.shallow_clone(),
            Moment::Bf16(t) => t.to_kind(Kind::Float),
            Moment::Blockwise8 {
                codes,
                absmax,
                map,
                shape,
            } => {
                let numel: i64 = shape.iter().product();
                let values = map
                    .values
                    .index_select(0, &codes.to_kind(Kind::Int64))
                    .view([-1, BLOCK])
                    * absmax.unsqueeze(1);
                values.view([-1]).narrow(0, 0, numel).view(shape.as_slice())
            }
            Moment::Absent | Moment::Factored { .. } => unreachable!("{ADAFACTOR_OWN_UPDATE}"),
        }
    }

    /// Values `start..start + length` of the flattened moment, as views (writes go to
    /// the whole); `start` must be a multiple of `BLOCK`.
    pub fn chunk(&self, start: i64, length: i64) -> Moment {
        match self {
            Moment::F32(t) => Moment::F32(t.view([-1]).narrow(0, start, length)),
            Moment::Bf16(t) => Moment::Bf16(t.view([-1]).narrow(0, start, length)),
            Moment::Blockwise8 {
                codes, absmax, map, ..
            } => {
                assert_eq!(start % BLOCK, 0, "8-bit chunks start on a block");
                let blocks = (length + BLOCK - 1) / BLOCK;
                Moment::Blockwise8 {
                    codes: codes.narrow(0, start, blocks * BLOCK),
                    absmax: absmax.narrow(0, start / BLOCK, blocks),
                    map: map.shallow_clone(),
                    shape: vec![length],
                }
            }
            Moment::Absent | Moment::Factored { .. } => unreachable!("{ADAFACTOR_OWN_UPDATE}"),
        }
    }

    /// The moment with each of its tensors replaced by `f(tensor)` (the 8-bit map too):
    /// how `--offload-optimizer` makes a device copy of host state (`offload.rs`).
    pub fn map_tensors(&self, f: impl Fn(&Tensor) -> Tensor) -> Moment {
        match self {
            Moment::F32(t) => Moment::F32(f(t)),
            Moment::Bf16(t) => Moment::Bf16(f(t)),
            Moment::Blockwise8 {
                codes,
                absmax,
                map,
                shape,
            } => Moment::Blockwise8 {
                codes: f(codes),
                absmax: f(absmax),
                map: map.map_tensors(&f),
                shape: shape.clone(),
            },
            Moment::Absent => Moment::Absent,
            Moment::Factored { row, col } => Moment::Factored {
                row: f(row),
                col: f(col),
            },
        }
    }

    /// The tensors an update changes, beside the same ones of `updated` (a
    /// `map_tensors` copy of this moment), for writing them back.
    pub fn updated_pairs<'a>(
        &'a mut self,
        updated: &'a Moment,
    ) -> Vec<(&'a mut Tensor, &'a Tensor)> {
        match (self, updated) {
            (Moment::F32(t), Moment::F32(u)) | (Moment::Bf16(t), Moment::Bf16(u)) => vec![(t, u)],
            (
                Moment::Blockwise8 { codes, absmax, .. },
                Moment::Blockwise8 {
                    codes: new_codes,
                    absmax: new_absmax,
                    ..
                },
            ) => vec![(codes, new_codes), (absmax, new_absmax)],
            (Moment::Absent, Moment::Absent) => Vec::new(),
            (
                Moment::Factored { row, col },
                Moment::Factored {
                    row: new_row,
                    col: new_col,
                },
            ) => vec![(row, new_row), (col, new_col)],
            _ => unreachable!("a moment and its copy have the same layout"),
        }
    }

    /// Stores f32 `value` (the parameter's shape) in the moment's format.
    pub fn set(&mut self, value: &Tensor) {
        match self {
            Moment::F32(t) => {
                // `get` hands out the stored tensor itself, often updated in place.
                if t.data_ptr() != value.data_ptr() {
                    t.copy_(value);
                }
            }
            Moment::Bf16(t) => t.copy_(&value.to_kind(Kind::BFloat16)),
            Moment::Blockwise8 {
                codes, absmax, map, ..
            } => {
                let (new_codes, new_absmax) = quantize_blockwise(value, map);
                codes.copy_(&new_codes);
                absmax.copy_(&new_absmax);
            }
            Moment::Absent | Moment::Factored { .. } => unreachable!("{ADAFACTOR_OWN_UPDATE}"),
        }
    }

    /// The tensors a checkpoint holds for this moment, under `name`.
    pub fn state(&self, name: &str, out: &mut BTreeMap<String, Tensor>) {
        match self {
            Moment::F32(t) | Moment::Bf16(t) => {
                out.insert(name.to_string(), t.shallow_clone());
            }
            Moment::Blockwise8 { codes, absmax, .. } => {
                out.insert(format!("{name}.codes"), codes.shallow_clone());
                out.insert(format!("{name}.absmax"), absmax.shallow_clone());
            }
            Moment::Absent => {}
            Moment::Factored { row, col } => {
                out.insert(format!("{name}.row"), row.shallow_clone());
                out.insert(format!("{name}.col"), col.shallow_clone());
            }
        }
    }

    /// Restores what `state` saved (exact: the same bytes).
    pub fn restore(&mut self, name: &str, saved: &BTreeMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            saved.get(key).ok_or_else(|| {
                anyhow!("optimizer state has no {key} (saved with another --optim?)")
            })
        };
        match self {
            Moment::F32(t) | Moment::Bf16(t) => {
                t.copy_(get(name)?);
            }
            Moment::Blockwise8 { codes, absmax, .. } => {
                codes.copy_(get(&format!("{name}.codes"))?);
                absmax.copy_(get(&format!("{name}.absmax"))?);
            }
            Moment::Absent => {}
            Moment::Factored { row, col } => {
                row.copy_(get(&format!("{name}.row"))?);
                col.copy_(get(&format!("{name}.col"))?);
            }
        }
        Ok(())
    }
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256
/// values in [-1, 1] (signed) or [0, 1], dense near zero (a decimal exponent from
/// 1e-6 to 1 and a linear fraction whose resolution grows with the exponent), sorted.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let max_exponent_bits: i32 = 7;
    let non_sign_bits: i32 = 7;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let fraction_items = if signed {
            (1usize << (i + non_sign_bits - max_exponent_bits)) + 1
        } else {
            (1usize << (i + non_sign_bits - max_exponent_bits + 1)) + 1
        };
        let step = 0.9 / (fraction_items - 1) as f64;
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
        for k in 0..fraction_items - 1 {
            let mean = (0.1 + step * k as f64 + 0.1 + step * (k + 1) as f64) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    let mut map: Vec<f32> = data.into_iter().map(|v| v as f32).collect();
    map.sort_by(f32::total_cmp);
    map
}

/// The 8-bit optimizer's map (`dynamic_map`), computed once per sign.
pub fn optimizer_map(signed: bool) -> &'static [f32] {
    static MAPS: [OnceLock<Vec<f32>>; 2] = [OnceLock::new(), OnceLock::new()];
    once_per_sign(&MAPS, signed, dynamic_map)
}

/// `compute(signed)`, computed on first use and kept in `cells` ([unsigned, signed]).
fn once_per_sign(
    cells: &'static [OnceLock<Vec<f32>>; 2],
    signed: bool,
    compute: fn(bool) -> Vec<f32>,
) -> &'static [f32] {
    cells[signed as usize].get_or_init(|| compute(signed))
}

/// The same map computed as bitsandbytes' `create_dynamic_map` computes it, in f32
/// tensor arithmetic (torch's `linspace`, means and scale in f32), so every value is
/// bit-identical to bitsandbytes' (the 4-bit codec's double quantization needs that:
/// `model::bnb4`). `dynamic_map`'s f64 arithmetic lands one f32 ulp away in 72 of the
/// signed map's 256 values; the 8-bit optimizer still uses it because its quality check
/// (a 1 % bar that tiny differences move) was measured with it. Switching it over is
/// one line once that check is re-run.
/// (Computed once per sign: it takes a few dozen tensor operations, and the 4-bit
/// codec asks for it at every dequantization.)
pub fn bnb_dynamic_map(signed: bool) -> &'static [f32] {
    static MAPS: [OnceLock<Vec<f32>>; 2] = [OnceLock::new(), OnceLock::new()];
    once_per_sign(&MAPS, signed, compute_bnb_dynamic_map)
}

/// What `bnb_dynamic_map` caches.
fn compute_bnb_dynamic_map(signed: bool) -> Vec<f32> {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let fraction_items = if signed {
            (1i64 << i) + 1
        } else {
            (1i64 << (i + 1)) + 1
        };
        let boundaries = Tensor::linspace(0.1, 1.0, fraction_items, (Kind::Float, Device::Cpu));
        let means = (boundaries.narrow(0, 0, fraction_items - 1)
            + boundaries.narrow(0, 1, fraction_items - 1))
            / 2.0;
        let scale = 10f64.powi(-6 + i);
        let positive = Vec::<f32>::try_from(&means * scale).expect("f32 values");
        let negative = Vec::<f32>::try_from(&means * -scale).expect("f32 values");
        data.extend(&positive);
        if signed {
            data.extend(&negative);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

/// Blockwise quantization to the nearest code of `map`: (codes u8 [blocks * 256],
/// absmax f32 [blocks]). On the CPU `value`'s memory is read directly, so no other
/// thread may write it meanwhile.
pub fn quantize_blockwise(value: &Tensor, map: &CodeMap) -> (Tensor, Tensor) {
    if value.device() == Device::Cpu
        && let Some(host) = map.host()
    {
        return quantize_blockwise_on_host(value, host);
    }
    let numel = value.numel() as i64;
    let blocks = (numel + BLOCK - 1) / BLOCK;
    let flat = value
        .to_kind(Kind::Float)
        .reshape([-1])
        .constant_pad_nd([0, blocks * BLOCK - numel])
        .view([blocks, BLOCK]);
    let absmax = flat.abs().amax([1], false);
    let normalized = (&flat / absmax.clamp_min(f32::MIN_POSITIVE as f64).unsqueeze(1)).view([-1]);
    (map.nearest(&normalized).to_kind(Kind::Uint8), absmax)
}

/// `quantize_blockwise` on the CPU: the same codes and absmax from a loop over the
/// values in host memory with the map's lookup table (`HostTable::quantize_blocks`),
/// on libtorch's intra-op thread count. 16.7 M values on a 2-core Xeon: 0.05-0.06 s
/// (0.09-0.12 s on one thread) against ~1.1 s for the tensor operations with
/// `searchsorted` and ~0.3 s for the same operations with the table (its form before
/// this loop); SmolLM2's 8-bit optimizer phase 5.5-6.0 s -> 3.9-4.6 s a step.
fn quantize_blockwise_on_host(value: &Tensor, host: &HostTable) -> (Tensor, Tensor) {
    let flat = value.to_kind(Kind::Float).contiguous().view([-1]);
    let numel = flat.numel();
    let blocks = numel.div_ceil(BLOCK as usize);
    let data = if numel == 0 {
        // An empty tensor's data pointer may be null, which no slice may hold.
        &[][..]
    } else {
        // SAFETY: `flat` is a contiguous f32 tensor on the CPU holding `numel` values;
        // it lives past the last read of the slice, and nothing writes it meanwhile
        // (`quantize_blockwise`'s callers pass tensors of their own, and tch tensors
        // are not shared between threads).
        unsafe { std::slice::from_raw_parts(flat.data_ptr() as *const f32, numel) }
    };
    let mut codes = vec![0u8; blocks * BLOCK as usize];
    let mut absmax = vec![0f32; blocks];
    // Threads only for tensors of a million values or more (spawning costs more than
    // a small tensor's loop, which runs on the calling thread).
    let threads = if numel >= 1 << 20 {
        tch::get_num_threads().max(1) as usize
    } else {
        1
    };
    host.quantize_blocks(data, BLOCK as usize, &mut codes, &mut absmax, threads);
    (Tensor::from_slice(&codes), Tensor::from_slice(&absmax))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HF's `optim` names reach the same optimizer from the command line and from a
    /// --config file.
    #[test]
    fn hf_optimizer_names_choose_the_same_kinds() {
        use clap::ValueEnum;
        for (names, kind) in [
            (
                &[
                    "adamw",
                    "adamw_torch",
                    "adamw_torch_fused",
                    "adamw_hf",
                    "paged_adamw_32bit",
                    "paged_adamw",
                ][..],
                OptimKind::AdamW,
            ),
            (&["adamw-bf16", "adamw_bf16"][..], OptimKind::AdamWBf16),
            (
                &[
                    "adamw-8bit",
                    "adamw_8bit",
                    "adamw_bnb_8bit",
                    "paged_adamw_8bit",
                ][..],
                OptimKind::AdamW8bit,
            ),
            (&["adafactor"][..], OptimKind::Adafactor),
        ] {
            for name in names {
                assert_eq!(OptimKind::from_str(name, false).unwrap(), kind, "{name}");
                let parsed: OptimKind = serde_json::from_value(serde_json::json!(name)).unwrap();
                assert_eq!(parsed, kind, "{name} in a config file");
            }
        }
        // An optimizer HF offers and amthal does not build is refused by name.
        assert!(OptimKind::from_str("lion_8bit", false).is_err());
    }

    #[test]
    fn dynamic_maps_have_bitsandbytes_shape() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        assert_eq!((signed.len(), unsigned.len()), (256, 256));
        assert_eq!(signed[255], 1.0);
        // The largest negative code: exponent 0, the last of 64 fraction means.
        assert!(
            (signed[0] + (1.0 - 0.9 / 128.0)).abs() < 1e-6,
            "{}",
            signed[0]
        );
        assert!(signed.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(unsigned[255], 1.0);
        assert!(unsigned.iter().all(|&v| v >= 0.0));
        // The smallest non-zero magnitude is 1e-6 * 0.55 (exponent -6, one fraction item).
        let smallest = signed
            .iter()
            .filter(|v| **v > 0.0)
            .fold(f32::MAX, |a, &b| a.min(b));
        assert!((smallest - 5.5e-7).abs() < 1e-12, "{smallest}");
        // 127 positive + 127 negative + 0 + 1.0 for signed.
        assert_eq!(signed.iter().filter(|v| **v < 0.0).count(), 127);
    }

    #[test]
    fn blockwise_8bit_round_trips_within_the_map_resolution() {
        tch::manual_seed(0);
        // 6400 values: 25 blocks of 256 (8-bit starts at 4096 values).
        let value = Tensor::randn([6400], (Kind::Float, Device::Cpu)) * 0.01;
        let mut moment = Moment::zeros(OptimKind::AdamW8bit, &[64, 100], Device::Cpu, true);
        assert!(matches!(moment, Moment::Blockwise8 { .. }));
        assert_eq!(moment.get().abs().sum(Kind::Float).double_value(&[]), 0.0);
        moment.set(&value.view([64, 100]));
        let back = moment.get().view([-1]);
        let error = (&back - &value).abs().max().double_value(&[]);
        let absmax = value.abs().max().double_value(&[]);
        // The coarsest step of the map near 1 is about 1/64 of the block's absmax.
        assert!(error <= absmax / 64.0, "{error} vs absmax {absmax}");
        // Small tensors keep f32 moments, as bnb's min_8bit_size.
        assert!(matches!(
            Moment::zeros(OptimKind::AdamW8bit, &[64], Device::Cpu, true),
            Moment::F32(_)
        ));
    }
}
