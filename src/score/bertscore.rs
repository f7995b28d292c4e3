//! BERTScore as the `bert_score` package (0.3.12) computes it with `score(cands, refs,
//! model_type=..., num_layers=L, idf=..., batch_size=..., rescale_with_baseline=...)`:
//!
//! - Each sentence is stripped (Python `str.strip`), tokenized with [CLS] ... [SEP] and
//!   truncated to the tokenizer's `model_max_length` (tokenizer_config.json, capped at the
//!   model's `max_position_embeddings`); an empty sentence is just [CLS] [SEP].
//! - Token embeddings are the hidden states after layer L (0 = the embeddings output),
//!   L2-normalised; [CLS] and [SEP] take part in the matching.
//! - Token weights: without idf 1, with [CLS] and [SEP] 0; with idf
//!   `ln((M + 1) / (df + 1))` where M is the number of references and df the number of
//!   references containing the token id (so [CLS]/[SEP] get 0), `ln(M + 1)` for tokens
//!   no reference has. Weights are divided by their sum per sentence (0/0 gives NaN,
//!   which bert_score keeps in P or R).
//! - Greedy matching: P averages each candidate token's best cosine over the reference
//!   tokens, R each reference token's best over the candidate tokens. bert_score pads a
//!   batch of `batch_size` pairs and zeroes padded similarities before the max, so a
//!   token whose best cosine is negative scores 0 when its partner sentence is shorter
//!   than the longest in its batch; amthal reproduces this (hence `batch_size`).
//! - F = 2PR / (P + R) with NaN set to 0; a candidate or reference of just [CLS] [SEP]
//!   sets P and R to 0.
//! - Baseline rescaling: `(x - b) / (1 - b)` for P, R and F separately, `b` from row L
//!   (0-based, after the header) of a bert_score baseline file (`LAYER,P,R,F` CSV).
//!
//! Arithmetic is f32 as in bert_score; results are returned as f64.
//!
//! One difference from running the package under transformers 5: bert_score 0.3.12
//! raises AttributeError on an empty (after strip) sentence there, because tokenizers
//! lost `build_inputs_with_special_tokens`; amthal uses the transformers 4 result,
//! [CLS] [SEP], which scores 0 (see scripts/golden/make_embedding_golden.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::{Device, Tensor};

use super::chrf::is_python_space;
use super::encoder_model::{EncoderTokenizer, pad_batch};
use crate::bail_input;
use crate::model::bert::BertModel;

pub const DEFAULT_BERTSCORE_MODEL: &str = "bert-base-multilingual-cased";
pub const DEFAULT_BERTSCORE_LAYER: usize = 9;

/// bert_score's `model2layers` for the BERT models amthal can run.
const MODEL_LAYERS: [(&str, usize); 5] = [
    ("bert-base-uncased", 9),
    ("bert-large-uncased", 18),
    ("bert-base-cased-finetuned-mrpc", 9),
    ("bert-base-multilingual-cased", DEFAULT_BERTSCORE_LAYER),
    ("bert-base-chinese", 8),
];

/// How to score.
#[derive(Debug, Clone, PartialEq)]
pub struct BertScoreOptions {
    /// The hidden state to use: 0 is the embeddings output, n the output of layer n.
    /// `None`: bert_score's tuned layer when the folder is a model it knows (its name, or
    /// the Hub cache's `models--org--name`, is a path component: bert-base-multilingual-cased
    /// gives 9), else the last layer (bert_score itself would refuse an unknown model).
    pub layer: Option<usize>,
    /// idf weights from the references (bert_score `idf=True`).
    pub idf: bool,
    /// A bert_score baseline file to rescale with.
    pub baseline: Option<PathBuf>,
    /// Pairs per matching batch (bert_score `batch_size`, default 64); it changes
    /// results slightly, see the module docs.
    pub batch_size: usize,
}

impl Default for BertScoreOptions {
    fn default() -> Self {
        BertScoreOptions {
            layer: None,
            idf: false,
            baseline: None,
            batch_size: 64,
        }
    }
}

/// Precision, recall and F1 of one pair.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Prf {
    pub p: f64,
    pub r: f64,
    pub f: f64,
}

pub struct BertScorer {
    model: BertModel,
    tokenizer: EncoderTokenizer,
    layer: usize,
    idf: bool,
    baseline: Option<[f32; 3]>,
    batch_size: usize,
}

