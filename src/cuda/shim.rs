//! The C++ shim (csrc/cuda_shim.cpp, compiled by build.rs) as a safe Rust wrapper.
//!
//! The library is embedded in the binary, so a binary carried to a GPU machine alone
//! still has it. It is loaded from memory (memfd_create + dlopen of /proc/self/fd/N),
//! and only after libtorch_cuda.so: its dependencies (libc10_cuda, libcudart) are then
//! already in the process, and on a CPU machine it is never loaded at all.

use std::ffi::{CStr, c_char, c_int, c_void};

/// The compiled shim (see build.rs).
pub const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libamthal_cuda.so"));

/// The interface version csrc/cuda_shim.cpp reports; a mismatch refuses the shim.
const VERSION: c_int = 3;

/// The exported functions, by name (a test checks the embedded library has each).
pub const SYMBOLS: [&str; 10] = [
    "amthal_cuda_shim_version",
    "amthal_cuda_last_error",
    "amthal_cuda_memory_stats",
    "amthal_cuda_reset_peak",
    "amthal_cuda_device_info",
    "amthal_cuda_mem_get_info",
    "amthal_cuda_graph_capture",
    "amthal_cuda_graph_replay",
    "amthal_cuda_graph_destroy",
    "amthal_cuda_graph_pool_handle",
];

type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type MemoryStatsFn = unsafe extern "C" fn(c_int, *mut i64) -> c_int;
type ResetPeakFn = unsafe extern "C" fn(c_int) -> c_int;
type DeviceInfoFn =
    unsafe extern "C" fn(c_int, *mut c_char, c_int, *mut i64, *mut c_int, *mut c_int) -> c_int;
type MemGetInfoFn = unsafe extern "C" fn(c_int, *mut i64, *mut i64) -> c_int;
/// The work to record: called with the context pointer, returns 0 on success.
pub type GraphBody = unsafe extern "C" fn(*mut c_void) -> c_int;
type GraphCaptureFn =
    unsafe extern "C" fn(GraphBody, *mut c_void, *const u64, *mut *mut c_void) -> c_int;
type GraphPoolFn = unsafe extern "C" fn(*mut u64) -> c_int;
type GraphFn = unsafe extern "C" fn(*mut c_void) -> c_int;

/// Function pointers into the loaded shim (kept loaded for the life of the process).
#[derive(Debug)]
pub struct Shim {
    last_error: LastErrorFn,
    memory_stats: MemoryStatsFn,
    reset_peak: ResetPeakFn,
    device_info: DeviceInfoFn,
    mem_get_info: MemGetInfoFn,
    graph_capture: GraphCaptureFn,
    graph_replay: GraphFn,
    graph_destroy: GraphFn,
    graph_pool_handle: GraphPoolFn,
}

/// Loads an embedded shared library from memory (memfd_create + dlopen of
/// /proc/self/fd/N, never closed) and returns a symbol finder for it. Its undefined
/// symbols resolve against what the process has loaded already (libtorch).
pub fn load_embedded(
    name: &std::ffi::CStr,
    bytes: &[u8],
) -> Result<impl Fn(&str) -> Result<*mut libc::c_void, String>, String> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh file descriptor we own; File closes it on drop.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    std::io::Write::write_all(&mut file, bytes).map_err(|e| format!("memfd write: {e}"))?;
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    // SAFETY: dlopen of the library just written; the mapping outlives the fd, and
    // the handle is never closed since function pointers into it are kept.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    // The fd stays open for the life of the process: glibc knows the library by its
    // path, and a closed fd's number (so its /proc path) would be reused by the next
    // embedded library, which dlopen would then take for this one already loaded.
    std::mem::forget(file);
    if handle.is_null() {
        return Err(dlerror());
    }
    let handle = handle as usize;
    Ok(move |name: &str| -> Result<*mut libc::c_void, String> {
        let c_name = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: dlsym on a valid, never-closed handle with a NUL-terminated name.
        let address = unsafe { libc::dlsym(handle as *mut libc::c_void, c_name.as_ptr()) };
        if address.is_null() {
            Err(format!("{name}: {}", dlerror()))
        } else {
            Ok(address)
        }
    })
}

