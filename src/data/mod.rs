//! Reading proverb data: CSV, JSON arrays and JSONL into `Example`s.
//!
//! bytes --(text: encoding)--> text --(csv_reader / json_reader)--> Table of cells
//! --(row checks)--> Dataset of Examples, plus the rows skipped as invalid.
//!
//! Columns are matched case-insensitively through aliases, so the benchmark files
//! (`Proverbs`, `Explanation`), the seed's predictions CSV (`Proverb`,
//! `Reference_Explanation`) and hand-made JSONL (`text`, `reference`) all read the same;
//! other columns are ignored whatever they hold. Structural problems (a broken quote, a
//! row with the wrong number of fields, bytes that are not text) are errors naming the
//! line. Rows whose proverb (or, for training and validation, reference) is empty, null
//! or not text are listed together in one error, or skipped and reported with
//! `--skip-invalid-rows`. Every problem is a `BadInput`; nothing is ever written here.

pub mod csv_reader;
mod json_reader;
pub mod text;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

pub use text::TextEncoding;

use crate::bail_input;

/// Column names (lower-case) accepted for the proverb.
pub const PROVERB_COLUMNS: [&str; 3] = ["proverb", "proverbs", "text"];
/// Column names (lower-case) accepted for the reference explanation.
pub const REFERENCE_COLUMNS: [&str; 3] = ["reference_explanation", "explanation", "reference"];

/// One proverb and, when the file has it, its reference explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub proverb: String,
    pub reference: Option<String>,
    /// Where the example came from, for messages ("row 12 (line 14)").
    pub location: Location,
}

/// Where a row sits in its file, in the words a user would look for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A CSV data row (1 = first row after the header) and the line it starts on.
    CsvRow { row: usize, line: u64 },
    /// An element of a JSON array (1-based).
    JsonItem(usize),
    /// A line of a JSONL file (1-based).
    JsonlLine(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::CsvRow { row, line } => write!(f, "row {row} (line {line})"),
            Location::JsonItem(item) => write!(f, "item {item}"),
            Location::JsonlLine(line) => write!(f, "line {line}"),
        }
    }
}

/// Whether a file must carry a reference explanation on every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum References {
    /// Training and validation data: a missing or empty reference is an error.
    Required,
    /// Test data: the reference column may be absent or a cell empty.
    Optional,
}

/// The examples of one file, plus what a user should hear about them.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// Rows that repeat an earlier row exactly (kept, but worth a warning).
    pub duplicate_rows: usize,
    /// Rows left out under `--skip-invalid-rows` (empty otherwise: invalid rows are
    /// then an error). `examples.len() + skipped.len()` is the file's record count.
    pub skipped: Vec<InvalidRow>,
}

/// A row whose proverb or reference is unusable, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidRow {
    /// "row 12 (line 14)", "item 3", "line 7": as `Location` shows it.
    pub row: String,
    /// The column as the file names it.
    pub field: String,
    /// "is empty", "is null", "is missing", "is a number (5), not text".
    pub problem: String,
}

impl fmt::Display for InvalidRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: '{}' {}", self.row, self.field, self.problem)
    }
}

/// How to read a data file: `--encoding` and `--skip-invalid-rows`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    pub encoding: TextEncoding,
    /// Leave out rows with an empty/null/non-text proverb or (required) reference,
    /// instead of refusing the file.
    pub skip_invalid_rows: bool,
}

/// The seed's data-dir convention: DIR/Train_data.csv, DIR/Validation_data.csv,
/// DIR/Test_data.csv (a .jsonl or .json file with the same stem works too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub fn file_stem(self) -> &'static str {
        match self {
            Split::Train => "Train_data",
            Split::Validation => "Validation_data",
            Split::Test => "Test_data",
        }
    }

    /// Training and validation rows need a reference to learn from or to score.
    pub fn references(self) -> References {
        match self {
            Split::Train | Split::Validation => References::Required,
            Split::Test => References::Optional,
        }
    }
}

