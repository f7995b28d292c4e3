//! The seed's predictions CSV: `Proverb,Reference_Explanation,Generated_Explanation`,
//! UTF-8 with a BOM (Excel opens it correctly), one row per test row in input order.
//! Always written whole to a temp file and renamed, so a crash leaves the previous
//! complete version.

use std::path::Path;

use anyhow::Result;

use crate::atomic::write_file;
use crate::bail_input;
use crate::error::bad_input;

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

/// Reads a predictions CSV written by amthal or the seed (column names matched
/// case-insensitively; `prediction`/`reference` accepted too).
pub fn read_predictions(path: &Path) -> Result<Vec<PredictionRow>> {
    let bytes = std::fs::read(path)
        .map_err(|e| bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let headers: Vec<String> = reader
        .headers()
        .map_err(|e| bad_input(format!("{}: cannot read the header: {e}", path.display())))?
        .iter()
        .map(|h| h.trim().to_lowercase())
        .collect();
    let find = |names: &[&str]| headers.iter().position(|h| names.contains(&h.as_str()));
    let proverb = find(&["proverb", "proverbs", "text"]);
    let reference = find(&["reference_explanation", "reference", "explanation"]);
    let Some(generated) = find(&["generated_explanation", "prediction", "generated"]) else {
        bail_input!(
            "{}: no Generated_Explanation column; found {}",
            path.display(),
            headers.join(", ")
        );
    };
    let mut rows = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let record =
            record.map_err(|e| bad_input(format!("{}: row {}: {e}", path.display(), index + 1)))?;
        let field = |i: Option<usize>| i.and_then(|i| record.get(i)).unwrap_or("").to_string();
        rows.push(PredictionRow {
            proverb: field(proverb),
            reference: field(reference),
            generated: field(Some(generated)),
        });
    }
    Ok(rows)
}
