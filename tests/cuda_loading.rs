//! CUDA detection cannot regress to "asked before loaded" (see src/cuda/mod.rs): the
//! only code that may ask libtorch about CUDA is the loader module, and the binary
//! loads before it runs any command. Runs without a GPU.

mod common;

use std::path::Path;

/// Calls that make libtorch decide, once and for good, whether CUDA exists.
const CUDA_QUERIES: [&str; 4] = ["tch::Cuda", "Cuda::", "cuda_if_available", "has_cuda"];

fn rust_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn only_the_cuda_module_queries_cuda() {
    let src = common::repo_root().join("src");
    let loader = src.join("cuda");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found the sources");
    let mut offenders = Vec::new();
    for file in files.iter().filter(|f| !f.starts_with(&loader)) {
        let text = std::fs::read_to_string(file).unwrap();
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if CUDA_QUERIES.iter().any(|q| code.contains(q)) {
                offenders.push(format!(
                    "{}:{}: {}",
                    file.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "CUDA queries outside src/cuda (use amthal::cuda, which loads libtorch_cuda.so first):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn main_loads_cuda_before_running_a_command() {
    let main = std::fs::read_to_string(common::repo_root().join("src/main.rs")).unwrap();
    let init = main
        .find("amthal::cuda::init()")
        .expect("main calls amthal::cuda::init()");
    let run = main
        .find("amthal::commands::run(")
        .expect("main runs the command");
    assert!(init < run, "cuda::init() must come before the command runs");
}

/// Without a driver (CI), `--device cuda` is a clear bad-input error naming where
/// libtorch_cuda.so was looked for; `amthal env` says why CUDA is off.
#[test]
fn without_a_gpu_cuda_is_refused_clearly_and_env_says_why() {
    if Path::new("/proc/driver/nvidia/version").exists() {
        // On a GPU machine scripts/gpu/check covers the CUDA path instead.
        let output = common::amthal(&["env", "--json"]);
        assert!(output.status.success());
        return;
    }
    let output = common::amthal(&[
        "loss",
        "--model",
        common::fixture("tiny-llama").to_str().unwrap(),
        "--data",
        common::repo_root()
            .join("examples/data/Validation_data.csv")
            .to_str()
            .unwrap(),
        "--device",
        "cuda",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let message = common::stderr(&output);
    assert!(
        message.contains("no CUDA device is usable: no NVIDIA driver")
            && message.contains("libtorch_cuda.so"),
        "{message}"
    );
    let output = common::amthal(&["env", "--json"]);
    assert!(output.status.success(), "{}", common::stderr(&output));
    let env: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(env["cuda"]["available"], false);
    assert_eq!(env["auto_device"], "cpu");
    assert!(
        env["libtorch"]["version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0")
    );
}

/// amthal pins MKL to its AVX2 kernels in strict mode (`MKL_CBWR=AVX2,STRICT`,
/// `device::pin_mkl_code_path`), which made OLoRA runs bit-reproducible on an AVX-512
/// machine, and leaves a value the user set alone; `amthal env` says what MKL itself
/// reports (libtorch's wheel for x86 carries MKL).
#[test]
fn mkl_code_path_is_pinned_unless_the_user_chose_one() {
    let mkl_cbwr = |user: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_amthal"));
        command.args(["env", "--json"]).env_remove("MKL_CBWR");
        if let Some(value) = user {
            command.env("MKL_CBWR", value);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", common::stderr(&output));
        let env: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        env["libtorch"]["mkl_cbwr"].as_str().map(str::to_string)
    };
    assert_eq!(mkl_cbwr(None).as_deref(), Some("AVX2,STRICT"));
    assert_eq!(mkl_cbwr(Some("AUTO")).as_deref(), Some("AUTO"));
    assert_eq!(mkl_cbwr(Some("COMPATIBLE")).as_deref(), Some("COMPATIBLE"));
}
