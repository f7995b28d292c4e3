//! `--report-to tensorboard`: the run's logs as a TensorBoard event file, as HF
//! Trainer's TensorBoardCallback writes them (through torch's SummaryWriter): in
//! `OUT/runs/<Mon><DD>_<HH>-<MM>-<SS>_<host>/` (or $TENSORBOARD_LOGGING_DIR, as HF),
//! the tags `train/loss`, `train/learning_rate`, `train/grad_norm`, `train/epoch` and
//! `eval/loss`, one scalar per logged step.
//!
//! The file format is TFRecord: each record is its length (u64, little-endian), a
//! masked CRC-32C of those 8 bytes, the bytes of one `Event` protocol buffer, and a
//! masked CRC-32C of them. The two messages it needs (`Event` with a wall time, a step
//! and a file version or a `Summary` of `{tag, simple_value}` values) are encoded here
//! by hand, a few lines, rather than through a protobuf crate and its generated code;
//! the records equal the bytes torch's SummaryWriter writes (tested against a file it
//! wrote, `tests/golden/tensorboard.tfevents`). The file is append-only and flushed
//! after every step: a crash leaves every complete record readable, as TensorBoard
//! reads a file whose last record is cut short.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::state::LogEntry;

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC-32C (tensorflow/core/lib/hash/crc32c.h).
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CRC32C.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), ... }`'s first two fields.
fn event_header(wall_time: f64, step: i64, out: &mut Vec<u8>) {
    varint(1 << 3 | 1, out);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        // proto3 leaves a zero scalar out.
        varint(2 << 3, out);
        varint(step as u64, out);
    }
}

/// The first event of every file: `Event { wall_time, file_version = 3,
/// source_metadata = 10: SourceMetadata { writer = 1 } }` (torch names its own
/// event_file_writer there; this file names amthal).
pub fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::new();
    event_header(wall_time, 0, &mut event);
    bytes_field(3, b"brain.Event:2", &mut event);
    let mut source = Vec::new();
    bytes_field(1, WRITER.as_bytes(), &mut source);
    bytes_field(10, &source, &mut event);
    event
}

/// `SourceMetadata.writer` of the files amthal writes.
const WRITER: &str = "amthal";

/// `Event { wall_time, step, summary = 5: Summary { value = 1: Value { tag = 1,
/// simple_value = 2 (float) } } }`, one value, as SummaryWriter.add_scalar writes.
pub fn scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut value_message = Vec::new();
    bytes_field(1, tag.as_bytes(), &mut value_message);
    varint(2 << 3 | 5, &mut value_message);
    value_message.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(1, &value_message, &mut summary);
    let mut event = Vec::new();
    event_header(wall_time, step, &mut event);
    bytes_field(5, &summary, &mut event);
    event
}

/// The scalars HF's TensorBoardCallback writes for one log entry (its `rewrite_logs`:
/// `eval_*` keys become `eval/*`, the others `train/*`).
pub fn scalars_of(entry: &LogEntry) -> Vec<(&'static str, f64)> {
    let mut scalars = Vec::new();
    if let Some(loss) = entry.loss {
        scalars.push(("train/loss", loss));
    }
    if let Some(grad_norm) = entry.grad_norm {
        scalars.push(("train/grad_norm", grad_norm));
    }
    if let Some(rate) = entry.learning_rate {
        scalars.push(("train/learning_rate", rate));
    }
    if let Some(loss) = entry.eval_loss {
        scalars.push(("eval/loss", loss));
    }
    scalars.push(("train/epoch", entry.epoch));
    scalars
}

