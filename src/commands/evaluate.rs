//! `amthal evaluate` (alias `generate`): the seed's evaluate.py. Generates an
//! explanation for every test proverb with a full checkpoint or base + adapter and
//! writes the predictions CSV (plus a JSON sidecar that says how it was made).
//!
//! The CSV is rewritten (temp file + rename) after every batch, so an interrupted run
//! leaves a valid file of the rows done so far, which `--resume` continues. An existing
//! output is never replaced without `--overwrite`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};
use serde_json::json;

use crate::atomic::write_file;
use crate::bail_input;
use crate::cli::EvaluateArgs;
use crate::data::{Example, ReadOptions, References, read_examples};
use crate::decode_step::DecodeMode;
use crate::encode::Encoder;
use crate::error::bad_input;
use crate::generate::{GenerationRequest, completion_text, generate_continuous, stop_ids};
use crate::generation_settings;
use crate::memory::MemoryReport;
use crate::predictions::{PredictionRow, read_predictions, write_predictions};
use crate::prompt::PromptBuilder;
use crate::runtime::load_model;

/// Which model and adapter the flags name (the seed's two modes, or --model).
fn model_and_adapter(args: &EvaluateArgs) -> Result<(Option<String>, Option<PathBuf>)> {
    let base = args.base_id.clone().or_else(|| args.model.model.clone());
    match (&args.checkpoint_dir, base, &args.adapter_dir) {
        (Some(_), Some(_), _) => {
            bail_input!("give either --checkpoint-dir or --base-id/--model, not both")
        }
        (Some(_), None, Some(_)) => {
            bail_input!("--adapter-dir goes with --base-id (the base model), not --checkpoint-dir")
        }
        (Some(dir), None, None) => Ok((Some(dir.to_string_lossy().into_owned()), None)),
        (None, base, adapter) => Ok((base, adapter.clone())),
    }
}

fn default_out_path() -> PathBuf {
    PathBuf::from("results").join(format!(
        "finetune_{}.csv",
        chrono::Local::now().format("%Y%m%d_%H%M%S")
    ))
}

/// Rows already in the output that match the start of the test file, for --resume.
fn resumable_rows(out: &Path, examples: &[Example]) -> Result<Vec<PredictionRow>> {
    let done = read_predictions(out)?;
    if done.len() > examples.len() {
        bail_input!(
            "{}: has {} rows but the test file has {}; it belongs to another test file",
            out.display(),
            done.len(),
            examples.len()
        );
    }
    for (index, (row, example)) in done.iter().zip(examples).enumerate() {
        if row.proverb != example.proverb {
            bail_input!(
                "{}: row {} is '{}' but the test file's row {} is '{}'; --resume needs the same test file",
                out.display(),
                index + 1,
                row.proverb,
                index + 1,
                example.proverb
            );
        }
    }
    Ok(done)
}

