//! `amthal demo`: the main job on the embedded default, end to end on what amthal has:
//! zero-shot explanations of the test split, a short LoRA fine-tune, explanations again,
//! the validation loss before and after, and both runs scored and compared in a report,
//! all under results/demo/. Without --data-dir it uses the sample data compiled into
//! amthal; without --model the SmolLM2-135M-Instruct GGUF that scripts/setup fetched.
//! Scoring uses `amthal score`'s defaults: a default model that is not available
//! offline (BERTScore's bert-base-multilingual-cased on a fresh machine) is skipped
//! with a note in the report.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Parser;

use crate::cli::{Cli, Command, DemoArgs};
use crate::data::{Split, split_path};
use crate::sample_data::sample_bytes;
use crate::score::scorer::{DEFAULT_EMBEDDING_MODEL, model_short_name};

/// The data dir the demo runs on: --data-dir, or the embedded samples written out.
fn data_dir(args: &DemoArgs, out: &Path) -> Result<PathBuf> {
    if let Some(dir) = &args.data_dir {
        for split in [Split::Train, Split::Validation, Split::Test] {
            split_path(dir, split)?;
        }
        return Ok(dir.clone());
    }
    let dir = out.join("data");
    std::fs::create_dir_all(&dir)?;
    for split in [Split::Train, Split::Validation, Split::Test] {
        crate::atomic::write_file(
            &dir.join(format!("{}.csv", split.file_stem())),
            sample_bytes(split),
        )?;
    }
    Ok(dir)
}

/// Runs one amthal command line inside this process.
fn run_command(words: &[String]) -> Result<()> {
    let cli =
        Cli::try_parse_from(std::iter::once("amthal".to_string()).chain(words.iter().cloned()))
            .map_err(|e| anyhow::anyhow!("internal command line: {e}"))?;
    if matches!(cli.command, Command::Demo(_)) {
        anyhow::bail!("the demo does not run itself");
    }
    crate::commands::run(cli)
}

/// Answer-token loss of the model (and adapter) over the validation split.
fn validation_loss(
    model: Option<&str>,
    data: &Path,
    adapter: Option<&Path>,
    read_options: crate::data::ReadOptions,
) -> Result<f64> {
    let loaded =
        crate::runtime::load_model(model, adapter, "auto", crate::device::Precision::Auto, None)?;
    let prompts =
        crate::prompt::PromptBuilder::new(crate::prompt::PromptFormat::Auto, &loaded.tokenizer)?;
    let encoder = crate::encode::Encoder::new(&loaded.tokenizer, &prompts)?;
    let set = crate::data::read_split(data, Split::Validation, read_options)?;
    let (encoded, _) = encoder.encode_all(&set.examples, Some(1024))?;
    Ok(crate::train::evaluate_loss(&loaded.model, &encoded, 8, 0.0))
}

