// PyTorch's distributed engine (c10d) for data-parallel training, which tch does not
// wrap: a TCPStore for the rendezvous and a ProcessGroupGloo (CPU tensors) whose
// all-reduce sums gradients across ranks. Built by build.rs into
// libamthal_dist.so against libtorch_cpu alone (with USE_C10D_GLOO and the stub gloo
// headers in csrc/gloo_stub, see its README), embedded in the binary and loaded by
// src/distributed/shim.rs. The NCCL group (CUDA tensors) belongs in cuda_shim.cpp's
// library and is not built yet.
//
// Every function returns 0 on success and 1 on failure and never throws across the C
// boundary; amthal_dist_last_error() gives the message.

// ProcessGroupGloo.hpp declares its classes only when this is defined (as torch's own
// build does).
#define USE_C10D_GLOO 1

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/version.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "guarded.h"

// The stub gloo headers (csrc/gloo_stub) were checked against torch 2.11's libtorch:
// the c10d classes the shim allocates must have libtorch's own layout. Another torch
// needs that check again (see csrc/gloo_stub/README.md) before this compiles.
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 11
static_assert(sizeof(c10d::ProcessGroupGloo) == 0x1e8, "ProcessGroupGloo layout differs from libtorch's");
static_assert(sizeof(c10d::ProcessGroupGloo::Options) == 0xb0, "Options layout differs from libtorch's");
#else
#error "csrc/gloo_stub was checked against torch 2.11 only: check the layouts for this torch"
#endif

namespace {
using amthal::guarded;
using amthal::last_error;

// A rank's membership: the store it rendezvoused through and its process group.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> group;
};

// Largest all-reduce buffer (bytes): gradients are flattened into buckets of about this
// size, as DDP's 25 MB buckets, so a LoRA step's hundreds of small tensors cost a few
// collective calls instead of hundreds.
constexpr int64_t kBucketBytes = 32 << 20;

// root < 0: all-reduce (sum) the bucket; else broadcast it from rank `root`.
void collective_flat(Group& g, std::vector<at::Tensor>& bucket, int root) {
  if (bucket.empty()) return;
  std::vector<at::Tensor> flat_views;
  flat_views.reserve(bucket.size());
  for (auto& t : bucket) flat_views.push_back(t.reshape({-1}));
  std::vector<at::Tensor> flat{at::cat(flat_views)};
  if (root < 0) {
    g.group->allreduce(flat)->wait();
  } else {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    g.group->broadcast(flat, options)->wait();
  }
  int64_t offset = 0;
  for (auto& t : bucket) {
    int64_t n = t.numel();
    t.copy_(flat[0].narrow(0, offset, n).view_as(t));
    offset += n;
  }
  bucket.clear();
}
}  // namespace

extern "C" {

// Bumped when a signature changes; src/distributed/shim.rs checks it.
int amthal_dist_version() { return 2; }

const char* amthal_dist_last_error() { return last_error.c_str(); }

// Joins the group: rank 0 hosts the TCPStore at host:port, every rank connects, then
// all create their Gloo group over a device bound to `host`'s interface. Blocks until
// all `world` ranks arrived or `timeout_s` passed.
int amthal_dist_init_gloo(const char* host, int port, int rank, int world, int timeout_s,
                          void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions options;
    options.port = static_cast<uint16_t>(port);
    options.isServer = rank == 0;
    options.numWorkers = world;
    options.timeout = std::chrono::seconds(timeout_s);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    auto group_options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(timeout_s));
    // One node (the loopback address): bind there. Several nodes: MASTER_ADDR is rank
    // 0's machine, not this one, so use gloo's default device (this host's address).
    std::string address(host);
    bool loopback = address == "localhost" || address == "::1" || address.rfind("127.", 0) == 0;
    group_options->devices.push_back(
        loopback ? c10d::ProcessGroupGloo::createDeviceForHostname(address)
                 : c10d::ProcessGroupGloo::createDefaultDevice());
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, group_options);
    *out = new Group{store, group};
  });
}

// root < 0: sums `count` tensors element-wise across ranks, in place; else every rank
// receives rank `root`'s values. CPU tensors, flattened into buckets per dtype.
int amthal_dist_collective(void* handle, at::Tensor** tensors, int count, int root) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    auto& g = *static_cast<Group*>(handle);
    std::map<at::ScalarType, std::vector<at::Tensor>> buckets;
    std::map<at::ScalarType, int64_t> bytes;
    for (int i = 0; i < count; ++i) {
      at::Tensor t = *tensors[i];
      auto type = t.scalar_type();
      buckets[type].push_back(t);
      bytes[type] += t.numel() * static_cast<int64_t>(t.element_size());
      if (bytes[type] >= kBucketBytes) {
        collective_flat(g, buckets[type], root);
        bytes[type] = 0;
      }
    }
    for (auto& [type, bucket] : buckets) collective_flat(g, bucket, root);
  });
}

// Every rank waits until all have arrived.
int amthal_dist_barrier(void* handle) {
  return guarded([&] { static_cast<Group*>(handle)->group->barrier()->wait(); });
}

void amthal_dist_destroy(void* handle) { delete static_cast<Group*>(handle); }
}
