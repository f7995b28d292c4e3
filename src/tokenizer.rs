//! The model's tokenizer, from an HF folder (tokenizer.json + tokenizer_config.json)
//! or rebuilt from GGUF metadata the way transformers rebuilds it, so that both
//! produce the same ids as `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
//!
//! GGUF rules mirrored from transformers' `integrations/gguf/gguf_tokenizer_mapping.py`:
//! - `tokenizer.ggml.model = gpt2`: byte-level BPE (vocab respelled in the byte
//!   alphabet where needed, merges from the file), ByteLevel pre-tokenizer with the
//!   GPT-2 regex unless `tokenizer.ggml.pre` names a known split regex, no BOS unless
//!   `tokenizer.ggml.add_bos_token` says so.
//! - `tokenizer.ggml.model = llama`: sentencepiece-style BPE with byte fallback,
//!   Metaspace("▁", prepend first), merges from the file or derived from the scores,
//!   BOS added unless `add_bos_token` is false.
//! - Control tokens (type 3) become special added tokens, user-defined ones (type 4)
//!   plain added tokens.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::bail_input;
use crate::error::bad_input;
use crate::gguf::GgufFile;

/// A special token's text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// A tokenizer plus what prompts and generation need from the model's files.
#[derive(Clone)]
pub struct ModelTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    pub unk: Option<SpecialToken>,
    /// The chat template (Jinja source), if the model has one.
    pub chat_template: Option<String>,
}

impl ModelTokenizer {
    /// Token ids of `text`; `add_special_tokens` adds BOS/EOS as the tokenizer's
    /// post-processor says (what `tokenizer(text)` does in transformers).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("tokenizing failed: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The vocabulary string of a token id ("Ġthe", "<|im_end|>").
    pub fn token_text(&self, id: u32) -> String {
        self.tokenizer
            .id_to_token(id)
            .unwrap_or_else(|| format!("<id {id}>"))
    }

    /// Ids back to text, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("decoding failed: {e}"))
    }

    /// The id of a token given by its text, if it is one token of the vocabulary.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokenizer.token_to_id(text)
    }

    /// Values for the chat template's special-token variables (bos_token, eos_token...).
    pub fn special_token_texts(&self) -> Vec<(&'static str, String)> {
        [
            ("bos_token", &self.bos),
            ("eos_token", &self.eos),
            ("pad_token", &self.pad),
            ("unk_token", &self.unk),
        ]
        .into_iter()
        .filter_map(|(name, token)| token.as_ref().map(|t| (name, t.text.clone())))
        .collect()
    }

    /// Reads tokenizer.json, tokenizer_config.json and chat_template.jinja from an HF folder.
    pub fn from_hf_folder(dir: &Path) -> Result<ModelTokenizer> {
        let tokenizer = read_tokenizer_json(dir)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_tokenizer_config(dir)?;
        let special = |name: &str| -> Option<SpecialToken> {
            let text = match config.get(name)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o.get("content")?.as_str()?.to_string(),
                _ => return None,
            };
            let id = tokenizer.token_to_id(&text)?;
            Some(SpecialToken { text, id })
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .with_context(|| format!("reading {}", jinja_path.display()))?,
            )
        } else {
            template_from_config(&config_path, config.get("chat_template"))?
        };
        Ok(ModelTokenizer {
            bos: special("bos_token"),
            eos: special("eos_token"),
            pad: special("pad_token"),
            unk: special("unk_token"),
            tokenizer,
            chat_template,
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes (see the module docs).
    pub fn from_gguf(gguf: &GgufFile) -> Result<ModelTokenizer> {
        let path = gguf.path.display();
        let model = gguf.get_str("tokenizer.ggml.model").ok_or_else(|| {
            bad_input(format!(
                "{path}: GGUF has no tokenizer (tokenizer.ggml.model is missing)"
            ))
        })?;
        let tokens = gguf
            .get_strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| bad_input(format!("{path}: GGUF has no tokenizer.ggml.tokens")))?;
        let token_types = gguf
            .get_ints("tokenizer.ggml.token_type")?
            .unwrap_or_default();
        let merges = gguf.get_strings("tokenizer.ggml.merges")?;
        let add_bos_flag = gguf.get_bool("tokenizer.ggml.add_bos_token");
        let add_eos = gguf
            .get_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);
        let special_id = |key: &str| -> Option<u32> {
            let id = gguf.get_i64(&format!("tokenizer.ggml.{key}"))?;
            (id >= 0 && (id as usize) < tokens.len()).then_some(id as u32)
        };
        let special = |key: &str| -> Option<SpecialToken> {
            special_id(key).map(|id| SpecialToken {
                text: tokens[id as usize].to_string(),
                id,
            })
        };
        let (bos, eos, unk, pad) = (
            special("bos_token_id"),
            special("eos_token_id"),
            special("unknown_token_id"),
            special("padding_token_id"),
        );

        let (mut tokenizer, add_bos, byte_level) = match model {
            "gpt2" => {
                let pre = gguf.get_str("tokenizer.ggml.pre");
                let merges = merges.ok_or_else(|| {
                    bad_input(format!(
                        "{path}: byte-level GGUF tokenizer without tokenizer.ggml.merges"
                    ))
                })?;
                (
                    byte_level_bpe(&tokens, &merges, pre)?,
                    add_bos_flag.unwrap_or(false),
                    true,
                )
            }
            "llama" => {
                let merges = match merges {
                    Some(merges) => split_merges(&merges),
                    None => {
                        let scores = gguf.get_floats("tokenizer.ggml.scores")?.ok_or_else(|| {
                            bad_input(format!(
                                "{path}: sentencepiece GGUF tokenizer has neither merges nor scores"
                            ))
                        })?;
                        merges_from_scores(&tokens, &scores)
                    }
                };
                let unk_text = unk.as_ref().map(|t| t.text.clone());
                (
                    sentencepiece_bpe(&tokens, merges, unk_text)?,
                    add_bos_flag.unwrap_or(true),
                    false,
                )
            }
            other => bail_input!(
                "{path}: tokenizer.ggml.model = '{other}' is not supported (gpt2 and llama are)"
            ),
        };

        // Control tokens are special; in a byte-level vocabulary a "control" token spelled
        // outside the byte alphabet is a llama.cpp mislabel and transformers skips it.
        let alphabet = byte_alphabet();
        let mut control = Vec::new();
        let mut user_defined = Vec::new();
        for (token, &kind) in tokens.iter().zip(token_types.iter()) {
            match kind {
                3 if !byte_level || token.chars().all(|c| alphabet.contains_key(&c)) => {
                    control.push(AddedToken::from(token.to_string(), true).normalized(false))
                }
                4 => {
                    user_defined.push(AddedToken::from(token.to_string(), false).normalized(false))
                }
                _ => {}
            }
        }
        // transformers also registers bos/eos/unk/pad as special tokens.
        for token in [&bos, &eos, &unk, &pad].into_iter().flatten() {
            if !control.iter().any(|t| t.content == token.text) {
                control.push(AddedToken::from(token.text.clone(), true).normalized(false));
            }
        }
        tokenizer
            .add_special_tokens(control)
            .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
        tokenizer
            .add_tokens(user_defined)
            .map_err(|e| anyhow::anyhow!("adding user-defined tokens: {e}"))?;
        tokenizer.with_post_processor(Some(post_processor(
            add_bos.then_some(bos.as_ref()).flatten(),
            add_eos.then_some(eos.as_ref()).flatten(),
        )?));

        Ok(ModelTokenizer {
            tokenizer,
            bos,
            eos,
            pad,
            unk,
            chat_template: gguf.get_str("tokenizer.chat_template").map(str::to_string),
        })
    }
}

