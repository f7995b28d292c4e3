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
#include <c10/core/GradMode.h>

#include <vector>

#include "guarded.h"

namespace {
using amthal::guarded;
using amthal::last_error;

std::vector<at::Tensor> list(at::Tensor** tensors, int count) {
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) out.push_back(*tensors[i]);
  return out;
}
}  // namespace

extern "C" {

// Bumped when a signature changes; src/torch_ops.rs checks it.
int amthal_ops_version() { return 1; }

const char* amthal_ops_last_error() { return last_error.c_str(); }

// torch.optim.AdamW(fused=True)'s update of `count` parameters in place (decoupled
// weight decay, no amsgrad): at::_fused_adamw_. `step` is the 1-based step number as a
// one-value f32 tensor on the parameters' device, shared by every parameter.
int amthal_fused_adamw(at::Tensor** params, at::Tensor** grads, at::Tensor** exp_avgs,
                       at::Tensor** exp_avg_sqs, at::Tensor* step, int count, double lr,
                       double beta1, double beta2, double weight_decay, double eps) {
  return guarded([&] {
    c10::NoGradGuard no_grad;
    std::vector<at::Tensor> steps(static_cast<size_t>(count), *step);
    at::_fused_adamw_(list(params, count), list(grads, count), list(exp_avgs, count),
                      list(exp_avg_sqs, count), {}, steps, lr, beta1, beta2, weight_decay,
                      eps, /*amsgrad=*/false, /*maximize=*/false);
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
}
