// PyTorch's distributed engine (c10d) for data-parallel training, which tch does not
// wrap: a TCPStore for the rendezvous and a process group whose collectives sum
// gradients across ranks. build.rs compiles this file twice, and both are embedded in
// the binary and loaded by src/distributed/shim.rs:
// - libamthal_dist.so against libtorch_cpu alone: ProcessGroupGloo (CPU tensors), with
//   the stub gloo headers in csrc/gloo_stub (see its README);
// - libamthal_dist_nccl.so with AMTHAL_WITH_NCCL, against libtorch_cuda too: also
//   ProcessGroupNCCL (CUDA tensors, summed on the device). Loaded only after
//   libtorch_cuda.so, whose dependencies (libnccl, libcudart) it then finds in the process.
//
// Every function returns 0 on success and 1 on failure and never throws across the C
// boundary; amthal_dist_last_error() gives the message.

// ProcessGroupGloo.hpp / ProcessGroupNCCL.hpp declare their classes only when these are
// defined (as torch's own build does).
#define USE_C10D_GLOO 1
#ifdef AMTHAL_WITH_NCCL
#define USE_C10D_NCCL 1
#endif

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef AMTHAL_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/version.h>

#include <chrono>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "guarded.h"

// The stub gloo headers (csrc/gloo_stub) were checked against torch 2.11's libtorch:
// the c10d classes the shim allocates must have libtorch's own layout. Another torch
// needs that check again (see csrc/gloo_stub/README.md) before this compiles.
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8, "ProcessGroupGloo layout differs from libtorch's");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 0xb0, "Options layout differs from libtorch's");
#ifdef AMTHAL_WITH_NCCL
// The same for the NCCL classes, compiled from the real nccl.h (scripts/setup): the sizes
// libtorch_python.so allocates for them (`operator new` before their constructors).
static_assert(sizeof(c10d::ProcessGroupNCCL) == 0x458, "ProcessGroupNCCL layout differs from libtorch's");
static_assert(sizeof(c10d::ProcessGroupNCCL::Options) == 0xf8, "NCCL Options layout differs from libtorch's");
#endif
#else
#error "csrc/gloo_stub was checked against torch 2.11 only: check the layouts for this torch"
#endif

namespace {
using amthal::guarded;
using amthal::last_error;

// A rank's membership: the store it rendezvoused through and its process group (Gloo
// or NCCL behind c10d's common Backend interface).
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> group;
};

// Which backend amthal_dist_init creates (src/distributed/shim.rs's Backend).
constexpr int kGloo = 0;
constexpr int kNccl = 1;

c10::intrusive_ptr<c10d::Backend> create_gloo(const c10::intrusive_ptr<c10d::Store>& store,
                                              const std::string& host, int rank, int world,
                                              int timeout_s) {
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(timeout_s));
  // One node (the loopback address): bind there. Several nodes: MASTER_ADDR is rank
  // 0's machine, not this one, so use gloo's default device (this host's address).
  bool loopback = host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
  options->devices.push_back(loopback ? c10d::ProcessGroupGloo::createDeviceForHostname(host)
                                      : c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
}

c10::intrusive_ptr<c10d::Backend> create_nccl(const c10::intrusive_ptr<c10d::Store>& store,
                                              int rank, int world, int timeout_s,
                                              int cuda_device) {
#ifdef AMTHAL_WITH_NCCL
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = std::chrono::seconds(timeout_s);
  auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
  // torch.distributed.init_process_group(device_id=...): the communicator is made now,
  // on this rank's card, and barrier() knows the card instead of guessing it from the rank.
  at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device));
  group->setBoundDeviceId(device);
  group->eagerConnectSingleDevice(device);
  return group;
#else
  throw std::runtime_error(
      "this is the CPU build of amthal's c10d library (Gloo only); NCCL needs the CUDA build, "
      "loaded once CUDA is");
#endif
}

// Largest all-reduce buffer (bytes): gradients are flattened into buckets of about this
// size, as DDP's 25 MB buckets, so a LoRA step's hundreds of small tensors cost a few
// collective calls instead of hundreds.
constexpr int64_t kBucketBytes = 32 << 20;

// One bucket in flight: the tensors it sums (or receives), the flat tensor the
// collective works on (their copy, or the one tensor itself), and c10d's handle for it.
struct InFlight {
  std::vector<at::Tensor> tensors;
  std::vector<at::Tensor> flat;
  c10::intrusive_ptr<c10d::Work> work;
  // The collective works on the tensor itself: nothing to copy back.
  bool in_place;
};

// Collectives started by amthal_dist_start, finished by amthal_dist_finish.
struct Pending {
  std::vector<InFlight> buckets;
};

void start_collective(Group& g, std::vector<at::Tensor>& bucket, std::vector<at::Tensor> flat,
                      bool in_place, int root, Pending& pending) {
  c10::intrusive_ptr<c10d::Work> work;
  if (root < 0) {
    work = g.group->allreduce(flat);
  } else {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    work = g.group->broadcast(flat, options);
  }
  pending.buckets.push_back(
      InFlight{std::move(bucket), std::move(flat), std::move(work), in_place});
  bucket.clear();
}

