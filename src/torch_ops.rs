//! libtorch's multi-tensor operations, which tch does not wrap (csrc/torch_ops.cpp):
//! AdamW over a list of parameters in one fused kernel (`at::_fused_adamw_`, what
//! `torch.optim.AdamW(fused=True)` runs) and the total L2 norm / scaling of a list
//! (`_foreach_norm`, `_foreach_mul_`, what `clip_grad_norm_` runs). One call instead
//! of ~10 kernels per tensor: a LoRA step of a 7B has 448 adapter tensors, and on the
//! GPU the host issuing their updates one by one took longer than the GPU's work.
//!
//! It also holds `recomputed_linear`: a linear layer whose frozen weight is produced by
//! a function in the forward pass and again in the backward pass instead of being kept
//! for it (a custom autograd function, which tch cannot define): how a 4-bit base model
//! trains without holding every dequantized projection until the backward pass.
//! And `lora_linear`: a projection with its LoRA adapter as one autograd node, whose
//! adapter product is accumulated into the base output by the matmul itself (PEFT's
//! graph writes a [tokens, out] tensor four times per projection; this, once).
//!
//! And `rms_norm` (training's RMSNorm on GPUs, its backward pass as one fused kernel),
//! `copy_async` and `pin_memory` (host-kept optimizer state, `train/offload.rs`).
//!
//! The library is embedded in the binary and loaded from memory on first use, on the
//! CPU and on CUDA (it needs only libtorch_cpu). If it cannot be loaded the optimizer
//! falls back to its per-tensor code, with a warning.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use tch::Tensor;

use crate::cuda::shim::{load_versioned, status_result};

/// The compiled library (see build.rs).
const LIBRARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libamthal_ops.so"));
const VERSION: c_int = 10;

type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type FusedAdamwFn = unsafe extern "C" fn(
    *const *mut c_void,
    *const *mut c_void,
    *const *mut c_void,
    *const *mut c_void,
    *mut c_void,
    c_int,
    f64,
    *mut c_void,
    f64,
    f64,
    f64,
    f64,
) -> c_int;
type TotalNormFn = unsafe extern "C" fn(*const *mut c_void, c_int, *mut c_void) -> c_int;
type MulFn = unsafe extern "C" fn(*const *mut c_void, c_int, f64) -> c_int;
/// Produces a weight in a dtype (c10::ScalarType as int) from an opaque state: a fresh
/// `torch::Tensor*` the C++ side takes ownership of, or null on failure.
pub type WeightFn = unsafe extern "C" fn(*const c_void, c_int) -> *mut c_void;
type RecomputedLinearFn =
    unsafe extern "C" fn(*mut c_void, WeightFn, *const c_void, *mut *mut c_void) -> c_int;
type LoraLinearFn = unsafe extern "C" fn(
    *mut c_void,
    *mut c_void,
    *mut c_void,
    *mut c_void,
    *mut c_void,
    *mut c_void,
    f64,
    *mut *mut c_void,
) -> c_int;
type DenseLinearFn =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *mut c_void, *mut *mut c_void) -> c_int;
type RmsNormFn = unsafe extern "C" fn(*mut c_void, *mut c_void, f64, *mut *mut c_void) -> c_int;
type SetCpuMatmulFn = unsafe extern "C" fn(c_int) -> c_int;
type ClearGradsFn = unsafe extern "C" fn(*const *mut c_void, c_int, c_int) -> c_int;
type CopyAsyncFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
type PinMemoryFn = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> c_int;
type CountStartFn = unsafe extern "C" fn() -> c_int;
type CountTakeFn = unsafe extern "C" fn(*mut c_char, c_int) -> c_int;

