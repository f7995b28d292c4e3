//! Bakes an rpath to the libtorch that torch-sys linked against into every binary
//! (the CLI, tests, benches), so `amthal` runs with no LD_LIBRARY_PATH.
//! The path is canonicalized: `.cache/libtorch` in the clone is a symlink into the
//! shared cache (see scripts/setup), and the libs' own RUNPATH ($ORIGIN/../../nvidia/...)
//! only resolves from their real location.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup first");
        return;
    };
    let lib = PathBuf::from(libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