/// The layer bert_score would pick for the model in `folder`, if it knows the model.
pub fn known_model_layer(folder: &Path) -> Option<usize> {
    folder.components().rev().find_map(|component| {
        let name = component.as_os_str().to_str()?;
        let name = name.rsplit("--").next().unwrap_or(name);
        MODEL_LAYERS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, layer)| *layer)
    })
}

/// Row `layer` of a bert_score baseline file: (P, R, F).
pub fn read_baseline(path: &Path, layer: usize) -> Result<[f32; 3]> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::error::bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    if header.len() != 4 {
        bail_input!(
            "{}: expected bert_score's baseline format, a comma-separated header LAYER,P,R,F; found {:?}",
            path.display(),
            header.join(",")
        );
    }
    let rows: Vec<&str> = lines.collect();
    let Some(row) = rows.get(layer) else {
        bail_input!(
            "{}: no baseline row for layer {layer} (the file has {} rows)",
            path.display(),
            rows.len()
        );
    };
    let fields: Vec<&str> = row.split(',').map(str::trim).collect();
    let parse = |s: &str| -> Result<f32> {
        s.parse::<f32>().map_err(|_| {
            crate::error::bad_input(format!(
                "{}: row {}: {s:?} is not a number",
                path.display(),
                layer + 2
            ))
        })
    };
    if fields.len() != 4 {
        bail_input!(
            "{}: row {}: expected 4 comma-separated fields, found {}",
            path.display(),
            layer + 2,
            fields.len()
        );
    }
    Ok([parse(fields[1])?, parse(fields[2])?, parse(fields[3])?])
}

/// One sentence's normalised token embeddings [n, d] and token weights.
struct Sentence {
    embeddings: Tensor,
    ids: Vec<u32>,
}

impl BertScorer {
    pub fn load(folder: &Path, options: BertScoreOptions, device: Device) -> Result<BertScorer> {
        let model = BertModel::load(folder, device)?;
        let mut tokenizer = EncoderTokenizer::from_folder(folder)?;
        let max_positions = model.config.max_position_embeddings;
        let max_length = tokenizer
            .model_max_length
            .unwrap_or(max_positions)
            .min(max_positions);
        tokenizer.set_max_length(max_length)?;
        let layer = options
            .layer
            .or_else(|| known_model_layer(folder))
            .unwrap_or(model.num_layers());
        if layer > model.num_layers() {
            bail_input!(
                "BERTScore layer {layer}: {} has only {} layers (0 is the embeddings output)",
                folder.display(),
                model.num_layers()
            );
        }
        let baseline = match &options.baseline {
            Some(path) => Some(read_baseline(path, layer)?),
            None => None,
        };
        if options.batch_size == 0 {
            bail_input!("BERTScore batch size must be at least 1");
        }
        Ok(BertScorer {
            model,
            tokenizer,
            layer,
            idf: options.idf,
            baseline,
            batch_size: options.batch_size,
        })
    }

    /// The hidden state used (0 = embeddings output).
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// bert_score's `sent_encode`.
    fn sent_encode(&self, text: &str) -> Result<Vec<u32>> {
        let text = text.trim_matches(is_python_space);
        if text.is_empty() {
            return Ok(vec![self.tokenizer.cls_id, self.tokenizer.sep_id]);
        }
        self.tokenizer.encode(text)
    }