/// `chat_template` in tokenizer_config.json: a string, or a list of named templates
/// from which transformers uses "default".
fn template_from_config(path: &Path, value: Option<&serde_json::Value>) -> Result<Option<String>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(items)) => {
            let default = items
                .iter()
                .find(|item| item.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|item| item.get("template").and_then(|t| t.as_str()));
            if let Some(template) = default {
                return Ok(Some(template.to_string()));
            }
            bail_input!(
                "{}: chat_template is a list without a template named \"default\"",
                path.display()
            )
        }
        Some(_) => bail_input!(
            "{}: chat_template must be a string or a list",
            path.display()
        ),
    }
}

/// GPT-2's byte-to-unicode table: every byte gets a printable character, so any byte
/// string can be a BPE token. Maps character -> byte.
fn byte_alphabet() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut extra = 0;
    for byte in 0..256u32 {
        if !printable.contains(&byte) {
            printable.push(byte);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(byte, c)| (char::from_u32(c).expect("valid char"), byte as u8))
        .collect()
}

/// The split regexes transformers uses for `tokenizer.ggml.pre` values whose merges
/// were learned with something other than GPT-2's regex.
fn pre_tokenizer_split(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => Some(LLAMA3),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

fn split_merges(merges: &[&str]) -> Vec<(String, String)> {
    merges
        .iter()
        .filter_map(|m| {
            let (a, b) = m.split_once(' ')?;
            Some((a.to_string(), b.to_string()))
        })
        .collect()
}

fn byte_level_bpe(tokens: &[&str], merges: &[&str], pre: Option<&str>) -> Result<Tokenizer> {
    let alphabet = byte_alphabet();
    let spelling: HashMap<u8, char> = alphabet.iter().map(|(&c, &b)| (b, c)).collect();
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let spelled = if token.chars().all(|c| alphabet.contains_key(&c)) {
            token.to_string()
        } else {
            token.bytes().map(|b| spelling[&b]).collect()
        };
        // Python's dict keeps the last id for a repeated token; so do we.
        vocab.insert(spelled, id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, split_merges(merges))
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .fuse_unk(false)
        .build()
        .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    match pre.and_then(pre_tokenizer_split) {
        Some(regex) => {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}"))?;
            tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        None => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
    }
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

fn sentencepiece_bpe(
    tokens: &[&str],
    merges: Vec<(String, String)>,
    unk: Option<String>,
) -> Result<Tokenizer> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.to_string(), id as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow::anyhow!("building the BPE model: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("▁", " ")
            .map_err(|e| anyhow::anyhow!("decoder: {e}"))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(tokenizer)
}

/// transformers' `generate_merges`: every split of every token into two vocabulary
/// pieces is a merge, ranked by the token's score (best first), then by the lengths of
/// the two pieces (longer first). Ties keep vocabulary order, as Python's stable sort does.
/// Loads an HF folder's tokenizer.json (fast tokenizers only; never a slow/pickled one).
pub fn read_tokenizer_json(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        bail_input!(
            "{}: no tokenizer.json (amthal reads fast tokenizers only; \
             save one with tokenizer.save_pretrained in transformers)",
            dir.display()
        );
    }
    Tokenizer::from_file(&path)
        .map_err(|e| bad_input(format!("{}: cannot load: {e}", path.display())))
}

/// An HF folder's tokenizer_config.json, or `Null` when it has none.
pub fn read_tokenizer_config(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(serde_json::Value::Null);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| bad_input(format!("{}: invalid JSON: {e}", path.display())))
}

