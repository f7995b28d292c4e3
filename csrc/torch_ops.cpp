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
// y = x W^T (+ bias) + scaling * (x_lora A^T) B^T: a projection with a LoRA adapter
// as one autograd node instead of ~10 (PEFT's Linear: base, two matmuls, a scale and an
// add; the backward pass as many again, plus the sum of x's two gradients). The
// adapter's product is accumulated into the base output by the second matmul itself
// (addmm_ with alpha = scaling), and its input gradient into the base's (addmm_), so
// no [tokens, out] or [tokens, in] tensor is written twice; the scale lands on the
// [tokens, r] products. Same FLOPs as autograd's graph, fewer passes over memory and
// fewer kernels (what the CPU step and the GPU launch count both spend time on).
// W and bias are frozen (no gradient); A [r, in] and B [out, r] may be f32 while x is
// bf16: they are cast as autocast would, and their gradients come back in their dtype.
// `x_lora` is x after LoRA's dropout, or x itself when `same_input` (no dropout): then
// x gets one gradient holding both terms.
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
    at::Tensor y = bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
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
    at::Tensor grad_b = at::mm(g.t(), xa).mul_(scaling).to(b_dtype);
    at::Tensor grad_a = at::mm(gb.t(), xl2).to(a_dtype);
    auto shape = grads[0].sizes().vec();
    shape.back() = in;
    at::Tensor grad_x, grad_x_lora;
    if (ctx->needs_input_grad(0)) {
      grad_x = at::mm(g, weight);
      if (same_input) grad_x.addmm_(gb, a_c);
      grad_x = grad_x.view(shape);
    }
    if (!same_input && ctx->needs_input_grad(1)) grad_x_lora = at::mm(gb, a_c).view(shape);
    return {grad_x, grad_x_lora, at::Tensor(), at::Tensor(), grad_a, grad_b,
            at::Tensor(), at::Tensor()};
  }
};

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
int amthal_ops_version() { return 4; }

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

// Drops the gradients of `count` tensors (optimizer.zero_grad(set_to_none=True), torch's
// default): no zero_ kernel per tensor, and the next backward pass adopts its
// gradients instead of adding them to zeros.
int amthal_clear_grads(at::Tensor** tensors, int count) {
  return guarded([&] {
    for (int i = 0; i < count; ++i) tensors[i]->mutable_grad().reset();
  });
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