    /// Normalised embeddings of each distinct sentence.
    fn embed_all(&self, texts: &[&str]) -> Result<HashMap<String, Sentence>> {
        let mut unique: Vec<(&str, Vec<u32>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &text in texts {
            if seen.insert(text) {
                unique.push((text, self.sent_encode(text)?));
            }
        }
        // Longest first, to pad little; results do not depend on the grouping.
        unique.sort_by_key(|(_, ids)| std::cmp::Reverse(ids.len()));
        let mut out = HashMap::new();
        for chunk in unique.chunks(self.batch_size.max(1)) {
            let rows: Vec<&[u32]> = chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
            let (ids, mask) = pad_batch(&rows, self.tokenizer.pad_id, self.model.device);
            let hidden = self
                .model
                .hidden_states_upto(&ids, &mask, self.layer)
                .to_device(Device::Cpu);
            let normed = &hidden / hidden.norm_scalaropt_dim(2, [-1], true);
            for (row, (text, token_ids)) in chunk.iter().enumerate() {
                let embeddings = normed.get(row as i64).narrow(0, 0, token_ids.len() as i64);
                out.insert(
                    text.to_string(),
                    Sentence {
                        embeddings,
                        ids: token_ids.clone(),
                    },
                );
            }
        }
        Ok(out)
    }

    /// P, R, F per pair (`hypotheses[i]` against `references[i]`).
    pub fn score(&self, hypotheses: &[&str], references: &[&str]) -> Result<Vec<Prf>> {
        if hypotheses.len() != references.len() {
            bail_input!(
                "BERTScore: {} hypotheses but {} references",
                hypotheses.len(),
                references.len()
            );
        }
        if hypotheses.is_empty() {
            return Ok(Vec::new());
        }
        let _guard = tch::no_grad_guard();
        let all: Vec<&str> = references.iter().chain(hypotheses).copied().collect();
        let sentences = self.embed_all(&all)?;
        let idf = self.idf_weights(references, &sentences);
        let weights = |s: &Sentence| -> Vec<f32> {
            s.ids
                .iter()
                .map(|id| match &idf {
                    Some((table, unseen)) => table.get(id).copied().unwrap_or(*unseen),
                    None if *id == self.tokenizer.cls_id || *id == self.tokenizer.sep_id => 0.0,
                    None => 1.0,
                })
                .collect()
        };
        let mut scores = Vec::with_capacity(hypotheses.len());
        for start in (0..hypotheses.len()).step_by(self.batch_size) {
            let end = (start + self.batch_size).min(hypotheses.len());
            let hyps: Vec<&Sentence> = hypotheses[start..end]
                .iter()
                .map(|h| &sentences[*h])
                .collect();
            let refs: Vec<&Sentence> = references[start..end]
                .iter()
                .map(|r| &sentences[*r])
                .collect();
            let hyp_width = hyps.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            let ref_width = refs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
            for (hyp, reference) in hyps.iter().zip(&refs) {
                let sim = hyp.embeddings.matmul(&reference.embeddings.tr());
                let mut precision = Vec::<f32>::try_from(sim.amax([1], false))?;
                let mut recall = Vec::<f32>::try_from(sim.amax([0], false))?;
                // Padded similarities are 0 in bert_score's batch and enter the max.
                if reference.ids.len() < ref_width {
                    precision.iter_mut().for_each(|x| *x = x.max(0.0));
                }
                if hyp.ids.len() < hyp_width {
                    recall.iter_mut().for_each(|x| *x = x.max(0.0));
                }
                let p = weighted_mean(&precision, &weights(hyp));
                let r = weighted_mean(&recall, &weights(reference));
                let mut f = 2.0 * p * r / (p + r);
                let (mut p, mut r) = (p, r);
                if hyp.ids.len() == 2 || reference.ids.len() == 2 {
                    p = 0.0;
                    r = 0.0;
                }
                if f.is_nan() {
                    f = 0.0;
                }
                let mut prf = [p, r, f];
                if let Some(baseline) = &self.baseline {
                    for (x, b) in prf.iter_mut().zip(baseline) {
                        *x = (*x - b) / (1.0 - b);
                    }
                }
                scores.push(Prf {
                    p: prf[0] as f64,
                    r: prf[1] as f64,
                    f: prf[2] as f64,
                });
            }
        }
        Ok(scores)
    }

    /// idf per token id from the references, and the weight of ids no reference has.
    fn idf_weights(
        &self,
        references: &[&str],
        sentences: &HashMap<String, Sentence>,
    ) -> Option<(HashMap<u32, f32>, f32)> {
        if !self.idf {
            return None;
        }
        let mut df: HashMap<u32, usize> = HashMap::new();
        for reference in references {
            let mut ids = sentences[*reference].ids.clone();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                *df.entry(id).or_insert(0) += 1;
            }
        }
        let m = references.len() as f64;
        let table = df
            .into_iter()
            .map(|(id, count)| (id, ((m + 1.0) / (count as f64 + 1.0)).ln() as f32))
            .collect();
        Some((table, (m + 1.0).ln() as f32))
    }
}

/// sum(x * w / sum(w)) in f32, as bert_score scales then sums.
fn weighted_mean(values: &[f32], weights: &[f32]) -> f32 {
    let total: f32 = weights.iter().sum();
    values
        .iter()
        .zip(weights)
        .map(|(x, w)| x * (w / total))
        .sum()
}