/// K worked examples drawn without replacement from a file (the same for every row).
fn pick_shots(
    path: &Path,
    count: usize,
    seed: u64,
    read_options: ReadOptions,
) -> Result<Vec<(String, String)>> {
    let set = read_examples(path, References::Required, read_options)?;
    if count > set.examples.len() {
        bail_input!(
            "--shots {count}: {} has only {} examples",
            path.display(),
            set.examples.len()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut indices: Vec<usize> = (0..set.examples.len()).collect();
    for i in 0..count {
        let j = i + (rng.next_u64() % (indices.len() - i) as u64) as usize;
        indices.swap(i, j);
    }
    Ok(indices[..count]
        .iter()
        .map(|&i| {
            let e = &set.examples[i];
            (e.proverb.clone(), e.reference.clone().unwrap_or_default())
        })
        .collect())
}

pub fn run(args: &EvaluateArgs) -> Result<()> {
    // The settings (flags over the chosen generation_config.json) are settled before
    // anything is loaded, so a bad flag or file fails at once, not after a 7B load.
    let (model, adapter) = model_and_adapter(args)?;
    let model_dir = match crate::model_source::ModelSource::resolve(model.as_deref())? {
        crate::model_source::ModelSource::HfFolder(dir) => Some(dir),
        crate::model_source::ModelSource::Gguf(_) => None,
    };
    let generation_file = args
        .generation
        .generation_config
        .file(model_dir.as_deref())?;
    let generation =
        generation_settings::resolve(&args.generation, generation_file.as_ref(), args.seed)?;
    let test = read_examples(
        &args.test_path,
        References::Optional,
        args.data_options.read_options(),
    )?;
    let examples: Vec<Example> = match args.limit {
        Some(limit) => test.examples.iter().take(limit).cloned().collect(),
        None => test.examples.clone(),
    };
    let out = args.out_path.clone().unwrap_or_else(default_out_path);
    let mut rows: Vec<PredictionRow> = if out.exists() {
        if args.resume {
            resumable_rows(&out, &examples)?
        } else if args.overwrite {
            Vec::new()
        } else {
            bail_input!(
                "{} exists; pass --resume to continue it or --overwrite to replace it",
                out.display()
            );
        }
    } else {
        Vec::new()
    };
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            bad_input(format!(
                "{}: cannot create the output folder: {e}",
                parent.display()
            ))
        })?;
    }
    // Fail on an unwritable output now, not after an hour of generation (and leave nothing).
    let probe = crate::atomic::temp_path_for(&out);
    std::fs::write(&probe, b"")
        .map_err(|e| bad_input(format!("{}: cannot write here: {e}", out.display())))?;
    let _ = std::fs::remove_file(&probe);

    let mut loaded = load_model(
        model.as_deref(),
        adapter.as_deref(),
        &args.runtime.device,
        args.runtime.precision,
        args.quantize.resolve()?,
    )?;
    let adapter_folded = loaded.adapter.is_some()
        && !args.no_merge_adapter
        && crate::model::lora::fold_adapters(&mut loaded.model) > 0;
    // After folding: fused q/k/v and gate/up matmuls (fewer, wider kernels per token).
    crate::model::fuse::fuse_projections(&mut loaded.model);
    let prompts = PromptBuilder::new(args.prompt_format, &loaded.tokenizer)?;
    let encoder = Encoder::new(&loaded.tokenizer, &prompts)?;
    let shots = match (&args.shots_from, args.shots) {
        (Some(path), count) if count > 0 => pick_shots(
            path,
            count,
            args.shots_seed.unwrap_or(args.seed),
            args.data_options.read_options(),
        )?,
        (None, count) if count > 0 => bail_input!("--shots {count} needs --shots-from FILE"),
        _ => Vec::new(),
    };
    let stops = stop_ids(
        encoder.end_id(),
        &loaded.tokenizer,
        &loaded.model,
        generation_file.as_ref().map(|file| &file.raw),
    );
    for warning in &generation.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(file) = generation_file
        .as_ref()
        .filter(|_| !generation.from_file.is_empty())
    {
        eprintln!(
            "evaluate: from {} (as HF's generate; flags override it, --generation-config none \
             ignores it): {}",
            file.path.display(),
            generation.from_file.join(", ")
        );
    }
    let sampling = generation.sampling;
    let mut sidecar = json!({
        "predictions": out.display().to_string(),
        "test_path": args.test_path.display().to_string(),
        "model": loaded.source.display(),
        "adapter": adapter.as_ref().map(|a| a.display().to_string()),
        "adapter_folded": adapter_folded,
        "precision": crate::device::kind_name(loaded.model.kind),
        "device": format!("{:?}", loaded.model.device),
        "prompt_format": prompts.format(),
        "shots": shots.len(),
        "shots_from": args.shots_from.as_ref().map(|p| p.display().to_string()),
        "shots_seed": args.shots_seed.unwrap_or(args.seed),
        "sampling": sampling,
        "generation_config": generation_file.as_ref().map(|f| f.path.display().to_string()),
        "from_generation_config": generation.from_file,
        "batch_size": match args.batch_size {
            crate::generate::BatchSize::Auto => json!("auto"),
            crate::generate::BatchSize::Fixed(n) => json!(n),
        },
        "stop_ids": stops,
        "skipped_rows": test.skipped,
        "amthal_version": env!("CARGO_PKG_VERSION"),
    });
    let sidecar_path = out.with_extension("json");
    eprintln!(
        "evaluate: {} on {} rows ({} done), {} prompts{}, {}",
        loaded.describe(),
        examples.len(),
        rows.len(),
        if prompts.is_chat() { "chat" } else { "plain" },
        if shots.is_empty() {
            String::new()
        } else {
            format!(" with {} shots", shots.len())
        },
        if sampling.num_beams > 1 {
            format!("beam search with {} beams", sampling.num_beams)
        } else if sampling.is_greedy() {
            "greedy".to_string()
        } else {
            format!("sampling T={}", sampling.temperature)
        }
    );

    let progress =
        indicatif::ProgressBar::new(examples.len() as u64).with_position(rows.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} rows  {msg}  ETA {eta}")
            .expect("valid template"),
    );
    let started = Instant::now();
    let mut new_tokens = 0usize;
    let start = rows.len();
    let requests = examples[start..]
        .iter()
        .enumerate()
        .map(|(i, example)| {
            Ok(GenerationRequest {
                prompt_ids: encoder.prompt_ids_with_shots(&example.proverb, &shots)?,
                row_number: (start + i) as u64,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let longest_prompt = requests
        .iter()
        .map(|r| r.prompt_ids.len())
        .max()
        .unwrap_or(0);
    // Beam search decodes num_beams rows per prompt.
    let slots = args.batch_size.resolve(
        &loaded.model,
        requests.len() * sampling.num_beams.max(1),
        longest_prompt + sampling.max_new_tokens,
    );
    sidecar["slots"] = json!(slots);
    // Continuous batching: rows end in any order; the CSV always holds the rows done
    // so far in input order (what --resume continues from), rewritten every
    // --batch-size rows.
    let mut finished: Vec<Option<PredictionRow>> = vec![None; requests.len()];
    let (mut done, mut last_written) = (0usize, rows.len());
    crate::profile::enable_from_env(loaded.model.device);
    let mut on_finished = |index: usize, generation: crate::generate::Generation| {
        new_tokens += generation.tokens.len();
        let example = &examples[start + index];
        finished[index] = Some(PredictionRow {
            proverb: example.proverb.clone(),
            reference: example.reference.clone().unwrap_or_default(),
            generated: completion_text(&loaded.tokenizer, &prompts, &generation.tokens)?,
        });
        done += 1;
        while let Some(row) = finished.get_mut(rows.len() - start).and_then(Option::take) {
            rows.push(row);
        }
        if rows.len() - last_written >= slots || rows.len() == examples.len() {
            write_predictions(&out, &rows)?;
            last_written = rows.len();
            // Peak host and GPU memory so far, next to the settings.
            sidecar["memory"] = serde_json::to_value(MemoryReport::now(loaded.model.device))?;
            write_file(
                &sidecar_path,
                serde_json::to_string_pretty(&sidecar)?.as_bytes(),
            )?;
        }
        let seconds = started.elapsed().as_secs_f64();
        progress.set_position((start + done) as u64);
        progress.set_message(format!(
            "{:.1} new tokens/s",
            new_tokens as f64 / seconds.max(1e-9)
        ));
        Ok(())
    };
    let report = if sampling.num_beams > 1 {
        // Each prompt takes num_beams rows of the --batch-size slots, and the prompts
        // searched together are prefilled in one pass: at most PREFILL_TOKENS
        // positions, as continuous batching admits them (what `auto` reserves for).
        let prompts_at_once = (slots / sampling.num_beams)
            .min(crate::generate::PREFILL_TOKENS / longest_prompt.max(1))
            .max(1);
        crate::beam_search::beam_search_all(
            &loaded.model,
            &requests,
            &stops,
            &sampling,
            prompts_at_once,
            &mut on_finished,
        )?
    } else {
        generate_continuous(
            &loaded.model,
            &requests,
            &stops,
            &sampling,
            slots,
            if args.no_cuda_graph {
                DecodeMode::Eager
            } else {
                DecodeMode::Graph
            },
            &mut on_finished,
        )?
    };
    progress.finish_and_clear();
    if let Some(table) = crate::profile::report() {
        eprintln!("{table}");
    }
    let seconds = started.elapsed().as_secs_f64();
    sidecar["cuda_graph"] = json!(report.cuda_graph);
    let decode_rate = report.decode_tokens as f64 / report.decode_seconds.max(1e-9);
    sidecar["decode"] = json!({
        "steps": report.decode_steps,
        "tokens": report.decode_tokens,
        "seconds": report.decode_seconds,
        "tokens_per_second": decode_rate,
    });
    sidecar["quantize"] = json!(loaded.model.quantization.map(|q| q.to_string()));
    write_file(
        &sidecar_path,
        serde_json::to_string_pretty(&sidecar)?.as_bytes(),
    )?;
    eprintln!(
        "wrote {} ({} rows; {new_tokens} new tokens in {seconds:.1}s, {:.1} tokens/s; decode step {}, \
         the decode steps alone {decode_rate:.1} tok/s ({:.2} ms a step); {})",
        out.display(),
        rows.len(),
        new_tokens as f64 / seconds.max(1e-9),
        if report.cuda_graph {
            "replayed from a CUDA graph"
        } else {
            "eager"
        },
        1e3 * report.decode_seconds / report.decode_steps.max(1) as f64,
        MemoryReport::now(loaded.model.device).short()
    );
    Ok(())
}
