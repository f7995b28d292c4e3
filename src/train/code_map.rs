//! A sorted 8-bit code map (bitsandbytes' dynamic map) and the search for each value's
//! nearest code, as bitsandbytes' `quantize_blockwise` picks it: the two map values
//! around the value, the nearer one, ties to the lower.
//!
//! Finding "the two map values around" by `searchsorted` is a binary search per value,
//! eight unpredictable branches: on a 2-core Xeon it took half of the 8-bit optimizer's
//! update (0.65 s of 1.3 s per 16.7 M values). On the CPU a lookup table does it
//! instead, in a loop over each block of values (`HostTable::quantize_blocks`): one
//! pass over memory, where the same steps as tensor operations took about fifteen
//! (16.7 M values: ~0.05 s on 2 cores, against ~0.3 s for the table as tensor
//! operations and ~1.1 s for `searchsorted`).
//! The table is keyed by a value's top 16 bits (sign, exponent, 7 mantissa bits: one
//! bucket is a run of floats 2^-7 to 2^-8 of their size wide) and holds how many map
//! values lie below the bucket. A bucket holds at most one map value (the maps' values
//! are at least 1.4 % apart), so the count of map values below `x` is the table's
//! entry plus one if that one value is below `x`: exactly `searchsorted`'s answer,
//! with the same float comparison. A map for which some bucket would hold two values
//! keeps `searchsorted`, and so does a GPU: there the binary search runs in the
//! card's cache and a table would add passes over memory to a bandwidth-bound
//! update (not measured on a GPU; the table is a CPU measure).

use std::sync::Arc;

use tch::{Device, Tensor};

/// Buckets: every possible top half of an f32's bits.
const BUCKETS: usize = 1 << 16;

/// A sorted code map on a device, with its lookup table in host memory on the CPU.
pub struct CodeMap {
    /// The code values, sorted ascending, [256] f32.
    pub values: Tensor,
    /// On the CPU (when every bucket holds at most one value): the map and its table
    /// in host memory, for `HostTable::quantize_blocks`. Read-only, so copies share it.
    host: Option<Arc<HostTable>>,
}

/// A code map and its lookup table in host memory.
pub struct HostTable {
    /// The code values, sorted ascending (256).
    values: Vec<f32>,
    /// Per bucket (`(bits >> 16) + 32768`, arithmetic shift): how many map values lie
    /// below the bucket's lowest float, at most 255.
    bucket_bases: Vec<u8>,
}

impl CodeMap {
    /// The map of `values` (sorted ascending) on `device`.
    pub fn new(values: &[f32], device: Device) -> CodeMap {
        CodeMap {
            values: Tensor::from_slice(values).to_device(device),
            host: match device {
                Device::Cpu => HostTable::new(values).map(Arc::new),
                _ => None,
            },
        }
    }

    /// The map of `values` (sorted ascending) on `device`, shared: on the CPU every call
    /// with the same `values` on one thread hands out the same map and table, so the
    /// 8-bit optimizer's moments (two per parameter) and the 4-bit codec's projections
    /// hold one table between them instead of one each (each table ~1 ms to build; as
    /// 256 KB i32 tables they had cost SmolLM2 ~100 MB). Off the CPU the map is built
    /// as `new` builds it (256 values, no table).
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
        let host = match values.device() {
            Device::Cpu => self.host.clone(),
            _ => None,
        };
        CodeMap { values, host }
    }

    pub fn shallow_clone(&self) -> CodeMap {
        self.map_tensors(Tensor::shallow_clone)
    }

    /// The host table, on the CPU.
    pub fn host(&self) -> Option<&HostTable> {
        self.host.as_deref()
    }

    /// The index of the nearest code of each of `x`'s values (f32, flat; ties to the
    /// lower code) by `searchsorted`, as i64: the search for a GPU and for a map
    /// without a table. A NaN's code is unspecified: its block's absmax is NaN too, so
    /// every value of that block dequantizes to NaN whatever its code.
    pub fn nearest(&self, x: &Tensor) -> Tensor {
        let last = self.values.numel() as i64 - 1;
        // The first map value not below x (side left), at most the last. tch's
        // searchsorted is values-first: x.searchsorted(sorted map).
        let upper = x
            .searchsorted(&self.values, false, false, "left", None::<Tensor>)
            .clamp(0, last);
        let lower = (&upper - 1).clamp_min(0);
        let distance_upper = (self.values.index_select(0, &upper) - x).abs();
        let distance_lower = (self.values.index_select(0, &lower) - x).abs();
        // torch.where(lower is nearer, lower, upper); tch's where_self is self-first.
        lower.where_self(&distance_lower.le_tensor(&distance_upper), &upper)
    }
}

