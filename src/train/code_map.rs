//! A sorted 8-bit code map (bitsandbytes' dynamic map) and the search for each value's
//! nearest code, as bitsandbytes' `quantize_blockwise` picks it: the two map values
//! around the value, the nearer one, ties to the lower.
//!
//! Finding "the two map values around" by `searchsorted` is a binary search per value,
//! eight unpredictable branches: on a 2-core Xeon it took half of the 8-bit optimizer's
//! update (0.65 s of 1.3 s per 16.7 M values). A lookup table does it in two gathers.
//! The table is keyed by a value's top 16 bits (sign, exponent, 7 mantissa bits: one
//! bucket is a run of floats 2^-7 to 2^-8 of their size wide) and holds how many map
//! values lie below the bucket. A bucket holds at most one map value (the maps' values
//! are at least 1.4 % apart), so the count of map values below `x` is the table's
//! entry plus one if that one value is below `x`: exactly `searchsorted`'s answer,
//! with the same float comparison. A map for which some bucket would hold two values
//! keeps `searchsorted`, and so does a GPU: there the binary search runs in the
//! card's cache and the table would add passes over memory to a bandwidth-bound
//! update (not measured on a GPU; the table is a CPU measure).

use tch::{Device, Kind, Tensor};

/// Buckets: every possible top half of an f32's bits.
const BUCKETS: usize = 1 << 16;

/// A sorted code map on a device, with its lookup table when it has one.
pub struct CodeMap {
    /// The code values, sorted ascending, [256] f32.
    pub values: Tensor,
    /// Per bucket (`(bits >> 16) + 32768`, arithmetic shift): how many map values lie
    /// below the bucket's lowest float, at most 255; [65536] i32. Only on the CPU.
    bucket_bases: Option<Tensor>,
}

impl CodeMap {
    /// The map of `values` (sorted ascending) on `device`.
    pub fn new(values: &[f32], device: Device) -> CodeMap {
        CodeMap {
            values: Tensor::from_slice(values).to_device(device),
            bucket_bases: match device {
                Device::Cpu => bucket_bases(values).map(|b| Tensor::from_slice(&b)),
                _ => None,
            },
        }
    }

