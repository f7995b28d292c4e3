//! A data file's bytes to text. Arabic files come in three encodings in practice:
//! UTF-8 (with or without a byte-order mark), UTF-16 with a BOM (Excel's "Unicode
//! text"), and Windows-1256 (Excel's plain "CSV" on Arabic Windows). `auto` trusts a
//! BOM, else requires UTF-8 and, when the bytes are not UTF-8, names the first bad
//! byte and suggests the flag that reads the file. Decoding uses `encoding_rs`.
//!
//! Two byte-level problems are refused here for every format, because no reader can
//! recover the rows after them: a NUL byte (binary data, or UTF-16 without a BOM).

use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::bail_input;

/// `--encoding`: how a data file's bytes become text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
pub enum TextEncoding {
    /// A byte-order mark decides (UTF-8 or UTF-16); without one the file must be UTF-8.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[value(name = "utf-8", alias = "utf8")]
    #[serde(rename = "utf-8", alias = "utf8")]
    Utf8,
    /// UTF-16; little-endian unless a BOM says otherwise (Windows' default).
    #[value(name = "utf-16", alias = "utf16")]
    #[serde(rename = "utf-16", alias = "utf16")]
    Utf16,
    /// Windows-1256, the Arabic code page of Windows and Excel.
    #[value(name = "cp1256", alias = "windows-1256")]
    #[serde(rename = "cp1256", alias = "windows-1256")]
    Cp1256,
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";
const UTF16LE_BOM: &[u8] = b"\xFF\xFE";
const UTF16BE_BOM: &[u8] = b"\xFE\xFF";

/// Decodes a whole file; `path` names it in messages. The leading BOM is removed.
pub fn decode(path: &Path, bytes: &[u8], encoding: TextEncoding) -> Result<String> {
    let text = match encoding {
        TextEncoding::Auto => {
            if bytes.starts_with(UTF16LE_BOM) || bytes.starts_with(UTF16BE_BOM) {
                decode_utf16(path, bytes)?
            } else {
                decode_utf8(path, bytes, true)?
            }
        }
        TextEncoding::Utf8 => decode_utf8(path, bytes, false)?,
        TextEncoding::Utf16 => decode_utf16(path, bytes)?,
        TextEncoding::Cp1256 => {
            if bytes.starts_with(UTF8_BOM) {
                bail_input!(
                    "{}: the file starts with a UTF-8 byte-order mark, so it is UTF-8, not \
                     cp1256; drop --encoding cp1256",
                    path.display()
                );
            }
            // Every byte has a character in Windows-1256 (WHATWG's table), so this
            // cannot fail; the `had_errors` flag is checked all the same.
            let (text, had_errors) = encoding_rs::WINDOWS_1256.decode_without_bom_handling(bytes);
            if had_errors {
                bail_input!("{}: not valid Windows-1256 text", path.display());
            }
            text.into_owned()
        }
    };
    if let Some(offset) = text.find('\0') {
        bail_input!(
            "{}: line {}: a NUL byte: this is binary data, or UTF-16 text without a \
             byte-order mark (try --encoding utf-16)",
            path.display(),
            line_of(text.as_bytes(), offset)
        );
    }
    Ok(text)
}

/// The 1-based line of a byte offset.
pub fn line_of(bytes: &[u8], offset: usize) -> usize {
    1 + bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

fn decode_utf8(path: &Path, bytes: &[u8], auto: bool) -> Result<String> {
    let body = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(error) => {
            let at = error.valid_up_to();
            let offset = at + (bytes.len() - body.len());
            let hint = if auto {
                "; if Excel saved it as \"CSV\" on Arabic Windows, read it with --encoding \
                 cp1256 (or save it as \"CSV UTF-8\")"
            } else {
                "; try --encoding cp1256 or --encoding utf-16"
            };
            bail_input!(
                "{}: line {}: not UTF-8: byte 0x{:02X} at byte offset {offset} is invalid{hint}",
                path.display(),
                line_of(bytes, offset),
                body[at]
            )
        }
    }
}

fn decode_utf16(path: &Path, bytes: &[u8]) -> Result<String> {
    let (codec, body) = if let Some(body) = bytes.strip_prefix(UTF16BE_BOM) {
        (encoding_rs::UTF_16BE, body)
    } else {
        (
            encoding_rs::UTF_16LE,
            bytes.strip_prefix(UTF16LE_BOM).unwrap_or(bytes),
        )
    };
    match codec.decode_without_bom_handling_and_without_replacement(body) {
        Some(text) => Ok(text.into_owned()),
        None => bail_input!(
            "{}: not valid {} text (an odd number of bytes, or a broken surrogate pair)",
            path.display(),
            codec.name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("d.csv")
    }

    #[test]
    fn auto_follows_the_bom_and_else_requires_utf8() {
        let text = "مثل,شرح\n";
        let mut utf8 = UTF8_BOM.to_vec();
        utf8.extend_from_slice(text.as_bytes());
        assert_eq!(decode(path(), &utf8, TextEncoding::Auto).unwrap(), text);
        let mut le = UTF16LE_BOM.to_vec();
        le.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
        assert_eq!(decode(path(), &le, TextEncoding::Auto).unwrap(), text);
        let mut be = UTF16BE_BOM.to_vec();
        be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
        assert_eq!(decode(path(), &be, TextEncoding::Auto).unwrap(), text);
    }

    #[test]
    fn cp1256_bytes_name_the_offset_and_the_flag() {
        let (bytes, _, _) = encoding_rs::WINDOWS_1256.encode("Proverbs\nمثل\n");
        let error = decode(path(), &bytes, TextEncoding::Auto).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("byte offset 9") && message.contains("line 2"),
            "{message}"
        );
        assert!(message.contains("--encoding cp1256"), "{message}");
        assert_eq!(
            decode(path(), &bytes, TextEncoding::Cp1256).unwrap(),
            "Proverbs\nمثل\n"
        );
    }

    #[test]
    fn nul_bytes_are_refused_with_their_line() {
        let message = decode(path(), b"a\nb\0c\n", TextEncoding::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 2") && message.contains("NUL"),
            "{message}"
        );
        // UTF-16 without a BOM is full of NULs when read as UTF-8: the hint names the flag.
        assert!(message.contains("--encoding utf-16"), "{message}");
    }

    #[test]
    fn utf16_without_bom_is_little_endian_and_odd_lengths_fail() {
        let le: Vec<u8> = "أ,ب".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(decode(path(), &le, TextEncoding::Utf16).unwrap(), "أ,ب");
        assert!(decode(path(), &le[..3], TextEncoding::Utf16).is_err());
    }
}