/// Finds a split's file in a data dir: `Train_data.csv`, else `.jsonl`, else `.json`.
pub fn split_path(dir: &Path, split: Split) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail_input!("data dir {}: not a directory", dir.display());
    }
    for extension in ["csv", "jsonl", "json"] {
        let candidate = dir.join(format!("{}.{extension}", split.file_stem()));
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    bail_input!(
        "data dir {}: no {}.csv (nor .jsonl/.json); the data dir must hold Train_data.csv, \
         Validation_data.csv and Test_data.csv; it holds: {}",
        dir.display(),
        split.file_stem(),
        if found.is_empty() {
            "nothing".to_string()
        } else {
            found.join(", ")
        }
    )
}

/// Reads one split of a data dir with that split's reference rule.
pub fn read_split(dir: &Path, split: Split, options: ReadOptions) -> Result<Dataset> {
    read_examples(&split_path(dir, split)?, split.references(), options)
}

/// Reads a CSV, JSON-array or JSONL file of proverbs. The format comes from the
/// extension (.csv, .json, .jsonl/.ndjson), or from the first character otherwise.
pub fn read_examples(path: &Path, references: References, options: ReadOptions) -> Result<Dataset> {
    let bytes = read_file(path)?;
    read_examples_from_bytes(path, &bytes, references, options)
}

/// A data file's bytes; a missing file is bad input, other failures are I/O errors.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail_input!("{}: file not found", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Reads examples from bytes already in memory; `path` names them in messages and
/// picks the format by extension.
pub fn read_examples_from_bytes(
    path: &Path,
    bytes: &[u8],
    references: References,
    options: ReadOptions,
) -> Result<Dataset> {
    let text = text::decode(path, bytes, options.encoding)?;
    let table = match detect_format(path, &text) {
        Format::Csv => csv_table(path, &text)?,
        Format::Json => json_reader::read_json_table(path, &text)?,
        Format::Jsonl => json_reader::read_jsonl_table(path, &text)?,
    };
    table_to_dataset(path, table, references, options.skip_invalid_rows)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
    Jsonl,
}

fn detect_format(path: &Path, text: &str) -> Format {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("csv") => Format::Csv,
        Some("json") => Format::Json,
        Some("jsonl") | Some("ndjson") => Format::Jsonl,
        _ => match text.trim_start().chars().next() {
            Some('[') => Format::Json,
            Some('{') => Format::Jsonl,
            _ => Format::Csv,
        },
    }
}

/// One value of a table, as the file held it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cell {
    Text(String),
    /// JSON `null`.
    Null,
    /// The key is absent from this JSON object.
    Missing,
    /// Any other JSON value, described for messages ("a number (5)").
    Other(String),
}

/// A file read into columns and rows of cells, before column matching.
struct Table {
    columns: Vec<String>,
    rows: Vec<(Location, Vec<Cell>)>,
}

fn csv_table(path: &Path, text: &str) -> Result<Table> {
    let csv = csv_reader::parse_csv(path, text)?;
    let rows = csv
        .records
        .into_iter()
        .enumerate()
        .map(|(index, record)| {
            let location = Location::CsvRow {
                row: index + 1,
                line: record.line,
            };
            (
                location,
                record.fields.into_iter().map(Cell::Text).collect(),
            )
        })
        .collect();
    Ok(Table {
        columns: csv.header,
        rows,
    })
}

/// Index of the one column whose name matches an alias; an error if two match.
fn find_column(path: &Path, columns: &[String], aliases: &[&str]) -> Result<Option<usize>> {
    let matches: Vec<usize> = columns
        .iter()
        .enumerate()
        .filter(|(_, name)| aliases.contains(&name.trim().to_lowercase().as_str()))
        .map(|(index, _)| index)
        .collect();
    match matches.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        several => bail_input!(
            "{}: columns {} all name the same field; keep one",
            path.display(),
            several
                .iter()
                .map(|&i| format!("'{}'", columns[i]))
                .collect::<Vec<_>>()
                .join(" and ")
        ),
    }
}

