// amthal's window into libtorch's CUDA side, for what tch does not wrap: the caching
// allocator's statistics (what torch.cuda.max_memory_allocated/reserved report), the
// devices' names and memory, and CUDA graphs (at::cuda::CUDAGraph). Built by build.rs
// into libamthal_cuda.so, which the binary embeds and loads (src/cuda/shim.rs) only
// after libtorch_cuda.so is loaded: the CPU build never needs a GPU, and this
// library's dependencies (libtorch_cuda, libc10_cuda, libcudart) are then already in
// the process. This is the one place amthal reaches past tch into libtorch's C++.
//
// Every function returns 0 on success and 1 on failure, never throws across the C
// boundary; amthal_cuda_last_error() gives the message of the last failure.

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

#include "guarded.h"

namespace {
using amthal::guarded;
using amthal::last_error;

int cuda_status(cudaError_t status) {
  if (status == cudaSuccess) return 0;
  last_error = cudaGetErrorString(status);
  return 1;
}
}  // namespace

extern "C" {

// Bumped when a signature changes; src/cuda/shim.rs checks it.
int amthal_cuda_shim_version() { return 3; }

const char* amthal_cuda_last_error() { return last_error.c_str(); }

// out[0..4]: allocated bytes now, allocated peak, reserved bytes now, reserved peak,
// for all pools (the AGGREGATE stat, as torch.cuda.memory_stats reports it).
int amthal_cuda_memory_stats(int device, int64_t* out) {
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
  });
}

// torch.cuda.reset_peak_memory_stats(device)
int amthal_cuda_reset_peak(int device) {
  return guarded([&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// The device's name (NUL-terminated, cut to name_len), total memory and compute capability.
int amthal_cuda_device_info(int device, char* name, int name_len, int64_t* total_bytes,
                            int* major, int* minor) {
  cudaDeviceProp props;
  if (cuda_status(cudaGetDeviceProperties(&props, device)) != 0) return 1;
  std::strncpy(name, props.name, static_cast<size_t>(name_len));
  if (name_len > 0) name[name_len - 1] = '\0';
  *total_bytes = static_cast<int64_t>(props.totalGlobalMem);
  *major = props.major;
  *minor = props.minor;
  return 0;
}

// Free and total bytes on the device, as the driver sees them (cudaMemGetInfo).
int amthal_cuda_mem_get_info(int device, int64_t* free_bytes, int64_t* total_bytes) {
  int previous = 0;
  if (cuda_status(cudaGetDevice(&previous)) != 0) return 1;
  if (cuda_status(cudaSetDevice(device)) != 0) return 1;
  size_t free_now = 0, total = 0;
  int status = cuda_status(cudaMemGetInfo(&free_now, &total));
  cudaSetDevice(previous);
  *free_bytes = static_cast<int64_t>(free_now);
  *total_bytes = static_cast<int64_t>(total);
  return status;
}

// CUDA graphs (at::cuda::CUDAGraph, what torch.cuda.graph wraps). `body(context)` is
// amthal's Rust code issuing the work to record; it returns 0 on success and must not
// unwind (the Rust side catches panics). Capture needs a stream other than the
// default one, so the work runs on a stream from the pool: once eagerly (warm-up:
// cuBLAS handles and workspaces, the allocator's blocks for that stream), then once
// recorded. Tensors the recorded work allocates live in the graph's private memory
// pool and keep their addresses, so a replay rewrites the same outputs. On success
// *graph_out owns the graph (free it with amthal_cuda_graph_destroy).
//
// `pool`: null for a private memory pool, else two ids from amthal_cuda_graph_pool_handle
// that several graphs share (as torch.cuda.make_graphed_callables shares one): graphs
// that are never replayed at the same time and hand out no tensor across replays
// (training's length buckets) then need the memory of the largest alone.
int amthal_cuda_graph_capture(int (*body)(void*), void* context, const uint64_t* pool,
                              void** graph_out) {
  *graph_out = nullptr;
  at::cuda::CUDAGraph* graph = nullptr;
  int status = guarded([&] {
    auto side = at::cuda::getStreamFromPool();
    auto caller = at::cuda::getCurrentCUDAStream();
    // The side stream starts after what the caller queued (prefill, cache copies).
    cudaEvent_t ready;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(ready, caller.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(side.stream(), ready, 0));
    C10_CUDA_CHECK(cudaEventDestroy(ready));
    c10::cuda::CUDAStreamGuard guard(side);
    if (body(context) != 0) throw std::runtime_error("the warm-up run failed");
    side.synchronize();
    // The warm-up's freed blocks are cached for the side stream, which nothing else
    // uses: hand them back before the graph's pool grows (and again after), or each
    // recording would keep one more micro-batch's worth of memory reserved.
    c10::cuda::CUDACachingAllocator::emptyCache();
    graph = new at::cuda::CUDAGraph();
    if (pool != nullptr) {
      graph->capture_begin(at::cuda::MempoolId_t{pool[0], pool[1]});
    } else {
      graph->capture_begin();
    }
    int recorded = body(context);
    graph->capture_end();  // throws if the capture was invalidated
    if (recorded != 0) throw std::runtime_error("recording the work failed");
    side.synchronize();
    c10::cuda::CUDACachingAllocator::emptyCache();
  });
  if (status != 0) {
    delete graph;
    return 1;
  }
  *graph_out = graph;
  return 0;
}

// A memory pool id for graphs to share (at::cuda::graph_pool_handle(), what
// torch.cuda.graph_pool_handle() returns): out[0..2].
int amthal_cuda_graph_pool_handle(uint64_t* out) {
  return guarded([&] {
    auto handle = at::cuda::graph_pool_handle();
    out[0] = handle.first;
    out[1] = handle.second;
  });
}

// Replays a captured graph on the current stream.
int amthal_cuda_graph_replay(void* graph) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph*>(graph)->replay(); });
}

int amthal_cuda_graph_destroy(void* graph) {
  return guarded([&] { delete static_cast<at::cuda::CUDAGraph*>(graph); });
}
}