/// Function pointers into the loaded library.
pub struct Ops {
    last_error: LastErrorFn,
    fused_adamw: FusedAdamwFn,
    total_norm: TotalNormFn,
    mul: MulFn,
    recomputed_linear: RecomputedLinearFn,
    lora_linear: LoraLinearFn,
    dense_linear: DenseLinearFn,
    rms_norm: RmsNormFn,
    clear_grads: ClearGradsFn,
    copy_async: CopyAsyncFn,
    pin_memory: PinMemoryFn,
    count_start: CountStartFn,
    count_take: CountTakeFn,
}

/// The tensors of one projection with a LoRA adapter, for `Ops::lora_linear`. W [out, in]
/// and bias are frozen; A [r, in] and B [out, r] are cast to x's dtype and get their
/// gradients in their own.
pub struct LoraProjection<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
}

/// The tensors one fused AdamW step updates: each parameter with its gradient and
/// moments, in the same order.
pub struct AdamWTensors<'a> {
    pub params: &'a [&'a Tensor],
    pub grads: &'a [&'a Tensor],
    pub exp_avgs: &'a [&'a Tensor],
    pub exp_avg_sqs: &'a [&'a Tensor],
}

/// AdamW's hyper-parameters for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWSettings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// The library, loaded on the first call; None if it could not be (warned once).
pub fn ops() -> Option<&'static Ops> {
    static OPS: OnceLock<Option<Ops>> = OnceLock::new();
    OPS.get_or_init(|| match Ops::load() {
        Ok(ops) => Some(ops),
        Err(message) => {
            tracing::warn!(
                "multi-tensor optimizer kernels unavailable ({message}); updating tensor by tensor"
            );
            None
        }
    })
    .as_ref()
}

/// tch's handle as the C++ side's `torch::Tensor*`.
fn handle(tensor: &Tensor) -> *mut c_void {
    tensor.as_ptr() as *mut c_void
}

/// `handle`, or null for an absent tensor.
fn optional_handle(tensor: Option<&Tensor>) -> *mut c_void {
    tensor.map_or(std::ptr::null_mut(), handle)
}

/// tch's handles as the C++ side's `torch::Tensor*` array.
fn handles(tensors: &[&Tensor]) -> Vec<*mut c_void> {
    tensors.iter().map(|t| handle(t)).collect()
}

impl Ops {
    fn load() -> Result<Ops, String> {
        let symbol = load_versioned(c"amthal_ops", LIBRARY, "amthal_ops_version", VERSION)?;
        // SAFETY: the symbol is `amthal_set_cpu_matmul(int) -> int` in csrc/torch_ops.cpp.
        unsafe {
            let set_cpu_matmul = std::mem::transmute::<*mut c_void, SetCpuMatmulFn>(symbol(
                "amthal_set_cpu_matmul",
            )?);
            let onednn = cpu_matmul_choice();
            if set_cpu_matmul(onednn as c_int) == 0 && onednn {
                tracing::debug!("this libtorch has no oneDNN linear; f32 CPU products use MKL");
            }
        }
        // SAFETY (all transmutes): each symbol is the extern "C" function of that name
        // in csrc/torch_ops.cpp, whose signature the type alias repeats.
        unsafe {
            Ok(Ops {
                last_error: std::mem::transmute::<*mut c_void, LastErrorFn>(symbol(
                    "amthal_ops_last_error",
                )?),
                fused_adamw: std::mem::transmute::<*mut c_void, FusedAdamwFn>(symbol(
                    "amthal_fused_adamw",
                )?),
                total_norm: std::mem::transmute::<*mut c_void, TotalNormFn>(symbol(
                    "amthal_foreach_total_norm",
                )?),
                mul: std::mem::transmute::<*mut c_void, MulFn>(symbol("amthal_foreach_mul")?),
                recomputed_linear: std::mem::transmute::<*mut c_void, RecomputedLinearFn>(symbol(
                    "amthal_recomputed_linear",
                )?),
                lora_linear: std::mem::transmute::<*mut c_void, LoraLinearFn>(symbol(
                    "amthal_lora_linear",
                )?),
                dense_linear: std::mem::transmute::<*mut c_void, DenseLinearFn>(symbol(
                    "amthal_dense_linear",
                )?),
                rms_norm: std::mem::transmute::<*mut c_void, RmsNormFn>(symbol("amthal_rms_norm")?),
                clear_grads: std::mem::transmute::<*mut c_void, ClearGradsFn>(symbol(
                    "amthal_clear_grads",
                )?),
                copy_async: std::mem::transmute::<*mut c_void, CopyAsyncFn>(symbol(
                    "amthal_copy_async",
                )?),
                pin_memory: std::mem::transmute::<*mut c_void, PinMemoryFn>(symbol(
                    "amthal_pin_memory",
                )?),
                count_start: std::mem::transmute::<*mut c_void, CountStartFn>(symbol(
                    "amthal_ops_count_start",
                )?),
                count_take: std::mem::transmute::<*mut c_void, CountTakeFn>(symbol(
                    "amthal_ops_count_take",
                )?),
            })
        }
    }

