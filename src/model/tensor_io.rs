//! tch tensors written as safetensors files, one tensor at a time.
//!
//! A 7B checkpoint is 14 GB of weights and 28-83 GB of optimizer state. Building every
//! tensor's bytes first and then the whole file in memory (what `safetensors::serialize`
//! does) held two or three copies of it in host memory and spent two passes over it
//! before the first byte reached the disk; `serialize_to_file` with views that produce
//! each tensor's bytes when its turn comes holds one tensor at a time, and a contiguous
//! host tensor in the file's dtype (the offloaded optimizer state, a CPU model) is
//! written straight from its memory.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use safetensors::Dtype;
use tch::{Device, Kind, Tensor};

/// A tensor to write, in the file dtype its kind maps to: f32, bf16, f16 and u8 as
/// themselves, anything else as f32.
pub struct WritableTensor {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl WritableTensor {
    /// Takes a handle to `tensor` (no copy; its bytes are read when the file is written,
    /// so it must not change before then).
    pub fn new(tensor: &Tensor) -> WritableTensor {
        let dtype = match tensor.kind() {
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            Kind::Uint8 => Dtype::U8,
            _ => Dtype::F32,
        };
        WritableTensor {
            tensor: tensor.detach(),
            dtype,
            shape: tensor.size().iter().map(|&d| d as usize).collect(),
        }
    }

    /// The kind the file stores.
    fn file_kind(&self) -> Kind {
        match self.dtype {
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
            Dtype::U8 => Kind::Uint8,
            _ => Kind::Float,
        }
    }

    /// Bytes in the file.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.file_kind().elt_size_in_bytes()
    }

    /// The same tensor copied into host memory now, so the original may change before
    /// the file is written (a checkpoint written while training goes on).
    fn snapshot(&self) -> WritableTensor {
        let copy = if self.tensor.device() == Device::Cpu {
            self.tensor.copy()
        } else {
            self.tensor.to_device(Device::Cpu)
        };
        WritableTensor {
            tensor: copy,
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
}

/// A safetensors file whose writing was put off (`deferring`), with host copies of its
/// tensors as they were when it was asked for.
pub struct DeferredFile {
    path: PathBuf,
    tensors: Vec<(String, WritableTensor)>,
}

impl DeferredFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn write(&self) -> Result<()> {
        write_now(&self.path, &self.tensors)
    }
}

thread_local! {
    /// Files put off by `deferring` on this thread (None: write at once).
    static DEFERRED: RefCell<Option<Vec<DeferredFile>>> = const { RefCell::new(None) };
}

/// Runs `f` with every `write_safetensors` on this thread put off: each takes host
/// copies of its tensors and returns, and the files come back to be written later
/// (on another thread: a checkpoint written in the background). Everything else `f`
/// writes is written at once. The writers of checkpoints stay one code path this way,
/// whether their big files are written now or later.
pub fn deferring<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<DeferredFile>)> {
    DEFERRED.with(|d| {
        let mut d = d.borrow_mut();
        anyhow::ensure!(d.is_none(), "safetensors writes are already being put off");
        *d = Some(Vec::new());
        Ok(())
    })?;
    let result = f();
    let files = DEFERRED.with(|d| d.borrow_mut().take()).unwrap_or_default();
    Ok((result?, files))
}

impl safetensors::View for &WritableTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let length = self.byte_len();
        if length == 0 {
            return Cow::Borrowed(&[]);
        }
        let t = &self.tensor;
        if t.device() == Device::Cpu && t.kind() == self.file_kind() && t.is_contiguous() {
            // SAFETY: a contiguous CPU tensor of the file's kind holds exactly `length`
            // bytes from its data pointer, alive as long as `self` holds the tensor, and
            // nothing writes it while the file is written (saving runs between steps).
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, length) };
            return Cow::Borrowed(bytes);
        }
        let host = t
            .to_device(Device::Cpu)
            .to_kind(self.file_kind())
            .contiguous();
        let mut bytes = vec![0u8; length];
        host.copy_data_u8(&mut bytes, host.numel());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.byte_len()
    }
}

/// Writes named tensors as one safetensors file, a tensor at a time (the crate writes
/// a temp file beside `path` and renames it), then flushes it to the disk; inside
/// `deferring`, copies them and leaves the file for later.
pub fn write_safetensors(path: &Path, tensors: &[(String, WritableTensor)]) -> Result<()> {
    let put_off = DEFERRED.with(|d| {
        d.borrow_mut().as_mut().map(|files| {
            files.push(DeferredFile {
                path: path.to_path_buf(),
                tensors: tensors
                    .iter()
                    .map(|(name, t)| (name.clone(), t.snapshot()))
                    .collect(),
            })
        })
    });
    if put_off.is_some() {
        return Ok(());
    }
    write_now(path, tensors)
}

