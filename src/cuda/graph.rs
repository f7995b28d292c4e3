//! CUDA graphs: a fixed piece of GPU work recorded once and replayed with one launch,
//! so a decode step of a 7B costs one launch instead of ~1,000 (what makes batch-1
//! decoding bound by the host rather than by memory bandwidth).
//!
//! What a recorded body may do (as for torch.cuda.graph): issue device work only (no
//! `.item()`, no copy to the host, nothing data-dependent on the host), read its
//! inputs from tensors whose storage stays put (the caller copies new values into
//! them before each replay), and return the tensors it creates: their memory belongs
//! to the graph, and each replay rewrites them in place.

use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::shim::Shim;

/// A recorded graph; dropped, it is freed.
pub struct CudaGraph {
    handle: *mut c_void,
    shim: &'static Shim,
}

struct Recording<'a, T> {
    body: &'a mut dyn FnMut() -> T,
    output: Option<T>,
    failure: Option<String>,
}

/// Called by the shim (twice: warm-up, then recorded); never unwinds into C++.
unsafe extern "C" fn run_body<T>(context: *mut c_void) -> c_int {
    // SAFETY: the shim passes back the pointer `capture` gave it, to a live Recording<T>.
    let recording = unsafe { &mut *(context as *mut Recording<'_, T>) };
    match catch_unwind(AssertUnwindSafe(|| (recording.body)())) {
        Ok(output) => {
            recording.output = Some(output);
            0
        }
        Err(panic) => {
            recording.failure = Some(
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "a panic".into()),
            );
            1
        }
    }
}

/// A memory pool several graphs record into (`torch.cuda.graph_pool_handle()`): for
/// graphs replayed one at a time that hand no tensor from one replay to the next
/// other than their outputs, which stay allocated. Then the pool needs what the
/// largest graph needs, not their sum (training's length buckets).
#[derive(Debug, Clone, Copy)]
pub struct GraphPool([u64; 2]);

impl GraphPool {
    pub fn new() -> Result<GraphPool, String> {
        Ok(GraphPool(loaded_shim()?.graph_pool_handle()?))
    }
}

fn loaded_shim() -> Result<&'static Shim, String> {
    super::runtime()
        .map_err(|why| format!("CUDA is not available: {why}"))?
        .shim
        .as_ref()
        .map_err(|why| format!("the CUDA shim is not loaded: {why}"))
}

impl CudaGraph {
    /// Runs `body` once eagerly (warm-up) on a side stream, then records it; returns
    /// the graph and the outputs of the recorded run (computed by the first `replay`).
    /// The graph's memory is its own.
    pub fn capture<T>(body: impl FnMut() -> T) -> Result<(CudaGraph, T), String> {
        CudaGraph::capture_in(None, body)
    }

    /// `capture`, with the graph's memory in `pool` when given (shared with the other
    /// graphs recorded into it).
    pub fn capture_in<T>(
        pool: Option<GraphPool>,
        mut body: impl FnMut() -> T,
    ) -> Result<(CudaGraph, T), String> {
        let shim = loaded_shim()?;
        let mut recording = Recording {
            body: &mut body,
            output: None,
            failure: None,
        };
        let context = &mut recording as *mut Recording<'_, T> as *mut c_void;
        // SAFETY: run_body::<T> is given a pointer to `recording`, which outlives the call.
        let captured = unsafe { shim.graph_capture(run_body::<T>, context, pool.map(|p| p.0)) };
        match (captured, recording.failure, recording.output) {
            (Ok(handle), None, Some(output)) => Ok((CudaGraph { handle, shim }, output)),
            (Ok(handle), failure, _) => {
                // SAFETY: a graph the shim just made.
                let _ = unsafe { shim.graph_destroy(handle) };
                Err(failure.unwrap_or_else(|| "the body produced nothing".into()))
            }
            (Err(message), failure, _) => Err(match failure {
                Some(failure) => format!("{message}: {failure}"),
                None => message,
            }),
        }
    }

    /// Runs the recorded work again (on the current stream).
    pub fn replay(&self) -> Result<(), String> {
        // SAFETY: handle is a live graph from capture.
        unsafe { self.shim.graph_replay(self.handle) }
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: handle is a live graph from capture, freed once here.
        if let Err(message) = unsafe { self.shim.graph_destroy(self.handle) } {
            tracing::warn!("freeing a CUDA graph: {message}");
        }
    }
}
