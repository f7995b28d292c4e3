//! What model-running commands share: resolve --model, pick device and dtype, load
//! the weights and the tokenizer, attach an adapter.

use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind};

use crate::device::{Precision, kind_name, parse_device, resolve_precision};
use crate::model::lora::{LoraConfig, load_adapter};
use crate::model::quantized::Quantization;
use crate::model::{Llama, LoadOptions, load_llama};
use crate::model_source::ModelSource;
use crate::tokenizer::ModelTokenizer;

/// A model ready to run, with what it was loaded from.
pub struct LoadedModel {
    pub source: ModelSource,
    pub model: Llama,
    pub tokenizer: ModelTokenizer,
    pub adapter: Option<LoraConfig>,
    /// Seconds spent reading the weights onto the device (adapter included).
    pub load_seconds: f64,
}

impl LoadedModel {
    pub fn describe(&self) -> String {
        format!(
            "{} ({} on {:?}{}{})",
            self.source.display(),
            kind_name(self.model.kind),
            self.model.device,
            match self.model.quantization {
                Some(q) => format!(", projections in {q}"),
                None => String::new(),
            },
            match &self.adapter {
                Some(a) => format!(", LoRA r={} alpha={}", a.r, a.alpha),
                None => String::new(),
            }
        )
    }
}

/// Loads `--model` (default: the embedded SmolLM2) with an optional `--adapter`,
/// its projections quantized if `quantize` says so.
pub fn load_model(
    model: Option<&str>,
    adapter: Option<&Path>,
    device: &str,
    precision: Precision,
    quantize: Option<Quantization>,
) -> Result<LoadedModel> {
    let source = ModelSource::resolve(model)?;
    let device: Device = parse_device(device)?;
    let kind: Kind = resolve_precision(precision, device);
    let tokenizer = source.tokenizer()?;
    let started = std::time::Instant::now();
    let options = LoadOptions {
        device,
        kind,
        quantize,
    };
    let mut llama =
        load_llama(&source, options).with_context(|| format!("loading {}", source.display()))?;
    let adapter = match adapter {
        Some(dir) => Some(
            load_adapter(&mut llama, dir)
                .with_context(|| format!("loading adapter {}", dir.display()))?,
        ),
        None => None,
    };
    if let Device::Cuda(index) = device {
        crate::cuda::synchronize(index);
    }
    Ok(LoadedModel {
        source,
        model: llama,
        tokenizer,
        adapter,
        load_seconds: started.elapsed().as_secs_f64(),
    })
}
