//! Examples to token ids and labels for causal-LM training.
//!
//! Prompt and answer are tokenized separately and their ids concatenated; labels are
//! -100 on the prompt and the ids on the answer + end token. Deriving the mask from a
//! second tokenization of the joined string would shift it where BPE merges across the
//! boundary. The end token is EOS for plain prompts and the template's end-of-turn
//! token for chat (a model trained without it never learns to stop). `cutoff_len`
//! truncates the answer, never the prompt; a prompt that leaves no room is skipped.

use anyhow::Result;

use crate::bail_input;
use crate::data::Example;
use crate::prompt::PromptBuilder;
use crate::tokenizer::ModelTokenizer;

/// Label value ignored by the loss (PyTorch's and transformers' convention).
pub const IGNORE_INDEX: i64 = -100;

/// One encoded example.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Number of leading prompt tokens (labels -100).
    #[serde(skip)]
    pub prompt_len: usize,
    /// Whether the answer was cut at cutoff_len (then it has no end token).
    #[serde(skip)]
    pub truncated: bool,
}

impl Encoded {
    /// The example with its prompt trained too (axolotl's train_on_inputs, TRL's
    /// completion_only_loss = false): every label is its token, but the first, which
    /// no earlier position predicts (HF's collator copies it, and the shift drops it).
    pub fn with_prompt_trained(mut self) -> Encoded {
        for (label, &id) in self.labels.iter_mut().zip(&self.input_ids).skip(1) {
            *label = id as i64;
        }
        self
    }

    /// Tokens the loss is computed on.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What happened to each example of a set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub kept: usize,
    pub truncated: usize,
    /// Examples whose prompt alone reaches cutoff_len.
    pub skipped: usize,
}

impl std::fmt::Display for EncodeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} encoded, {} answers truncated at cutoff, {} skipped (prompt alone reaches cutoff)",
            self.kept, self.truncated, self.skipped
        )
    }
}

/// Encodes examples for one model and prompt format.
pub struct Encoder<'a> {
    tokenizer: &'a ModelTokenizer,
    prompts: &'a PromptBuilder,
    end_id: u32,
    /// The tokenizer adds its own word-start marker to the first piece of any text
    /// (sentencepiece's "▁"), so a leading space in the answer would double it.
    drop_leading_space: bool,
}

impl<'a> Encoder<'a> {
    pub fn new(tokenizer: &'a ModelTokenizer, prompts: &'a PromptBuilder) -> Result<Encoder<'a>> {
        let end_id = end_token_id(tokenizer, prompts)?;
        let probe = tokenizer.encode("a", false)?;
        let drop_leading_space = probe
            .first()
            .map(|&id| tokenizer.token_text(id).starts_with('▁'))
            .unwrap_or(false);
        Ok(Encoder {
            tokenizer,
            prompts,
            end_id,
            drop_leading_space,
        })
    }

    /// The id that ends an answer (EOS, or the chat template's end-of-turn token).
    pub fn end_id(&self) -> u32 {
        self.end_id
    }

    /// Prompt ids for generation.
    pub fn prompt_ids(&self, proverb: &str) -> Result<Vec<u32>> {
        self.prompt_ids_with_shots(proverb, &[])
    }

    /// Prompt ids with few-shot examples before the proverb.
    pub fn prompt_ids_with_shots(
        &self,
        proverb: &str,
        shots: &[(String, String)],
    ) -> Result<Vec<u32>> {
        let prompt = self.prompts.prompt_with_shots(proverb, shots)?;
        self.tokenizer
            .encode(&prompt, self.prompts.prompt_adds_special_tokens())
    }

    /// Answer ids (without the end token).
    pub fn answer_ids(&self, reference: &str) -> Result<Vec<u32>> {
        let answer = self.prompts.answer(reference);
        let answer = match answer.strip_prefix(' ') {
            Some(rest) if self.drop_leading_space => rest.to_string(),
            _ => answer,
        };
        self.tokenizer.encode(&answer, false)
    }

    /// Encodes one example. `None` when its prompt alone reaches `cutoff_len`.
    /// An example without a reference encodes as its prompt with every label -100.
    pub fn encode(&self, example: &Example, cutoff_len: Option<usize>) -> Result<Option<Encoded>> {
        let prompt = self.prompt_ids(&example.proverb)?;
        let mut answer = match &example.reference {
            Some(reference) => self.answer_ids(reference)?,
            None => Vec::new(),
        };
        if example.reference.is_some() {
            answer.push(self.end_id);
        }
        let mut truncated = false;
        if let Some(cutoff) = cutoff_len {
            if prompt.len() >= cutoff {
                return Ok(None);
            }
            if prompt.len() + answer.len() > cutoff {
                answer.truncate(cutoff - prompt.len());
                truncated = true;
            }
        }
        let prompt_len = prompt.len();
        let mut labels = vec![IGNORE_INDEX; prompt_len];
        labels.extend(answer.iter().map(|&id| id as i64));
        let mut input_ids = prompt;
        input_ids.extend(answer);
        Ok(Some(Encoded {
            input_ids,
            labels,
            prompt_len,
            truncated,
        }))
    }

    /// Encodes a set, dropping skipped examples and counting what happened.
    pub fn encode_all(
        &self,
        examples: &[Example],
        cutoff_len: Option<usize>,
    ) -> Result<(Vec<Encoded>, EncodeStats)> {
        let mut stats = EncodeStats::default();
        let mut encoded = Vec::with_capacity(examples.len());
        for example in examples {
            match self.encode(example, cutoff_len)? {
                Some(e) => {
                    stats.kept += 1;
                    stats.truncated += usize::from(e.truncated);
                    encoded.push(e);
                }
                None => stats.skipped += 1,
            }
        }
        Ok((encoded, stats))
    }
}

/// EOS for plain prompts; for chat, the first token of the text the template writes
/// after an answer when it is a special token ("<|im_end|>", Llama-2's "</s>"), else EOS.
fn end_token_id(tokenizer: &ModelTokenizer, prompts: &PromptBuilder) -> Result<u32> {
    if let Some(after) = prompts.text_after_answer() {
        let ids = tokenizer.encode(after.trim_start(), false)?;
        if let Some(&first) = ids.first() {
            let text = tokenizer.token_text(first);
            let is_special = tokenizer
                .tokenizer
                .get_added_vocabulary()
                .get_vocab()
                .contains_key(&text)
                || Some(first) == tokenizer.eos.as_ref().map(|t| t.id);
            if is_special {
                return Ok(first);
            }
        }
    }
    match &tokenizer.eos {
        Some(eos) => Ok(eos.id),
        None => bail_input!(
            "the tokenizer has no EOS token, so answers cannot be taught to end \
             (set eos_token in tokenizer_config.json)"
        ),
    }
}
