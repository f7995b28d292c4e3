// libtorch operations that tch does not wrap and that amthal needs on the CPU and on
// CUDA alike: the multi-tensor ("foreach") forms of AdamW and of the gradient norm,
// which run one kernel over many tensors instead of one kernel per tensor per step
// (a LoRA step of a 7B updates 448 tensors; issued one by one they cost the host more
// than the GPU spends on them). Built by build.rs into libamthal_ops.so, embedded in
// the binary and loaded from memory on first use (src/torch_ops.rs); it needs only
// libtorch_cpu, which the binary already links. The CUDA-only APIs live in
// cuda_shim.cpp.
//
// Tensors come as tch's handles (torch::Tensor*). Every function returns 0 on success
// and 1 on failure, never throws across the C boundary; amthal_ops_last_error() gives
// the message of the last failure.

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "guarded.h"
#include "linear_nodes.h"

namespace {
using amthal::guarded;
using amthal::last_error;
using amthal::DenseLinear;
using amthal::LoraLinear;
using amthal::RecomputedLinear;
using amthal::RmsNorm;
using amthal::WeightFn;

std::vector<at::Tensor> list(at::Tensor** tensors, int count) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) out.push_back(*tensors[i]);
  return out;
}

// Counts the kernels a step issues (AMTHAL_PROFILE_STEP, src/profile.rs): a global
// RecordFunction callback sees every dispatcher call, forward and backward, nested
// calls included. A call counts as one kernel unless it is in kTrivial (views,
// allocations, and composite ops such as aten::linear or aten::to that launch nothing
// themselves, only through the ops they call) or repeats its caller's name (mul with
// a scalar calls mul with a tensor: one kernel). An estimate: an op that launches two
// kernels counts once, and a CPU scalar's conversion counts as one.
const char* const kTrivial[] = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias",
    "aten::view_as", "aten::transpose", "aten::t", "aten::permute", "aten::as_strided",
    "aten::narrow", "aten::slice", "aten::select", "aten::expand", "aten::expand_as",
    "aten::unsqueeze", "aten::squeeze", "aten::unbind", "aten::split",
    "aten::split_with_sizes", "aten::chunk", "aten::detach", "aten::detach_", "detach",
    "detach_", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
    "aten::empty_like", "aten::resize_", "aten::resolve_conj", "aten::resolve_neg",
    "aten::result_type", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
    "aten::type_as", "aten::matmul", "aten::linear", "aten::item", "aten::dropout",
    "aten::flatten", "aten::ones", "aten::zeros", "aten::ones_like", "aten::zeros_like",
    "aten::full", "aten::full_like", "aten::scaled_dot_product_attention",
    "aten::cross_entropy_loss", "aten::silu_", "aten::_has_compatible_shallow_copy_type",
    "aten::is_nonzero", "aten::set_", "aten::requires_grad_", "aten::retains_grad",
    "aten::output_nr", "aten::_version",
};

bool is_trivial(const char* name) {
  // The autograd engine's wrapper around each backward node launches nothing itself.
  if (std::strncmp(name, "autograd::", 10) == 0) return true;
  for (const char* trivial : kTrivial) {
    if (std::strcmp(name, trivial) == 0) return true;
  }
  return false;
}

struct OpCounts {
  std::mutex mutex;
  std::map<std::string, int64_t> counts;
};
OpCounts& op_counts() {
  static OpCounts counts;
  return counts;
}

// Per thread (the autograd engine runs CUDA backward passes on its own threads): the
// names of the calls open now, innermost last.
thread_local std::vector<std::string> open_calls;

std::unique_ptr<at::ObserverContext> on_op_start(const at::RecordFunction& fn) {
  const char* name = fn.name();
  bool counts = fn.scope() != at::RecordScope::BACKWARD_FUNCTION && !is_trivial(name) &&
                (open_calls.empty() || open_calls.back() != name);
  if (counts) {
    auto& all = op_counts();
    std::lock_guard<std::mutex> lock(all.mutex);
    all.counts[name] += 1;
  }
  open_calls.emplace_back(name);
  return nullptr;
}

void on_op_end(const at::RecordFunction&, at::ObserverContext*) {
  if (!open_calls.empty()) open_calls.pop_back();
}
}  // namespace

extern "C" {

// Bumped when a signature changes; src/torch_ops.rs checks it.
int amthal_ops_version() { return 10; }

const char* amthal_ops_last_error() { return last_error.c_str(); }

// torch.optim.AdamW(fused=True)'s update of `count` parameters in place (decoupled
// weight decay, no amsgrad): at::_fused_adamw_. `step` is the 1-based step number as a
// one-value f32 tensor on the parameters' device, shared by every parameter. The
// learning rate is `lr`, or, when `lr_tensor` is not null, that one-value f32 tensor on
// the same device (read by the kernel: a recorded CUDA graph replays it with each
// step's value).
int amthal_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                       at::Tensor** exp_avg_sqs, at::Tensor* step, int count, double lr,
                       at::Tensor* lr_tensor, double beta1, double beta2, double weight_decay,
                       double eps) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> steps(static_cast<size_t>(count), *step);
    auto p = list(params, count), g = list(grads, count), m = list(exp_avgs, count),
         v = list(exp_avg_sqs, count);
    if (lr_tensor != nullptr) {
      at::_fused_adamw_(p, g, m, v, {}, steps, *lr_tensor, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false);
    } else {
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                        /*amsgrad=*/false, /*maximize=*/false);
    }
  });
}

// The L2 norm of all `count` tensors together (computed in f32), written into `out`
// (a one-value f32 tensor): torch.nn.utils.clip_grad_norm_'s total norm.
int amthal_foreach_total_norm(at::Tensor** tensors, int count, at::Tensor* out) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    auto norms = at::_foreach_norm(list(tensors, count), 2, at::kFloat);
    out->copy_(at::linalg_vector_norm(at::stack(norms), 2));
  });
}