impl HostTable {
    /// The table for sorted `values`, or None when a bucket would hold two of them.
    fn new(values: &[f32]) -> Option<HostTable> {
        Some(HostTable {
            values: values.to_vec(),
            bucket_bases: bucket_bases(values)?,
        })
    }

    /// The index of the nearest code to `x` (ties to the lower code): `searchsorted`'s
    /// upper neighbour from the table, then the nearer of it and the one below, with
    /// the same f32 arithmetic as `CodeMap::nearest`.
    pub fn nearest(&self, x: f32) -> u8 {
        let last = self.values.len() - 1;
        let bucket = ((x.to_bits() as i32 >> 16) + (BUCKETS / 2) as i32) as usize;
        let base = self.bucket_bases[bucket] as usize;
        let upper = (base + usize::from(self.values[base] < x)).min(last);
        let lower = upper.saturating_sub(1);
        let (distance_upper, distance_lower) = (
            (self.values[upper] - x).abs(),
            (self.values[lower] - x).abs(),
        );
        // Arithmetic instead of a branch: which neighbour is nearer is a coin toss for
        // the predictor (a branch here took half of the loop's time). Anything but
        // "lower or equal" picks the upper code, as torch.where(le, lower, upper) does:
        // also a NaN `x` (inf / inf in a block holding an infinity), whose distances
        // are NaN. (`|`, not `||`: no branch.)
        let upper_is_nearer = (distance_lower > distance_upper) | x.is_nan();
        (lower + (usize::from(upper_is_nearer) & (upper - lower))) as u8
    }

    /// bitsandbytes' blockwise quantization of `data` (padded with zeros to whole
    /// blocks of `block`): each block's absmax (NaN if the block holds one, as torch's
    /// `amax`), and each value's nearest code after dividing by it (by at least the
    /// smallest normal float, so an all-zero block codes its zeros). `codes` holds
    /// `blocks * block` values, `absmax` `blocks`. Blocks are split across
    /// `threads` threads.
    pub fn quantize_blocks(
        &self,
        data: &[f32],
        block: usize,
        codes: &mut [u8],
        absmax: &mut [f32],
        threads: usize,
    ) {
        let blocks = absmax.len();
        assert!(codes.len() == blocks * block && data.len() <= blocks * block);
        if threads <= 1 {
            return self.quantize_part(data, block, 0, codes, absmax);
        }
        let per_thread = blocks.div_ceil(threads).max(1);
        let work = codes
            .chunks_mut(per_thread * block)
            .zip(absmax.chunks_mut(per_thread))
            .enumerate();
        std::thread::scope(|scope| {
            for (index, (codes, absmax)) in work {
                let first = index * per_thread * block;
                scope.spawn(move || self.quantize_part(data, block, first, codes, absmax));
            }
        });
    }

    /// The blocks of `quantize_blocks` whose first value is `data[first]`.
    fn quantize_part(
        &self,
        data: &[f32],
        block: usize,
        first: usize,
        codes: &mut [u8],
        absmax: &mut [f32],
    ) {
        for (index, (codes, absmax)) in codes.chunks_mut(block).zip(absmax).enumerate() {
            let start = (first + index * block).min(data.len());
            let end = (start + block).min(data.len());
            self.quantize_block(&data[start..end], codes, absmax);
        }
    }

    /// One block of `quantize_blocks`; `codes` past `values`' end code the padding's
    /// zeros.
    fn quantize_block(&self, values: &[f32], codes: &mut [u8], absmax: &mut f32) {
        // torch's amax: NaN if the block holds one (kept apart so the max vectorizes).
        let largest = values.iter().fold(0f32, |largest, v| largest.max(v.abs()));
        let largest = if values.iter().any(|v| v.is_nan()) {
            f32::NAN
        } else {
            largest
        };
        *absmax = largest;
        // torch's clamp_min keeps a NaN.
        let divisor = if largest.is_nan() {
            largest
        } else {
            largest.max(f32::MIN_POSITIVE)
        };
        for (code, &v) in codes.iter_mut().zip(values) {
            *code = self.nearest(v / divisor);
        }
        let padding = self.nearest(0.0 / divisor);
        for code in codes.iter_mut().skip(values.len()) {
            *code = padding;
        }
    }
}

