//! amthal::data: every reader and every bad-input case, through the library and the CLI.

mod common;

use amthal::data::{Location, ReadOptions, References, Split, read_examples, read_split};
use amthal::error::{EXIT_BAD_INPUT, exit_code};
use common::*;

const BOM: &str = "\u{FEFF}";

fn error_of(path: &std::path::Path, references: References) -> String {
    let error =
        read_examples(path, references, ReadOptions::default()).expect_err("should be rejected");
    assert_eq!(
        exit_code(&error),
        EXIT_BAD_INPUT,
        "bad input exits 2: {error:#}"
    );
    format!("{error:#}")
}

#[test]
fn csv_with_bom_quotes_and_multiline_fields() {
    let dir = temp_dir("csv-ok");
    let text = format!(
        "{BOM}Proverbs,Explanation\n\
         \"  مثل, بفاصلة  \",\"شرح \"\"مقتبس\"\"\nعلى سطرين\"\n\
         مثل ثان,شرح ثان\r\n"
    );
    let path = write(&dir, "d.csv", text);
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 2);
    assert_eq!(set.examples[0].proverb, "مثل, بفاصلة");
    assert_eq!(
        set.examples[0].reference.as_deref(),
        Some("شرح \"مقتبس\"\nعلى سطرين")
    );
    assert_eq!(
        set.examples[1].location,
        Location::CsvRow { row: 2, line: 4 }
    );
    assert_eq!(set.examples[1].reference.as_deref(), Some("شرح ثان"));
}

#[test]
fn csv_without_bom_and_column_aliases_any_case() {
    let dir = temp_dir("aliases");
    let path = write(&dir, "d.csv", "ID,TEXT,Reference_Explanation\n1,أ,ب\n");
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples[0].proverb, "أ");
    assert_eq!(set.examples[0].reference.as_deref(), Some("ب"));
    let path = write(
        &dir,
        "p.csv",
        "Proverb,Reference_Explanation,Generated_Explanation\nج,د,ه\n",
    );
    assert_eq!(
        read_examples(&path, References::Required, ReadOptions::default())
            .unwrap()
            .examples[0]
            .proverb,
        "ج"
    );
}

#[test]
fn json_array_and_jsonl() {
    let dir = temp_dir("json");
    let path = write(
        &dir,
        "d.json",
        r#"[{"Proverb": " أ ", "explanation": "ب"}, {"explanation": "د", "Proverb": "ج"}]"#,
    );
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 2);
    assert_eq!(set.examples[0].proverb, "أ");
    assert_eq!(set.examples[1].location, Location::JsonItem(2));
    assert_eq!(set.examples[1].reference.as_deref(), Some("د"));
    let path = write(&dir, "two.json", r#"[{"proverb": "أ", "text": "ب"}]"#);
    let message = error_of(&path, References::Optional);
    assert!(message.contains("'proverb' and 'text'"), "{message}");

    let path = write(
        &dir,
        "d.jsonl",
        "{\"text\": \"أ\", \"reference\": \"ب\"}\n\n{\"text\": \"ج\"}\n",
    );
    let set = read_examples(&path, References::Optional, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 2);
    assert_eq!(set.examples[1].reference, None);
    assert_eq!(set.examples[1].location, Location::JsonlLine(3));
    let message = error_of(&path, References::Required);
    assert!(
        message.contains("line 3: 'reference' is missing"),
        "{message}"
    );
}

#[test]
fn format_is_sniffed_when_the_extension_says_nothing() {
    let dir = temp_dir("sniff");
    let path = write(&dir, "data.txt", "[{\"proverb\": \"أ\"}]");
    assert_eq!(
        read_examples(&path, References::Optional, ReadOptions::default())
            .unwrap()
            .examples
            .len(),
        1
    );
}

#[test]
fn test_file_may_lack_the_reference_column() {
    let dir = temp_dir("noref");
    let path = write(&dir, "t.csv", "Proverbs\nأ\nب\n");
    let set = read_examples(&path, References::Optional, ReadOptions::default()).unwrap();
    assert!(set.examples.iter().all(|e| e.reference.is_none()));
    let message = error_of(&path, References::Required);
    assert!(
        message.contains("no reference explanation column") && message.contains("'Proverbs'"),
        "{message}"
    );
}