type VersionFn = unsafe extern "C" fn() -> c_int;

/// `load_embedded`, then the library's `version_symbol()` (an `int (*)()`) must
/// return `expected`: the Rust side's function types match the C++ signatures only
/// for the interface version they were written for.
pub fn load_versioned(
    name: &std::ffi::CStr,
    bytes: &[u8],
    version_symbol: &str,
    expected: c_int,
) -> Result<impl Fn(&str) -> Result<*mut libc::c_void, String>, String> {
    let symbol = load_embedded(name, bytes)?;
    // SAFETY: every embedded library exports `version_symbol` as `int f(void)`.
    let found = unsafe {
        let version: VersionFn = std::mem::transmute(symbol(version_symbol)?);
        version()
    };
    if found != expected {
        return Err(format!(
            "the embedded library {} reports interface {found} but amthal expects {expected}",
            name.to_string_lossy()
        ));
    }
    Ok(symbol)
}

/// A C++ library's 0/1 status as a Result carrying its `*_last_error()` message
/// (csrc/guarded.h).
pub fn status_result(
    status: c_int,
    last_error: unsafe extern "C" fn() -> *const c_char,
) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: last_error returns a pointer to a thread-local std::string's buffer.
    Err(unsafe { CStr::from_ptr(last_error()) }
        .to_string_lossy()
        .into_owned())
}

