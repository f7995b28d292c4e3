//! `--device` and `--precision`, shared by every command that runs a model. How
//! CUDA is found and loaded is `crate::cuda`'s job.

use anyhow::Result;
use tch::{Device, Kind};

use crate::bail_input;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 on CPUs with AMX or AVX512-BF16 and on CUDA, else f32.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cuda_available() {
                Ok(Device::Cuda(0))
            } else {
                Ok(Device::Cpu)
            }
        }
        "cuda" => require_cuda(0),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(index) => require_cuda(index),
            None => bail_input!("--device {other}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

fn require_cuda(index: usize) -> Result<Device> {
    let runtime = match crate::cuda::runtime() {
        Ok(runtime) => runtime,
        Err(why) => bail_input!(
            "--device cuda: no CUDA device is usable: {why}. amthal looks for libtorch_cuda.so in {}",
            crate::cuda::library_candidates()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if index >= runtime.device_count {
        bail_input!(
            "--device cuda:{index}: only {} CUDA device(s)",
            runtime.device_count
        );
    }
    Ok(Device::Cuda(index))
}

/// Whether CUDA works (loading libtorch_cuda.so first, see `crate::cuda`).
pub fn cuda_available() -> bool {
    crate::cuda::is_available()
}

/// Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16).
pub fn cpu_has_fast_bf16() -> bool {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    flags
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| {
            l.split_whitespace()
                .any(|f| f == "amx_bf16" || f == "avx512_bf16")
        })
        .unwrap_or(false)
}

/// The compute dtype for a precision on a device.
pub fn resolve_precision(precision: Precision, device: Device) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::F16 => Kind::Half,
        Precision::Auto => match device {
            Device::Cuda(_) => Kind::BFloat16,
            _ if cpu_has_fast_bf16() => Kind::BFloat16,
            _ => Kind::Float,
        },
    }
}

pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "other",
    }
}

/// Pins MKL's code path to its AVX2 kernels in strict mode (`MKL_CBWR=AVX2,STRICT`,
/// MKL's "conditional numerical reproducibility") unless the user set `MKL_CBWR`
/// themselves. Measured on a 2-core AVX-512 Xeon (2026-12-08): with MKL's default
/// AVX-512 kernels, the first gradients of identical one-step OLoRA runs (LoRA dropout
/// 0.05, 2 threads) took one of two values, 2.1475894 or 2.1475902 for the gradient
/// norm, in 3 to 8 of 60 processes; with `AVX2`, `AVX2,STRICT` or `COMPATIBLE`, 60 of
/// 60 alike (`AVX512` and `AUTO,STRICT` did not help). `STRICT` because plain `AVX2`
/// made results depend on the thread count: two single-thread Gloo workers then ended
/// 4e-6 from the two-thread process that trains the same batches
/// (`tests/distributed.rs` fails at 1e-6; it passes with `AVX2,STRICT`, as with MKL's
/// default). A 3-step OLoRA run and its resume from step 1 ended bit-identical in 100
/// of 100 loops (4 of 100 apart before). It costs a few percent at most: amthal's large
/// CPU products go through oneDNN (`matmul_nt`), MKL computes the small LoRA ones
/// (SmolLM2 f32 training on the same machine, two pairs against `AUTO`: LoRA -2 % and
/// -10 %, full fine-tune -8 % and +2 %, inside the runs' ~5 % noise; README
/// "Training"). `MKL_CBWR=AUTO` gives MKL its own choice back.
///
/// MKL reads the variable when it first computes, so this runs first thing in `main`,
/// before any other thread exists (the only time `set_var` is sound).
pub fn pin_mkl_code_path() {
    if std::env::var_os("MKL_CBWR").is_none_or(|value| value.is_empty()) {
        // SAFETY: called at the top of `main`, while the process has one thread.
        unsafe { std::env::set_var("MKL_CBWR", "AVX2,STRICT") };
    }
}

/// MKL's reproducibility setting as MKL itself reports it (`mkl_serv_cbwr_get`, which
/// libtorch_cpu.so exports), e.g. "AVX2,STRICT" or "OFF" (none); None where libtorch
/// has no MKL (an ARM build). What `amthal env` prints: proof that MKL took the pin.
pub fn mkl_code_path() -> Option<String> {
    // MKL_CBWR_ALL: the branch in the low 16 bits, MKL_CBWR_STRICT (0x10000) above.
    const ALL: i32 = -1;
    // SAFETY: a lookup by name in the libraries already loaded; the symbol, when
    // there, is MKL's `int mkl_serv_cbwr_get(int)`.
    let get = unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"mkl_serv_cbwr_get".as_ptr());
        if symbol.is_null() {
            return None;
        }
        std::mem::transmute::<*mut libc::c_void, extern "C" fn(i32) -> i32>(symbol)
    };
    let value = get(ALL);
    // MKL's MKL_CBWR_* branch numbers (mkl_service.h).
    let branch = match value & 0xffff {
        1 => "OFF".to_string(),
        2 => "AUTO".to_string(),
        3 => "COMPATIBLE".to_string(),
        4 => "SSE2".to_string(),
        6 => "SSSE3".to_string(),
        7 => "SSE4_1".to_string(),
        8 => "SSE4_2".to_string(),
        9 => "AVX".to_string(),
        10 => "AVX2".to_string(),
        12 => "AVX512".to_string(),
        14 => "AVX512_E1".to_string(),
        other => format!("branch {other}"),
    };
    Some(if value & 0x10000 != 0 {
        format!("{branch},STRICT")
    } else {
        branch
    })
}

/// Sets libtorch's intra-op thread count to what it already is, as
/// `torch.set_num_threads(torch.get_num_threads())` would: the call also turns off
/// MKL's dynamic threading (`mkl_set_dynamic(false)`), so MKL uses the same number of
/// threads in every product. Measured on a 2-core Xeon (2026-12-07): without it,
/// 7 of 300 processes computed their first LoRA backward pass with other rounding than
/// the rest; with it, 0 of 300. (The OLoRA runs' remaining per-process differences
/// were MKL's AVX-512 code path: `pin_mkl_code_path`.)
pub fn init_threads() {
    tch::set_num_threads(tch::get_num_threads());
}