#[test]
fn duplicates_are_kept_and_counted() {
    let dir = temp_dir("dups");
    let path = write(
        &dir,
        "d.csv",
        "proverb,explanation\nأ,ب\nأ,ب\n أ ,ب \nأ,ج\n",
    );
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 4);
    assert_eq!(set.duplicate_rows, 2);
}

#[test]
fn missing_file() {
    let message = error_of(
        std::path::Path::new("/nonexistent/x.csv"),
        References::Optional,
    );
    assert!(
        message.contains("/nonexistent/x.csv") && message.contains("not found"),
        "{message}"
    );
}

#[test]
fn no_proverb_column_lists_found_and_accepted_names() {
    let dir = temp_dir("nocol");
    let path = write(&dir, "d.csv", "Saying,Explanation\nأ,ب\n");
    let message = error_of(&path, References::Required);
    assert!(message.contains("d.csv"), "{message}");
    assert!(message.contains("'Saying', 'Explanation'"), "{message}");
    assert!(message.contains("proverb, proverbs, text"), "{message}");
}

#[test]
fn invalid_utf8_names_the_row() {
    let dir = temp_dir("utf8");
    let mut bytes = b"Proverbs,Explanation\nok,ok\nbad \xff\xfe,x\n".to_vec();
    bytes.extend_from_slice(b"ok2,ok2\n");
    let path = write(&dir, "d.csv", bytes);
    let message = error_of(&path, References::Required);
    assert!(
        message.contains("line 3: not UTF-8: byte 0xFF at byte offset 31"),
        "{message}"
    );
    let path = write(&dir, "d.jsonl", b"{\"text\": \"a\xff\"}\n");
    let message = error_of(&path, References::Optional);
    assert!(message.contains("line 1: not UTF-8"), "{message}");
}

#[test]
fn empty_proverb_names_the_row() {
    let dir = temp_dir("emptyp");
    let path = write(&dir, "d.csv", "Proverbs,Explanation\nأ,ب\n   ,ج\n");
    let message = error_of(&path, References::Optional);
    assert!(
        message.contains("row 2 (line 3): 'Proverbs' is empty"),
        "{message}"
    );
}

#[test]
fn empty_reference_is_an_error_only_where_required() {
    let dir = temp_dir("emptyr");
    let path = write(&dir, "d.csv", "Proverbs,Explanation\nأ,ب\nج,\n");
    let message = error_of(&path, References::Required);
    assert!(
        message.contains("row 2 (line 3): 'Explanation' is empty"),
        "{message}"
    );
    let set = read_examples(&path, References::Optional, ReadOptions::default()).unwrap();
    assert_eq!(set.examples[1].reference, None);
}

#[test]
fn malformed_json_and_wrong_value_types() {
    let dir = temp_dir("badjson");
    let path = write(&dir, "d.json", "[{\"proverb\": \"أ\"},");
    assert!(error_of(&path, References::Optional).contains("invalid JSON"));
    let path = write(&dir, "e.json", "[{\"proverb\": 5}]");
    let message = error_of(&path, References::Optional);
    assert!(
        message.contains("item 1: 'proverb' is a number (5), not text"),
        "{message}"
    );
    let path = write(&dir, "f.json", "{\"proverb\": \"أ\"}");
    assert!(error_of(&path, References::Optional).contains("expected a JSON array"));
}

#[test]
fn data_dir_convention_and_missing_splits() {
    let dir = temp_dir("datadir");
    write(&dir, "Train_data.csv", "Proverbs,Explanation\nأ,ب\n");
    write(&dir, "notes.txt", "x");
    let set = read_split(&dir, Split::Train, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 1);
    let error = read_split(&dir, Split::Validation, ReadOptions::default()).unwrap_err();
    assert_eq!(exit_code(&error), EXIT_BAD_INPUT);
    let message = format!("{error:#}");
    assert!(
        message.contains("Validation_data.csv") && message.contains("Train_data.csv, notes.txt"),
        "{message}"
    );
}

#[test]
fn benchmark_splits_read_with_their_row_counts() {
    let dir = benchmark_dir();
    assert_eq!(
        read_split(&dir, Split::Train, ReadOptions::default())
            .unwrap()
            .examples
            .len(),
        333
    );
    assert_eq!(
        read_split(&dir, Split::Validation, ReadOptions::default())
            .unwrap()
            .examples
            .len(),
        100
    );
    assert_eq!(
        read_split(&dir, Split::Test, ReadOptions::default())
            .unwrap()
            .examples
            .len(),
        100
    );
}

