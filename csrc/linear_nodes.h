// The autograd nodes amthal's layers run through (included by torch_ops.cpp): a
// frozen weight recomputed in the backward pass (4-bit bases), a projection with its
// LoRA adapter in one node, a plain projection whose f32 CPU products go through
// oneDNN, and training's RMSNorm on GPUs with a formula for its backward pass. tch
// cannot define autograd functions, hence C++.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <optional>
#include <stdexcept>

namespace amthal {

// Whether f32 products on the CPU go through oneDNN (set by amthal_set_cpu_matmul).
// On by default: measured on a 2-core AMD EPYC (Zen 4, AVX-512), oneDNN's f32 matmul
// ran the shapes of SmolLM2's projections at ~190 GFLOP/s where MKL, which
// at::mm uses for f32 and which takes a generic path on AMD CPUs, ran them at
// ~100-150 (the 49152-wide lm_head: 96 vs 151). PyTorch already sends bf16 CPU
// matmuls to oneDNN; this does the same for f32 through the operator it registers for
// Inductor (mkldnn::_linear_pointwise). Results differ from MKL's by rounding only
// (~1e-6 relative).
inline std::atomic<bool> cpu_matmul_onednn{true};

// mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm): X W^T + B through
// oneDNN; null if this libtorch was built without it.
inline const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op ? &*op : nullptr;
}

// a b^T (+ bias) for 2-D a [m, k] and b [n, k] (b may be a transposed view): through
// oneDNN for f32 CPU tensors when it is on and available, else at::mm / at::addmm.
inline at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& bias) {
  const c10::OperatorHandle* op = onednn_linear();
  if (op != nullptr && cpu_matmul_onednn.load(std::memory_order_relaxed) &&
      a.device().is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
      a.size(0) > 0) {
    torch::jit::Stack stack{a, b, bias ? c10::IValue(*bias) : c10::IValue(),
                            c10::IValue(std::string("none")),
                            c10::IValue(c10::List<std::optional<at::Scalar>>()),
                            c10::IValue()};
    op->callBoxed(stack);
    return stack[0].toTensor();
  }
  return bias ? at::addmm(*bias, a, b.t()) : at::mm(a, b.t());
}

// Produces a projection's weight [out, in] in the given dtype (a c10::ScalarType as
// int) from `state`: a fresh heap tensor the caller takes ownership of, or null on
// failure. amthal passes a Rust function that dequantizes a 4-bit or 8-bit weight.
using WeightFn = at::Tensor* (*)(const void* state, int dtype);

