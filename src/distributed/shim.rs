//! The c10d library (csrc/distributed.cpp): a TCPStore rendezvous and a Gloo or NCCL
//! process group, embedded in the binary and loaded from memory on first use, as the
//! other C++ libraries are (`crate::cuda::shim::load_embedded`). Two builds of the same
//! source: Gloo only against libtorch_cpu, and Gloo + NCCL against libtorch_cuda, which
//! is loaded only once CUDA is (its undefined symbols resolve there).

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use tch::Tensor;

use crate::cuda::shim::{load_versioned, status_result};

const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libamthal_dist.so"));
const NCCL_LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libamthal_dist_nccl.so"));
const VERSION: c_int = 3;

/// The exported functions, by name (a test checks both embedded builds have each).
pub const SYMBOLS: [&str; 7] = [
    "amthal_dist_version",
    "amthal_dist_last_error",
    "amthal_dist_init",
    "amthal_dist_start",
    "amthal_dist_finish",
    "amthal_dist_barrier",
    "amthal_dist_destroy",
];

/// c10d's communication backend for a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors (CUDA tensors through host copies, `super::Distributed`).
    Gloo,
    /// CUDA tensors, summed on the devices (NVIDIA's collective library).
    Nccl,
}

impl Backend {
    /// The code csrc/distributed.cpp's `amthal_dist_init` takes.
    fn code(self) -> c_int {
        match self {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        }
    }
}

type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type InitFn = unsafe extern "C" fn(
    *const c_char,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *mut *mut c_void,
) -> c_int;
type StartFn =
    unsafe extern "C" fn(*mut c_void, *const *mut c_void, c_int, c_int, *mut *mut c_void) -> c_int;
type FinishFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type BarrierFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut c_void);

struct Library {
    last_error: LastErrorFn,
    init: InitFn,
    start: StartFn,
    finish: FinishFn,
    barrier: BarrierFn,
    destroy: DestroyFn,
}

/// The build that has `backend`: NCCL's needs libtorch_cuda in the process first.
fn library(backend: Backend) -> Result<&'static Library, String> {
    static GLOO: OnceLock<Result<Library, String>> = OnceLock::new();
    static NCCL: OnceLock<Result<Library, String>> = OnceLock::new();
    let (cell, name, bytes) = match backend {
        Backend::Gloo => (&GLOO, c"amthal_dist", LIBRARY),
        Backend::Nccl => {
            if !crate::cuda::is_available() {
                return Err("the NCCL backend needs CUDA, which is not available here".into());
            }
            (&NCCL, c"amthal_dist_nccl", NCCL_LIBRARY)
        }
    };
    cell.get_or_init(|| load(name, bytes))
        .as_ref()
        .map_err(Clone::clone)
}

fn load(name: &std::ffi::CStr, bytes: &[u8]) -> Result<Library, String> {
    let symbol = load_versioned(name, bytes, SYMBOLS[0], VERSION)?;
    // SAFETY (all transmutes): each symbol is the extern "C" function of that name in
    // csrc/distributed.cpp, whose signature the type alias repeats.
    unsafe {
        Ok(Library {
            last_error: std::mem::transmute::<*mut c_void, LastErrorFn>(symbol(SYMBOLS[1])?),
            init: std::mem::transmute::<*mut c_void, InitFn>(symbol(SYMBOLS[2])?),
            start: std::mem::transmute::<*mut c_void, StartFn>(symbol(SYMBOLS[3])?),
            finish: std::mem::transmute::<*mut c_void, FinishFn>(symbol(SYMBOLS[4])?),
            barrier: std::mem::transmute::<*mut c_void, BarrierFn>(symbol(SYMBOLS[5])?),
            destroy: std::mem::transmute::<*mut c_void, DestroyFn>(symbol(SYMBOLS[6])?),
        })
    }
}

/// One rank's process group.
pub struct ProcessGroup {
    handle: *mut c_void,
    library: &'static Library,
    pub backend: Backend,
}

