//! `amthal export`: base model (+ adapter, folded) -> a GGUF file and an Ollama
//! Modelfile beside it.

use anyhow::Result;

use crate::atomic::write_file;
use crate::cli::{ExportArgs, ExportFormat};
use crate::device::Precision;
use crate::export::{export_gguf, modelfile::modelfile};
use crate::model::lora::merge_adapters;
use crate::runtime::load_model;

pub fn run(args: &ExportArgs) -> Result<()> {
    let ExportFormat::Gguf = args.format;
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