fn write_now(path: &Path, tensors: &[(String, WritableTensor)]) -> Result<()> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(
        tensors.iter().map(|(name, t)| (name.as_str(), t)),
        Some(metadata),
        path,
    )
    .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    // The crate's temp file is private (0600); give the file the mode `File::create`
    // gives every other file we write, and flush it to the disk as `atomic::write_file`
    // does before anyone relies on it.
    crate::atomic::set_created_file_mode(path)?;
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("flushing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind and layout reads back with its values: f32, bf16 and u8 as stored,
    /// int64 as f32, a transposed (non-contiguous) tensor in its logical order, an
    /// empty tensor; a contiguous host tensor is written from its own memory.
    #[test]
    fn tensors_read_back_as_written() {
        let dir = std::env::temp_dir().join(format!("amthal-tensor-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let f32s = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]) * 0.5;
        let bf16 = f32s.to_kind(Kind::BFloat16);
        let codes = Tensor::arange(256, (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
        let longs = Tensor::arange(5, (Kind::Int64, Device::Cpu));
        let transposed = f32s.tr();
        let empty = Tensor::zeros([0, 4], (Kind::Float, Device::Cpu));
        let named = [
            ("f32", &f32s),
            ("bf16", &bf16),
            ("u8", &codes),
            ("i64", &longs),
            ("transposed", &transposed),
            ("empty", &empty),
        ];
        let writable: Vec<(String, WritableTensor)> = named
            .iter()
            .map(|(n, t)| (n.to_string(), WritableTensor::new(t)))
            .collect();
        {
            use safetensors::View;
            let (contiguous, transposed) = (&writable[0].1, &writable[4].1);
            assert!(
                matches!(contiguous.data(), Cow::Borrowed(_)),
                "no copy of a host tensor"
            );
            assert!(matches!(transposed.data(), Cow::Owned(_)));
        }
        write_safetensors(&path, &writable).unwrap();
        // The mode every other file we write gets, not the crate temp file's 0600.
        use std::os::unix::fs::PermissionsExt;
        let created = dir.join("created");
        std::fs::write(&created, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&created));
        let bytes = std::fs::read(&path).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, tensor) in named {
            let view = file.tensor(name).unwrap();
            let read = Tensor::from_data_size(
                view.data(),
                &view.shape().iter().map(|&d| d as i64).collect::<Vec<_>>(),
                WritableTensor::new(tensor).file_kind(),
            );
            let expected = tensor.to_kind(read.kind());
            assert_eq!(read.size(), expected.size(), "{name}");
            assert!(read.equal(&expected), "{name}");
        }
        assert_eq!(file.tensor("i64").unwrap().dtype(), Dtype::F32);
        assert_eq!(file.tensor("transposed").unwrap().shape(), &[4, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Inside `deferring` nothing is written, and the file written later holds the
    /// values of when it was asked for, though the tensor changed in place since (as
    /// the weights do while a background writer works); outside, files are written at
    /// once again.
    #[test]
    fn a_deferred_file_holds_the_values_it_was_asked_for_with() {
        let dir = std::env::temp_dir().join(format!("amthal-deferred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (now, later) = (dir.join("now.safetensors"), dir.join("later.safetensors"));
        let mut weights = Tensor::arange(8, (Kind::Float, Device::Cpu)) * 0.25;
        let before = weights.copy();
        let named = |t: &Tensor| vec![("w".to_string(), WritableTensor::new(t))];
        let ((), files) = deferring(|| write_safetensors(&later, &named(&weights))).unwrap();
        assert!(!later.exists(), "nothing written inside deferring");
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path(), later.as_path());
        let _ = weights.g_add_scalar_(1.0);
        files[0].write().unwrap();
        write_safetensors(&now, &named(&before)).unwrap();
        assert_eq!(
            std::fs::read(&later).unwrap(),
            std::fs::read(&now).unwrap(),
            "the deferred file holds the values from before the change"
        );
        // A nested deferral is refused, and an error inside comes back as is.
        let nested = deferring(|| deferring(|| Ok(())).map(|_| ()));
        assert!(nested.is_err());
        let failed = deferring(|| -> Result<()> { anyhow::bail!("inner failure") });
        assert_eq!(failed.err().unwrap().to_string(), "inner failure");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
