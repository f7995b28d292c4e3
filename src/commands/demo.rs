//! `amthal demo`: the main job on the embedded default. For now it loads the sample
//! data and the default model's tokenizer and shows how training examples are
//! encoded; later steps (zero-shot evaluate -> fine-tune -> evaluate -> score) join
//! it as they are built.

use anyhow::Result;

use crate::cli::DemoArgs;
use crate::data::{Dataset, Split, read_split};
use crate::encode::Encoder;
use crate::model_source::ModelSource;
use crate::prompt::{PromptBuilder, PromptFormat};
use crate::sample_data::sample_split;

pub fn run(args: &DemoArgs) -> Result<()> {
    let read = |split: Split| -> Result<Dataset> {
        match &args.data_dir {
            Some(dir) => read_split(dir, split),
            None => sample_split(split),
        }
    };
    let (train, validation, test) = (
        read(Split::Train)?,
        read(Split::Validation)?,
        read(Split::Test)?,
    );
    println!("data:");
    for set in [&train, &validation, &test] {
        println!(
            "  {:<50} {:>4} rows",
            set.path.display(),
            set.examples.len()
        );
    }

    let source = ModelSource::resolve(args.model.model.as_deref())?;
    let tokenizer = source.tokenizer()?;
    let prompts = PromptBuilder::new(PromptFormat::Auto, &tokenizer)?;
    let encoder = Encoder::new(&tokenizer, &prompts)?;
    println!(
        "model: {} ({} prompts, answers end with {:?})",
        source.display(),
        if prompts.is_chat() {
            "chat-template"
        } else {
            "plain"
        },
        tokenizer.token_text(encoder.end_id())
    );

    for (name, set) in [("train", &train), ("validation", &validation)] {
        let (encoded, stats) = encoder.encode_all(&set.examples, Some(1024))?;
        let tokens: usize = encoded.iter().map(|e| e.input_ids.len()).sum();
        let trained: usize = encoded.iter().map(|e| e.trained_tokens()).sum();
        println!("{name}: {stats}; {tokens} tokens, {trained} of them trained (answer + end)");
    }

    let first = &train.examples[0];
    let encoded = encoder
        .encode(first, None)?
        .expect("no cutoff, so never skipped");
    println!("\nfirst training example ({}):", first.location);
    println!("{}", prompts.prompt(&first.proverb)?);
    println!(
        "-> trained on: {}",
        tokenizer.decode(&encoded.input_ids[encoded.prompt_len..])?
    );
    println!(
        "\nnext: zero-shot evaluation, LoRA fine-tuning, evaluation and scoring join this demo \
         as they are built (see README)."
    );
    Ok(())
}