inline at::Tensor produce_weight(int64_t weight_fn, int64_t state, at::ScalarType dtype) {
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

// y = x W^T (+ bias) + scaling * (x_lora A^T) B^T: a projection with a LoRA adapter
// as one autograd node instead of ~10 (PEFT's Linear: base, two matmuls, a scale and an
// add; the backward pass as many again, plus the sum of x's two gradients). The
// adapter's product is accumulated into the base output by the second matmul itself
// (addmm_ with alpha = scaling), and its input gradient into the base's (addmm_), so
// no [tokens, out] or [tokens, in] tensor is written twice; the scale lands on the
// [tokens, r] products. Same FLOPs as autograd's graph and fewer passes over memory;
// not fewer kernels per step as counted by AMTHAL_PROFILE_STEP (README, "Training").
// W and bias are frozen (no gradient); A [r, in] and B [out, r] may be f32 while x is
// bf16: they are cast as autocast would, and their gradients come back in their dtype.
// `x_lora` is x after LoRA's dropout, or x itself when `same_input` (no dropout): then
// x gets one gradient holding both terms.
// scale * a b in `dtype`. The LoRA matrices are f32 while a bf16 model's products are
// bf16: on CUDA, cuBLAS writes the f32 product directly (`mm.dtype`, f32 accumulation
// either way), one launch instead of a bf16 product and its cast, and without the
// bf16 rounding in between. Elsewhere, or if that overload fails once, the product,
// scaled, then cast (the CPU's numbers stay what they were).
inline std::atomic<bool> cuda_mm_out_dtype{true};
inline at::Tensor product_in(const at::Tensor& a, const at::Tensor& b, double scale,
                             at::ScalarType dtype) {
  if (a.scalar_type() != dtype && a.is_cuda() && cuda_mm_out_dtype.load()) {
    try {
      at::Tensor product = at::mm(a, b, dtype);
      return scale == 1.0 ? product : product.mul_(scale);
    } catch (const c10::Error& e) {
      cuda_mm_out_dtype.store(false);
      TORCH_WARN("amthal: mm with an f32 output failed (", e.what_without_backtrace(),
                 "); casting bf16 products from now on");
    }
  }
  at::Tensor product = at::mm(a, b);
  if (scale != 1.0) product.mul_(scale);
  return product.to(dtype);
}

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& x_lora, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& a,
                            const at::Tensor& b,
                            double scaling, bool same_input) {
    auto dtype = x.scalar_type();
    int64_t in = weight.size(1), out = weight.size(0);
    at::Tensor x2 = x.reshape({-1, in});
    at::Tensor xl2 = same_input ? x2 : x_lora.reshape({-1, in});
    at::Tensor a_c = a.to(dtype), b_c = b.to(dtype);
    at::Tensor y = matmul_nt(x2, weight, bias);
    at::Tensor xa = at::mm(xl2, a_c.t());
    y.addmm_(xa, b_c.t(), /*beta=*/1, /*alpha=*/scaling);
    ctx->save_for_backward({xl2, xa, weight, a_c, b_c});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["same_input"] = same_input;
    ctx->saved_data["a_dtype"] = static_cast<int64_t>(a.scalar_type());
    ctx->saved_data["b_dtype"] = static_cast<int64_t>(b.scalar_type());
    auto shape = x.sizes().vec();
    shape.back() = out;
    return y.view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &xl2 = saved[0], &xa = saved[1], &weight = saved[2], &a_c = saved[3],
                     &b_c = saved[4];
    double scaling = ctx->saved_data["scaling"].toDouble();
    bool same_input = ctx->saved_data["same_input"].toBool();
    auto a_dtype = static_cast<at::ScalarType>(ctx->saved_data["a_dtype"].toInt());
    auto b_dtype = static_cast<at::ScalarType>(ctx->saved_data["b_dtype"].toInt());
    int64_t in = weight.size(1), out = weight.size(0);
    at::Tensor g = grads[0].reshape({-1, out}).to(xa.scalar_type());
    // scaling * g B: the gradient of x_lora A^T, [tokens, r].
    at::Tensor gb = at::mm(g, b_c).mul_(scaling);
    at::Tensor grad_b = product_in(g.t(), xa, scaling, b_dtype);
    at::Tensor grad_a = product_in(gb.t(), xl2, 1.0, a_dtype);
    auto shape = grads[0].sizes().vec();
    shape.back() = in;
    at::Tensor grad_x, grad_x_lora;
    if (ctx->needs_input_grad(0)) {
      grad_x = matmul_nt(g, weight.t(), std::nullopt);
      if (same_input) grad_x.addmm_(gb, a_c);
      grad_x = grad_x.view(shape);
    }
    if (!same_input && ctx->needs_input_grad(1)) grad_x_lora = at::mm(gb, a_c).view(shape);
    return {grad_x, grad_x_lora, at::Tensor(), at::Tensor(), grad_a, grad_b,
            at::Tensor(), at::Tensor()};
  }
};