pub fn merges_from_scores(tokens: &[&str], scores: &[f64]) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (id, &token) in tokens.iter().enumerate() {
        vocab.insert(token, id);
        if score_of
            .insert(token, scores.get(id).copied().unwrap_or(0.0))
            .is_none()
        {
            order.push(token);
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for &token in &order {
        let score = score_of[token];
        let boundaries: Vec<usize> = token.char_indices().map(|(i, _)| i).skip(1).collect();
        let mut local: Vec<(&str, &str, f64)> = boundaries
            .into_iter()
            .map(|i| (&token[..i], &token[i..]))
            .filter(|(left, right)| vocab.contains_key(left) && vocab.contains_key(right))
            .map(|(left, right)| (left, right, score))
            .collect();
        local.sort_by_key(|(left, right, _)| (vocab[left], vocab[right]));
        merges.extend(local);
    }
    let char_len = |s: &str| s.chars().count();
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| char_len(b.0).cmp(&char_len(a.0)))
            .then_with(|| char_len(b.1).cmp(&char_len(a.1)))
    });
    merges
        .into_iter()
        .map(|(a, b, _)| (a.to_string(), b.to_string()))
        .collect()
}

/// transformers' post-processor: "[BOS] $A [EOS]" with each part only when enabled.
fn post_processor(
    bos: Option<&SpecialToken>,
    eos: Option<&SpecialToken>,
) -> Result<TemplateProcessing> {
    let mut single = String::new();
    let mut pair = String::new();
    let mut specials = Vec::new();
    if let Some(bos) = bos {
        single.push_str(&format!("{}:0 ", bos.text));
        specials.push((bos.text.clone(), bos.id));
    }
    single.push_str("$A:0");
    pair.push_str(&single);
    if let Some(eos) = eos {
        single.push_str(&format!(" {}:0", eos.text));
        pair.push_str(&format!(" {}:0", eos.text));
        specials.push((eos.text.clone(), eos.id));
    }
    if let Some(bos) = bos {
        pair.push_str(&format!(" {}:1", bos.text));
    }
    pair.push_str(" $B:1");
    if let Some(eos) = eos {
        pair.push_str(&format!(" {}:1", eos.text));
    }
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(|e| anyhow::anyhow!("post-processor: {e}"))?
        .try_pair(pair.as_str())
        .map_err(|e| anyhow::anyhow!("post-processor: {e}"))?
        .special_tokens(specials)
        .build()
        .map_err(|e| anyhow::anyhow!("post-processor: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_covers_every_byte_once() {
        let alphabet = byte_alphabet();
        assert_eq!(alphabet.len(), 256);
        let mut bytes: Vec<u8> = alphabet.values().copied().collect();
        bytes.sort();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(alphabet[&'Ġ'], b' ');
        assert_eq!(alphabet[&'A'], b'A');
    }

    #[test]
    fn merges_from_scores_rank_by_score_then_length() {
        let tokens = ["a", "b", "c", "ab", "abc", "bc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -0.5, -2.0];
        let merges = merges_from_scores(&tokens, &scores);
        // "abc" (score -0.5) splits as ab+c and a+bc; longer left piece first.
        assert_eq!(
            merges,
            vec![
                ("ab".to_string(), "c".to_string()),
                ("a".to_string(), "bc".to_string()),
                ("a".to_string(), "b".to_string()),
                ("b".to_string(), "c".to_string()),
            ]
        );
    }
}
