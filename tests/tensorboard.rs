//! `train --report-to tensorboard`: the event file under OUT/runs/ holds, at each
//! logged step, the scalars OUT/log.jsonl has, under HF's tags (decoded here with a
//! small protobuf reader; `src/train/tensorboard.rs` checks the bytes against torch's
//! SummaryWriter).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Reads a varint at `at`, moving past it.
fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = bytes[*at];
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return value;
        }
        shift += 7;
    }
}

/// A protobuf message's fields: (number, raw bytes of a length-delimited field, or the
/// little-endian bytes of a fixed one, or the varint's value as 8 bytes).
fn fields(message: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let key = varint(message, &mut at);
        let (number, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => varint(message, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                message[at - 8..at].to_vec()
            }
            2 => {
                let length = varint(message, &mut at) as usize;
                at += length;
                message[at - length..at].to_vec()
            }
            5 => {
                at += 4;
                message[at - 4..at].to_vec()
            }
            other => panic!("wire type {other}"),
        };
        out.push((number, value));
    }
    out
}

/// (step, tag) -> value of every scalar in an event file, and its file version.
fn scalars(path: &Path) -> (String, BTreeMap<(i64, String), f32>) {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut version = String::new();
    let mut out = BTreeMap::new();
    while at < bytes.len() {
        let length = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        let event = &bytes[at + 12..at + 12 + length];
        at += 16 + length;
        let mut step = 0;
        for (number, value) in fields(event) {
            match number {
                2 => step = i64::from_le_bytes(value.try_into().unwrap()),
                3 => version = String::from_utf8(value).unwrap(),
                5 => {
                    for (_, summary_value) in fields(&value) {
                        let parts = fields(&summary_value);
                        let tag = String::from_utf8(parts[0].1.clone()).unwrap();
                        let scalar = f32::from_le_bytes(parts[1].1.clone().try_into().unwrap());
                        out.insert((step, tag), scalar);
                    }
                }
                _ => {}
            }
        }
    }
    (version, out)
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    let runs = out.join("runs");
    let mut files = Vec::new();
    for run in std::fs::read_dir(runs).unwrap() {
        for file in std::fs::read_dir(run.unwrap().path()).unwrap() {
            files.push(file.unwrap().path());
        }
    }
    files
}

#[test]
fn the_event_file_holds_what_the_log_holds_under_hf_tags() {
    let dir = temp_dir("tensorboard");
    let data = repo_root().join("examples/data");
    let model = fixture("tiny-llama");
    let train = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--precision",
            "f32",
            "--device",
            "cpu",
            "--lora",
            "--bsz",
            "4",
            "--grad-accum",
            "1",
            "--previews",
            "0",
        ];
        args.extend(extra);
        amthal(&args)
    };
    let out = dir.join("out");
    let output = train(
        &out,
        &[
            "--max-steps",
            "3",
            "--eval-strategy",
            "steps",
            "--eval-steps",
            "2",
            "--report_to",
            "tensorboard",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let files = event_files(&out);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    let (version, logged) = scalars(&files[0]);
    assert_eq!(version, "brain.Event:2");

    let mut expected = BTreeMap::new();
    for line in std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
    {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = entry["step"].as_i64().unwrap();
        for (key, tag) in [
            ("loss", "train/loss"),
            ("learning_rate", "train/learning_rate"),
            ("grad_norm", "train/grad_norm"),
            ("epoch", "train/epoch"),
            ("eval_loss", "eval/loss"),
        ] {
            if let Some(value) = entry[key].as_f64() {
                expected.insert((step, tag.to_string()), value as f32);
            }
        }
    }
    // Steps 1-3 trained and logged; evaluations at 2 and 3.
    assert!(expected.contains_key(&(2, "eval/loss".to_string())));
    assert!(expected.contains_key(&(3, "train/loss".to_string())));
    assert_eq!(logged.len(), expected.len());
    for (key, value) in &expected {
        let ours = logged[key];
        // The log's JSON carries f64; the event file f32 (as SummaryWriter's
        // simple_value), and serde_json reads within an ulp.
        assert!(
            (ours - value).abs() <= 1e-6 * value.abs().max(1e-6),
            "{key:?}: {ours} vs {value}"
        );
    }

    // Without the flag, no runs/ folder.
    let plain = dir.join("plain");
    let output = train(&plain, &["--max-steps", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!plain.join("runs").exists());
}