    fn check(&self, status: c_int) -> Result<(), String> {
        status_result(status, self.last_error)
    }

    /// Runs a C call that hands back a new `torch::Tensor*` through its out pointer, and
    /// owns that tensor from then on.
    fn returned_tensor(
        &self,
        call: impl FnOnce(*mut *mut c_void) -> c_int,
    ) -> Result<Tensor, String> {
        let mut out: *mut c_void = std::ptr::null_mut();
        self.check(call(&mut out))?;
        // SAFETY: on success `out` is a `new torch::Tensor` from the C++ side.
        Ok(unsafe { Tensor::from_ptr(out as *mut torch_sys::C_tensor) })
    }

    /// transformers' RMSNorm of `x` with `weight` (the same values as
    /// `llama::rms_norm`) as one autograd node whose backward pass is a formula: on CUDA
    /// libtorch's fused kernel, elsewhere ~10 operations instead of autograd's ~14
    /// (csrc/linear_nodes.h).
    pub fn rms_norm(&self, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, String> {
        // SAFETY: live tensor handles; the call hands back a new tensor.
        self.returned_tensor(|out| unsafe { (self.rms_norm)(handle(x), handle(weight), eps, out) })
    }

    /// Drops the tensors' gradients (`.grad` becomes undefined), as
    /// `zero_grad(set_to_none=True)` does.
    pub fn clear_grads(&self, tensors: &[&Tensor]) -> Result<(), String> {
        let handles = handles(tensors);
        // SAFETY: live tensor handles.
        self.check(unsafe { (self.clear_grads)(handles.as_ptr(), handles.len() as c_int, 0) })
    }

    /// Zeroes the tensors' defined gradients in place, one multi-tensor kernel
    /// (`zero_grad(set_to_none=False)`): the gradients keep their storage.
    pub fn zero_grads_in_place(&self, tensors: &[&Tensor]) -> Result<(), String> {
        let handles = handles(tensors);
        // SAFETY: live tensor handles.
        self.check(unsafe { (self.clear_grads)(handles.as_ptr(), handles.len() as c_int, 1) })
    }

    /// `dst.copy_(src, non_blocking=true)`: between pinned host memory and a CUDA device
    /// the host does not wait for the copy (tch's `copy_` does). Reading `dst` on the
    /// host afterwards needs a synchronization first.
    pub fn copy_async(&self, dst: &Tensor, src: &Tensor) -> Result<(), String> {
        // SAFETY: live tensor handles.
        self.check(unsafe { (self.copy_async)(handle(dst), handle(src)) })
    }

    /// A copy of host tensor `src` in pinned memory (needs CUDA to be loaded).
    pub fn pin_memory(&self, src: &Tensor) -> Result<Tensor, String> {
        // SAFETY: a live tensor handle; the call hands back a new tensor.
        self.returned_tensor(|out| unsafe { (self.pin_memory)(handle(src), out) })
    }

    /// Starts counting the operators every thread issues (for the step profile).
    pub fn start_counting_ops(&self) -> Result<(), String> {
        // SAFETY: no arguments.
        self.check(unsafe { (self.count_start)() })
    }

    /// The kernels issued since the last call, by operator name, and resets the
    /// counts (see csrc/torch_ops.cpp for what counts).
    pub fn take_op_counts(&self) -> Result<Vec<(String, u64)>, String> {
        let mut buffer = vec![0u8; 1 << 16];
        // SAFETY: a writable buffer of the given capacity.
        self.check(unsafe {
            (self.count_take)(buffer.as_mut_ptr() as *mut c_char, buffer.len() as c_int)
        })?;
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        Ok(String::from_utf8_lossy(&buffer[..end])
            .lines()
            .filter_map(|line| {
                let (name, count) = line.split_once('\t')?;
                Some((name.to_string(), count.parse().ok()?))
            })
            .collect())
    }

    /// One AdamW step over every parameter at once, in place. All tensors on one
    /// device with one dtype; `step`: a one-value f32 tensor holding the step number;
    /// `lr_tensor`: the learning rate as a one-value f32 tensor on that device instead
    /// of `settings.lr` (what a recorded CUDA graph reads at each replay).
    pub fn fused_adamw(
        &self,
        AdamWTensors {
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
        }: AdamWTensors,
        step: &Tensor,
        settings: AdamWSettings,
        lr_tensor: Option<&Tensor>,
    ) -> Result<(), String> {
        let count = params.len();
        assert!(grads.len() == count && exp_avgs.len() == count && exp_avg_sqs.len() == count);
        let (p, g, m, v) = (
            handles(params),
            handles(grads),
            handles(exp_avgs),
            handles(exp_avg_sqs),
        );
        // SAFETY: four arrays of `count` live tensor handles and one more; the C++
        // side only reads the arrays and updates the tensors' storage in place.
        self.check(unsafe {
            (self.fused_adamw)(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                step.as_ptr() as *mut c_void,
                count as c_int,
                settings.lr,
                lr_tensor.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut c_void),
                settings.beta1,
                settings.beta2,
                settings.weight_decay,
                settings.eps,
            )
        })
    }

