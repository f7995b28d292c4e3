//! A strict RFC 4180 CSV reader: every record has the header's number of fields, and
//! anything that would make a reader guess where a row ends is an error naming the
//! line, never a merge. The cases (each an error, exit 2):
//! - a quoted field that is never closed (pandas: "EOF inside string"; the `csv` crate
//!   silently turns the rest of the file into one field): the line where it opened;
//! - a quote inside an unquoted field (`ab"c`), or text after a closing quote (`"a"b`);
//! - a record with more or fewer fields than the header;
//! - a carriage return not followed by a line feed outside quotes (old Mac endings, or
//!   a stray `\r` that splits a row in two);
//! - a byte-order mark at the start of a later line (two files joined together).
//!
//! Empty lines between records are skipped, as pandas does. Inside quotes anything
//! goes: commas, line breaks (CRLF kept as written), doubled quotes for one quote.
//!
//! Why not the `csv` crate: it is deliberately lenient (an unterminated quote runs to
//! the end of the file, text after a closing quote is appended, a lone `\r` ends a
//! record) and its errors cannot say where a quote opened. Strictness needs the state
//! machine itself, and RFC 4180 is small enough to read in one screen. Writing still
//! uses the `csv` crate, whose output this reader accepts.

use std::path::Path;

use anyhow::Result;

use crate::bail_input;

/// One data record and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRecord {
    pub line: u64,
    pub fields: Vec<String>,
}

/// A whole CSV file: the header's column names and the data records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvTable {
    pub header: Vec<String>,
    pub records: Vec<CsvRecord>,
}

/// Parses decoded text (no leading BOM: `text::decode` removes it).
pub fn parse_csv(path: &Path, text: &str) -> Result<CsvTable> {
    let mut parser = Parser {
        path,
        bytes: text.as_bytes(),
        text,
        at: 0,
        line: 1,
    };
    let mut header: Option<Vec<String>> = None;
    let mut records = Vec::new();
    while let Some((line, fields)) = parser.record()? {
        match &header {
            None => header = Some(fields),
            Some(columns) => {
                if fields.len() != columns.len() {
                    let hint = if fields.len() > columns.len() {
                        "an unquoted comma inside a field?"
                    } else {
                        "a missing comma, or a line break inside an unquoted field?"
                    };
                    bail_input!(
                        "{}: row {} (line {line}): {} field(s) but the header has {} columns ({hint})",
                        path.display(),
                        records.len() + 1,
                        fields.len(),
                        columns.len()
                    );
                }
                records.push(CsvRecord { line, fields });
            }
        }
    }
    let Some(header) = header else {
        bail_input!("{}: empty file (no header line)", path.display());
    };
    Ok(CsvTable { header, records })
}