/// The lookup table of `HostTable::bucket_bases` for sorted `values`, or None when a
/// bucket would hold two of them (or the map has more than 256 values).
fn bucket_bases(values: &[f32]) -> Option<Vec<u8>> {
    if values.len() > 256 {
        return None; // a base would not fit in a byte
    }
    let bucket_of = |v: f32| ((v.to_bits() as i32 >> 16) + (BUCKETS / 2) as i32) as usize;
    let mut holders = vec![0u8; BUCKETS];
    for &v in values {
        let holder = &mut holders[bucket_of(v)];
        if v.is_nan() || *holder > 0 {
            return None;
        }
        *holder += 1;
    }
    let last = values.len().saturating_sub(1);
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
            below.min(last) as u8
        })
        .collect();
    Some(bases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::moments::{
        BLOCK, bnb_dynamic_map, dynamic_map, optimizer_map, quantize_blockwise,
    };
    use tch::Kind;

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
            let host = with_table
                .host()
                .expect("every bucket holds at most one value");
            let values = hard_values(&map);
            let by_table: Vec<i64> = values.iter().map(|&v| host.nearest(v) as i64).collect();
            let by_search =
                Vec::<i64>::try_from(with_table.nearest(&Tensor::from_slice(&values))).unwrap();
            let differing = by_table
                .iter()
                .zip(&by_search)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(differing, 0, "of {} values", values.len());
        }
    }

    /// The host loop quantizes as the tensor operations do (the GPU's path): the same
    /// codes and absmax, bit for bit, for blocks at every scale, an all-zero block, a
    /// last block cut short, a block holding an infinity, and a split across three
    /// threads; a block holding a NaN gets a NaN absmax on both paths.
    #[test]
    fn the_host_loop_quantizes_as_the_tensor_operations() {
        tch::manual_seed(5);
        let blocks = 40;
        let scales = Tensor::logspace(-9.0, 1.0, blocks, 10.0, (Kind::Float, Device::Cpu));
        let x = Tensor::randn([blocks, BLOCK], (Kind::Float, Device::Cpu)) * scales.unsqueeze(1);
        let _ = x.get(7).zero_();
        let _ = x.get(3).get(17).fill_(f64::NAN);
        // An infinity: absmax +inf, and inf / inf a NaN to code.
        let _ = x.get(11).get(5).fill_(f64::INFINITY);
        let x = x.view([-1]).narrow(0, 0, blocks * BLOCK - 100);
        // Codes outside the NaN's block, absmax bits with that block's NaN checked apart.
        let nan_block = 3 * BLOCK as usize..4 * BLOCK as usize;
        let codes_apart = |codes: &[u8]| {
            let mut codes = codes.to_vec();
            codes[nan_block.clone()].fill(0);
            codes
        };
        let bits_apart = |absmax: &[f32]| {
            assert!(absmax[3].is_nan());
            absmax
                .iter()
                .enumerate()
                .filter(|&(block, _)| block != 3)
                .map(|(_, v)| v.to_bits())
                .collect::<Vec<_>>()
        };
        for map in [
            optimizer_map(true),
            optimizer_map(false),
            bnb_dynamic_map(true),
        ] {
            let x = if map[0] < 0.0 {
                x.shallow_clone()
            } else {
                x.abs()
            };
            let with_table = CodeMap::new(map, Device::Cpu);
            let searched = CodeMap {
                values: with_table.values.shallow_clone(),
                host: None,
            };
            let (codes, absmax) = quantize_blockwise(&x, &searched);
            let data = Vec::<f32>::try_from(&x).unwrap();
            for threads in [1, 3] {
                let mut host_codes = vec![0u8; (blocks * BLOCK) as usize];
                let mut host_absmax = vec![0f32; blocks as usize];
                with_table.host().unwrap().quantize_blocks(
                    &data,
                    BLOCK as usize,
                    &mut host_codes,
                    &mut host_absmax,
                    threads,
                );
                let tensor_codes = Vec::<u8>::try_from(&codes).unwrap();
                assert_eq!(
                    codes_apart(&tensor_codes),
                    codes_apart(&host_codes),
                    "{threads}"
                );
                let absmax = Vec::<f32>::try_from(&absmax).unwrap();
                assert_eq!(bits_apart(&absmax), bits_apart(&host_absmax), "{threads}");
            }
            // And quantize_blockwise takes the loop on the CPU.
            let (loop_codes, _) = quantize_blockwise(&x, &with_table);
            let loop_codes = Vec::<u8>::try_from(&loop_codes).unwrap();
            let tensor_codes = Vec::<u8>::try_from(&codes).unwrap();
            assert_eq!(codes_apart(&loop_codes), codes_apart(&tensor_codes));
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
                Arc::as_ptr(map.host.as_ref().expect("a CPU table")) as usize,
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
