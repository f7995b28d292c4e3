//! A reader for GGUF files (llama.cpp's model format): the header, the metadata
//! key/values and the tensor table. Tensor bytes are not read here; `data_offset`
//! and each tensor's `offset` say where they are.
//!
//! Hand-written rather than a crate: the format is a few dozen lines to parse, and the
//! crates that read it either come inside a whole tensor engine (candle) or are not
//! maintained. Spec: ggml's docs/gguf.md (little-endian, versions 2 and 3).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bail_input;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an integer, whatever integer type the file used.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::I8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// A tensor's entry in the table: its shape in ggml order (fastest dimension first),
/// its ggml type id, and its byte offset from `GgufFile::data_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// A parsed GGUF header: metadata and tensor table.
#[derive(Debug, Clone)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset where tensor data starts (aligned).
    pub data_offset: u64,
}

impl GgufFile {
    /// Reads the header of a GGUF file. Errors name the file and what is wrong.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| {
            crate::error::bad_input(format!("{}: cannot open GGUF file: {e}", path.display()))
        })?;
        let mut reader = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            position: 0,
        };
        parse(path, &mut reader).with_context(|| format!("{}: reading GGUF header", path.display()))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key).and_then(Value::as_i64)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`); an error if present with another type.
    pub fn get_strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get_array(key, "strings", Value::as_str)
    }

    /// An integer array (e.g. `tokenizer.ggml.token_type`).
    pub fn get_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.get_array(key, "integers", Value::as_i64)
    }

    /// A float array (e.g. `tokenizer.ggml.scores`).
    pub fn get_floats(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.get_array(key, "numbers", Value::as_f64)
    }

    /// An array whose every item `convert` accepts; `None` when the key is absent.
    fn get_array<'a, T>(
        &'a self,
        key: &str,
        item_kind: &str,
        convert: impl Fn(&'a Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array"))?;
        items
            .iter()
            .map(|v| {
                convert(v).ok_or_else(|| self.wrong_type(key, &format!("an array of {item_kind}")))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn wrong_type(&self, key: &str, expected: &str) -> anyhow::Error {
        crate::error::bad_input(format!(
            "{}: GGUF metadata '{key}' should be {expected}",
            self.path.display()
        ))
    }
}

/// A byte reader that counts its position (tensor data is aligned from the file start).
struct Reader<R> {
    inner: R,
    position: u64,
}

impl<R: Read> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut buffer = [0u8; N];
        self.inner
            .read_exact(&mut buffer)
            .context("unexpected end of file")?;
        self.position += N as u64;
        Ok(buffer)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String> {
        let length = self.u64()?;
        if length > 1 << 30 {
            anyhow::bail!("string length {length} is not plausible (corrupt file?)");
        }
        let mut buffer = vec![0u8; length as usize];
        self.inner
            .read_exact(&mut buffer)
            .context("unexpected end of file")?;
        self.position += length;
        // llama.cpp writes some vocabularies with invalid UTF-8 byte tokens; keep them lossily.
        Ok(String::from_utf8(buffer)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    fn value(&mut self, type_id: u32) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(u8::from_le_bytes(self.bytes()?)),
            1 => Value::I8(i8::from_le_bytes(self.bytes()?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let count = self.u64()?;
                if count > 1 << 28 {
                    anyhow::bail!("array length {count} is not plausible (corrupt file?)");
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(item_type)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => anyhow::bail!("unknown metadata value type {other}"),
        })
    }
}

fn parse<R: Read>(path: &Path, reader: &mut Reader<R>) -> Result<GgufFile> {
    let magic: [u8; 4] = reader.bytes()?;
    if &magic != MAGIC {
        bail_input!("{}: not a GGUF file (bad magic bytes)", path.display());
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        bail_input!(
            "{}: GGUF version {version} is not supported (2 and 3 are)",
            path.display()
        );
    }
    let tensor_count = reader.u64()?;
    let metadata_count = reader.u64()?;
    let mut metadata = BTreeMap::new();
    for _ in 0..metadata_count {
        let key = reader.string()?;
        let type_id = reader.u32()?;
        let value = reader
            .value(type_id)
            .with_context(|| format!("metadata '{key}'"))?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let name = reader.string()?;
        let n_dims = reader.u32()?;
        if n_dims > 8 {
            anyhow::bail!("tensor '{name}' has {n_dims} dimensions (corrupt file?)");
        }
        let dims = (0..n_dims)
            .map(|_| reader.u64())
            .collect::<Result<Vec<_>>>()?;
        let ggml_type = reader.u32()?;
        let offset = reader.u64()?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_i64)
        .map(|a| a as u64)
        .unwrap_or(DEFAULT_ALIGNMENT);
    let data_offset = reader.position.div_ceil(alignment) * alignment;
    Ok(GgufFile {
        path: path.to_path_buf(),
        version,
        metadata,
        tensors,
        data_offset,
    })
}
