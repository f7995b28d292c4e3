//! Writes a GGUF file (version 3, little-endian, 32-byte alignment): the metadata,
//! the tensor table, then each tensor's bytes at an aligned offset. The inverse of
//! `crate::gguf`'s reader (hand-written for the same reason: a few dozen lines of
//! format, and no maintained crate writes it). Written to a temp name and renamed, so a
//! crash never leaves a half-written model.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use crate::atomic::write_file_with;
use crate::gguf::Value;

const ALIGNMENT: u64 = 32;

/// One tensor to write: ggml-order dims (fastest first), type, encoded bytes.
pub struct TensorEntry {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

/// Metadata (in the order given) and tensors, written to `path`.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[TensorEntry],
) -> Result<()> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&type_id(value).to_le_bytes());
        put_value(&mut header, value);
    }
    let mut offset = 0u64;
    for tensor in tensors {
        put_string(&mut header, &tensor.name);
        header.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            header.extend_from_slice(&dim.to_le_bytes());
        }
        header.extend_from_slice(&tensor.ggml_type.to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = align(offset + tensor.data.len() as u64);
    }
    header.resize(align(header.len() as u64) as usize, 0);
    write_file_with(path, |file| {
        file.write_all(&header)?;
        for tensor in tensors {
            file.write_all(&tensor.data)?;
            let padding = align(tensor.data.len() as u64) - tensor.data.len() as u64;
            file.write_all(&vec![0u8; padding as usize])?;
        }
        Ok(())
    })
}

fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// GGUF's value type ids (gguf.md `gguf_metadata_value_type`).
fn type_id(value: &Value) -> u32 {
    match value {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => put_string(out, s),
        Value::Array(items) => {
            // GGUF arrays are homogeneous: the first item's type stands for all.
            let item_type = items.first().map_or(8, type_id);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                debug_assert_eq!(type_id(item), item_type, "a mixed GGUF array");
                put_value(out, item);
            }
        }
    }
}