    /// The map of `values` (sorted ascending) on `device`, shared: on the CPU every call
    /// with the same `values` on one thread hands out the same tensors, so the 8-bit
    /// optimizer's moments (two per parameter) hold one table between them instead of
    /// 256 KB each (SmolLM2: ~100 MB and ~0.4 s of building saved). Off the CPU the map
    /// is built as `new` builds it (256 values, no table).
    pub fn shared(values: &'static [f32], device: Device) -> CodeMap {
        if device != Device::Cpu {
            return CodeMap::new(values, device);
        }
        // tch tensors are not Sync, so the cache is per thread; shallow clones share
        // the storage.
        thread_local! {
            static ON_CPU: std::cell::RefCell<Vec<(usize, CodeMap)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let key = values.as_ptr() as usize;
        ON_CPU.with_borrow_mut(|maps| {
            if let Some((_, map)) = maps.iter().find(|(k, _)| *k == key) {
                return map.shallow_clone();
            }
            let map = CodeMap::new(values, Device::Cpu);
            maps.push((key, map.shallow_clone()));
            map
        })
    }

    /// The map with its values replaced by `f(values)` (a device copy). A copy off the
    /// CPU leaves the table behind; one that stays on the CPU (pinning for
    /// `--offload-optimizer`, a staged copy) shares it, since nothing writes a table.
    pub fn map_tensors(&self, f: impl Fn(&Tensor) -> Tensor) -> CodeMap {
        let values = f(&self.values);
        let bucket_bases = match values.device() {
            Device::Cpu => self.bucket_bases.as_ref().map(Tensor::shallow_clone),
            _ => None,
        };
        CodeMap {
            values,
            bucket_bases,
        }
    }

    pub fn shallow_clone(&self) -> CodeMap {
        self.map_tensors(Tensor::shallow_clone)
    }

    /// The index of the nearest code of each of `x`'s values (f32, flat; ties to the
    /// lower code), as i32 or i64. A NaN's code is unspecified: its block's absmax is
    /// NaN too, so every value of that block dequantizes to NaN whatever its code.
    pub fn nearest(&self, x: &Tensor) -> Tensor {
        let last = self.values.numel() as i64 - 1;
        // The first map value not below x (searchsorted, side left), at most the last.
        let upper = match &self.bucket_bases {
            Some(bases) => {
                let bucket = x
                    .contiguous()
                    .view_dtype(Kind::Int)
                    .bitwise_right_shift_tensor_scalar(16)
                    + (BUCKETS / 2) as i64;
                let base = bases.index_select(0, &bucket);
                let below = self.values.index_select(0, &base).lt_tensor(x);
                (base + below).clamp_max(last)
            }
            // tch's searchsorted is values-first: x.searchsorted(sorted map).
            None => x
                .searchsorted(&self.values, false, false, "left", None::<Tensor>)
                .clamp(0, last),
        };
        let lower = (&upper - 1).clamp_min(0);
        let distance_upper = (self.values.index_select(0, &upper) - x).abs();
        let distance_lower = (self.values.index_select(0, &lower) - x).abs();
        // torch.where(lower is nearer, lower, upper); tch's where_self is self-first.
        lower.where_self(&distance_lower.le_tensor(&distance_upper), &upper)
    }
}

/// The lookup table of `CodeMap::bucket_bases` for sorted `values`, or None when a
/// bucket would hold two of them.
fn bucket_bases(values: &[f32]) -> Option<Vec<i32>> {
    let bucket_of = |v: f32| ((v.to_bits() as i32 >> 16) + (BUCKETS / 2) as i32) as usize;
    let mut holders = vec![0u8; BUCKETS];
    for &v in values {
        let holder = &mut holders[bucket_of(v)];
        if v.is_nan() || *holder > 0 {
            return None;
        }
        *holder += 1;
    }
    let last = values.len() as i32 - 1;
    let bases = (0..BUCKETS)
        .map(|bucket| {
            let top = ((bucket as i32 - (BUCKETS / 2) as i32) as u32) << 16;
            // The bucket's lowest float: its first bits for a positive sign, its last
            // for a negative one (larger magnitude). A bucket of NaNs after -inf's
            // bits starts at -inf; one of NaNs only (any base will do) at +inf.
            let lowest = if top >> 31 == 0 {
                f32::from_bits(top)
            } else if f32::from_bits(top | 0xFFFF).is_nan() {
                if f32::from_bits(top).is_nan() {
                    f32::INFINITY
                } else {
                    f32::from_bits(top)
                }
            } else {
                f32::from_bits(top | 0xFFFF)
            };
            let below = if lowest.is_nan() {
                values.len()
            } else {
                values.partition_point(|&v| v < lowest)
            };
            (below as i32).min(last)
        })
        .collect();
    Some(bases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::moments::{bnb_dynamic_map, dynamic_map, optimizer_map};

    /// The values that decide a code: every map value, the midpoints between
    /// neighbours and the floats either side of each, both zeros, the ends, and a
    /// spread of random values at every scale the map covers.
    fn hard_values(map: &[f32]) -> Vec<f32> {
        let mut values = vec![0.0, -0.0, 1.0, -1.0, 1.5, -1.5, f32::MIN_POSITIVE];
        let neighbours = |v: f32| [v, f32::from_bits(v.to_bits() + 1), v.next_down()];
        for w in map.windows(2) {
            values.extend(neighbours(w[0]));
            values.extend(neighbours((w[0] + w[1]) / 2.0));
        }
        tch::manual_seed(3);
        let scales = Tensor::logspace(-8.0, 0.0, 64, 10.0, (Kind::Float, Device::Cpu));
        let random = Tensor::randn([64, 512], (Kind::Float, Device::Cpu)) * scales.unsqueeze(1);
        values.extend(Vec::<f32>::try_from(random.clamp(-1.0, 1.0).view([-1])).unwrap());
        values
    }

    /// The lookup gives `searchsorted`'s codes on both optimizer maps and the 4-bit
    /// codec's bitsandbytes map, value for value.
    #[test]
    fn the_lookup_table_picks_the_binary_searchs_codes() {
        let maps = [
            dynamic_map(true),
            dynamic_map(false),
            bnb_dynamic_map(true).to_vec(),
        ];
        for map in maps {
            let with_table = CodeMap::new(&map, Device::Cpu);
            assert!(
                with_table.bucket_bases.is_some(),
                "a bucket holds two values"
            );
            let searched = CodeMap {
                values: with_table.values.shallow_clone(),
                bucket_bases: None,
            };
            let x = Tensor::from_slice(&hard_values(&map));
            let by_table = with_table.nearest(&x).to_kind(Kind::Int64);
            let by_search = searched.nearest(&x).to_kind(Kind::Int64);
            let differing = by_table.ne_tensor(&by_search).sum(Kind::Int64);
            assert_eq!(differing.int64_value(&[]), 0);
        }
    }

    /// Every 8-bit moment of a sign on the CPU holds the same map and table (one
    /// storage), also after a copy on the CPU, and the two signs hold different ones.
    #[test]
    fn moments_share_one_table_per_sign() {
        use crate::train::moments::{Moment, OptimKind};
        let table_of = |moment: &Moment| match moment {
            Moment::Blockwise8 { map, .. } => (
                map.values.data_ptr() as usize,
                map.bucket_bases.as_ref().expect("a CPU table").data_ptr() as usize,
            ),
            _ => panic!("an 8-bit moment"),
        };
        let zeros =
            |shape: &[i64], signed| Moment::zeros(OptimKind::AdamW8bit, shape, Device::Cpu, signed);
        let first = table_of(&zeros(&[64, 128], true));
        assert_eq!(first, table_of(&zeros(&[4096], true)));
        let unsigned = table_of(&zeros(&[64, 128], false));
        assert_eq!(unsigned, table_of(&zeros(&[8192], false)));
        assert_ne!(first.1, unsigned.1);
        // A copy that stays on the CPU (offloaded state, a staged chunk) shares the
        // table too; its values are its own.
        let copied = zeros(&[64, 128], true).map_tensors(Tensor::copy);
        assert_eq!(table_of(&copied).1, first.1);
        assert_ne!(table_of(&copied).0, first.0);
        // The shared map is the same map: its codes are the searched ones.
        let x = Tensor::from_slice(&hard_values(optimizer_map(true)));
        let own = CodeMap::new(optimizer_map(true), Device::Cpu);
        let shared = CodeMap::shared(optimizer_map(true), Device::Cpu);
        assert!(own.nearest(&x).equal(&shared.nearest(&x)));
    }

    /// Two map values in one bucket (1.0 and the next float) leave the binary search.
    #[test]
    fn a_map_with_two_values_in_a_bucket_keeps_the_search() {
        assert!(bucket_bases(&[0.0, 1.0, f32::from_bits(1.0f32.to_bits() + 1)]).is_none());
        let bases = bucket_bases(&[-0.5, 0.0, 0.5]).unwrap();
        let base_of = |v: f32| bases[((v.to_bits() as i32 >> 16) + 32768) as usize];
        assert_eq!(base_of(-0.75), 0);
        assert_eq!(base_of(-0.0), 1);
        assert_eq!(base_of(0.25), 2);
        assert_eq!(base_of(0.75), 2);
    }
}
