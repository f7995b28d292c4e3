//! The project's own sample data (examples/data), embedded in the binary so
//! `amthal demo` runs anywhere. Written for amthal; not the benchmark.

use std::path::Path;

use anyhow::Result;

use crate::data::{Dataset, ReadOptions, Split, read_examples_from_bytes};

const TRAIN: &[u8] = include_bytes!("../examples/data/Train_data.csv");
const VALIDATION: &[u8] = include_bytes!("../examples/data/Validation_data.csv");
const TEST: &[u8] = include_bytes!("../examples/data/Test_data.csv");

/// The bytes of one embedded split (the CSV as shipped).
pub fn sample_bytes(split: Split) -> &'static [u8] {
    match split {
        Split::Train => TRAIN,
        Split::Validation => VALIDATION,
        Split::Test => TEST,
    }
}

/// One split of the embedded sample data, read through the same reader as user files.
pub fn sample_split(split: Split) -> Result<Dataset> {
    let bytes = sample_bytes(split);
    let name = format!("<embedded>/examples/data/{}.csv", split.file_stem());
    read_examples_from_bytes(
        Path::new(&name),
        bytes,
        split.references(),
        ReadOptions::default(),
    )
}
