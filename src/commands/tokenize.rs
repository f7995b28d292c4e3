//! `amthal tokenize`: what the model will be trained on, example by example.

use std::io::Write;

use anyhow::Result;

use crate::cli::TokenizeArgs;
use crate::data::{References, read_examples};
use crate::encode::{EncodeStats, Encoded, Encoder, IGNORE_INDEX};
use crate::model_source::ModelSource;
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;

pub fn run(args: &TokenizeArgs) -> Result<()> {
    let dataset = read_examples(
        &args.data,
        References::Optional,
        args.data_options.read_options(),
    )?;
    let source = ModelSource::resolve(args.model.model.as_deref())?;
    let tokenizer = source.tokenizer()?;
    let prompts = PromptBuilder::new(args.prompt_format, &tokenizer)?;
    let encoder = Encoder::new(&tokenizer, &prompts)?;
    let examples = match args.limit {
        Some(limit) => &dataset.examples[..limit.min(dataset.examples.len())],
        None => &dataset.examples[..],
    };

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut stats = EncodeStats::default();
    for example in examples {
        let Some(encoded) = encoder.encode(example, args.cutoff_len)? else {
            stats.skipped += 1;
            eprintln!(
                "{}: {}: skipped, the prompt alone reaches --cutoff-len",
                dataset.path.display(),
                example.location
            );
            continue;
        };
        stats.kept += 1;
        stats.truncated += usize::from(encoded.truncated);
        let encoded = if args.train_on_inputs {
            encoded.with_prompt_trained()
        } else {
            encoded
        };
        if args.jsonl {
            serde_json::to_writer(&mut out, &encoded)?;
            writeln!(out)?;
        } else {
            let prompt = prompts.prompt(&example.proverb)?;
            write_human_view(
                &mut out,
                &tokenizer,
                &example.location.to_string(),
                &prompt,
                &encoded,
            )?;
        }
    }
    out.flush()?;
    eprintln!(
        "{}: {} format, {stats}",
        dataset.path.display(),
        match prompts.format() {
            crate::prompt::PromptFormat::Chat => "chat",
            _ => "plain",
        }
    );
    Ok(())
}

/// The rendered prompt, then every token; trained tokens (label != -100) are ⟦marked⟧.
fn write_human_view(
    out: &mut impl Write,
    tokenizer: &ModelTokenizer,
    location: &str,
    prompt: &str,
    encoded: &Encoded,
) -> Result<()> {
    writeln!(
        out,
        "── {location}: {} tokens ({} prompt, {} trained{})",
        encoded.input_ids.len(),
        encoded.prompt_len,
        encoded.trained_tokens(),
        if encoded.truncated {
            ", answer truncated"
        } else {
            ""
        }
    )?;
    writeln!(out, "prompt:\n{prompt}")?;
    write!(out, "tokens:")?;
    for (&id, &label) in encoded.input_ids.iter().zip(&encoded.labels) {
        let piece = tokenizer.decode(&[id])?;
        let piece = format!("{piece:?}");
        let piece = &piece[1..piece.len() - 1];
        if label == IGNORE_INDEX {
            write!(out, " {id}:{piece}")?;
        } else {
            write!(out, " ⟦{id}:{piece}⟧")?;
        }
    }
    writeln!(out, "\n")?;
    Ok(())
}
