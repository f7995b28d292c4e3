//! `amthal env`: what this machine gives amthal. The libtorch it runs on (version and
//! file), the CPU and whether it multiplies bf16 natively, CUDA (where libtorch_cuda.so
//! was loaded from, or why not; each device's name, memory and compute capability),
//! and the precision `--precision auto` resolves to on each device.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;
use tch::Device;

use crate::cli::EnvArgs;
use crate::device::{Precision, cpu_has_fast_bf16, kind_name, resolve_precision};

/// The libtorch_cpu.so this process mapped, from /proc/self/maps.
fn loaded_libtorch() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .map(PathBuf::from)
}

/// `__version__` from the torch/version.py beside a torch/lib folder (the wheel's
/// layout, in a pip install and in scripts/setup's cache alike).
fn torch_version(library: &Path) -> Option<String> {
    let lib = library.canonicalize().ok()?;
    let text = std::fs::read_to_string(lib.parent()?.parent()?.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim_matches(['\'', '"']).to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn run(args: &EnvArgs) -> Result<()> {
    let libtorch = loaded_libtorch();
    let version = libtorch.as_deref().and_then(torch_version);
    let cuda = crate::cuda::runtime();
    let devices = crate::cuda::devices();
    let cpu_precision = kind_name(resolve_precision(Precision::Auto, Device::Cpu));
    let cuda_precision = kind_name(resolve_precision(Precision::Auto, Device::Cuda(0)));
    let report = json!({
        "amthal": env!("CARGO_PKG_VERSION"),
        "libtorch": {
            "version": version,
            "library": libtorch.as_ref().map(|p| p.display().to_string()),
            "threads": tch::get_num_threads(),
            // MKL's code path (`device::pin_mkl_code_path`: AVX2,STRICT unless the user
            // set MKL_CBWR), as MKL reports it.
            "mkl_cbwr": crate::device::mkl_code_path(),
        },
        "cpu": {
            "model": cpu_model(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "fast_bf16": cpu_has_fast_bf16(),
            "auto_precision": cpu_precision,
        },
        "cuda": match cuda {
            Ok(runtime) => json!({
                "available": true,
                "library": runtime.library.as_ref().map(|p| p.display().to_string()),
                "memory_statistics": runtime.shim.as_ref().err().map_or("available".to_string(), |e| format!("unavailable: {e}")),
                "cudnn": crate::cuda::cudnn_available(),
                "devices": devices,
                "auto_precision": cuda_precision,
            }),
            Err(why) => json!({
                "available": false,
                "why": why,
                "looked_in": crate::cuda::library_candidates()
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>(),
            }),
        },
        "auto_device": if cuda.is_ok() { "cuda:0" } else { "cpu" },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("amthal {}", env!("CARGO_PKG_VERSION"));
    println!(
        "libtorch {} ({}), {} threads, MKL_CBWR={}",
        version.as_deref().unwrap_or("version unknown"),
        libtorch
            .as_ref()
            .map_or("library not found in /proc/self/maps".into(), |p| p
                .display()
                .to_string()),
        tch::get_num_threads(),
        report["libtorch"]["mkl_cbwr"].as_str().unwrap_or("no MKL")
    );
    println!(
        "CPU: {}, {} cores, native bf16 (AMX/AVX512-BF16): {}; --precision auto on cpu: {cpu_precision}",
        report["cpu"]["model"].as_str().unwrap_or("?"),
        report["cpu"]["cores"],
        if cpu_has_fast_bf16() { "yes" } else { "no" }
    );
    match cuda {
        Ok(runtime) => {
            println!(
                "CUDA: libtorch_cuda.so from {}; cuDNN {}; memory statistics {}",
                runtime
                    .library
                    .as_ref()
                    .map_or("libtorch itself".into(), |p| p.display().to_string()),
                if crate::cuda::cudnn_available() {
                    "yes"
                } else {
                    "no"
                },
                report["cuda"]["memory_statistics"].as_str().unwrap_or("?")
            );
            for device in &devices {
                println!(
                    "  cuda:{} {}, {:.1} GiB ({:.1} GiB free), compute capability {}; --precision auto: {cuda_precision}",
                    device.index,
                    device.name,
                    device.total_bytes as f64 / (1u64 << 30) as f64,
                    device.free_bytes as f64 / (1u64 << 30) as f64,
                    device.compute_capability
                );
            }
        }
        Err(why) => println!(
            "CUDA: not available: {why} (looked for libtorch_cuda.so in {})",
            report["cuda"]["looked_in"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        ),
    }
    println!(
        "--device auto: {}",
        report["auto_device"].as_str().unwrap_or("?")
    );
    Ok(())
}
