//! `--device` and `--precision`, shared by every command that runs a model.
//!
//! amthal links the CPU part of libtorch. For `--device cuda`, libtorch_cuda.so is
//! loaded at start-up (dlopen with RTLD_GLOBAL, so its CUDA kernels register with
//! libtorch) from `$AMTHAL_LIBTORCH_CUDA` (a file or a torch/lib folder, e.g. a
//! PyTorch 2.11 install's), or from the torch wheel that scripts/setup unpacked
//! (which needs the NVIDIA runtime wheels: `scripts/setup --cuda`).

use std::path::PathBuf;

use anyhow::Result;
use tch::{Device, Kind};

use crate::bail_input;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CPUs with AMX or AVX512-BF16 and on CUDA, else f32.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cuda_available() {
                Ok(Device::Cuda(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => require_cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(index) => require_cuda(index),
            None => bail_input!("--device {other}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

fn require_cuda(index: usize) -> Result<Device> {
    if !cuda_available() {
        bail_input!(
            "--device cuda: no CUDA device is usable. amthal looked for libtorch_cuda.so in {} \
             (set AMTHAL_LIBTORCH_CUDA to a PyTorch 2.11 torch/lib folder, or run scripts/setup --cuda)",
            cuda_library_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let count = tch::Cuda::device_count() as usize;
    if index >= count {
        bail_input!("--device cuda:{index}: only {count} CUDA device(s)");
    }
    Ok(Device::Cuda(index))
}

fn cuda_library_candidates() -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("AMTHAL_LIBTORCH_CUDA").map(PathBuf::from) {
        candidates.push(if path.is_dir() {
            path.join("libtorch_cuda.so")
        } else {
            path
        });
    }
    candidates.push(
        crate::model_source::cache_dir()
            .join("site")
            .join("torch")
            .join("lib")
            .join("libtorch_cuda.so"),
    );
    candidates
}

/// Whether CUDA works, loading libtorch_cuda.so once if needed.
pub fn cuda_available() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        if tch::Cuda::is_available() {
            return true;
        }
        // Without an NVIDIA driver there is nothing to load libtorch_cuda.so for.
        let driver = std::path::Path::new("/proc/driver/nvidia/version").exists()
            || std::path::Path::new("/dev/nvidiactl").exists();
        if !driver {
            return false;
        }
        for candidate in cuda_library_candidates() {
            if !candidate.is_file() {
                continue;
            }
            let Ok(path) = std::ffi::CString::new(candidate.to_string_lossy().as_bytes()) else {
                continue;
            };
            // SAFETY: dlopen of a shared library by path; the handle is kept for the
            // life of the process (never dlclosed) since libtorch keeps pointers into it.
            let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or null.
                let message = unsafe {
                    let e = libc::dlerror();
                    if e.is_null() {
                        String::new()
                    } else {
                        std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                    }
                };
                tracing::warn!("could not load {}: {message}", candidate.display());
                continue;
            }
            if tch::Cuda::is_available() {
                return true;
            }
        }
        false
    })
}

/// Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16).
pub fn cpu_has_fast_bf16() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    flags
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            l.split_whitespace()
                .any(|f| f == "amx_bf16" || f == "avx512_bf16")
        })
        .unwrap_or(false)
}

/// The compute dtype for a precision on a device.
pub fn resolve_precision(precision: Precision, device: Device) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::F16 => Kind::Half,
        Precision::Auto => match device {
            Device::Cuda(_) => Kind::BFloat16,
            _ if cpu_has_fast_bf16() => Kind::BFloat16,
            _ => Kind::Float,
        },
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "other",
    }
}