    /// The L2 norm of all the tensors together, computed in f32, as a one-value f32
    /// tensor on their device.
    pub fn total_norm(&self, tensors: &[&Tensor]) -> Result<Tensor, String> {
        let device = tensors.first().map_or(tch::Device::Cpu, |t| t.device());
        let out = Tensor::zeros([], (tch::Kind::Float, device));
        let list = handles(tensors);
        // SAFETY: an array of live tensor handles and a live output tensor.
        self.check(unsafe {
            (self.total_norm)(
                list.as_ptr(),
                list.len() as c_int,
                out.as_ptr() as *mut c_void,
            )
        })?;
        Ok(out)
    }

    /// Multiplies every tensor by `factor`, in place.
    pub fn scale(&self, tensors: &[&Tensor], factor: f64) -> Result<(), String> {
        let list = handles(tensors);
        // SAFETY: an array of live tensor handles, updated in place.
        self.check(unsafe { (self.mul)(list.as_ptr(), list.len() as c_int, factor) })
    }

    /// `x W^T` where W = `produce(state, x's dtype)`, called in the forward pass and
    /// again in the backward pass; autograd keeps nothing of W, and only `x` gets a
    /// gradient.
    ///
    /// # Safety
    /// `state` must stay valid, and `produce` callable with it from any thread (the
    /// backward pass may run on autograd's device threads), until the returned tensor's
    /// graph has been backpropagated or dropped.
    pub unsafe fn recomputed_linear(
        &self,
        x: &Tensor,
        produce: WeightFn,
        state: *const c_void,
    ) -> Result<Tensor, String> {
        // SAFETY: a live input handle; `out` receives a new heap tensor on success.
        self.returned_tensor(|out| unsafe {
            (self.recomputed_linear)(handle(x), produce, state, out)
        })
    }

