//! Properties of the three data readers (CSV, JSON, JSONL), checked with proptest:
//! - any bytes, and any mutation of the benchmark files, either parse or give a
//!   `BadInput` error (exit 2), never a panic and never another kind of error;
//! - for a file that parses, the rows read plus the rows reported as skipped equal
//!   the records written to it, and the rows read are exactly the valid ones.

mod common;

use std::path::Path;

use amthal::data::{ReadOptions, References, read_examples_from_bytes};
use amthal::error::{EXIT_BAD_INPUT, exit_code};
use proptest::prelude::*;

const NAMES: [&str; 4] = ["d.csv", "d.json", "d.jsonl", "d.txt"];

/// Reading must end in Ok or BadInput; a panic fails the property by itself.
fn read_never_fails_otherwise(name: &str, bytes: &[u8], references: References, skip: bool) {
    let options = ReadOptions {
        skip_invalid_rows: skip,
        ..Default::default()
    };
    if let Err(error) = read_examples_from_bytes(Path::new(name), bytes, references, options) {
        assert_eq!(
            exit_code(&error),
            EXIT_BAD_INPUT,
            "not a BadInput: {error:#}"
        );
        let message = format!("{error:#}");
        assert!(
            message.contains(name),
            "the message names the file: {message}"
        );
    }
}

/// The first rows of each benchmark split (whole files make each case slow).
fn benchmark_heads() -> Vec<Vec<u8>> {
    ["Train", "Validation", "Test"]
        .iter()
        .map(|split| {
            let text =
                std::fs::read_to_string(common::benchmark_dir().join(format!("{split}_data.csv")))
                    .unwrap();
            text.lines()
                .take(8)
                .map(|l| format!("{l}\r\n"))
                .collect::<String>()
                .into_bytes()
        })
        .collect()
}

/// Bytes that matter to the readers, so mutations hit the interesting states often.
fn special_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(b'"'),
        Just(b','),
        Just(b'\n'),
        Just(b'\r'),
        Just(0u8),
        Just(0xEF),
        Just(0xBB),
        Just(0xBF),
        Just(0xFF),
        Just(b'{'),
        Just(b'['),
        any::<u8>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Insert(usize, u8),
    Delete(usize),
    Replace(usize, u8),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), special_byte()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), special_byte()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    match *mutation {
        Mutation::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
        Mutation::Delete(at) => {
            bytes.remove(at % bytes.len());
        }
        Mutation::Replace(at, b) => {
            let at = at % bytes.len();
            bytes[at] = b;
        }
        Mutation::Truncate(at) => bytes.truncate(at % bytes.len()),
    }
}

/// A cell as a generated row holds it.
#[derive(Debug, Clone)]
enum Value {
    Text(String),
    /// JSON only: null, or a key left out.
    Null,
    Absent,
    Number(i64),
}

impl Value {
    fn usable(&self) -> Option<&str> {
        match self {
            Value::Text(t) if !t.trim().is_empty() => Some(t.trim()),
            _ => None,
        }
    }
}

/// Text with the characters that stress quoting: quotes, commas, line breaks, Arabic.
fn text() -> impl Strategy<Value = String> + Clone {
    proptest::collection::vec(
        prop_oneof![
            Just("\"".to_string()),
            Just(",".to_string()),
            Just("\n".to_string()),
            Just("\r\n".to_string()),
            Just(" ".to_string()),
            Just("مثل".to_string()),
            Just("شرح".to_string()),
            Just("{}[]".to_string()),
            "[a-z]{1,3}",
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

fn csv_value() -> impl Strategy<Value = Value> + Clone {
    text().prop_map(Value::Text)
}

fn json_value() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        6 => text().prop_map(Value::Text),
        1 => Just(Value::Null),
        1 => Just(Value::Absent),
        1 => any::<i64>().prop_map(Value::Number),
    ]
}

/// (proverb, reference, an unused "id" column of any type)
type Row = (Value, Value, Value);

fn rows(value: impl Strategy<Value = Value> + Clone) -> impl Strategy<Value = Vec<Row>> {
    proptest::collection::vec((value.clone(), value.clone(), value), 1..12)
}

fn as_json(value: &Value) -> Option<serde_json::Value> {
    match value {
        Value::Text(t) => Some(serde_json::Value::String(t.clone())),
        Value::Null => Some(serde_json::Value::Null),
        Value::Absent => None,
        Value::Number(n) => Some(serde_json::json!(n)),
    }
}

fn to_objects(rows: &[Row]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|(proverb, reference, id)| {
            let mut object = serde_json::Map::new();
            for (key, value) in [("id", id), ("Proverb", proverb), ("explanation", reference)] {
                if let Some(v) = as_json(value) {
                    object.insert(key.to_string(), v);
                }
            }
            serde_json::Value::Object(object)
        })
        .collect()
}