// y = x W^T (+ bias) with its products through matmul_nt (oneDNN for f32 on the CPU):
// autograd's linear otherwise. W and bias get gradients when they require them (a
// full fine-tune; lm_head tied to the embedding).
struct DenseLinear : public torch::autograd::Function<DenseLinear> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    int64_t in = weight.size(1), out = weight.size(0);
    at::Tensor x2 = x.reshape({-1, in});
    // x is needed only for W's gradient: a frozen projection keeps nothing of it (as
    // autograd's mm, which saves an input only for the other's gradient).
    ctx->save_for_backward({weight.requires_grad() ? x2 : at::Tensor(), weight});
    ctx->saved_data["has_bias"] = bias.has_value();
    auto shape = x.sizes().vec();
    shape.back() = out;
    return matmul_nt(x2, weight, bias).view(shape);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &weight = saved[1];
    int64_t in = weight.size(1), out = weight.size(0);
    at::Tensor g = grads[0].reshape({-1, out});
    at::Tensor grad_x, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      auto shape = grads[0].sizes().vec();
      shape.back() = in;
      grad_x = matmul_nt(g, weight.t(), std::nullopt).view(shape);
    }
    if (ctx->needs_input_grad(1)) grad_weight = matmul_nt(g.t(), x2.t(), std::nullopt);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = g.sum(0);
    return {grad_x, grad_weight, grad_bias};
  }
};

}  // namespace amthal

namespace amthal {

// RMSNorm as transformers orders it (normalize in f32, cast back, then scale by the
// weight), with the backward pass as a formula instead of autograd's graph. The
// forward is the same eight operations as `llama.rs::rms_norm`, so its values are
// bit-identical; the backward takes the gradient of x directly:
//   n = x * r, r = (mean(x^2) + eps)^-1/2, gn = (g * w) in f32:  dx = r (gn - n mean(gn n))
// On CUDA that is libtorch's fused kernel (`_fused_rms_norm_backward`, one or two
// launches; its forward rounds differently from transformers', its backward computes
// the same formula in f32), elsewhere about ten operations where autograd's graph
// takes about fourteen and keeps an f32 copy of x. A training step on the GPU is
// bound by kernel launches; two norms per layer pass here. It keeps x (input dtype)
// and r (f32, one per row) for the backward pass.
struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, double eps) {
    at::Tensor x32 = x.to(at::kFloat);
    at::Tensor rstd = x32.pow(2).mean(-1, /*keepdim=*/true).add_(eps).rsqrt_();
    at::Tensor normed = (x32 * rstd).to(x.scalar_type());
    ctx->save_for_backward({x, weight, rstd});
    return weight * normed;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &rstd = saved[2];
    const at::Tensor& g = grads[0];
    bool weight_grad = ctx->needs_input_grad(1);
    if (x.is_cuda() && fused_norm_backward.load()) {
      try {
        auto [dx, dw] = at::_fused_rms_norm_backward(g, x, {x.size(-1)}, rstd, weight,
                                                     {true, weight_grad});
        return {dx, weight_grad ? dw : at::Tensor(), at::Tensor()};
      } catch (const c10::Error& e) {
        fused_norm_backward.store(false);
        TORCH_WARN("amthal: libtorch's fused RMSNorm backward failed (", e.what_without_backtrace(),
                   "); using the composite formula from now on");
      }
    }
    at::Tensor n32 = x.to(at::kFloat) * rstd;
    at::Tensor gn = (g * weight).to(at::kFloat);
    at::Tensor dot = (gn * n32).mean(-1, /*keepdim=*/true);
    at::Tensor dx = gn.sub_(n32 * dot).mul_(rstd).to(x.scalar_type());
    at::Tensor dw;
    if (weight_grad) {
      // transformers' weight * normed: the weight's gradient is g * normed summed over
      // every row, normed in the input dtype.
      dw = (g * n32.to(x.scalar_type())).reshape({-1, x.size(-1)}).sum(0);
    }
    return {dx, dw, at::Tensor()};
  }

  // Whether CUDA uses libtorch's fused backward kernel (turned off if it ever fails).
  static inline std::atomic<bool> fused_norm_backward{true};
};

}  // namespace amthal
