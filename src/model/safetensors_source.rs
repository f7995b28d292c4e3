//! Tensors from safetensors files, single or sharded (model.safetensors.index.json),
//! memory-mapped so only the tensor being converted is paged in.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::bail_input;
use crate::error::bad_input;

/// The tensors of one or more safetensors files, by name.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> (file index, shape, byte range of its data in the file).
    index: BTreeMap<String, (usize, Vec<i64>, Range<usize>)>,
    /// Per file, the tensors' byte ranges in file order (for read-ahead).
    file_order: Vec<Vec<Range<usize>>>,
}

impl SafetensorsSource {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`,
    /// in an HF model folder.
    pub fn open_folder(dir: &Path) -> Result<SafetensorsSource> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad_input(format!("{}: no weight_map", index.display())))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            return Self::open_files(&paths);
        }
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        if dir.join("pytorch_model.bin").is_file()
            || dir.join("pytorch_model.bin.index.json").is_file()
        {
            bail_input!(
                "{}: only pickle weights (pytorch_model.bin), which amthal never loads; \
                 convert them to safetensors (model.save_pretrained(..., safe_serialization=True))",
                dir.display()
            );
        }
        bail_input!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        )
    }

    /// Opens the given safetensors files as one set of tensors.
    pub fn open_files(paths: &[PathBuf]) -> Result<SafetensorsSource> {
        let mut files = Vec::new();
        let mut index = BTreeMap::new();
        let mut file_order = Vec::new();
        for (file_index, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path)
                .map_err(|e| bad_input(format!("{}: cannot open: {e}", path.display())))?;
            // SAFETY: the file is only read; a concurrent writer could change what we read,
            // which safetensors' own bounds checks then report as an error.
            let mmap = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            let tensors = SafeTensors::deserialize(&mmap).map_err(|e| {
                bad_input(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            let mut ranges = Vec::new();
            for (name, view) in tensors.tensors() {
                let shape = view.shape().iter().map(|&d| d as i64).collect();
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let range = start..start + view.data().len();
                ranges.push(range.clone());
                index.insert(name, (file_index, shape, range));
            }
            ranges.sort_by_key(|r| r.start);
            file_order.push(ranges);
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsSource {
            files,
            index,
            file_order,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.index.get(name).map(|(_, s, _)| s.as_slice())
    }

    /// Loads one tensor converted to `kind` on `device`; `None` if absent.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some((file_index, shape, range)) = self.index.get(name) else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[*file_index];
        // Read-ahead: ask the kernel for this tensor's bytes in one request, and for the
        // next tensor's in file order, so the disk works while this one is copied to
        // the device (page faults alone read 128 KB at a time).
        let order = &self.file_order[*file_index];
        let next = order
            .partition_point(|r| r.start <= range.start)
            .min(order.len() - 1);
        for r in [range, &order[next]] {
            let _ = mmap.advise_range(memmap2::Advice::WillNeed, r.start, r.len());
        }
        let tensors = SafeTensors::deserialize(mmap)
            .map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| bad_input(format!("{}: tensor {name}: {e}", path.display())))?;
        let stored = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => bail_input!(
                "{}: tensor {name} has dtype {other:?}; amthal reads F32, F16, BF16 and F64 weights",
                path.display()
            ),
        };
        let bytes = view.data();
        let tensor = Tensor::from_data_size(bytes, shape, stored);
        // To the device first, then convert there: the host holds one tensor's copy at
        // a time, and the GPU does the conversion.
        let tensor = tensor.to_device(device).to_kind(kind);
        release_pages(mmap, bytes);
        Ok(Some(tensor))
    }
}

/// Drops the mapped pages of bytes already copied out of `mmap` from this process's
/// resident set (madvise DONTNEED; they stay in the page cache, and a later read
/// faults them back in). Without it a 14 GB model read through the mapping counts
/// 14 GB of host RSS after it went to the GPU.
pub fn release_pages(mmap: &Mmap, bytes: &[u8]) {
    let offset = bytes.as_ptr() as usize - mmap.as_ptr() as usize;
    // SAFETY: DONTNEED on a read-only file mapping only discards this process's view
    // of pages it can fault back in; nothing borrowed from the range is read later
    // without going through the mapping again.
    let result = unsafe {
        mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len())
    };
    if let Err(error) = result {
        tracing::debug!("madvise(DONTNEED) failed: {error}");
    }
}