fn shorten(text: &str, chars: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= chars {
        text
    } else {
        format!("{}…", text.chars().take(chars).collect::<String>())
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let out = args.out.clone();
    std::fs::create_dir_all(&out)
        .map_err(|e| crate::error::bad_input(format!("{}: {e}", out.display())))?;
    let data = data_dir(args, &out)?;
    let model: Vec<String> = match &args.model.model {
        Some(m) => vec!["--model".into(), m.clone()],
        None => Vec::new(),
    };
    // Fail early (exit 2) on a missing default model or a broken one.
    crate::model_source::ModelSource::resolve(args.model.model.as_deref())?;
    let test = split_path(&data, Split::Test)?.display().to_string();
    let adapter = out.join("lora");
    let evaluate = |name: &str, adapter: Option<&Path>| -> Result<PathBuf> {
        let path = out.join(format!("{name}.csv"));
        let mut words: Vec<String> = vec!["evaluate".into()];
        words.extend(model.iter().cloned());
        if let Some(adapter) = adapter {
            words.extend(["--adapter-dir".into(), adapter.display().to_string()]);
        }
        words.extend([
            "--test-path".into(),
            test.clone(),
            "--out-path".into(),
            path.display().to_string(),
            "--max-new-tokens".into(),
            args.max_new_tokens.to_string(),
            "--no-repeat-ngram-size".into(),
            args.no_repeat_ngram_size.to_string(),
            // Greedy whatever a --model folder's generation_config.json says, so the
            // zero-shot and fine-tuned columns compare like with like.
            "--do-sample".into(),
            "false".into(),
            "--overwrite".into(),
        ]);
        words.extend(args.data_options.to_words());
        run_command(&words)?;
        Ok(path)
    };

    println!("1/5 zero-shot explanations of {test}");
    let zero_shot = evaluate("zero_shot", None)?;
    let loss_before = validation_loss(
        args.model.model.as_deref(),
        &data,
        None,
        args.data_options.read_options(),
    )?;

    println!(
        "2/5 LoRA fine-tune ({} steps) into {}",
        args.steps,
        adapter.display()
    );
    if adapter.exists() {
        std::fs::remove_dir_all(&adapter)?;
    }
    let mut words: Vec<String> = vec!["train".into()];
    words.extend(model.iter().cloned());
    words.extend([
        "--data-dir".into(),
        data.display().to_string(),
        "--output-dir".into(),
        adapter.display().to_string(),
        "--lora".into(),
        "--lr".into(),
        "1e-3".into(),
        "--bsz".into(),
        "4".into(),
        "--grad-accum".into(),
        "1".into(),
        "--max-steps".into(),
        args.steps.to_string(),
        "--eval-strategy".into(),
        "steps".into(),
        "--eval-steps".into(),
        (args.steps / 2).max(1).to_string(),
        "--warmup-ratio".into(),
        "0.1".into(),
        "--previews".into(),
        "0".into(),
    ]);
    words.extend(args.data_options.to_words());
    run_command(&words)?;
    let loss_after = validation_loss(
        args.model.model.as_deref(),
        &data,
        Some(&adapter),
        args.data_options.read_options(),
    )?;

    println!("3/5 fine-tuned explanations");
    let fine_tuned = evaluate("fine_tuned", Some(&adapter))?;

    println!("4/5 scoring both runs and writing the report");
    let options = crate::score::scorer::ScoreOptions {
        device: crate::device::parse_device("auto")?,
        ..crate::score::scorer::ScoreOptions::defaults()
    };
    let report_dir = out.join("report");
    let runs = crate::commands::report::report(
        &[&zero_shot, &fine_tuned],
        &["zero-shot".to_string(), "fine-tuned".to_string()],
        &[&adapter.join("log.jsonl")],
        8,
        &report_dir,
        &options,
        crate::data::TextEncoding::Auto,
    )?;
    let (scores_before, scores_after) = (&runs[0].scores, &runs[1].scores);

    println!("5/5 summary (full files in {})", out.display());
    println!(
        "\nvalidation answer-token loss: zero-shot {loss_before:.4} -> fine-tuned {loss_after:.4}\n"
    );
    // The headline metrics (corpus score where there is one, else the mean).
    let cosine = format!("cosine_{}", model_short_name(DEFAULT_EMBEDDING_MODEL));
    println!("| metric | zero-shot | fine-tuned |\n|---|---:|---:|");
    for metric in ["bleu", "chrf++", "rougeL_f", "bertscore_f", cosine.as_str()] {
        if let (Some(a), Some(b)) = (
            scores_before.headline(metric),
            scores_after.headline(metric),
        ) {
            println!("| {metric} | {a:.4} | {b:.4} |");
        }
    }
    if let (Some(a), Some(b)) = (&scores_before.checks, &scores_after.checks) {
        println!(
            "| outputs with Latin letters (%) | {:.1} | {:.1} |",
            100.0 * a.latin_share,
            100.0 * b.latin_share
        );
    }
    println!();
    // Both files come from the same test file, so their rows line up.
    let (before, after) = (&runs[0].table, &runs[1].table);
    println!("| proverb | reference | zero-shot | fine-tuned |");
    println!("|---|---|---|---|");
    for row in 0..before.len().min(after.len()).min(5) {
        println!(
            "| {} | {} | {} | {} |",
            shorten(before.proverb(row), 40),
            shorten(before.reference(row), 60),
            shorten(before.generated(row), 60),
            shorten(after.generated(row), 60)
        );
    }
    let summary = serde_json::json!({
        "data_dir": data.display().to_string(),
        "zero_shot_predictions": zero_shot.display().to_string(),
        "fine_tuned_predictions": fine_tuned.display().to_string(),
        "adapter": adapter.display().to_string(),
        "validation_loss_zero_shot": loss_before,
        "validation_loss_fine_tuned": loss_after,
        "training_log": adapter.join("log.jsonl").display().to_string(),
        "loss_curve": adapter.join("loss.svg").display().to_string(),
        "report": report_dir.join("report.md").display().to_string(),
        "scores_zero_shot": scores_before.summary,
        "scores_fine_tuned": scores_after.summary,
        "skipped_metrics": scores_after.skipped,
    });
    crate::atomic::write_file(
        &out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!(
        "\nreport: {} (and report.html); summary: {}/summary.json",
        report_dir.join("report.md").display(),
        out.display()
    );
    Ok(())
}