/// The thread's last dlopen/dlsym error message.
pub fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local C string or null.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl Shim {
    /// Loads the embedded library. Call only after libtorch_cuda.so is loaded.
    pub fn load() -> Result<Shim, String> {
        let symbol = load_versioned(c"amthal_cuda", LIBRARY, SYMBOLS[0], VERSION)?;
        // SAFETY (all transmutes): each symbol is the extern "C" function of that name in
        // csrc/cuda_shim.cpp, whose signature the type alias repeats.
        unsafe {
            Ok(Shim {
                last_error: std::mem::transmute::<*mut libc::c_void, LastErrorFn>(symbol(
                    SYMBOLS[1],
                )?),
                memory_stats: std::mem::transmute::<*mut libc::c_void, MemoryStatsFn>(symbol(
                    SYMBOLS[2],
                )?),
                reset_peak: std::mem::transmute::<*mut libc::c_void, ResetPeakFn>(symbol(
                    SYMBOLS[3],
                )?),
                device_info: std::mem::transmute::<*mut libc::c_void, DeviceInfoFn>(symbol(
                    SYMBOLS[4],
                )?),
                mem_get_info: std::mem::transmute::<*mut libc::c_void, MemGetInfoFn>(symbol(
                    SYMBOLS[5],
                )?),
                graph_capture: std::mem::transmute::<*mut libc::c_void, GraphCaptureFn>(symbol(
                    SYMBOLS[6],
                )?),
                graph_replay: std::mem::transmute::<*mut libc::c_void, GraphFn>(symbol(
                    SYMBOLS[7],
                )?),
                graph_destroy: std::mem::transmute::<*mut libc::c_void, GraphFn>(symbol(
                    SYMBOLS[8],
                )?),
                graph_pool_handle: std::mem::transmute::<*mut libc::c_void, GraphPoolFn>(symbol(
                    SYMBOLS[9],
                )?),
            })
        }
    }

    /// Turns the shim's 0/1 status into a Result with its message.
    fn check(&self, status: c_int) -> Result<(), String> {
        status_result(status, self.last_error)
    }

    pub fn memory_stats(&self, device: usize) -> Result<super::GpuMemory, String> {
        let mut out = [0i64; 4];
        // SAFETY: out has the 4 slots the function writes.
        self.check(unsafe { (self.memory_stats)(device as c_int, out.as_mut_ptr()) })?;
        Ok(super::GpuMemory {
            device,
            allocated_bytes: out[0],
            peak_allocated_bytes: out[1],
            reserved_bytes: out[2],
            peak_reserved_bytes: out[3],
        })
    }

    pub fn reset_peak(&self, device: usize) -> Result<(), String> {
        // SAFETY: plain call with an int.
        self.check(unsafe { (self.reset_peak)(device as c_int) })
    }

    /// (name, total bytes, (major, minor) compute capability)
    pub fn device_info(&self, device: usize) -> Result<(String, i64, (i32, i32)), String> {
        let mut name = [0 as c_char; 256];
        let (mut total, mut major, mut minor) = (0i64, 0, 0);
        // SAFETY: every out-pointer is valid and name holds name.len() bytes.
        self.check(unsafe {
            (self.device_info)(
                device as c_int,
                name.as_mut_ptr(),
                name.len() as c_int,
                &mut total,
                &mut major,
                &mut minor,
            )
        })?;
        // SAFETY: the shim NUL-terminates name within its length.
        let name = unsafe { CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok((name, total, (major, minor)))
    }

    /// (free, total) bytes as the driver reports them.
    pub fn mem_get_info(&self, device: usize) -> Result<(i64, i64), String> {
        let (mut free, mut total) = (0i64, 0i64);
        // SAFETY: both out-pointers are valid.
        self.check(unsafe { (self.mem_get_info)(device as c_int, &mut free, &mut total) })?;
        Ok((free, total))
    }
}

impl Shim {
    /// Records `body`'s work into a new CUDA graph (after one eager warm-up run of
    /// it); returns the graph's handle. `pool`: a memory pool shared with other
    /// graphs (`graph_pool_handle`), or `None` for the graph's own. See `super::graph`
    /// for the safe wrapper.
    ///
    /// # Safety
    /// `context` must be what `body` expects, valid for the duration of the call.
    pub unsafe fn graph_capture(
        &self,
        body: GraphBody,
        context: *mut c_void,
        pool: Option<[u64; 2]>,
    ) -> Result<*mut c_void, String> {
        let mut graph = std::ptr::null_mut();
        let pool_ptr = pool.as_ref().map_or(std::ptr::null(), |ids| ids.as_ptr());
        // SAFETY: the caller guarantees body/context; pool_ptr is null or two ids that
        // outlive the call; graph is a valid out-pointer.
        self.check(unsafe { (self.graph_capture)(body, context, pool_ptr, &mut graph) })?;
        Ok(graph)
    }

    /// A new memory pool id for graphs to share (`torch.cuda.graph_pool_handle()`).
    pub fn graph_pool_handle(&self) -> Result<[u64; 2], String> {
        let mut ids = [0u64; 2];
        // SAFETY: ids has the two slots the function writes.
        self.check(unsafe { (self.graph_pool_handle)(ids.as_mut_ptr()) })?;
        Ok(ids)
    }

    /// # Safety
    /// `graph` must come from `graph_capture` and not be destroyed yet.
    pub unsafe fn graph_replay(&self, graph: *mut c_void) -> Result<(), String> {
        // SAFETY: per the caller's guarantee.
        self.check(unsafe { (self.graph_replay)(graph) })
    }

    /// # Safety
    /// `graph` must come from `graph_capture`; it is invalid afterwards.
    pub unsafe fn graph_destroy(&self, graph: *mut c_void) -> Result<(), String> {
        // SAFETY: per the caller's guarantee.
        self.check(unsafe { (self.graph_destroy)(graph) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded library is a shared object that exports every symbol the loader
    /// asks for (it cannot be loaded without libtorch_cuda.so, so this is checked on
    /// its bytes: the ELF magic and the dynamic symbol names).
    #[test]
    fn the_embedded_shim_exports_what_the_loader_asks_for() {
        assert!(LIBRARY.starts_with(b"\x7FELF"), "not an ELF file");
        for name in SYMBOLS {
            let needle = format!("\0{name}\0");
            assert!(
                LIBRARY
                    .windows(needle.len())
                    .any(|w| w == needle.as_bytes()),
                "{name} is not in the embedded shim"
            );
        }
    }
}
