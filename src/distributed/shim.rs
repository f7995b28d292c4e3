//! The c10d library (csrc/distributed.cpp): a TCPStore rendezvous and a Gloo process
//! group, embedded in the binary and loaded from memory on first use, as the other
//! C++ libraries are (`crate::cuda::shim::load_embedded`).

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::OnceLock;

use tch::Tensor;

use crate::cuda::shim::{load_versioned, status_result};

const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libamthal_dist.so"));
const VERSION: c_int = 2;

type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type InitFn =
    unsafe extern "C" fn(*const c_char, c_int, c_int, c_int, c_int, *mut *mut c_void) -> c_int;
type CollectiveFn = unsafe extern "C" fn(*mut c_void, *const *mut c_void, c_int, c_int) -> c_int;
type BarrierFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type DestroyFn = unsafe extern "C" fn(*mut c_void);

struct Library {
    last_error: LastErrorFn,
    init: InitFn,
    collective: CollectiveFn,
    barrier: BarrierFn,
    destroy: DestroyFn,
}

fn library() -> Result<&'static Library, String> {
    static LIBRARY_CELL: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY_CELL
        .get_or_init(|| {
            let symbol = load_versioned(c"amthal_dist", LIBRARY, "amthal_dist_version", VERSION)?;
            // SAFETY (all transmutes): each symbol is the extern "C" function of that
            // name in csrc/distributed.cpp, whose signature the type alias repeats.
            unsafe {
                Ok(Library {
                    last_error: std::mem::transmute::<*mut c_void, LastErrorFn>(symbol(
                        "amthal_dist_last_error",
                    )?),
                    init: std::mem::transmute::<*mut c_void, InitFn>(symbol(
                        "amthal_dist_init_gloo",
                    )?),
                    collective: std::mem::transmute::<*mut c_void, CollectiveFn>(symbol(
                        "amthal_dist_collective",
                    )?),
                    barrier: std::mem::transmute::<*mut c_void, BarrierFn>(symbol(
                        "amthal_dist_barrier",
                    )?),
                    destroy: std::mem::transmute::<*mut c_void, DestroyFn>(symbol(
                        "amthal_dist_destroy",
                    )?),
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One rank's Gloo process group (CPU tensors).
pub struct GlooGroup {
    handle: *mut c_void,
    library: &'static Library,
}

// SAFETY: the group is used from the training thread only; c10d's objects are
// thread-safe for the calls made (one collective at a time).
unsafe impl Send for GlooGroup {}

impl GlooGroup {
    /// Rendezvous at `host:port` (rank 0 hosts the store) and join the group; waits up
    /// to `timeout_s` for every rank.
    pub fn join(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout_s: u32,
    ) -> Result<GlooGroup, String> {
        let library = library()?;
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
                    &mut handle,
                )
            },
            library.last_error,
        )?;
        Ok(GlooGroup { handle, library })
    }

    /// Sums the tensors across ranks, in place (CPU tensors).
    pub fn allreduce_sum(&self, tensors: &[&Tensor]) -> Result<(), String> {
        self.collective(tensors, -1)
    }

    /// Every rank receives rank `root`'s values of the tensors (CPU tensors).
    pub fn broadcast(&self, tensors: &[&Tensor], root: usize) -> Result<(), String> {
        self.collective(tensors, root as c_int)
    }

    /// root < 0: all-reduce (sum); else broadcast from `root`.
    fn collective(&self, tensors: &[&Tensor], root: c_int) -> Result<(), String> {
        let handles: Vec<*mut c_void> = tensors.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        // SAFETY: live tensor handles, updated in place.
        status_result(
            unsafe {
                (self.library.collective)(
                    self.handle,
                    handles.as_ptr(),
                    handles.len() as c_int,
                    root,
                )
            },
            self.library.last_error,
        )
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

impl Drop for GlooGroup {
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
                    let group = GlooGroup::join("127.0.0.1", port, rank, 2, 30).unwrap();
                    let a = Tensor::from_slice(&[1f32, 2.0, 3.0]) * (rank as f64 + 1.0);
                    let b = Tensor::from_slice(&[10f64]) * (rank as f64 + 1.0);
                    group.allreduce_sum(&[&a, &b]).unwrap();
                    let c = Tensor::from_slice(&[rank as f32; 4]);
                    group.broadcast(&[&c], 1).unwrap();
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
}