// Starts one bucket's collective: root < 0 all-reduces (sums) it, else broadcasts it
// from rank `root`. The tensors are copied into one flat buffer first, so they may be
// read (not written) until the bucket finishes.
void start_bucket(Group& g, std::vector<at::Tensor>& bucket, int root, Pending& pending) {
  if (bucket.empty()) return;
  std::vector<at::Tensor> flat_views;
  flat_views.reserve(bucket.size());
  for (auto& t : bucket) flat_views.push_back(t.reshape({-1}));
  start_collective(g, bucket, {at::cat(flat_views)}, false, root, pending);
}

// Starts the collective of one large contiguous tensor on the tensor itself, as DDP's
// gradient_as_bucket_view saves its copies: a 7B full fine-tune's gradients (13.8 GB in
// bf16) are otherwise copied into buckets and back at every step. The tensor may be
// neither read nor written until it finishes.
void start_alone(Group& g, const at::Tensor& tensor, int root, Pending& pending) {
  std::vector<at::Tensor> bucket{tensor};
  start_collective(g, bucket, {tensor.view({-1})}, true, root, pending);
}

// Whether a tensor gets a collective of its own, on itself (start_alone).
bool alone(const at::Tensor& t) {
  return t.is_contiguous() && t.numel() * static_cast<int64_t>(t.element_size()) >= kBucketBytes;
}

// Waits for each bucket (for NCCL: the current CUDA stream waits, not the host) and
// writes the results back into the tensors.
void finish_buckets(Pending& pending) {
  for (auto& b : pending.buckets) {
    b.work->wait();
    if (b.in_place) continue;
    int64_t offset = 0;
    for (auto& t : b.tensors) {
      int64_t n = t.numel();
      t.copy_(b.flat[0].narrow(0, offset, n).view_as(t));
      offset += n;
    }
  }
}
}  // namespace

extern "C" {

// Bumped when a signature changes; src/distributed/shim.rs checks it.
int amthal_dist_version() { return 3; }

const char* amthal_dist_last_error() { return last_error.c_str(); }

// Joins the group: rank 0 hosts the TCPStore at host:port, every rank connects, then
// all create their process group: `backend` kGloo (over a device bound to `host`'s
// interface) or kNccl (on card `cuda_device`). Blocks until all `world` ranks arrived or
// `timeout_s` passed.
int amthal_dist_init(const char* host, int port, int rank, int world, int timeout_s,
                     int backend, int cuda_device, void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = rank == 0;
    options.numWorkers = world;
    options.timeout = std::chrono::seconds(timeout_s);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    c10::intrusive_ptr<c10d::Backend> group;
    if (backend == kGloo) {
      group = create_gloo(store, host, rank, world, timeout_s);
    } else if (backend == kNccl) {
      group = create_nccl(store, rank, world, timeout_s, cuda_device);
    } else {
      throw std::runtime_error("unknown backend " + std::to_string(backend));
    }
    *out = new Group{store, group};
  });
}

// Starts a collective over `count` tensors and returns at once (*out: the pending
// work for amthal_dist_finish). root < 0: sums them element-wise across ranks, in
// place; else every rank receives rank `root`'s values. Large contiguous tensors are
// worked on where they are, the others flattened into buckets per dtype: CPU tensors
// for Gloo (its own threads do the work), tensors on the group's card for NCCL (on its
// own stream, after the current stream's work so far). Every rank must start the same
// collectives in the same order.
int amthal_dist_start(void* handle, at::Tensor** tensors, int count, int root, void** out) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    auto& g = *static_cast<Group*>(handle);
    auto pending = std::make_unique<Pending>();
    std::map<at::ScalarType, std::vector<at::Tensor>> buckets;
    std::map<at::ScalarType, int64_t> bytes;
    for (int i = 0; i < count; ++i) {
      at::Tensor t = *tensors[i];
      if (alone(t)) {
        start_alone(g, t, root, *pending);
        continue;
      }
      auto type = t.scalar_type();
      buckets[type].push_back(t);
      bytes[type] += t.numel() * static_cast<int64_t>(t.element_size());
      if (bytes[type] >= kBucketBytes) {
        start_bucket(g, buckets[type], root, *pending);
        bytes[type] = 0;
      }
    }
    for (auto& [type, bucket] : buckets) start_bucket(g, bucket, root, *pending);
    *out = pending.release();
  });
}

// Waits for what amthal_dist_start started, writes the results into its tensors and
// frees it (also when waiting fails).
int amthal_dist_finish(void* pending) {
  std::unique_ptr<Pending> owned(static_cast<Pending*>(pending));
  return guarded([&] {
    c10::NoGradGuard no_grad;
    finish_buckets(*owned);
  });
}

// Every rank waits until all have arrived.
int amthal_dist_barrier(void* handle) {
  return guarded([&] { static_cast<Group*>(handle)->group->barrier()->wait(); });
}

// Leaves the group: shutdown() first (torch.distributed.destroy_process_group: NCCL's
// communicators and watchdog threads end cleanly instead of warning from the destructor).
void amthal_dist_destroy(void* handle) {
  auto* g = static_cast<Group*>(handle);
  guarded([&] { g->group->shutdown(); });
  delete g;
}
}
