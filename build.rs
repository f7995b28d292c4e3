//! Three jobs:
//! 1. Bakes an rpath to the libtorch that torch-sys linked against into every binary
//!    (the CLI, tests, benches), so `amthal` runs with no LD_LIBRARY_PATH. The path is
//!    canonicalized: `.cache/libtorch` in the clone is a symlink into the shared cache
//!    (see scripts/setup), and the libs' own RUNPATH ($ORIGIN/../../nvidia/...) only
//!    resolves from their real location.
//! 2. Compiles the C++ shim in csrc/ (libtorch's CUDA APIs that tch does not wrap)
//!    into `$OUT_DIR/libamthal_cuda.so`, which src/cuda/shim.rs embeds and loads at run
//!    time after libtorch_cuda.so. It needs only headers (torch's, and the CUDA
//!    runtime's that scripts/setup unpacks) and links libc10_cuda.so from the torch
//!    wheel, so a CPU machine builds it too.
//! 3. Compiles csrc/torch_ops.cpp (multi-tensor AdamW and norms, CPU and CUDA) into
//!    `$OUT_DIR/libamthal_ops.so`, embedded and loaded by src/torch_ops.rs.
//! 4. Compiles csrc/distributed.cpp (c10d's TCPStore and process groups) twice:
//!    `$OUT_DIR/libamthal_dist.so` (Gloo, against libtorch_cpu) and
//!    `$OUT_DIR/libamthal_dist_nccl.so` (Gloo and NCCL, against libtorch_cuda too: nccl.h
//!    from the wheel scripts/setup unpacks, the CUDA math libraries' handle types from
//!    csrc/cuda_libs_stub), both embedded and loaded by src/distributed/shim.rs.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup first");
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    build_cuda_shim(&libtorch, &out.join("libamthal_cuda.so"));
    build_ops_library(&libtorch, &out.join("libamthal_ops.so"));
    build_distributed_library(&libtorch, &out.join("libamthal_dist.so"));
    build_distributed_nccl_library(&libtorch, &out.join("libamthal_dist_nccl.so"));
}

/// What the CUDA builds (the shim, the NCCL library) link: libtorch's CUDA and CPU
/// parts and the CUDA runtime, all already in the process when they are loaded.
const CUDA_LIBRARIES: &[&str] = &[
    "-ltorch_cuda",
    "-ltorch_cpu",
    "-lc10_cuda",
    "-lc10",
    "-l:libcudart.so.13",
];

/// csrc/distributed.cpp with ProcessGroupNCCL (AMTHAL_WITH_NCCL), against libtorch_cuda.
/// Headers only, as the CUDA shim: a CPU machine builds it, a GPU machine loads it.
fn build_distributed_nccl_library(libtorch: &Path, target: &Path) {
    let site = libtorch.parent().expect("LIBTORCH has a parent");
    let torch = site.join("torch");
    let nccl_include = site.join("nvidia/nccl/include");
    require(
        &[
            nccl_include.join("nccl.h"),
            site.join("nvidia/cu13/include/nv/target"),
        ],
        "the NCCL library",
    );
    compile_library_with(
        "csrc/distributed.cpp",
        &["-DAMTHAL_WITH_NCCL"],
        &[
            torch.join("include"),
            torch.join("include/torch/csrc/api/include"),
            PathBuf::from("csrc/gloo_stub"),
            PathBuf::from("csrc/cuda_libs_stub"),
            site.join("nvidia/cu13/include"),
            nccl_include,
        ],
        &[torch.join("lib"), site.join("nvidia/cu13/lib")],
        CUDA_LIBRARIES,
        target,
    );
}

/// csrc/distributed.cpp against libtorch_cpu alone (c10d's Gloo backend lives there),
/// with the stub gloo headers the wheel lacks (csrc/gloo_stub/README.md).
fn build_distributed_library(libtorch: &Path, target: &Path) {
    let torch = libtorch
        .parent()
        .expect("LIBTORCH has a parent")
        .join("torch");
    compile_library(
        "csrc/distributed.cpp",
        &[
            torch.join("include"),
            torch.join("include/torch/csrc/api/include"),
            PathBuf::from("csrc/gloo_stub"),
        ],
        &[torch.join("lib")],
        &["-ltorch_cpu", "-lc10"],
        target,
    );
}

/// csrc/torch_ops.cpp (multi-tensor AdamW and norms) against libtorch_cpu alone, so the
/// CPU build loads it too (src/torch_ops.rs).
fn build_ops_library(libtorch: &Path, target: &Path) {
    let torch = libtorch
        .parent()
        .expect("LIBTORCH has a parent")
        .join("torch");
    compile_library(
        "csrc/torch_ops.cpp",
        &[torch.join("include")],
        &[torch.join("lib")],
        &["-ltorch_cpu", "-lc10"],
        target,
    );
}

/// site/ in scripts/setup's cache: the CPU view (LIBTORCH) sits at site/libtorch-cpu.
fn build_cuda_shim(libtorch: &Path, target: &Path) {
    let site = libtorch.parent().expect("LIBTORCH has a parent");
    let torch = site.join("torch");
    let cuda_include = site.join("nvidia/cu13/include");
    let cuda_lib = site.join("nvidia/cu13/lib");
    require(
        &[
            torch.join("include/c10/cuda/CUDACachingAllocator.h"),
            torch.join("lib/libc10_cuda.so"),
            torch.join("lib/libtorch_cuda.so"),
            cuda_include.join("cuda_runtime_api.h"),
            cuda_include.join("crt/host_config.h"),
        ],
        "the CUDA shim",
    );
    compile_library(
        "csrc/cuda_shim.cpp",
        &[torch.join("include"), cuda_include],
        &[torch.join("lib"), cuda_lib],
        CUDA_LIBRARIES,
        target,
    );
}

/// Stops the build with a pointer to scripts/setup when a file `library` compiles or
/// links against is not there.
fn require(files: &[PathBuf], library: &str) {
    for file in files {
        if !file.exists() {
            panic!(
                "{} is missing: run scripts/setup (it unpacks the files {library} needs)",
                file.display()
            );
        }
    }
}

/// Compiles one C++ source of csrc/ into a shared library against the torch wheel's
/// headers and libraries.
fn compile_library(
    source: &str,
    includes: &[PathBuf],
    library_dirs: &[PathBuf],
    libraries: &[&str],
    target: &Path,
) {
    compile_library_with(source, &[], includes, library_dirs, libraries, target);
}

/// `compile_library` with extra compiler flags (preprocessor definitions).
fn compile_library_with(
    source: &str,
    flags: &[&str],
    includes: &[PathBuf],
    library_dirs: &[PathBuf],
    libraries: &[&str],
    target: &Path,
) {
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut command = Command::new(compiler.path());
    command
        .args(["-std=c++17", "-O2", "-shared", "-fPIC", "-w"])
        // torch 2.11 wheels use the C++11 ABI.
        .arg("-D_GLIBCXX_USE_CXX11_ABI=1")
        .args(flags)
        .args(includes.iter().map(|dir| format!("-I{}", dir.display())))
        .arg(source)
        .args(
            library_dirs
                .iter()
                .map(|dir| format!("-L{}", dir.display())),
        )
        .args(libraries)
        .arg("-o")
        .arg(target);
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("running {:?}: {e}", compiler.path()));
    if !status.success() {
        panic!("compiling {source} failed: {command:?}");
    }
}
