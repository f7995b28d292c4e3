//! `amthal export`: base model (+ adapter, folded) -> a GGUF file and an Ollama
//! Modelfile beside it.

use std::path::Path;

use anyhow::Result;

use crate::atomic::write_file;
use crate::bail_input;
use crate::cli::{ExportArgs, ExportFormat};
use crate::data::{Dataset, ReadOptions, References, Split, read_examples, read_split};
use crate::device::Precision;
use crate::encode::Encoder;
use crate::export::imatrix::{ImportanceMatrix, measure};
use crate::export::{ExportQuant, export_gguf, modelfile::modelfile};
use crate::model::lora::merge_adapters;
use crate::prompt::{PromptBuilder, PromptFormat};
use crate::runtime::{LoadedModel, load_model};

pub fn run(args: &ExportArgs) -> Result<()> {
    if args.format == ExportFormat::GgufLora {
        return export_adapter(args);
    }
    if args.imatrix_data.is_some() && args.quant != ExportQuant::Q4KM {
        let quant = clap::ValueEnum::to_possible_value(&args.quant)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        bail_input!(
            "--imatrix-data weighs the blocks of --quant q4_k_m; {quant} has no weighted route \
             in llama.cpp (leave --imatrix-data out, or export q4_k_m)"
        );
    }
    if args.imatrix_rows == 0 {
        bail_input!("--imatrix-rows must be at least 1");
    }
    // The calibration rows are read before the model (a 7B takes minutes to load): a
    // wrong path fails at once.
    let calibration = match &args.imatrix_data {
        Some(data) => Some(read_calibration(data)?),
        None => None,
    };
    // f32 on the CPU: the adapter folds in f32 and every output type is rounded from
    // f32 once (a 7B needs ~27 GB of RAM for this).
    let mut loaded = load_model(
        args.model.model.as_deref(),
        args.adapter.as_deref(),
        "cpu",
        Precision::F32,
        None,
    )?;
    merge_adapters(&mut loaded.model);
    let importance = match &calibration {
        Some(set) => Some(measure_on_data(&loaded, set, args.imatrix_rows)?),
        None => None,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        let source = loaded.source.display();
        let path = std::path::Path::new(&source);
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(source.clone())
    });
    let report = export_gguf(
        &loaded.model,
        &loaded.tokenizer,
        &loaded.source,
        &name,
        args.quant,
        importance.as_ref(),
        &args.out,
    )?;
    let file_name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let modelfile_path = args.out.with_file_name("Modelfile");
    write_file(
        &modelfile_path,
        modelfile(&file_name, &loaded.tokenizer).as_bytes(),
    )?;
    let types: Vec<String> = report
        .types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    println!(
        "wrote {} ({:.1} MB; tensors: {}) and {}",
        args.out.display(),
        report.bytes as f64 / 1e6,
        types.join(", "),
        modelfile_path.display()
    );
    Ok(())
}

/// `--format gguf-lora`: the adapter alone, for the base `--from` names, with a
/// Modelfile that puts them together (`FROM` the base, `ADAPTER` the file).
fn export_adapter(args: &ExportArgs) -> Result<()> {
    let Some(adapter) = args.adapter.as_deref() else {
        bail_input!("--format gguf-lora writes an adapter: give --adapter DIR");
    };
    if args.imatrix_data.is_some() {
        bail_input!(
            "--imatrix-data quantizes a model's weights; an adapter is written unquantized"
        );
    }
    let saved = crate::model::lora::saved_modules(adapter)?;
    if !saved.is_empty() {
        bail_input!(
            "{}: the adapter carries full copies of {} (modules_to_save), which a llama.cpp \
             LoRA file cannot hold; export the model with it folded in (--format gguf \
             --adapter DIR)",
            adapter.display(),
            saved.join(" and ")
        );
    }
    let loaded = load_model(
        args.model.model.as_deref(),
        Some(adapter),
        "cpu",
        Precision::F32,
        None,
    )?;
    let name = args.name.clone().unwrap_or_else(|| {
        adapter
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adapter".into())
    });
    let report =
        crate::export::lora_gguf::export_lora_gguf(&loaded.model, &name, args.quant, &args.out)?;
    let file_name = args
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let from = args.from.trim_start_matches("./");
    let text = modelfile(from, &loaded.tokenizer);
    let from_line = format!("FROM ./{from}\n");
    let from_line_written = if args.from.contains('/') || args.from.ends_with(".gguf") {
        from_line.clone()
    } else {
        // An Ollama model name, not a file.
        format!("FROM {}\n", args.from)
    };
    let text = text.replacen(
        &from_line,
        &format!(
            "# The adapter goes on the base model it was trained on, exported with\n\
             #   amthal export --model M --out base.gguf   (or an Ollama model of that base)\n\
             {from_line_written}ADAPTER ./{file_name}\n"
        ),
        1,
    );
    let modelfile_path = args.out.with_file_name("Modelfile");
    write_file(&modelfile_path, text.as_bytes())?;
    println!(
        "wrote {} ({:.1} MB; {} tensors) and {}",
        args.out.display(),
        report.bytes as f64 / 1e6,
        report.types.iter().map(|(_, n)| n).sum::<usize>(),
        modelfile_path.display()
    );
    Ok(())
}

/// `--imatrix-data`'s rows: a data dir's Train split, or a file (explanations required).
fn read_calibration(data: &Path) -> Result<Dataset> {
    let options = ReadOptions::default();
    if data.is_dir() {
        read_split(data, Split::Train, options)
    } else {
        read_examples(data, References::Required, options)
    }
}

/// The importance matrix of `--imatrix-data`: the first `rows` examples of `set`, each
/// prompt with its reference answer as `train` encodes them (prompt format auto: the
/// chat template when the model has one), through the model about to be written.
fn measure_on_data(loaded: &LoadedModel, set: &Dataset, rows: usize) -> Result<ImportanceMatrix> {
    let prompts = PromptBuilder::new(PromptFormat::Auto, &loaded.tokenizer)?;
    let encoder = Encoder::new(&loaded.tokenizer, &prompts)?;
    let examples = &set.examples[..rows.min(set.examples.len())];
    // The training default's cutoff: one example is one forward pass of at most this.
    let (encoded, _) = encoder.encode_all(examples, Some(1024))?;
    let sequences: Vec<Vec<u32>> = encoded.into_iter().map(|e| e.input_ids).collect();
    if sequences.is_empty() {
        bail_input!("--imatrix-data {}: no rows to measure", set.path.display());
    }
    let dataset = format!("{} ({} rows)", set.path.display(), sequences.len());
    let matrix = measure(&loaded.model, &sequences, &dataset)?;
    eprintln!(
        "importance matrix: {} tokens in {} sequences of {}, {} weights",
        matrix.tokens,
        matrix.sequences,
        set.path.display(),
        matrix.entries()
    );
    Ok(matrix)
}
