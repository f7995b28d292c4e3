//! Before loading anything on a GPU: does the chosen setup fit the card? If not, say
//! so with the estimate and the first flag that would fit (`memory_estimate.rs`).

use anyhow::Result;
use tch::{Device, Kind};

use super::config::TrainConfig;
use crate::bail_input;
use crate::model::config::LlamaConfig;

/// On CUDA, refuses a setup whose estimated memory exceeds the device's free memory,
/// before loading anything, naming the estimate and the first flag that would fit.
pub fn check_fits_the_device(
    config: &TrainConfig,
    model_config: &LlamaConfig,
    device: Device,
    kind: Kind,
) -> Result<()> {
    use super::memory_estimate::{Setup, estimate};
    use super::moments::OptimKind;
    let Device::Cuda(index) = device else {
        return Ok(());
    };
    let Some(free) = crate::cuda::devices()
        .get(index)
        .map(|d| d.free_bytes)
        .filter(|&f| f > 0)
    else {
        return Ok(());
    };
    let setup = setup_of(config, model_config, kind)?;
    let needed = estimate(&setup);
    eprintln!(
        "estimated GPU memory: {} of {:.1} GB free on cuda:{index}",
        needed.describe(),
        free as f64 / 1e9
    );
    let host_available = host_available_bytes();
    if let Some(available) = host_available.filter(|&a| needed.host_optimizer > a) {
        bail_input!(
            "--offload-optimizer keeps {:.1} GB of optimizer state in host memory but only {:.1} GB is available; \
             a smaller state would fit: --optim adamw-8bit (about 4 bytes a parameter) or --optim adamw-bf16 (6)",
            needed.host_optimizer as f64 / 1e9,
            available as f64 / 1e9
        );
    }
    if needed.total() <= free as u64 {
        return Ok(());
    }
    let fits = |alternative: &Setup| {
        let estimate = estimate(alternative);
        estimate.total() <= free as u64
            && host_available.is_none_or(|available| estimate.host_optimizer <= available)
    };
    let alternatives = [
        (
            "--optim adamw-bf16",
            Setup {
                optim: OptimKind::AdamWBf16,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit",
            Setup {
                optim: OptimKind::AdamW8bit,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit --gradient-checkpointing",
            Setup {
                optim: OptimKind::AdamW8bit,
                gradient_checkpointing: true,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit --optim-in-backward",
            Setup {
                optim: OptimKind::AdamW8bit,
                gradient_checkpointing: true,
                optim_in_backward: true,
                ..setup.clone()
            },
        ),
        (
            "--gradient-checkpointing --offload-optimizer",
            Setup {
                gradient_checkpointing: true,
                offload_optimizer: true,
                ..setup.clone()
            },
        ),
        (
            "--optim adamw-8bit --gradient-checkpointing --offload-optimizer",
            Setup {
                optim: OptimKind::AdamW8bit,
                gradient_checkpointing: true,
                offload_optimizer: true,
                ..setup.clone()
            },
        ),
        // Another optimizer, still a full fine-tune: Adafactor's state is the bf16
        // weights' compensation alone.
        (
            "--optim adafactor --optim-in-backward",
            Setup {
                optim: OptimKind::Adafactor,
                gradient_checkpointing: true,
                optim_in_backward: true,
                // Refused with adafactor (nothing to move).
                offload_optimizer: false,
                ..setup.clone()
            },
        ),
        (
            "--lora --gradient-checkpointing",
            Setup {
                lora: Some((config.lora_r, config.lora_targets.as_slice())),
                gradient_checkpointing: true,
                ..setup.clone()
            },
        ),
        (
            "--lora --quantize nf4 --double-quant --gradient-checkpointing",
            Setup {
                lora: Some((config.lora_r, config.lora_targets.as_slice())),
                gradient_checkpointing: true,
                quantize: Some(crate::model::quantized::Quantization {
                    kind: crate::model::quantized::QuantKind::Nf4,
                    double_quant: true,
                }),
                ..setup.clone()
            },
        ),
    ];
    let hint = alternatives
        .iter()
        .find(|(_, alternative)| fits(alternative))
        .map_or(
            "a smaller --batch-size or --cutoff-len".to_string(),
            |(flags, alternative)| format!("{flags} ({})", estimate(alternative).describe()),
        );
    bail_input!(
        "this setup needs {} but cuda:{index} has {:.1} GB free; what would fit: {hint}",
        needed.describe(),
        free as f64 / 1e9
    )
}

/// The memory estimate's view of a training configuration.
pub fn setup_of<'a>(
    config: &'a TrainConfig,
    model_config: &'a LlamaConfig,
    kind: Kind,
) -> Result<super::memory_estimate::Setup<'a>> {
    Ok(super::memory_estimate::Setup {
        config: model_config,
        kind,
        lora: config
            .lora
            .then_some((config.lora_r, config.lora_targets.as_slice())),
        dora: config.use_dora,
        optim: config.optim,
        batch_size: config.batch_size,
        tokens_per_row: config.cutoff_len,
        gradient_checkpointing: config.gradient_checkpointing || config.optim_in_backward,
        optim_in_backward: config.optim_in_backward,
        grad_accum: config.grad_accum,
        quantize: config.quantization()?,
        optimizer_shards: if config.zero == 1 {
            config.world_size
        } else {
            1
        },
        offload_optimizer: config.offload_optimizer,
    })
}

/// Host memory the kernel says is available (`MemAvailable` in /proc/meminfo), if known.
pub fn host_available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&meminfo)
}

/// `MemAvailable:  123456 kB` as bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_available_host_memory() {
        let meminfo =
            "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   65536000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(65_536_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        // This machine's own figure is there and plausible.
        let here = host_available_bytes().expect("/proc/meminfo has MemAvailable");
        assert!(here > 100_000_000, "{here}");
    }
}