#[test]
fn embedded_sample_data_has_its_splits() {
    use amthal::sample_data::sample_split;
    let train = sample_split(Split::Train).unwrap();
    let validation = sample_split(Split::Validation).unwrap();
    let test = sample_split(Split::Test).unwrap();
    assert_eq!(
        (
            train.examples.len(),
            validation.examples.len(),
            test.examples.len()
        ),
        (40, 10, 10)
    );
    assert!(train.examples.iter().all(|e| e.reference.is_some()));
    assert_eq!(
        train.duplicate_rows + validation.duplicate_rows + test.duplicate_rows,
        0
    );
}

/// Each bad input through the CLI: exit code 2, the message on stderr, nothing on stdout.
#[test]
fn cli_bad_input_exits_2_with_the_message_and_writes_nothing() {
    let dir = temp_dir("cli");
    let model = smollm2();
    let model = model.to_str().unwrap();
    let cases: Vec<(std::path::PathBuf, &str)> = vec![
        (dir.join("missing.csv"), "not found"),
        (write(&dir, "nocol.csv", "Saying\nأ\n"), "no proverb column"),
        (
            write(&dir, "utf8.csv", b"Proverbs\n\xff\n"),
            "line 2: not UTF-8",
        ),
        (
            write(&dir, "empty.csv", "Proverbs\n \n"),
            "row 1 (line 2): 'Proverbs' is empty",
        ),
    ];
    for (path, expected) in cases {
        let output = amthal(&[
            "tokenize",
            "--model",
            model,
            "--data",
            path.to_str().unwrap(),
        ]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{}: {}",
            path.display(),
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(expected),
            "{}: {}",
            path.display(),
            stderr(&output)
        );
        assert!(
            stdout(&output).is_empty(),
            "nothing on stdout for {}",
            path.display()
        );
    }
    let files_before: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    let output = amthal(&[
        "demo",
        "--model",
        model,
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("no Train_data.csv"),
        "{}",
        stderr(&output)
    );
    let files_after: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(
        files_before.len(),
        files_after.len(),
        "the demo wrote nothing on bad input"
    );
}

/// A training set of 5,000+ rows (the benchmark Train split 16 times, each copy's
/// explanation rotated and its proverb tagged, so no row repeats) is read, encoded and
/// batched whole: every row once per epoch. Its time and memory are measured by
/// scripts/bench/data, not here.
#[test]
fn a_large_training_set_is_read_encoded_and_batched_whole() {
    use amthal::encode::Encoder;
    use amthal::prompt::{PromptBuilder, PromptFormat};
    use amthal::train::config::DataOrder;
    use amthal::train::data_order::epoch_batches;

    let train = read_split(&benchmark_dir(), Split::Train, ReadOptions::default()).unwrap();
    let mut bytes = Vec::new();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        writer.write_record(["Proverbs", "Explanation"]).unwrap();
        for copy in 0..16 {
            for example in &train.examples {
                let mut words: Vec<&str> =
                    example.reference.as_deref().unwrap().split(' ').collect();
                let turn = copy % words.len();
                words.rotate_left(turn);
                writer
                    .write_record([format!("{} ({copy})", example.proverb), words.join(" ")])
                    .unwrap();
            }
        }
    }
    let dir = temp_dir("large");
    let path = write(&dir, "Train_data.csv", bytes);
    let set = read_examples(&path, References::Required, ReadOptions::default()).unwrap();
    assert_eq!(set.examples.len(), 16 * 333);
    assert_eq!(set.duplicate_rows, 0);
    assert_eq!(
        set.examples.last().unwrap().location,
        Location::CsvRow {
            row: 5328,
            line: 5329
        }
    );

    let source =
        amthal::model_source::ModelSource::resolve(Some(fixture("tiny-llama").to_str().unwrap()))
            .unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let prompts = PromptBuilder::new(PromptFormat::Plain, &tokenizer).unwrap();
    let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
    let (encoded, stats) = encoder.encode_all(&set.examples, Some(1024)).unwrap();
    assert_eq!(encoded.len() + stats.skipped, 5328);
    let lengths: Vec<usize> = encoded.iter().map(|e| e.input_ids.len()).collect();
    let batches = epoch_batches(&lengths, 2, 42, 0, DataOrder::Grouped);
    let mut seen: Vec<usize> = batches.concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..encoded.len()).collect::<Vec<_>>());
}
