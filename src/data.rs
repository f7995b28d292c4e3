//! Reading proverb data: CSV, JSON arrays and JSONL into `Example`s.
//!
//! Columns are matched case-insensitively through aliases, so the benchmark files
//! (`Proverbs`, `Explanation`), the seed's predictions CSV (`Proverb`,
//! `Reference_Explanation`) and hand-made JSONL (`text`, `reference`) all read the same.
//! Every problem is a `BadInput` naming the file, the row and what is wrong; nothing is
//! ever written by this module.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bail_input;
use crate::error::bad_input;

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
pub fn read_split(dir: &Path, split: Split) -> Result<Dataset> {
    read_examples(&split_path(dir, split)?, split.references())
}

/// Reads a CSV, JSON-array or JSONL file of proverbs. The format comes from the
/// extension (.csv, .json, .jsonl/.ndjson), or from the first character otherwise.
pub fn read_examples(path: &Path, references: References) -> Result<Dataset> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail_input!("{}: file not found", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    read_examples_from_bytes(path, &bytes, references)
}

/// Reads examples from bytes already in memory; `path` names them in messages and
/// picks the format by extension.
pub fn read_examples_from_bytes(
    path: &Path,
    bytes: &[u8],
    references: References,
) -> Result<Dataset> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let table = match detect_format(path, bytes) {
        Format::Csv => read_csv_table(path, bytes)?,
        Format::Json => read_json_table(path, bytes)?,
        Format::Jsonl => read_jsonl_table(path, bytes)?,
    };
    table_to_dataset(path, table, references)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Json,
    Jsonl,
}

fn detect_format(path: &Path, bytes: &[u8]) -> Format {
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("csv") => Format::Csv,
        Some("json") => Format::Json,
        Some("jsonl") | Some("ndjson") => Format::Jsonl,
        _ => match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => Format::Json,
            Some(b'{') => Format::Jsonl,
            _ => Format::Csv,
        },
    }
}

/// A file read into columns and rows of optional strings, before column matching.
struct Table {
    columns: Vec<String>,
    rows: Vec<(Location, Vec<Option<String>>)>,
}

fn read_csv_table(path: &Path, bytes: &[u8]) -> Result<Table> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let headers = reader
        .byte_headers()
        .map_err(|e| {
            bad_input(format!(
                "{}: cannot read the CSV header: {e}",
                path.display()
            ))
        })?
        .clone();
    let mut columns = Vec::with_capacity(headers.len());
    for field in headers.iter() {
        let name = std::str::from_utf8(field).map_err(|_| {
            bad_input(format!(
                "{}: header (line 1): invalid UTF-8",
                path.display()
            ))
        })?;
        columns.push(name.to_string());
    }
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let row = rows.len() + 1;
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => bail_input!("{}: row {row}: malformed CSV: {e}", path.display()),
        }
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let location = Location::CsvRow { row, line };
        if record.len() > columns.len() {
            bail_input!(
                "{}: {location}: {} fields but the header has {} columns (an unquoted comma?)",
                path.display(),
                record.len(),
                columns.len()
            );
        }
        let mut values = Vec::with_capacity(columns.len());
        for (index, field) in record.iter().enumerate() {
            let text = std::str::from_utf8(field).map_err(|_| {
                bad_input(format!(
                    "{}: {location}: invalid UTF-8 in column '{}' (save the file as UTF-8)",
                    path.display(),
                    columns[index]
                ))
            })?;
            values.push(Some(text.to_string()));
        }
        values.resize(columns.len(), None);
        rows.push((location, values));
    }
    Ok(Table { columns, rows })
}

fn read_json_table(path: &Path, bytes: &[u8]) -> Result<Table> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        bad_input(format!(
            "{}: invalid JSON at line {} column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    let serde_json::Value::Array(items) = value else {
        bail_input!(
            "{}: expected a JSON array of objects (or use .jsonl for one object per line)",
            path.display()
        );
    };
    let objects = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| (Location::JsonItem(index + 1), item));
    objects_to_table(path, objects)
}

fn read_jsonl_table(path: &Path, bytes: &[u8]) -> Result<Table> {
    let mut objects = Vec::new();
    for (index, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let location = Location::JsonlLine(index + 1);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if std::str::from_utf8(line).is_err() {
            bail_input!("{}: {location}: invalid UTF-8", path.display());
        }
        let value: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| bad_input(format!("{}: {location}: invalid JSON: {e}", path.display())))?;
        objects.push((location, value));
    }
    objects_to_table(path, objects)
}

/// Turns JSON objects into a table whose columns are the keys in order of first use.
fn objects_to_table(
    path: &Path,
    objects: impl IntoIterator<Item = (Location, serde_json::Value)>,
) -> Result<Table> {
    let mut columns: Vec<String> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut keyed_rows = Vec::new();
    for (location, value) in objects {
        let serde_json::Value::Object(object) = value else {
            bail_input!("{}: {location}: expected a JSON object", path.display());
        };
        let mut row = Vec::new();
        for (key, value) in object {
            let text = match value {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Null => None,
                other => bail_input!(
                    "{}: {location}: field '{key}' must be a string, found {other}",
                    path.display()
                ),
            };
            let column = *index_of.entry(key.clone()).or_insert_with(|| {
                columns.push(key);
                columns.len() - 1
            });
            row.push((column, text));
        }
        keyed_rows.push((location, row));
    }
    let rows = keyed_rows
        .into_iter()
        .map(|(location, row)| {
            let mut values = vec![None; columns.len()];
            for (column, text) in row {
                values[column] = text;
            }
            (location, values)
        })
        .collect();
    Ok(Table { columns, rows })
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

fn table_to_dataset(path: &Path, table: Table, references: References) -> Result<Dataset> {
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
    let mut seen = std::collections::HashSet::new();
    let mut duplicate_rows = 0;
    for (location, values) in table.rows {
        let proverb = values[proverb_column].as_deref().unwrap_or("").trim();
        if proverb.is_empty() {
            bail_input!("{}: {location}: empty proverb", path.display());
        }
        let reference = reference_column
            .and_then(|c| values[c].as_deref())
            .map(str::trim)
            .filter(|r| !r.is_empty());
        if reference.is_none() && references == References::Required {
            bail_input!(
                "{}: {location}: empty reference explanation (training and validation rows need one)",
                path.display()
            );
        }
        let example = Example {
            proverb: proverb.to_string(),
            reference: reference.map(str::to_string),
            location,
        };
        if !seen.insert((example.proverb.clone(), example.reference.clone())) {
            duplicate_rows += 1;
        }
        examples.push(example);
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
    })
}