/// An open event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in HF's run folder under `out` (or $TENSORBOARD_LOGGING_DIR).
    pub fn create(out: &Path) -> Result<EventWriter> {
        let host = hostname();
        let dir = match std::env::var_os("TENSORBOARD_LOGGING_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => out.join("runs").join(format!(
                "{}_{host}",
                chrono::Local::now().format("%b%d_%H-%M-%S")
            )),
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the TensorBoard folder {}", dir.display()))?;
        let now = wall_time();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.0",
            now as u64,
            std::process::id()
        ));
        let file = File::create(&path)
            .with_context(|| format!("creating the TensorBoard file {}", path.display()))?;
        let mut writer = EventWriter { file, path };
        writer.append(&file_version_event(now))?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a log entry's scalars at its step.
    pub fn log(&mut self, entry: &LogEntry) -> Result<()> {
        let now = wall_time();
        for (tag, value) in scalars_of(entry) {
            self.append(&scalar_event(now, entry.step, tag, value as f32))?;
        }
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    fn append(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The machine's name, as socket.gethostname() gives it for HF's folder name.
fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let name = String::from_utf8_lossy(&buffer[..end]).into_owned();
    if ok && !name.is_empty() {
        name
    } else {
        "localhost".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C("123456789") = 0xE3069283 (the catalogue's check value), then
        // TFRecord's mask: rotate right by 15, add 0xa282ead8.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        let masked = 0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), masked);
    }

    /// Splits a file into its records' data, checking both CRCs of each.
    fn records_of(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut records = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let length_bytes = &bytes[at..at + 8];
            let length = u64::from_le_bytes(length_bytes.try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(length_bytes), "length CRC at {at}");
            let data = &bytes[at + 12..at + 12 + length];
            let crc = u32::from_le_bytes(
                bytes[at + 12 + length..at + 16 + length]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(crc, masked_crc(data), "data CRC at {at}");
            records.push(data.to_vec());
            at += 16 + length;
        }
        records
    }

    /// The records torch's SummaryWriter wrote for the same scalars (goldens from
    /// scripts/golden/make_tensorboard_golden.py), byte for byte.
    #[test]
    fn scalar_records_equal_summary_writers() {
        let golden = |name: &str| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(name)
        };
        let theirs = std::fs::read(golden("tensorboard.tfevents")).unwrap();
        let calls: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(golden("tensorboard.json")).unwrap())
                .unwrap();
        let calls = calls["calls"].as_array().unwrap();
        let records = records_of(&theirs);
        assert_eq!(records.len(), calls.len() + 1);
        // The first record: the file version at the time the file was opened, and the
        // writer's name (torch's, or amthal).
        let wall_time = f64::from_le_bytes(records[0][1..9].try_into().unwrap());
        let torch_writer = b"tensorboard.summary.writer.event_file_writer";
        let first = file_version_event(wall_time);
        let version_part = first.len() - WRITER.len() - 4;
        assert_eq!(records[0][..version_part], first[..version_part]);
        assert!(records[0].ends_with(torch_writer) && first.ends_with(WRITER.as_bytes()));
        let mut ours = record(&records[0]);
        for call in calls {
            let event = scalar_event(
                call["wall_time"].as_f64().unwrap(),
                call["step"].as_i64().unwrap(),
                call["tag"].as_str().unwrap(),
                call["value"].as_f64().unwrap() as f32,
            );
            ours.extend(record(&event));
        }
        assert_eq!(ours, theirs);
    }

    #[test]
    fn varints_and_fields_are_protobuf_encodings() {
        let mut out = Vec::new();
        varint(300, &mut out);
        assert_eq!(out, [0xAC, 0x02]);
        // Value { tag: "a", simple_value: 1.0 }
        let event = scalar_event(0.0, 1, "a", 1.0);
        assert_eq!(
            event,
            [
                0x09, 0, 0, 0, 0, 0, 0, 0, 0, // wall_time 0.0
                0x10, 0x01, // step 1
                0x2a, 0x0a, 0x0a, 0x08, // summary { value {
                0x0a, 0x01, b'a', // tag "a"
                0x15, 0x00, 0x00, 0x80, 0x3f, // simple_value 1.0f
            ]
        );
    }
}