// Multiplies every one of `count` tensors by `factor`, in place.
int amthal_foreach_mul(at::Tensor** tensors, int count, double factor) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    auto tensors_list = list(tensors, count);
    at::_foreach_mul_(tensors_list, factor);
  });
}

// RecomputedLinear (above) applied to `x`; the result, a new tensor, goes to `*out`.
int amthal_recomputed_linear(at::Tensor* x, WeightFn weight_fn, const void* state,
                             at::Tensor** out) {
  return guarded([&] {
    at::Tensor y = RecomputedLinear::apply(*x, reinterpret_cast<int64_t>(weight_fn),
                                           reinterpret_cast<int64_t>(state));
    *out = new at::Tensor(std::move(y));
  });
}

// LoraLinear (above): `x_lora` null when it is x itself; `bias` may be null. The
// result, a new tensor, goes to `*out`.
int amthal_lora_linear(at::Tensor* x, at::Tensor* x_lora, at::Tensor* weight,
                       at::Tensor* bias, at::Tensor* a, at::Tensor* b, double scaling,
                       at::Tensor** out) {
  return guarded([&] {
    bool same_input = x_lora == nullptr;
    at::Tensor y = LoraLinear::apply(*x, same_input ? *x : *x_lora, *weight,
                                     bias == nullptr ? std::nullopt : std::optional(*bias), *a, *b,
                                     scaling, same_input);
    *out = new at::Tensor(std::move(y));
  });
}

// DenseLinear (linear_nodes.h): x W^T (+ bias, which may be null). The result, a new
// tensor, goes to `*out`.
int amthal_dense_linear(at::Tensor* x, at::Tensor* weight, at::Tensor* bias,
                        at::Tensor** out) {
  return guarded([&] {
    at::Tensor y = DenseLinear::apply(*x, *weight,
                                      bias == nullptr ? std::nullopt : std::optional(*bias));
    *out = new at::Tensor(std::move(y));
  });
}

// RmsNorm (linear_nodes.h): transformers' RMSNorm of x with `weight`, its backward
// pass as a formula. The result, a new tensor, goes to `*out`.
int amthal_rms_norm(at::Tensor* x, at::Tensor* weight, double eps, at::Tensor** out) {
  return guarded([&] {
    at::Tensor y = RmsNorm::apply(*x, *weight, eps);
    *out = new at::Tensor(std::move(y));
  });
}

// Whether f32 CPU products go through oneDNN (1, the default) or MKL (0); returns 0
// when oneDNN is not in this libtorch (the choice is then MKL whatever was asked).
int amthal_set_cpu_matmul(int onednn) {
  amthal::cpu_matmul_onednn.store(onednn != 0);
  return amthal::onednn_linear() != nullptr ? 1 : 0;
}

// Drops the gradients of `count` tensors (optimizer.zero_grad(set_to_none=True), torch's
// default): no zero_ kernel per tensor, and the next backward pass adopts its
// gradients instead of adding them to zeros. With `in_place`, zeroes the defined ones
// instead, with one multi-tensor kernel (set_to_none=False): what recorded CUDA
// graphs need, whose backward passes add into those very tensors.
int amthal_clear_grads(at::Tensor** tensors, int count, int in_place) {
  return guarded([&] {
    if (!in_place) {
      for (int i = 0; i < count; ++i) tensors[i]->mutable_grad().reset();
      return;
    }
    std::vector<at::Tensor> grads;
    for (int i = 0; i < count; ++i) {
      if (tensors[i]->grad().defined()) grads.push_back(tensors[i]->grad());
    }
    if (!grads.empty()) at::_foreach_zero_(grads);
  });
}

// dst.copy_(src, non_blocking=true): a copy between pinned host memory and a CUDA
// device that the host does not wait for (ordered on the current stream like a kernel;
// tch's copy_ always waits). `--offload-optimizer` writes updated state back to host
// memory this way; whoever reads that memory on the host synchronizes first.
int amthal_copy_async(at::Tensor* dst, at::Tensor* src) {
  return guarded([&] { dst->copy_(*src, /*non_blocking=*/true); });
}

// A copy of host tensor `src` in pinned (page-locked) memory, into `*out`. tch's
// pin_memory passes a device, which libtorch 2.11 warns about as deprecated on every
// call (once per optimizer tensor under --offload-optimizer).
int amthal_pin_memory(at::Tensor* src, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(src->pin_memory()); });
}

// Starts counting operators in every thread (once per process; later calls do nothing).
int amthal_ops_count_start() {
  return guarded([&] {
    static bool started = false;
    if (started) return;
    at::addGlobalCallback(at::RecordFunctionCallback(on_op_start, on_op_end)
                              .scopes({at::RecordScope::FUNCTION,
                                       at::RecordScope::BACKWARD_FUNCTION}));
    started = true;
  });
}

// The counts since the last call, as "name<TAB>count" lines, into `buffer` (NUL
// terminated, cut at `capacity`), and resets them.
int amthal_ops_count_take(char* buffer, int capacity) {
  return guarded([&] {
    std::string text;
    {
      auto& counts = op_counts();
      std::lock_guard<std::mutex> lock(counts.mutex);
      for (const auto& [name, count] : counts.counts) {
        text += name + "\t" + std::to_string(count) + "\n";
      }
      counts.counts.clear();
    }
    if (capacity <= 0) return;
    size_t n = std::min(text.size(), static_cast<size_t>(capacity - 1));
    std::memcpy(buffer, text.data(), n);
    buffer[n] = '\0';
  });
}
}