    /// `x W^T + bias` as one autograd node whose f32 CPU products go through oneDNN
    /// (see `cpu_matmul_choice`); W and bias get gradients when they require them.
    pub fn dense_linear(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor, String> {
        // SAFETY: live tensor handles (bias null when absent); `out` receives a new heap
        // tensor on success.
        self.returned_tensor(|out| unsafe {
            (self.dense_linear)(handle(x), handle(weight), optional_handle(bias), out)
        })
    }

    /// A projection with a LoRA adapter as one autograd node:
    /// `x W^T + bias + scaling * (x_lora A^T) B^T`, where `x_lora` (LoRA's dropout of x)
    /// is x itself when None. See `LoraProjection` and csrc/linear_nodes.h.
    pub fn lora_linear(
        &self,
        x: &Tensor,
        x_lora: Option<&Tensor>,
        projection: LoraProjection,
    ) -> Result<Tensor, String> {
        let LoraProjection {
            weight,
            bias,
            a,
            b,
            scaling,
        } = projection;
        // SAFETY: live tensor handles (or null where optional); `out` receives a new
        // heap tensor on success.
        self.returned_tensor(|out| unsafe {
            (self.lora_linear)(
                handle(x),
                optional_handle(x_lora),
                handle(weight),
                optional_handle(bias),
                handle(a),
                handle(b),
                scaling,
                out,
            )
        })
    }
}

/// Which library multiplies f32 matrices on the CPU: oneDNN (the default) or MKL
/// (`AMTHAL_CPU_MATMUL=mkl`, which is what at::mm and PyTorch use). oneDNN ran
/// SmolLM2's projection shapes 1.2-1.6x faster than MKL on a 2-core AMD EPYC; the
/// variable exists to compare the two on other CPUs. True for oneDNN; an unknown value
/// is warned about and means oneDNN.
fn cpu_matmul_choice() -> bool {
    match std::env::var("AMTHAL_CPU_MATMUL").as_deref() {
        Err(_) | Ok("onednn") => true,
        Ok("mkl") => false,
        Ok(other) => {
            tracing::warn!(
                "AMTHAL_CPU_MATMUL={other:?} is neither \"onednn\" nor \"mkl\"; using oneDNN"
            );
            true
        }
    }
}

/// tch's Kind for a c10::ScalarType code, for the float dtypes a weight is made in.
pub fn float_kind_from_scalar_type(code: c_int) -> Option<tch::Kind> {
    match code {
        5 => Some(tch::Kind::Half),
        6 => Some(tch::Kind::Float),
        7 => Some(tch::Kind::Double),
        15 => Some(tch::Kind::BFloat16),
        _ => None,
    }
}

/// Hands a tensor to the C++ side as a `torch::Tensor*` it owns (and deletes).
pub fn into_raw_handle(mut tensor: Tensor) -> *mut c_void {
    let handle = tensor.as_mut_ptr() as *mut c_void;
    std::mem::forget(tensor);
    handle
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The library loads on the CPU, and its norm and scaling equal the per-tensor ones.
    #[test]
    fn multi_tensor_norm_and_scale_equal_per_tensor() {
        let ops = ops().expect("the embedded ops library loads");
        tch::manual_seed(1);
        let tensors: Vec<Tensor> = [vec![3, 5], vec![7], vec![2, 2, 2]]
            .iter()
            .map(|shape| Tensor::randn(shape.as_slice(), (Kind::Float, tch::Device::Cpu)))
            .collect();
        let refs: Vec<&Tensor> = tensors.iter().collect();
        let total = ops.total_norm(&refs).unwrap().double_value(&[]);
        let expected = tensors
            .iter()
            .map(|t| t.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        assert!(
            (total - expected).abs() < 1e-5 * expected,
            "{total} vs {expected}"
        );
        let before: Vec<Tensor> = tensors.iter().map(|t| t.copy()).collect();
        ops.scale(&refs, 0.25).unwrap();
        for (after, before) in tensors.iter().zip(&before) {
            assert!(after.equal(&(before * 0.25)));
        }
    }

    /// Pinning a host tensor: with CUDA loaded, a pinned copy of the same values;
    /// without it (CI), libtorch's error comes back as an error, not a crash. And the
    /// asynchronous copy between host tensors is a plain copy.
    #[test]
    fn pinning_and_async_copies_report_their_outcome() {
        let ops = ops().expect("the embedded ops library loads");
        let host = Tensor::from_slice(&[1f32, 2.0, 3.0]);
        match ops.pin_memory(&host) {
            Ok(pinned) => {
                assert!(pinned.equal(&host));
                assert!(crate::cuda::is_available(), "pinned without CUDA");
            }
            Err(message) => {
                assert!(!message.is_empty());
                assert!(!crate::cuda::is_available(), "CUDA is there: {message}");
            }
        }
        let target = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        ops.copy_async(&target, &host).unwrap();
        assert!(target.equal(&host));
    }

    /// Dropped gradients are undefined, and the next backward pass sets them to its
    /// own gradient (not added to what was there).
    #[test]
    fn cleared_gradients_are_dropped() {
        let ops = ops().expect("the embedded ops library loads");
        let w = Tensor::from_slice(&[1f32, 2.0, 3.0]).set_requires_grad(true);
        (&w * 2.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![2.0; 3]);
        ops.clear_grads(&[&w]).unwrap();
        assert!(!w.grad().defined());
        (&w * 5.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![5.0; 3]);
    }

    /// Gradients zeroed in place keep their storage (what a recorded CUDA graph adds
    /// into), and the next backward pass adds to the zeros; undefined ones stay so.
    #[test]
    fn gradients_zeroed_in_place_keep_their_storage() {
        let ops = ops().expect("the embedded ops library loads");
        let w = Tensor::from_slice(&[1f32, 2.0, 3.0]).set_requires_grad(true);
        let unused = Tensor::from_slice(&[1f32]).set_requires_grad(true);
        (&w * 2.0).sum(Kind::Float).backward();
        let address = w.grad().data_ptr();
        ops.zero_grads_in_place(&[&w, &unused]).unwrap();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![0.0; 3]);
        assert_eq!(w.grad().data_ptr(), address);
        assert!(!unused.grad().defined());
        (&w * 5.0).sum(Kind::Float).backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![5.0; 3]);
        assert_eq!(w.grad().data_ptr(), address);
    }

