//! CUDA, in one place.
//!
//! amthal links the CPU part of libtorch and loads `libtorch_cuda.so` at run time
//! (dlopen, RTLD_GLOBAL, so its kernels and CUDA hooks register with libtorch). The
//! order matters: libtorch creates its CUDA hooks object once, on the first CUDA query
//! (`getCUDAHooks`, a call_once), and keeps that answer for the life of the process. A
//! query before the load (`tch::Cuda::is_available()`, but also `tch::manual_seed`,
//! which asks whether CUDA exists) fixes the CPU-only answer for good; that was the
//! bug that made every `--device cuda` fail. So `runtime()` is the only way in: it
//! attempts the load first and queries second, `main` calls it before anything else,
//! and no other module calls `tch::Cuda` (a test reads the sources to keep it so).
//!
//! Where libtorch_cuda.so comes from: `$AMTHAL_LIBTORCH_CUDA` (a file, or a PyTorch
//! 2.11 `torch/lib` folder), else the torch wheel that scripts/setup unpacked (which
//! needs the NVIDIA runtime wheels: `scripts/setup --cuda`). Once CUDA is up, the C++
//! shim (`shim.rs`, csrc/) adds what tch does not wrap: the caching allocator's memory
//! statistics and the devices' names and memory.

pub mod graph;
pub mod shim;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// What the loader found, once per process.
#[derive(Debug)]
pub struct CudaRuntime {
    /// The libtorch_cuda.so that was loaded (None: libtorch already had CUDA).
    pub library: Option<PathBuf>,
    pub device_count: usize,
    /// The C++ shim, or why it could not be loaded (memory statistics are then absent).
    pub shim: Result<shim::Shim, String>,
}

/// One step of the loader, recorded so a test can check the order (load, then query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderStep {
    /// The loader looked for an NVIDIA driver and libtorch_cuda.so (before any query).
    LoadAttempt { driver: bool },
    /// libtorch was asked whether CUDA works.
    Query,
}

static STEPS: Mutex<Vec<LoaderStep>> = Mutex::new(Vec::new());

fn record(step: LoaderStep) {
    STEPS.lock().expect("loader log").push(step);
}

/// The loader's steps so far, in order (for tests).
pub fn loader_steps() -> Vec<LoaderStep> {
    STEPS.lock().expect("loader log").clone()
}

/// The CUDA runtime, loading libtorch_cuda.so on the first call; Err says why CUDA is
/// not usable (no driver, no library found, the library failed to load or sees no device).
pub fn runtime() -> Result<&'static CudaRuntime, &'static str> {
    static RUNTIME: OnceLock<Result<CudaRuntime, String>> = OnceLock::new();
    RUNTIME.get_or_init(load).as_ref().map_err(String::as_str)
}

/// Loads CUDA if it is there; `main` calls this before any command runs.
pub fn init() {
    let _ = runtime();
}

pub fn is_available() -> bool {
    runtime().is_ok()
}

pub fn device_count() -> usize {
    runtime().map_or(0, |r| r.device_count)
}

fn driver_present() -> bool {
    Path::new("/proc/driver/nvidia/version").exists() || Path::new("/dev/nvidiactl").exists()
}