fn to_csv(rows: &[Row]) -> Vec<u8> {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        writer
            .write_record(["id", "Proverbs", "Explanation"])
            .unwrap();
        for (proverb, reference, id) in rows {
            let cell = |v: &Value| match v {
                Value::Text(t) => t.clone(),
                _ => String::new(),
            };
            writer
                .write_record([cell(id), cell(proverb), cell(reference)])
                .unwrap();
        }
    }
    bytes
}

/// Reads generated rows with --skip-invalid-rows and checks every row is accounted
/// for: read rows are the valid ones in order, the rest are reported as skipped.
fn check_accounting(name: &str, bytes: &[u8], rows: &[Row], references: References) {
    let valid: Vec<(String, Option<String>)> = rows
        .iter()
        .filter(|(proverb, reference, _)| {
            proverb.usable().is_some()
                && match references {
                    References::Required => reference.usable().is_some(),
                    References::Optional => !matches!(reference, Value::Number(_)),
                }
        })
        .map(|(proverb, reference, _)| {
            (
                proverb.usable().unwrap().to_string(),
                reference.usable().map(str::to_string),
            )
        })
        .collect();
    let options = ReadOptions {
        skip_invalid_rows: true,
        ..Default::default()
    };
    match read_examples_from_bytes(Path::new(name), bytes, references, options) {
        Ok(set) => {
            assert_eq!(set.examples.len() + set.skipped.len(), rows.len());
            let read: Vec<(String, Option<String>)> = set
                .examples
                .iter()
                .map(|e| (e.proverb.clone(), e.reference.clone()))
                .collect();
            assert_eq!(read, valid);
        }
        Err(error) => {
            // Only a file with no valid row at all may be refused.
            assert!(valid.is_empty(), "{name}: {error:#}");
            assert_eq!(exit_code(&error), EXIT_BAD_INPUT);
        }
    }
    // Without the flag: accepted exactly when every row is valid.
    let strict =
        read_examples_from_bytes(Path::new(name), bytes, references, ReadOptions::default());
    assert_eq!(strict.is_ok(), valid.len() == rows.len(), "{name}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_parse_or_are_bad_input(bytes in proptest::collection::vec(special_byte(), 0..200),
                                          name in 0..NAMES.len(), skip: bool) {
        for references in [References::Required, References::Optional] {
            read_never_fails_otherwise(NAMES[name], &bytes, references, skip);
        }
    }

    #[test]
    fn mutated_benchmark_files_parse_or_are_bad_input(split in 0..3usize,
                                                     mutations in proptest::collection::vec(mutation(), 1..6),
                                                     skip: bool) {
        let mut bytes = benchmark_heads()[split].clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        read_never_fails_otherwise("Train_data.csv", &bytes, References::Required, skip);
    }

    #[test]
    fn every_csv_row_is_read_or_reported(rows in rows(csv_value()), required: bool) {
        let references = if required { References::Required } else { References::Optional };
        check_accounting("d.csv", &to_csv(&rows), &rows, references);
    }

    #[test]
    fn every_json_row_is_read_or_reported(rows in rows(json_value()), required: bool) {
        let references = if required { References::Required } else { References::Optional };
        let objects = to_objects(&rows);
        check_accounting("d.json", serde_json::to_string(&objects).unwrap().as_bytes(), &rows, references);
        let jsonl: String = objects.iter().map(|o| format!("{o}\n")).collect();
        check_accounting("d.jsonl", jsonl.as_bytes(), &rows, references);
    }
}
