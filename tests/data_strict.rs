//! The data readers are strict where a guess would lose rows, and forgiving where
//! real files differ only in ways that do not matter: broken CSV exits 2 naming the
//! line and writes nothing; Excel's encodings read with --encoding; unused JSON
//! fields may hold anything; invalid rows are listed, or skipped and reported.

mod common;

use std::path::{Path, PathBuf};

use amthal::data::{ReadOptions, References, TextEncoding, read_examples};
use common::*;

fn model() -> String {
    fixture("tiny-llama").to_string_lossy().into_owned()
}

/// `amthal evaluate` on a test file into a fresh folder: (exit code, stderr, files left).
fn evaluate_into(dir: &Path, test: &Path, extra: &[&str]) -> (Option<i32>, String, Vec<PathBuf>) {
    let out_dir = dir.join(format!(
        "out-{}",
        test.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&out_dir).unwrap();
    let model = model();
    let mut args = vec![
        "evaluate",
        "--model",
        &model,
        "--test-path",
        test.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    ];
    let out = out_dir.join("preds.csv");
    let out = out.to_str().unwrap().to_string();
    args.extend(["--out-path", &out]);
    args.extend(extra);
    let output = amthal(&args);
    let left: Vec<PathBuf> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    (output.status.code(), stderr(&output), left)
}

#[test]
fn broken_csv_exits_2_naming_file_and_line_and_writes_nothing() {
    let dir = temp_dir("strict-cli");
    let cases: [(&str, &[u8], &str); 8] = [
        (
            "unterminated.csv",
            "Proverbs,Explanation\n\"a,b\",c\n\"unterminated,شرح\nx,y\n".as_bytes(),
            "line 3: a quoted field opens here and is never closed",
        ),
        (
            "midquote.csv",
            b"Proverbs,Explanation\nab\"c,d\n",
            "line 2: a quote inside an unquoted field",
        ),
        (
            "afterquote.csv",
            b"Proverbs,Explanation\n\"a\"b,c\n",
            "line 2: text after the closing quote",
        ),
        (
            "more.csv",
            b"Proverbs,Explanation\na,b\nc,d,e\n",
            "row 2 (line 3): 3 field(s) but the header has 2 columns",
        ),
        (
            "fewer.csv",
            b"Proverbs,Explanation\na,b\nc\n",
            "row 2 (line 3): 1 field(s) but the header has 2 columns",
        ),
        (
            "lone-cr.csv",
            b"Proverbs,Explanation\na,b\rc,d\n",
            "line 2: a carriage return",
        ),
        (
            "nul.csv",
            b"Proverbs,Explanation\na,b\nc\0,d\n",
            "line 3: a NUL byte",
        ),
        (
            "late-bom.csv",
            "Proverbs,Explanation\na,b\n\u{FEFF}Proverbs,Explanation\nc,d\n".as_bytes(),
            "line 3: a byte-order mark",
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = write(&dir, name, bytes);
        let (code, message, left) = evaluate_into(&dir, &path, &[]);
        assert_eq!(code, Some(2), "{name}: {message}");
        assert!(
            message.contains(&path.display().to_string()) && message.contains(expected),
            "{name}: {message}"
        );
        assert!(left.is_empty(), "{name}: nothing written, found {left:?}");
    }
}

#[test]
fn cp1256_and_utf16_files_read_like_their_utf8_original() {
    let dir = temp_dir("encodings");
    let original = std::fs::read_to_string(repo_root().join("data/Test_data.csv")).unwrap();
    let original = original.trim_start_matches('\u{FEFF}');
    // Windows-1256 cannot hold every character of the benchmark (curly quotes are
    // there; emoji or Persian letters would not be): keep the rows it can encode.
    let encodable: String = original
        .lines()
        .filter(|line| !encoding_rs::WINDOWS_1256.encode(line).2)
        .map(|line| format!("{line}\r\n"))
        .collect();
    let rows = encodable.lines().count() - 1;
    assert!(rows > 50, "most rows are encodable: {rows}");
    let utf8 = write(&dir, "utf8.csv", &encodable);
    let (cp1256_bytes, _, unmappable) = encoding_rs::WINDOWS_1256.encode(&encodable);
    assert!(!unmappable);
    let cp1256 = write(&dir, "cp1256.csv", &cp1256_bytes);
    let mut utf16_bytes = vec![0xFF, 0xFE];
    utf16_bytes.extend(encodable.encode_utf16().flat_map(u16::to_le_bytes));
    let utf16 = write(&dir, "utf16.csv", &utf16_bytes);

    let read = |path: &Path, encoding| {
        read_examples(
            path,
            References::Required,
            ReadOptions {
                encoding,
                skip_invalid_rows: false,
            },
        )
    };
    let expected = read(&utf8, TextEncoding::Auto).unwrap().examples;
    assert_eq!(expected.len(), rows);
    assert_eq!(
        read(&cp1256, TextEncoding::Cp1256).unwrap().examples,
        expected
    );
    assert_eq!(read(&utf16, TextEncoding::Auto).unwrap().examples, expected);
    assert_eq!(
        read(&utf16, TextEncoding::Utf16).unwrap().examples,
        expected
    );

    // auto on cp1256 bytes: exit 2 with the first bad byte's offset and the flag to use.
    let output = amthal(&[
        "tokenize",
        "--model",
        &model(),
        "--data",
        cp1256.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2));
    let first_bad = cp1256_bytes.iter().position(|&b| b >= 0x80).unwrap();
    let message = stderr(&output);
    assert!(
        message.contains(&format!("byte offset {first_bad}"))
            && message.contains("--encoding cp1256"),
        "{message}"
    );
    // The flag through the CLI gives the same tokens as the UTF-8 file.
    let tokens = |path: &Path, encoding: &str| {
        let output = amthal(&[
            "tokenize",
            "--model",
            &model(),
            "--jsonl",
            "--encoding",
            encoding,
            "--data",
            path.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    let utf8_tokens = tokens(&utf8, "auto");
    assert_eq!(utf8_tokens.lines().count(), rows);
    assert_eq!(tokens(&cp1256, "cp1256"), utf8_tokens);
    assert_eq!(tokens(&utf16, "utf-16"), utf8_tokens);
}

#[test]
fn unused_json_fields_may_hold_anything() {
    let dir = temp_dir("json-release");
    let release = r#"[
        {"id": 1, "proverb": "الصبر مفتاح الفرج", "explanation": "يضرب في الصبر", "city": null, "source": "كتاب", "tags": ["a"], "verified": true},
        {"id": 2.5, "proverb": "من جد وجد", "explanation": "يقال لمن يجتهد", "city": "صنعاء", "source": null}
    ]"#;
    let path = write(&dir, "release.json", release);
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 2);
    assert_eq!(set.examples[1].proverb, "من جد وجد");
    let jsonl: String = serde_json::from_str::<Vec<serde_json::Value>>(release)
        .unwrap()
        .iter()
        .map(|v| format!("{v}\n"))
        .collect();
    let path = write(&dir, "release.jsonl", jsonl);
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 2);
}

/// 13 bad rows among good ones, in each format: the error lists the first 10 with
/// their field and what was found, and the count.
fn bad_rows(format: &str) -> String {
    let mut objects = Vec::new();
    for i in 0..20 {
        let good =
            serde_json::json!({"proverb": format!("مثل {i}"), "explanation": format!("شرح {i}")});
        objects.push(good);
        if i < 13 {
            let bad = match i % 4 {
                0 => serde_json::json!({"proverb": null, "explanation": "شرح"}),
                1 => serde_json::json!({"proverb": "مثل", "explanation": 7}),
                2 => serde_json::json!({"proverb": "  ", "explanation": "شرح"}),
                _ => serde_json::json!({"proverb": "مثل"}),
            };
            objects.push(bad);
        }
    }
    match format {
        "json" => serde_json::to_string(&objects).unwrap(),
        _ => objects.iter().map(|o| format!("{o}\n")).collect(),
    }
}

#[test]
fn invalid_rows_are_listed_or_skipped_and_reported() {
    let dir = temp_dir("invalid-rows");
    for format in ["json", "jsonl"] {
        let path = write(&dir, &format!("d.{format}"), bad_rows(format));
        let error = read_examples(&path, References::Required, ReadOptions::default()).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("13 invalid row(s)"), "{message}");
        assert!(message.contains("... and 3 more"), "{message}");
        let first = if format == "json" {
            "item 2: 'proverb' is null"
        } else {
            "line 2: 'proverb' is null"
        };
        assert!(message.contains(first), "{message}");
        assert!(message.contains("'explanation' is a number (7), not text"));
        assert!(message.contains("'proverb' is empty"));
        assert!(message.contains("'explanation' is missing"));
        assert!(message.contains("--skip-invalid-rows"));

        let set = read_examples(
            &path,
            References::Required,
            ReadOptions {
                skip_invalid_rows: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(set.examples.len(), 20);
        assert_eq!(set.skipped.len(), 13);
        assert!(set.examples.iter().all(|e| e.proverb.starts_with("مثل ")));
    }
    // A CSV's empty cells: the same rule.
    let path = write(
        &dir,
        "d.csv",
        "Proverbs,Explanation\nأ,ب\n,ب\nج,\n\"  \",د\n",
    );
    let message = format!(
        "{:#}",
        read_examples(&path, References::Required, ReadOptions::default()).unwrap_err()
    );
    assert!(
        message.contains("3 invalid row(s)")
            && message.contains("row 2 (line 3): 'Proverbs' is empty")
            && message.contains("row 3 (line 4): 'Explanation' is empty"),
        "{message}"
    );
}

#[test]
fn training_with_skip_invalid_rows_reports_the_rows_in_its_summary() {
    let dir = temp_dir("train-skip");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let csv = "Proverbs,Explanation\nالصبر مفتاح الفرج,يضرب في الحث على الصبر\n,شرح بلا مثل\nمن جد وجد,يقال لمن يجتهد فينال\nمثل بلا شرح,\n";
    std::fs::write(data.join("Train_data.csv"), csv).unwrap();
    std::fs::write(
        data.join("Validation_data.csv"),
        "Proverbs,Explanation\nالجار قبل الدار,اختر جارك أولا\n",
    )
    .unwrap();
    let out = dir.join("out");
    let args = |skip: bool| {
        let mut args = vec![
            "train".to_string(),
            "--model".into(),
            model(),
            "--data-dir".into(),
            data.display().to_string(),
            "--output-dir".into(),
            out.display().to_string(),
            "--lora".into(),
            "--max-steps".into(),
            "1".into(),
            "--device".into(),
            "cpu".into(),
            "--precision".into(),
            "f32".into(),
            "--previews".into(),
            "0".into(),
        ];
        if skip {
            args.push("--skip-invalid-rows".into());
        }
        args
    };
    let refused = amthal(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("2 invalid row(s)"));
    assert!(!out.exists(), "a refused run writes nothing");

    let output = amthal(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("skipped 2 invalid row(s)")
            && stderr(&output).contains("row 2 (line 3), row 4 (line 5)"),
        "{}",
        stderr(&output)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap())
            .unwrap();
    let skipped = summary["skipped_rows"]["train"].as_array().unwrap();
    assert_eq!(skipped.len(), 2);
    assert_eq!(skipped[0]["row"], "row 2 (line 3)");
    assert_eq!(skipped[0]["field"], "Proverbs");
    assert_eq!(skipped[1]["problem"], "is empty");
}
