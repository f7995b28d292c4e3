//! JSON arrays of objects and JSONL (one object per line) into a table of cells. Keys
//! amthal does not use may hold anything (a numeric `id`, a `null` city); the cells of
//! the keys it does use keep what they held, so the row checks can say "is null" or
//! "is a number (5)" instead of refusing the whole file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::{Cell, Location, Table};
use crate::bail_input;
use crate::error::bad_input;

pub(super) fn read_json_table(path: &Path, text: &str) -> Result<Table> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        bad_input(format!(
            "{}: invalid JSON at line {} column {}: {e}",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    let Value::Array(items) = value else {
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

pub(super) fn read_jsonl_table(path: &Path, text: &str) -> Result<Table> {
    let mut objects = Vec::new();
    // `lines` also strips a CR before each LF (files saved on Windows).
    for (index, line) in text.lines().enumerate() {
        let location = Location::JsonlLine(index + 1);
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with('\u{FEFF}') {
            bail_input!(
                "{}: {location}: a byte-order mark (U+FEFF) at the start of a line inside the \
                 file: were two files joined together? Remove it",
                path.display()
            );
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| bad_input(format!("{}: {location}: invalid JSON: {e}", path.display())))?;
        objects.push((location, value));
    }
    objects_to_table(path, objects)
}

/// Turns JSON objects into a table whose columns are the keys in order of first use.
fn objects_to_table(
    path: &Path,
    objects: impl IntoIterator<Item = (Location, Value)>,
) -> Result<Table> {
    let mut columns: Vec<String> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    let mut keyed_rows = Vec::new();
    for (location, value) in objects {
        let Value::Object(object) = value else {
            bail_input!(
                "{}: {location}: expected a JSON object, found {}",
                path.display(),
                describe(&value)
            );
        };
        let mut row = Vec::with_capacity(object.len());
        for (key, value) in object {
            let cell = match value {
                Value::String(text) => Cell::Text(text),
                Value::Null => Cell::Null,
                other => Cell::Other(describe(&other)),
            };
            let column = *index_of.entry(key.clone()).or_insert_with(|| {
                columns.push(key);
                columns.len() - 1
            });
            row.push((column, cell));
        }
        keyed_rows.push((location, row));
    }
    let rows = keyed_rows
        .into_iter()
        .map(|(location, row)| {
            let mut cells = vec![Cell::Missing; columns.len()];
            for (column, cell) in row {
                cells[column] = cell;
            }
            (location, cells)
        })
        .collect();
    Ok(Table { columns, rows })
}

/// A JSON value as a message shows it: its type and, when short, the value.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("a boolean ({b})"),
        Value::Number(n) => format!("a number ({n})"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
