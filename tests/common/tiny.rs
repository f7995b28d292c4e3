//! The tiny random Llama set up for training tests: its encoded sample rows, and the
//! model for a full fine-tune or with the fixture adapter.

use amthal::encode::{Encoded, Encoder};
use amthal::model::lora::{LoraConfig, load_adapter};
use amthal::model::{Llama, LoadOptions, load_llama};
use amthal::model_source::ModelSource;
use amthal::prompt::{PromptBuilder, PromptFormat};
use amthal::train::trainables::{Mode, unfreeze_all};

use super::fixture;

/// The sample training rows, encoded for the tiny model (lengths differ).
pub fn encoded_rows() -> Vec<Encoded> {
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let tokenizer = source.tokenizer().unwrap();
    let prompts = PromptBuilder::new(PromptFormat::Plain, &tokenizer).unwrap();
    let encoder = Encoder::new(&tokenizer, &prompts).unwrap();
    let examples = amthal::sample_data::sample_split(amthal::data::Split::Train)
        .unwrap()
        .examples;
    encoder.encode_all(&examples[..8], None).unwrap().0
}

/// The answer tokens an optimizer step's window of micro-batches trains (the loss's
/// normaliser).
pub fn window_tokens(window: &[Vec<&Encoded>]) -> i64 {
    window
        .iter()
        .flatten()
        .map(|r| r.trained_tokens() as i64)
        .sum()
}

/// The tiny model set up for a full fine-tune (tied or untied lm_head) or with the
/// fixture adapter (LoRA).
pub fn model_for(full: bool, tied: bool) -> (Llama, Mode) {
    let source = ModelSource::HfFolder(fixture("tiny-llama"));
    let mut model = load_llama(&source, LoadOptions::default()).unwrap();
    if !tied {
        model.lm_head = Some(model.embed_tokens.copy());
    }
    if full {
        unfreeze_all(&model);
        return (model, Mode::Full);
    }
    load_adapter(&mut model, &fixture("tiny-llama-adapter")).unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![],
        rslora: false,
        use_dora: false,
        init: Default::default(),
    };
    (model, Mode::Lora(config))
}