fn describe_columns(columns: &[String]) -> String {
    if columns.is_empty() {
        "none".to_string()
    } else {
        columns
            .iter()
            .map(|c| format!("'{c}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The usable text of a cell, or what is wrong with it.
fn cell_text(cell: &Cell) -> std::result::Result<&str, String> {
    match cell {
        Cell::Text(text) if !text.trim().is_empty() => Ok(text.trim()),
        Cell::Text(_) => Err("is empty".into()),
        Cell::Null => Err("is null".into()),
        Cell::Missing => Err("is missing".into()),
        Cell::Other(what) => Err(format!("is {what}, not text")),
    }
}

/// How many invalid rows an error message lists before "and N more".
const INVALID_ROWS_LISTED: usize = 10;

fn table_to_dataset(
    path: &Path,
    table: Table,
    references: References,
    skip_invalid_rows: bool,
) -> Result<Dataset> {
    let Some(proverb_column) = find_column(path, &table.columns, &PROVERB_COLUMNS)? else {
        bail_input!(
            "{}: no proverb column; found columns {}; accepted names (any case): {}",
            path.display(),
            describe_columns(&table.columns),
            PROVERB_COLUMNS.join(", ")
        );
    };
    let reference_column = find_column(path, &table.columns, &REFERENCE_COLUMNS)?;
    if reference_column.is_none() && references == References::Required {
        bail_input!(
            "{}: no reference explanation column, which training and validation data need; \
             found columns {}; accepted names (any case): {}",
            path.display(),
            describe_columns(&table.columns),
            REFERENCE_COLUMNS.join(", ")
        );
    }
    if table.rows.is_empty() {
        bail_input!("{}: no data rows", path.display());
    }

    let mut examples = Vec::with_capacity(table.rows.len());
    let mut invalid = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut duplicate_rows = 0;
    for (location, cells) in &table.rows {
        let invalid_row = |column: usize, problem: String| InvalidRow {
            row: location.to_string(),
            field: table.columns[column].clone(),
            problem,
        };
        let proverb = match cell_text(&cells[proverb_column]) {
            Ok(text) => text,
            Err(problem) => {
                invalid.push(invalid_row(proverb_column, problem));
                continue;
            }
        };
        let reference = match (reference_column, references) {
            (None, _) => None,
            (Some(column), References::Required) => match cell_text(&cells[column]) {
                Ok(text) => Some(text),
                Err(problem) => {
                    invalid.push(invalid_row(column, problem));
                    continue;
                }
            },
            // A test file may leave a reference empty or null, but not put a number there.
            (Some(column), References::Optional) => match &cells[column] {
                Cell::Other(what) => {
                    invalid.push(invalid_row(column, format!("is {what}, not text")));
                    continue;
                }
                cell => cell_text(cell).ok(),
            },
        };
        let example = Example {
            proverb: proverb.to_string(),
            reference: reference.map(str::to_string),
            location: *location,
        };
        if !seen.insert((example.proverb.clone(), example.reference.clone())) {
            duplicate_rows += 1;
        }
        examples.push(example);
    }
    if !invalid.is_empty() {
        let needs = match references {
            References::Required => {
                "training and validation rows need a proverb and a reference explanation, as text"
            }
            References::Optional => "every row needs a proverb, as text",
        };
        if !skip_invalid_rows {
            let mut listed: Vec<String> = invalid
                .iter()
                .take(INVALID_ROWS_LISTED)
                .map(|row| format!("  {row}"))
                .collect();
            if invalid.len() > INVALID_ROWS_LISTED {
                listed.push(format!(
                    "  ... and {} more",
                    invalid.len() - INVALID_ROWS_LISTED
                ));
            }
            bail_input!(
                "{}: {} invalid row(s) ({needs}):\n{}\nFix them, or pass --skip-invalid-rows to use the other rows",
                path.display(),
                invalid.len(),
                listed.join("\n")
            );
        }
        tracing::warn!(
            "{}: skipped {} invalid row(s) (--skip-invalid-rows): {}",
            path.display(),
            invalid.len(),
            invalid
                .iter()
                .map(|row| row.row.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if examples.is_empty() {
            bail_input!(
                "{}: every row is invalid ({needs}); the first: {}",
                path.display(),
                invalid[0]
            );
        }
    }
    if duplicate_rows > 0 {
        tracing::warn!(
            "{}: {duplicate_rows} row(s) repeat an earlier row exactly; they are kept",
            path.display()
        );
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        duplicate_rows,
        skipped: invalid,
    })
}