struct Parser<'a> {
    path: &'a Path,
    text: &'a str,
    bytes: &'a [u8],
    /// Byte offset of the next unread byte (always on a char boundary between fields).
    at: usize,
    /// 1-based line of `at`.
    line: u64,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// The next record and its first line, skipping blank lines; None at the end.
    fn record(&mut self) -> Result<Option<(u64, Vec<String>)>> {
        self.skip_blank_lines()?;
        if self.at >= self.bytes.len() {
            return Ok(None);
        }
        if self.text[self.at..].starts_with('\u{FEFF}') {
            bail_input!(
                "{}: line {}: a byte-order mark (U+FEFF) at the start of a line inside \
                 the file: were two files joined together? Remove it",
                self.path.display(),
                self.line
            );
        }
        let line = self.line;
        let mut fields = Vec::new();
        loop {
            let field = if self.peek() == Some(b'"') {
                self.quoted_field()?
            } else {
                self.unquoted_field()?
            };
            fields.push(field);
            if self.peek() == Some(b',') {
                self.at += 1;
            } else {
                self.end_of_line()?;
                return Ok(Some((line, fields)));
            }
        }
    }

    /// Skips empty lines (a line of spaces is a record: its one field may be a row
    /// the user meant, so it is checked, not dropped).
    fn skip_blank_lines(&mut self) -> Result<()> {
        while matches!(self.peek(), Some(b'\n') | Some(b'\r')) {
            self.end_of_line()?;
        }
        Ok(())
    }

    /// Consumes `\n`, `\r\n` or the end of the text; a lone `\r` is an error.
    fn end_of_line(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(b'\n') => {
                self.at += 1;
                self.line += 1;
                Ok(())
            }
            Some(b'\r') if self.bytes.get(self.at + 1) == Some(&b'\n') => {
                self.at += 2;
                self.line += 1;
                Ok(())
            }
            Some(b'\r') => bail_input!(
                "{}: line {}: a carriage return (\\r) not followed by a line feed, outside \
                 quotes: old Mac line endings, or a stray \\r that would split a row; save \
                 the file with CRLF or LF line endings",
                self.path.display(),
                self.line
            ),
            Some(other) => unreachable!("end_of_line called before {:?}", other as char),
        }
    }

    /// An unquoted field: up to the next comma or line end. A quote inside is an error.
    fn unquoted_field(&mut self) -> Result<String> {
        let start = self.at;
        while let Some(byte) = self.peek() {
            match byte {
                b',' | b'\n' | b'\r' => break,
                b'"' => bail_input!(
                    "{}: line {}: a quote inside an unquoted field; a field with quotes must \
                     be quoted whole, with each inner quote doubled (\"ab\"\"c\")",
                    self.path.display(),
                    self.line
                ),
                _ => self.at += 1,
            }
        }
        // Only ASCII bytes delimit fields, so both ends are char boundaries.
        Ok(self.text[start..self.at].to_string())
    }

    /// A quoted field: `"..."` with `""` for one quote; must be followed by a comma,
    /// a line end or the end of the file.
    fn quoted_field(&mut self) -> Result<String> {
        let opened_on = self.line;
        self.at += 1;
        let mut value = String::new();
        loop {
            let rest = &self.bytes[self.at..];
            let Some(quote) = rest.iter().position(|&b| b == b'"') else {
                bail_input!(
                    "{}: line {opened_on}: a quoted field opens here and is never closed (the \
                     rest of the file would become one field); close the quote, or double \
                     the quote if it belongs to the text",
                    self.path.display()
                );
            };
            let chunk = &self.text[self.at..self.at + quote];
            self.line += chunk.bytes().filter(|&b| b == b'\n').count() as u64;
            value.push_str(chunk);
            self.at += quote + 1;
            if self.peek() == Some(b'"') {
                value.push('"');
                self.at += 1;
                continue;
            }
            return match self.peek() {
                None | Some(b',') | Some(b'\n') | Some(b'\r') => Ok(value),
                Some(_) => bail_input!(
                    "{}: line {}: text after the closing quote of a field (opened on line \
                     {opened_on}); a quote inside a field must be doubled (\"\")",
                    self.path.display(),
                    self.line
                ),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CsvTable> {
        parse_csv(Path::new("d.csv"), text)
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("should be refused"))
    }

    #[test]
    fn quoting_multiline_fields_and_line_numbers() {
        let table = parse("a,b\r\n\"x,\"\"y\"\"\nz\",w\r\n\r\n\n,\n").unwrap();
        assert_eq!(table.header, ["a", "b"]);
        assert_eq!(table.records.len(), 2);
        assert_eq!(table.records[0].fields, ["x,\"y\"\nz", "w"]);
        assert_eq!(table.records[0].line, 2);
        assert_eq!(table.records[1].fields, ["", ""]);
        assert_eq!(table.records[1].line, 6);
    }

    #[test]
    fn csv_crate_output_reads_back() {
        let rows = [
            ["مثل, بفاصلة", "شرح \"مقتبس\"\r\nسطر"],
            ["", " "],
            ["\r", "x\ry"],
        ];
        let mut bytes = Vec::new();
        {
            let mut writer = csv::Writer::from_writer(&mut bytes);
            writer.write_record(["p", "e"]).unwrap();
            for row in rows {
                writer.write_record(row).unwrap();
            }
        }
        let table = parse(std::str::from_utf8(&bytes).unwrap()).unwrap();
        let read: Vec<Vec<String>> = table.records.into_iter().map(|r| r.fields).collect();
        assert_eq!(read, rows.map(|r| r.map(str::to_string).to_vec()));
    }

    #[test]
    fn an_unterminated_quote_names_the_line_it_opened_on() {
        let message = error("Proverbs,Explanation\n\"a,b\",c\n\"unterminated,شرح\nx,y\n");
        assert!(
            message.contains("line 3") && message.contains("never closed"),
            "{message}"
        );
    }

    #[test]
    fn the_neighbours_of_an_unterminated_quote() {
        for (text, line, what) in [
            ("a,b\nab\"c,d\n", "line 2", "quote inside an unquoted field"),
            ("a,b\n\"a\"b,c\n", "line 2", "after the closing quote"),
            (
                "a,b\n1,2\n1,2,3\n",
                "line 3",
                "3 field(s) but the header has 2",
            ),
            (
                "a,b\n1,2\n1\n",
                "row 2 (line 3)",
                "1 field(s) but the header has 2",
            ),
            ("a,b\n1,2\r3,4\n", "line 2", "carriage return"),
            ("a,b\n1,2\n\u{FEFF}a,b\n", "line 3", "byte-order mark"),
        ] {
            let message = error(text);
            assert!(
                message.contains(line) && message.contains(what),
                "{text:?}: {message}"
            );
        }
    }

    #[test]
    fn empty_text_has_no_header() {
        assert!(error("\n\r\n\n").contains("no header"));
    }
}