// SAFETY: the group is used from the training thread only; c10d's objects are
// thread-safe for the calls made (one collective at a time).
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Rendezvous at `host:port` (rank 0 hosts the store) and join the group; waits up
    /// to `timeout_s` for every rank. NCCL works on card `cuda_device`.
    pub fn join(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout_s: u32,
        backend: Backend,
        cuda_device: usize,
    ) -> Result<ProcessGroup, String> {
        let library = library(backend)?;
        let host_c = CString::new(host).map_err(|e| e.to_string())?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: a valid C string and an out-pointer.
        status_result(
            unsafe {
                (library.init)(
                    host_c.as_ptr(),
                    port as c_int,
                    rank as c_int,
                    world as c_int,
                    timeout_s as c_int,
                    backend.code(),
                    cuda_device as c_int,
                    &mut handle,
                )
            },
            library.last_error,
        )?;
        Ok(ProcessGroup {
            handle,
            library,
            backend,
        })
    }

    /// Starts summing (`root` None) or broadcasting the tensors (CPU tensors for Gloo,
    /// tensors on the group's card for NCCL) and returns while the backend works; the
    /// tensors may be read but not written until `finish`. Every rank must start the
    /// same collectives in the same order.
    pub fn start(&self, tensors: &[&Tensor], root: Option<usize>) -> Result<InFlight, String> {
        let handles: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let root = root.map_or(-1, |r| r as c_int);
        let mut pending: *mut c_void = std::ptr::null_mut();
        // SAFETY: live tensor handles (kept alive by the caller until `finish`, which
        // writes into them) and an out-pointer.
        status_result(
            unsafe {
                (self.library.start)(
                    self.handle,
                    handles.as_ptr(),
                    handles.len() as c_int,
                    root,
                    &mut pending,
                )
            },
            self.library.last_error,
        )?;
        Ok(InFlight {
            pending,
            library: self.library,
        })
    }

    /// Waits for every rank.
    pub fn barrier(&self) -> Result<(), String> {
        // SAFETY: a live group handle.
        status_result(
            unsafe { (self.library.barrier)(self.handle) },
            self.library.last_error,
        )
    }
}

/// Collectives started and not yet finished (`ProcessGroup::start`).
#[must_use = "a started collective must be finished"]
pub struct InFlight {
    pending: *mut c_void,
    library: &'static Library,
}

// SAFETY: as ProcessGroup: used from the training thread.
unsafe impl Send for InFlight {}

impl InFlight {
    /// Waits for the collectives (under NCCL the current CUDA stream waits, not the
    /// host) and writes the results into the tensors.
    pub fn finish(mut self) -> Result<(), String> {
        let pending = std::mem::replace(&mut self.pending, std::ptr::null_mut());
        // SAFETY: `pending` came from start and is finished (and freed) once.
        status_result(
            unsafe { (self.library.finish)(pending) },
            self.library.last_error,
        )
    }
}

impl Drop for InFlight {
    /// An unfinished collective (an error on the way) is still waited for and freed.
    fn drop(&mut self) {
        if !self.pending.is_null() {
            // SAFETY: as in finish.
            let _ = unsafe { (self.library.finish)(self.pending) };
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from init and is dropped once.
        unsafe { (self.library.destroy)(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ranks in one process (two threads) on the loopback address: the sum of
    /// [1, 2, 3] * (rank + 1) is [3, 6, 9] on both, for tensors of two dtypes.
    #[test]
    fn two_gloo_ranks_sum_their_tensors() {
        let port = super::super::free_port().unwrap();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let group =
                        ProcessGroup::join("127.0.0.1", port, rank, 2, 30, Backend::Gloo, 0)
                            .unwrap();
                    let a = Tensor::from_slice(&[1f32, 2.0, 3.0]) * (rank as f64 + 1.0);
                    let b = Tensor::from_slice(&[10f64]) * (rank as f64 + 1.0);
                    group.start(&[&a, &b], None).unwrap().finish().unwrap();
                    let c = Tensor::from_slice(&[rank as f32; 4]);
                    group.start(&[&c], Some(1)).unwrap().finish().unwrap();
                    assert_eq!(Vec::<f32>::try_from(&c).unwrap(), vec![1.0; 4]);
                    group.barrier().unwrap();
                    (
                        Vec::<f32>::try_from(&a).unwrap(),
                        Vec::<f64>::try_from(&b).unwrap(),
                    )
                })
            })
            .collect();
        for rank in ranks {
            let (a, b) = rank.join().unwrap();
            assert_eq!(a, vec![3.0, 6.0, 9.0]);
            assert_eq!(b, vec![30.0]);
        }
    }

    /// Both embedded builds export every function the loader asks for, and only the
    /// CUDA build names NCCL's process group (it cannot be loaded without CUDA, so its
    /// symbols are read from the file).
    #[test]
    fn both_builds_export_the_interface() {
        for bytes in [LIBRARY, NCCL_LIBRARY] {
            for name in SYMBOLS {
                let needle = format!("{name}\0");
                assert!(
                    bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{name} missing"
                );
            }
        }
        let nccl = b"ProcessGroupNCCL";
        assert!(NCCL_LIBRARY.windows(nccl.len()).any(|w| w == nccl));
        assert!(!LIBRARY.windows(nccl.len()).any(|w| w == nccl));
    }

    /// The NCCL build loads where CUDA is (after libtorch_cuda, whose symbols it
    /// uses); without CUDA, asking for it is a clear error, not a failed dlopen.
    #[test]
    fn the_nccl_build_loads_only_with_cuda() {
        match library(Backend::Nccl) {
            Ok(_) => assert!(crate::cuda::is_available()),
            Err(error) => {
                assert!(!crate::cuda::is_available(), "{error}");
                assert!(error.contains("needs CUDA"), "{error}");
            }
        }
        assert!(library(Backend::Gloo).is_ok());
    }
}
