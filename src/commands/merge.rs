//! `amthal merge`: base model + LoRA adapter -> a merged HF model folder.

use anyhow::Result;

use crate::cli::MergeArgs;
use crate::model::checkpoint::save_hf_folder;
use crate::model::lora::merge_adapters;
use crate::runtime::load_model;

pub fn run(args: &MergeArgs) -> Result<()> {
    let mut loaded = load_model(
        args.model.model.as_deref(),
        Some(&args.adapter),
        &args.runtime.device,
        args.runtime.precision,
        None,
    )?;
    merge_adapters(&mut loaded.model);
    save_hf_folder(&loaded.model, &loaded.tokenizer, &args.output_dir)?;
    println!(
        "merged {} + {} into {}",
        loaded.source.display(),
        args.adapter.display(),
        args.output_dir.display()
    );
    Ok(())
}
