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
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

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

// Produces a projection's weight [out, in] in the given dtype (a c10::ScalarType as
// int) from `state`: a fresh heap tensor the caller takes ownership of, or null on
// failure. amthal passes a Rust function that dequantizes a 4-bit or 8-bit weight.
using WeightFn = at::Tensor* (*)(const void* state, int dtype);

at::Tensor produce_weight(int64_t weight_fn, int64_t state, at::ScalarType dtype) {
  auto fn = reinterpret_cast<WeightFn>(weight_fn);
  at::Tensor* made = fn(reinterpret_cast<const void*>(state), static_cast<int>(dtype));
  if (made == nullptr) throw std::runtime_error("could not produce a quantized weight");
  at::Tensor weight = std::move(*made);
  delete made;
  return weight;
}

// y = x W^T where W is produced by a function in the forward pass and produced again in
// the backward pass, never saved: autograd keeps nothing of the weight (bitsandbytes'
// MatMul4Bit does the same), so a 4-bit model's backward holds one dequantized
// projection at a time instead of every one the forward pass used. W is frozen: only
// x gets a gradient.
struct RecomputedLinear : public torch::autograd::Function<RecomputedLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            int64_t weight_fn, int64_t state) {
    ctx->saved_data["weight_fn"] = weight_fn;
    ctx->saved_data["state"] = state;
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return at::linear(x, produce_weight(weight_fn, state, x.scalar_type()));
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    at::Tensor weight = produce_weight(ctx->saved_data["weight_fn"].toInt(),
                                       ctx->saved_data["state"].toInt(), dtype);
    return {grads[0].to(dtype).matmul(weight), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" {

// Bumped when a signature changes; src/torch_ops.rs checks it.
int amthal_ops_version() { return 2; }

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

// RecomputedLinear (above) applied to `x`; the result, a new tensor, goes to `*out`.
int amthal_recomputed_linear(at::Tensor* x, WeightFn weight_fn, const void* state,
                             at::Tensor** out) {
  return guarded([&] {
    at::Tensor y = RecomputedLinear::apply(*x, reinterpret_cast<int64_t>(weight_fn),
                                           reinterpret_cast<int64_t>(state));
    *out = new at::Tensor(std::move(y));
  });
}
}