/// Where libtorch_cuda.so is looked for, in order.
pub fn library_candidates() -> Vec<PathBuf> {
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

fn load() -> Result<CudaRuntime, String> {
    let driver = driver_present();
    record(LoaderStep::LoadAttempt { driver });
    // Without an NVIDIA driver there is nothing to load libtorch_cuda.so for, and
    // nothing to ask libtorch either.
    if !driver {
        return Err("no NVIDIA driver on this machine".into());
    }
    let mut failures = Vec::new();
    let mut library = None;
    for candidate in library_candidates() {
        if !candidate.is_file() {
            failures.push(format!("{}: not found", candidate.display()));
            continue;
        }
        match dlopen_global(&candidate) {
            Ok(()) => {
                library = Some(candidate);
                break;
            }
            Err(message) => failures.push(format!("{}: {message}", candidate.display())),
        }
    }
    record(LoaderStep::Query);
    if !tch::Cuda::is_available() {
        return Err(if library.is_some() {
            "libtorch_cuda.so loaded but libtorch sees no usable CUDA device".into()
        } else {
            format!(
                "libtorch_cuda.so could not be loaded ({}); set AMTHAL_LIBTORCH_CUDA to a \
                 PyTorch 2.11 torch/lib folder, or run scripts/setup --cuda",
                failures.join("; ")
            )
        });
    }
    let device_count = tch::Cuda::device_count().max(0) as usize;
    let shim = shim::Shim::load();
    if let Err(message) = &shim {
        tracing::warn!("CUDA memory statistics are unavailable: {message}");
    }
    Ok(CudaRuntime {
        library,
        device_count,
        shim,
    })
}

/// dlopen with RTLD_GLOBAL; the handle is kept for the life of the process.
fn dlopen_global(path: &Path) -> Result<(), String> {
    let c_path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| "a NUL in the path".to_string())?;
    // SAFETY: dlopen of a shared library by path; the handle is never dlclosed since
    // libtorch keeps pointers into it.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(shim::dlerror());
    }
    Ok(())
}

/// GPU memory of one device as libtorch's caching allocator counts it (what
/// `torch.cuda.memory_allocated`/`memory_reserved` and their `max_` forms report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GpuMemory {
    pub device: usize,
    pub allocated_bytes: i64,
    pub peak_allocated_bytes: i64,
    pub reserved_bytes: i64,
    pub peak_reserved_bytes: i64,
}

/// The allocator statistics of a device, when CUDA and the shim are loaded.
pub fn memory(device: usize) -> Option<GpuMemory> {
    let shim = runtime().ok()?.shim.as_ref().ok()?;
    match shim.memory_stats(device) {
        Ok(stats) => Some(stats),
        Err(message) => {
            tracing::warn!("cuda:{device}: memory statistics: {message}");
            None
        }
    }
}

/// A CUDA device as `amthal env` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    pub index: usize,
    pub name: String,
    pub total_bytes: i64,
    pub free_bytes: i64,
    pub compute_capability: String,
}

/// Every visible device, with what the shim can tell about it.
pub fn devices() -> Vec<DeviceInfo> {
    let Ok(runtime) = runtime() else {
        return Vec::new();
    };
    (0..runtime.device_count)
        .map(|index| {
            let info = runtime
                .shim
                .as_ref()
                .ok()
                .and_then(|s| s.device_info(index).ok());
            let (free_bytes, _) = runtime
                .shim
                .as_ref()
                .ok()
                .and_then(|s| s.mem_get_info(index).ok())
                .unwrap_or((-1, -1));
            match info {
                Some((name, total_bytes, (major, minor))) => DeviceInfo {
                    index,
                    name,
                    total_bytes,
                    free_bytes,
                    compute_capability: format!("{major}.{minor}"),
                },
                None => DeviceInfo {
                    index,
                    name: "unknown (no shim)".into(),
                    total_bytes: -1,
                    free_bytes,
                    compute_capability: "?".into(),
                },
            }
        })
        .collect()
}

/// Waits for the device's queued work (timing and memory readings need it).
pub fn synchronize(device: usize) {
    if is_available() {
        tch::Cuda::synchronize(device as i64);
    }
}

/// Whether libtorch can use cuDNN (only asked once CUDA is loaded).
pub fn cudnn_available() -> bool {
    is_available() && tch::Cuda::cudnn_is_available()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_attempt_comes_before_any_query() {
        let available = is_available();
        let steps = loader_steps();
        assert!(
            matches!(steps.first(), Some(LoaderStep::LoadAttempt { .. })),
            "{steps:?}"
        );
        // Without a driver nothing is queried at all; with one, the query follows the load.
        match steps[0] {
            LoaderStep::LoadAttempt { driver: false } => {
                assert_eq!(steps.len(), 1, "{steps:?}");
                assert!(!available);
            }
            LoaderStep::LoadAttempt { driver: true } => {
                assert_eq!(steps.get(1), Some(&LoaderStep::Query), "{steps:?}")
            }
            LoaderStep::Query => unreachable!(),
        }
        // A second call loads nothing again.
        let _ = is_available();
        assert_eq!(loader_steps(), steps);
    }
}
