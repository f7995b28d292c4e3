//! The seed's predictions CSV: `Proverb,Reference_Explanation,Generated_Explanation`,
//! UTF-8 with a BOM (Excel opens it correctly), one row per test row in input order.
//! Always written whole to a temp file and renamed, so a crash leaves the previous
//! complete version. One reader serves every command: `read_prediction_table` keeps all
//! columns (what `amthal score` and `report` need: the per-row scores file is the input
//! plus one column per metric), `read_predictions` gives the three fields (`--resume`).
//! Columns are matched case-insensitively (prediction/reference and the like accepted).

use std::path::Path;

use anyhow::Result;

use crate::atomic::write_file;
use crate::bail_input;
use crate::data::TextEncoding;
use crate::data::csv_reader::parse_csv;

pub const HEADER: [&str; 3] = ["Proverb", "Reference_Explanation", "Generated_Explanation"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PredictionRow {
    pub proverb: String,
    /// Empty when the test file has no reference.
    pub reference: String,
    pub generated: String,
}

/// Writes the rows (through a temp file and a rename).
pub fn write_predictions(path: &Path, rows: &[PredictionRow]) -> Result<()> {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        writer.write_record(HEADER)?;
        for row in rows {
            writer.write_record([&row.proverb, &row.reference, &row.generated])?;
        }
        writer.flush()?;
    }
    write_file(path, &bytes)
}

/// Reads a predictions CSV written by amthal or the seed as rows (through the one
/// reader of the format, `read_prediction_table`).
pub fn read_predictions(path: &Path) -> Result<Vec<PredictionRow>> {
    let table = read_prediction_table(path, TextEncoding::Auto)?;
    Ok((0..table.len())
        .map(|row| PredictionRow {
            proverb: table.proverb(row).to_string(),
            reference: table.reference(row).to_string(),
            generated: table.generated(row).to_string(),
        })
        .collect())
}

/// Column names accepted for the generated text, matched case-insensitively.
const GENERATED_NAMES: [&str; 4] = [
    "generated_explanation",
    "prediction",
    "generated",
    "hypothesis",
];
/// Column names accepted for the reference text.
const REFERENCE_NAMES: [&str; 3] = ["reference_explanation", "reference", "explanation"];
/// Column names accepted for the proverb (optional; used by reports).
const PROVERB_NAMES: [&str; 3] = ["proverb", "proverbs", "text"];

/// A predictions file with all its columns.
#[derive(Debug, Clone)]
pub struct PredictionTable {
    pub headers: Vec<String>,
    pub records: Vec<Vec<String>>,
    generated: usize,
    reference: Option<usize>,
    proverb: Option<usize>,
}

impl PredictionTable {
    pub fn generated(&self, row: usize) -> &str {
        &self.records[row][self.generated]
    }

    /// The reference of a row, or "" when the file has no reference column.
    pub fn reference(&self, row: usize) -> &str {
        self.reference.map_or("", |i| self.records[row][i].as_str())
    }

    /// The proverb of a row, or "" when the file has no proverb column.
    pub fn proverb(&self, row: usize) -> &str {
        self.proverb.map_or("", |i| self.records[row][i].as_str())
    }

    /// Whether the file has a proverb column.
    pub fn has_proverbs(&self) -> bool {
        self.proverb.is_some()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

fn find_column(headers: &[String], names: &[&str]) -> Vec<usize> {
    headers
        .iter()
        .enumerate()
        .filter(|(_, h)| names.contains(&h.trim().to_lowercase().as_str()))
        .map(|(i, _)| i)
        .collect()
}

/// Picks the one column with one of `names`; two candidates are an error, not a guess.
fn one_column(path: &Path, headers: &[String], names: &[&str], what: &str) -> Result<usize> {
    match find_column(headers, names).as_slice() {
        [one] => Ok(*one),
        [] => bail_input!(
            "{}: no {what} column (expected one of {}); found {}",
            path.display(),
            names.join(", "),
            headers.join(", ")
        ),
        many => bail_input!(
            "{}: several {what} columns ({}); keep one",
            path.display(),
            many.iter()
                .map(|&i| headers[i].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Reads a predictions CSV through the strict CSV reader (`data::csv_reader`): an
/// unterminated quote or a row with a different number of fields than the header is
/// an error naming the line.
pub fn read_prediction_table(path: &Path, encoding: TextEncoding) -> Result<PredictionTable> {
    let bytes = crate::data::read_file(path)?;
    let text = crate::data::text::decode(path, &bytes, encoding)?;
    let csv = parse_csv(path, &text)?;
    let headers = csv.header;
    let generated = one_column(path, &headers, &GENERATED_NAMES, "generated-text")?;
    // A file without references (generated for an unlabelled test set) still gets the
    // task checks; every row is then reported as not scored.
    let reference = if find_column(&headers, &REFERENCE_NAMES).is_empty() {
        tracing::warn!(
            "{}: no reference column ({}); no row can be scored against a reference, only checked",
            path.display(),
            REFERENCE_NAMES.join(", ")
        );
        None
    } else {
        Some(one_column(path, &headers, &REFERENCE_NAMES, "reference")?)
    };
    let proverb = find_column(&headers, &PROVERB_NAMES).first().copied();
    let records = csv.records.into_iter().map(|r| r.fields).collect();
    Ok(PredictionTable {
        headers,
        records,
        generated,
        reference,
        proverb,
    })
}
