//! Tensors from safetensors files, single or sharded (model.safetensors.index.json),
//! memory-mapped so only the tensor being converted is paged in.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::bail_input;
use crate::error::bad_input;

/// The tensors of one or more safetensors files, by name.
pub struct SafetensorsSource {
    files: Vec<(PathBuf, Mmap)>,
    /// Tensor name -> where and what it is, read once from the headers at open.
    index: BTreeMap<String, Entry>,
}

/// One tensor of a safetensors file.
struct Entry {
    file: usize,
    shape: Vec<i64>,
    dtype: Dtype,
    /// Byte range of its data in the file (safetensors checked it against shape and dtype).
    range: Range<usize>,
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
            for (name, view) in tensors.tensors() {
                let shape = view.shape().iter().map(|&d| d as i64).collect();
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = Entry {
                    file: file_index,
                    shape,
                    dtype: view.dtype(),
                    range: start..start + view.data().len(),
                };
                index.insert(name, entry);
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafetensorsSource { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.index.get(name).map(|e| e.shape.as_slice())
    }

    /// Loads one tensor converted to `kind` on `device`; `None` if absent.
    pub fn load(&self, name: &str, kind: Kind, device: Device) -> Result<Option<Tensor>> {
        let Some(Entry {
            file,
            shape,
            dtype,
            range,
        }) = self.index.get(name)
        else {
            return Ok(None);
        };
        let (path, mmap) = &self.files[*file];
        // One read-ahead request for the whole tensor (page faults alone read 128 KB at
        // a time); `read_ahead` usually has it in the page cache already.
        let _ = mmap.advise_range(memmap2::Advice::WillNeed, range.start, range.len());
        let stored = match dtype {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => bail_input!(
                "{}: tensor {name} has dtype {other:?}; amthal reads F32, F16, BF16 and F64 weights",
                path.display()
            ),
        };
        let bytes = &mmap[range.clone()];
        let tensor = match device {
            // Straight from the mapped file to the device (no host copy), then converted
            // there. The blob tensor borrows the mapping only until to_device returns.
            Device::Cuda(_) => {
                // SAFETY: `bytes` is the tensor's data in the mapping (safetensors checked
                // its length against the shape and dtype; data offsets are 8-byte
                // aligned), it outlives the temporary, which is only read by the copy.
                let view =
                    unsafe { Tensor::from_blob(bytes.as_ptr(), shape, &[], stored, Device::Cpu) };
                view.to_device(device).to_kind(kind)
            }
            // On the CPU the tensor must own its memory: the mapping goes away.
            _ => Tensor::from_data_size(bytes, shape, stored).to_kind(kind),
        };
        release_pages(mmap, bytes);
        Ok(Some(tensor))
    }

    /// Reads tensors into the page cache in the order `names` will be loaded, at most
    /// `READ_AHEAD_BYTES` ahead of the loader (`consumed`: how many it has loaded), so
    /// the disk works while the loader copies to the device. Touches one byte per page.
    pub fn read_ahead(&self, names: &[&str], consumed: &AtomicUsize) {
        const READ_AHEAD_BYTES: usize = 256 << 20;
        let sizes: Vec<usize> = names
            .iter()
            .map(|n| self.index.get(*n).map_or(0, |e| e.range.len()))
            .collect();
        let mut in_flight = 0usize; // bytes read ahead and not yet loaded
        let mut read = vec![false; names.len()];
        let mut done = 0usize;
        for (i, name) in names.iter().enumerate() {
            loop {
                let now = consumed.load(Ordering::Acquire);
                while done < now.min(i) {
                    if read[done] {
                        in_flight -= sizes[done];
                    }
                    done += 1;
                }
                if now > i || in_flight == 0 || in_flight + sizes[i] <= READ_AHEAD_BYTES {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            if consumed.load(Ordering::Acquire) > i {
                continue; // the loader got there first
            }
            let Some(Entry { file, range, .. }) = self.index.get(*name) else {
                continue;
            };
            let mmap = &self.files[*file].1;
            let _ = mmap.advise_range(memmap2::Advice::WillNeed, range.start, range.len());
            let mut sum = 0u8;
            for offset in range.clone().step_by(4096) {
                sum = sum.wrapping_add(mmap[offset]);
            }
            std::hint::black_box(sum);
            in_flight += sizes[i];
            read[i] = true;
        }
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
