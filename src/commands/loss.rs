//! `amthal loss`: token-weighted mean answer-token cross-entropy of a model (and
//! adapter) over a data file, with perplexity; per row with --jsonl.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use crate::cli::LossArgs;
use crate::data::{References, read_examples};
use crate::encode::Encoder;
use crate::loss::per_example_losses;
use crate::prompt::PromptBuilder;
use crate::runtime::load_model;

pub fn run(args: &LossArgs) -> Result<()> {
    let dataset = read_examples(
        &args.data,
        References::Required,
        args.data_options.read_options(),
    )?;
    let loaded = load_model(
        args.model.model.as_deref(),
        args.adapter.as_deref(),
        &args.runtime.device,
        args.runtime.precision,
        args.quantize.resolve()?,
    )?;
    let prompts = PromptBuilder::new(args.prompt_format, &loaded.tokenizer)?;
    let encoder = Encoder::new(&loaded.tokenizer, &prompts)?;
    let mut encoded = Vec::new();
    let mut skipped = 0;
    for example in &dataset.examples {
        match encoder.encode(example, args.cutoff_len)? {
            Some(e) => encoded.push((example, e)),
            None => skipped += 1,
        }
    }
    eprintln!(
        "loss: {} on {} rows of {} ({} prompts){}",
        loaded.describe(),
        encoded.len(),
        dataset.path.display(),
        if prompts.is_chat() { "chat" } else { "plain" },
        if skipped > 0 {
            format!(", {skipped} skipped (prompt reaches --cutoff-len)")
        } else {
            String::new()
        }
    );

    let rows: Vec<&crate::encode::Encoded> = encoded.iter().map(|(_, e)| e).collect();
    let per_row = per_example_losses(&loaded.model, &rows, args.batch_size, 0.0);

    let total: f64 = per_row.iter().map(|(s, _)| s).sum();
    let tokens: i64 = per_row.iter().map(|(_, c)| c).sum();
    let loss = total / tokens.max(1) as f64;
    let summary = json!({
        "loss": loss,
        "perplexity": loss.exp(),
        "answer_tokens": tokens,
        "examples": encoded.len(),
        "skipped": skipped,
        "skipped_rows": dataset.skipped,
        "memory": crate::memory::MemoryReport::now(loaded.model.device),
        "load_seconds": loaded.load_seconds,
        "model": loaded.source.display(),
        "adapter": args.adapter.as_ref().map(|a| a.display().to_string()),
        "prompt_format": prompts.format(),
    });
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.jsonl {
        for ((example, _), (sum, count)) in encoded.iter().zip(&per_row) {
            let row = json!({
                "row": example.location.to_string(),
                "proverb": example.proverb,
                "loss": sum / (*count).max(1) as f64,
                "answer_tokens": count,
            });
            writeln!(out, "{row}")?;
        }
    }
    if args.json {
        writeln!(out, "{summary}")?;
    } else if !args.jsonl {
        writeln!(
            out,
            "loss {loss:.6}  perplexity {:.4}  over {tokens} answer tokens in {} examples",
            loss.exp(),
            encoded.len()
        )?;
    } else {
        eprintln!(
            "loss {loss:.6}  perplexity {:.4}  over {tokens} answer tokens",
            loss.exp()
        );
    }
    Ok(())
}
