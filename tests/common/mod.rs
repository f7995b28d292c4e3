//! Shared test helpers: where the fixtures, the benchmark data and the default model
//! are, and how to run the binary. Missing prerequisites fail loudly (never a skip).
#![allow(dead_code)]

pub mod tiny;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests").join("fixtures").join(name)
}

pub fn golden(name: &str) -> serde_json::Value {
    let path = repo_root().join("tests").join("golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (scripts/golden/make_golden.py writes it)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// The public benchmark splits, carried in the repo (data/, CC BY 4.0).
pub fn benchmark_dir() -> PathBuf {
    let dir = repo_root().join("data");
    assert!(
        dir.join("Train_data.csv").is_file(),
        "benchmark data not found at {}",
        dir.display()
    );
    dir
}

/// SmolLM2-135M-Instruct GGUF from the setup cache.
pub fn smollm2() -> PathBuf {
    let path = amthal::model_source::default_model_path();
    assert!(
        path.is_file(),
        "{} not found: run scripts/setup first",
        path.display()
    );
    path
}

/// A fresh temp dir for one test, removed when the returned guard drops (also when
/// the test panics), so a full test run leaves nothing behind in the temp folder: a
/// full fine-tune's checkpoints are gigabytes, and CI once ran out of disk on the
/// leftovers of earlier runs. Set AMTHAL_KEEP_TEST_DIRS=1 to keep them for debugging.
pub fn temp_dir(name: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!("amthal-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TestDir(dir)
}

/// A test's temp folder; derefs to its path and is deleted on drop.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("AMTHAL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs the amthal binary with arguments.
pub fn amthal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amthal"))
        .args(args)
        .output()
        .expect("run amthal")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command was refused as bad input: exit status 2 and `message` in its stderr.
/// `context` names the case in a failure.
#[allow(dead_code)] // not every test binary uses every helper
pub fn assert_refused(output: &Output, context: &str, message: &str) {
    assert_eq!(
        output.status.code(),
        Some(2),
        "{context}: {}",
        stderr(output)
    );
    assert!(
        stderr(output).contains(message),
        "{context}: expected {message:?} in {}",
        stderr(output)
    );
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("array of ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

/// all-MiniLM-L6-v2 (sentence-transformers folder) from the setup cache.
pub fn minilm() -> PathBuf {
    let path = amthal::model_source::cache_dir()
        .join("models")
        .join("all-MiniLM-L6-v2");
    assert!(
        path.join("modules.json").is_file() && path.join("model.safetensors").is_file(),
        "{} not found: run scripts/setup first",
        path.display()
    );
    path
}
