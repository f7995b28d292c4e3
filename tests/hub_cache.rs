//! Hub ids resolve through the Hugging Face cache shared with Python (HF_HUB_CACHE,
//! HF_HOME), offline mode reads only the cache, and HF_TOKEN never appears in output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A cache laid out as huggingface_hub lays it out, holding the tiny model.
fn fake_hub_cache(root: &Path) -> PathBuf {
    let repo = root.join("models--amthal-test--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123456789abcdef").unwrap();
    for entry in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), snapshot.join(entry.file_name())).unwrap();
    }
    snapshot
}

fn loss_json(model: &str, envs: &[(&str, &str)]) -> std::process::Output {
    let data = repo_root().join("examples/data/Validation_data.csv");
    let mut command = Command::new(env!("CARGO_BIN_EXE_amthal"));
    command
        .args([
            "loss",
            "--model",
            model,
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--precision",
            "f32",
        ])
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HOME")
        .env_remove("HF_TOKEN");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn loss_of(output: &std::process::Output) -> f64 {
    assert!(output.status.success(), "{}", stderr(output));
    let summary: serde_json::Value = serde_json::from_str(stdout(output).trim()).unwrap();
    summary["loss"].as_f64().unwrap()
}

#[test]
fn hub_ids_resolve_from_the_shared_cache_offline() {
    let direct = loss_of(&loss_json(fixture("tiny-llama").to_str().unwrap(), &[]));

    let cache = temp_dir("hf-hub-cache");
    fake_hub_cache(&cache);
    let output = loss_json(
        "amthal-test/tiny-llama",
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert_eq!(loss_of(&output), direct);

    // HF_HOME/hub is the cache when HF_HUB_CACHE is not set.
    let home = temp_dir("hf-home");
    fake_hub_cache(&home.join("hub"));
    let output = loss_json(
        "amthal-test/tiny-llama",
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(loss_of(&output), direct);
}

#[test]
fn missing_models_offline_are_clear_errors_and_the_token_stays_secret() {
    let cache = temp_dir("hf-empty-cache");
    let secret = "hf_amthalTestSecretToken123";
    let output = loss_json(
        "amthal-test/absent",
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", secret),
        ],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("not complete in the Hugging Face cache"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains(secret) && !stdout(&output).contains(secret));

    // Online but unreachable (no network to the Hub here or in CI): the cache is tried, then a clear error.
    let output = loss_json(
        "amthal-test/absent",
        &[
            ("HF_HUB_CACHE", cache.to_str().unwrap()),
            ("HF_TOKEN", secret),
        ],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--model amthal-test/absent"),
        "{}",
        stderr(&output)
    );
    assert!(!stderr(&output).contains(secret) && !stdout(&output).contains(secret));
}