    /// The counter sees the kernels an expression launches, forward and backward, and
    /// leaves out views, composite wrappers and the autograd engine's node wrappers.
    /// (Counts are per process and other tests run beside this one, so the kernels it
    /// launches are checked as present, and the others as never counted.)
    #[test]
    fn op_counts_name_the_kernels() {
        let ops = ops().expect("the embedded ops library loads");
        ops.start_counting_ops().unwrap();
        let _ = ops.take_op_counts().unwrap();
        let a = Tensor::ones([4, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let b = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu));
        // matmul (composite) -> mm, which calls resolve_conj (no kernel); transpose and
        // unsqueeze: views; mul: a kernel.
        let y = a.matmul(&b).transpose(0, 1).unsqueeze(0) * 3.0;
        y.sum(Kind::Float).backward();
        let counts: std::collections::HashMap<String, u64> =
            ops.take_op_counts().unwrap().into_iter().collect();
        for kernel in ["aten::mm", "aten::mul", "aten::sum"] {
            assert!(counts.contains_key(kernel), "{kernel} missing: {counts:?}");
        }
        for no_kernel in [
            "aten::transpose",
            "aten::unsqueeze",
            "aten::matmul",
            "aten::resolve_conj",
        ] {
            assert!(
                !counts.contains_key(no_kernel),
                "{no_kernel} counted: {counts:?}"
            );
        }
        assert!(
            !counts.keys().any(|k| k.starts_with("autograd::")),
            "{counts:?}"
        );
    }
}
