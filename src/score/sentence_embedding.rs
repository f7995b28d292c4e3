//! Sentence embeddings as sentence-transformers (6.2) computes them for a BERT model
//! folder, and the semantic answer similarity (SAS) built on them: the cosine of the
//! hypothesis and reference embeddings, `util.cos_sim(model.encode(h), model.encode(r))`
//! read on the diagonal.
//!
//! modules.json lists the pipeline; amthal runs Transformer (a BERT folder at path ""
//! or a subfolder), Pooling (cls, max, mean, mean_sqrt_len_tokens, several concatenated)
//! and Normalize, and refuses any other module by name. Without modules.json the folder
//! is a plain BERT with mean pooling, as sentence-transformers builds it.
//! Texts are tokenized as given (no strip), truncated to `max_seq_length`
//! (sentence_bert_config.json, else the tokenizer's model_max_length capped at
//! max_position_embeddings), lowercased first when do_lower_case is set and the
//! tokenizer does not lowercase already.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::{Device, Kind, Tensor};
use tokenizers::NormalizerWrapper;
use tokenizers::normalizers::{Lowercase, Sequence};

use super::encoder_model::{EncoderTokenizer, pad_batch, read_json};
use crate::bail_input;
use crate::error::bad_input;
use crate::model::bert::BertModel;

/// Texts per forward pass (sentence-transformers' encode default).
pub const BATCH_SIZE: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingMode {
    Cls,
    Max,
    Mean,
    MeanSqrtLen,
}

pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: EncoderTokenizer,
    pooling: Vec<PoolingMode>,
    normalize: bool,
    pub max_seq_length: usize,
}

/// The module types amthal runs, by the last part of their Python class path.
fn module_kind(type_name: &str) -> Option<&'static str> {
    if !type_name.starts_with("sentence_transformers.") {
        return None;
    }
    match type_name.rsplit('.').next()? {
        "Transformer" => Some("Transformer"),
        "Pooling" => Some("Pooling"),
        "Normalize" => Some("Normalize"),
        _ => None,
    }
}

fn pooling_modes(path: &Path) -> Result<Vec<PoolingMode>> {
    let config = read_json(path)?;
    let parse = |name: &str| -> Result<PoolingMode> {
        Ok(match name {
            "cls" => PoolingMode::Cls,
            "max" => PoolingMode::Max,
            "mean" => PoolingMode::Mean,
            "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
            other => bail_input!(
                "{}: pooling mode {other:?} is not supported (amthal pools with cls, max, mean, mean_sqrt_len_tokens)",
                path.display()
            ),
        })
    };
    match config.get("pooling_mode") {
        Some(serde_json::Value::String(mode)) => return Ok(vec![parse(mode)?]),
        Some(serde_json::Value::Array(modes)) => {
            return modes
                .iter()
                .map(|m| {
                    m.as_str()
                        .ok_or_else(|| {
                            bad_input(format!(
                                "{}: pooling_mode entries are strings",
                                path.display()
                            ))
                        })
                        .and_then(parse)
                })
                .collect();
        }
        Some(_) => bail_input!("{}: pooling_mode is not a string or list", path.display()),
        None => {}
    }
    // Legacy boolean keys, in sentence-transformers' order.
    let legacy = [
        ("pooling_mode_cls_token", "cls"),
        ("pooling_mode_max_tokens", "max"),
        ("pooling_mode_mean_tokens", "mean"),
        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len_tokens"),
        ("pooling_mode_weightedmean_tokens", "weightedmean"),
        ("pooling_mode_lasttoken", "lasttoken"),
    ];
    let active: Vec<&str> = legacy
        .iter()
        .filter(|(key, _)| config.get(*key).and_then(|v| v.as_bool()) == Some(true))
        .map(|(_, mode)| *mode)
        .collect();
    if active.is_empty() {
        return Ok(vec![PoolingMode::Mean]);
    }
    active.into_iter().map(parse).collect()
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder (or a plain BERT folder: mean pooling).
    pub fn load(folder: &Path, device: Device) -> Result<SentenceEncoder> {
        let modules_path = folder.join("modules.json");
        let mut transformer: Option<PathBuf> = None;
        let mut pooling = None;
        let mut normalize = false;
        if modules_path.is_file() {
            let modules = read_json(&modules_path)?;
            let Some(modules) = modules.as_array() else {
                bail_input!("{}: expected a list of modules", modules_path.display());
            };
            for module in modules {
                let type_name = module.get("type").and_then(|t| t.as_str()).unwrap_or("");
                let sub = module.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let dir = if sub.is_empty() {
                    folder.to_path_buf()
                } else {
                    folder.join(sub)
                };
                match module_kind(type_name) {
                    Some("Transformer") if transformer.is_none() && pooling.is_none() => {
                        transformer = Some(dir)
                    }
                    Some("Pooling") if transformer.is_some() && pooling.is_none() => {
                        pooling = Some(pooling_modes(&dir.join("config.json"))?)
                    }
                    Some("Normalize") if pooling.is_some() => normalize = true,
                    Some(kind) => bail_input!(
                        "{}: module {type_name:?} ({kind}) at an unsupported place in the pipeline; \
                         amthal runs Transformer, Pooling, then optionally Normalize",
                        modules_path.display()
                    ),
                    None => bail_input!(
                        "{}: module type {type_name:?} is not supported; amthal runs \
                         sentence_transformers Transformer, Pooling and Normalize modules only",
                        modules_path.display()
                    ),
                }
            }
        } else {
            transformer = Some(folder.to_path_buf());
        }
        let Some(transformer) = transformer else {
            bail_input!("{}: no Transformer module", modules_path.display());
        };
        let pooling = pooling.unwrap_or_else(|| vec![PoolingMode::Mean]);
        let model = BertModel::load(&transformer, device)?;
        let mut tokenizer = EncoderTokenizer::from_folder(&transformer)?;
        let st_config_path = transformer.join("sentence_bert_config.json");
        let st_config = if st_config_path.is_file() {
            read_json(&st_config_path)?
        } else {
            serde_json::Value::Null
        };
        let max_positions = model.config.max_position_embeddings;
        let max_seq_length = match st_config.get("max_seq_length").and_then(|v| v.as_u64()) {
            Some(n) => n as usize,
            None => tokenizer
                .model_max_length
                .unwrap_or(max_positions)
                .min(max_positions),
        };
        if max_seq_length > max_positions {
            bail_input!(
                "{}: max_seq_length {max_seq_length} exceeds the model's max_position_embeddings {max_positions}",
                st_config_path.display()
            );
        }
        tokenizer.set_max_length(max_seq_length)?;
        if st_config.get("do_lower_case").and_then(|v| v.as_bool()) == Some(true) {
            add_lowercase(&mut tokenizer)?;
        }
        Ok(SentenceEncoder {
            model,
            tokenizer,
            pooling,
            normalize,
            max_seq_length,
        })
    }

    pub fn pooling(&self) -> &[PoolingMode] {
        &self.pooling
    }

    /// Sentence embeddings [N, D] (f32, CPU), in the order of `texts`.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let encoded: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<_>>()?;
        // Longest first so batches pad little; each row's result does not depend on it.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let mut rows: Vec<Option<Tensor>> = (0..texts.len()).map(|_| None).collect();
        for chunk in order.chunks(BATCH_SIZE) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let (ids, mask) = pad_batch(&batch, self.tokenizer.pad_id, self.model.device);
            let tokens = self
                .model
                .hidden_states_upto(&ids, &mask, self.model.num_layers());
            let pooled = self.pool(&tokens, &mask).to_device(Device::Cpu);
            for (row, &i) in chunk.iter().enumerate() {
                rows[i] = Some(pooled.get(row as i64));
            }
        }
        if texts.is_empty() {
            let width = self.model.config.hidden_size * self.pooling.len();
            return Ok(Tensor::zeros([0, width as i64], (Kind::Float, Device::Cpu)));
        }
        let rows: Vec<Tensor> = rows.into_iter().map(|r| r.expect("every row")).collect();
        Ok(Tensor::stack(&rows, 0))
    }

    fn pool(&self, tokens: &Tensor, mask: &Tensor) -> Tensor {
        let mask_f = mask.to_kind(Kind::Float).unsqueeze(-1);
        let mut parts = Vec::new();
        for mode in &self.pooling {
            parts.push(match mode {
                PoolingMode::Cls => {
                    // The first real token (right padding: position 0).
                    let first = mask.argmax(1, false);
                    let hidden = tokens.size()[2];
                    let index = first.view([-1, 1, 1]).expand([-1, 1, hidden], false);
                    tokens.gather(1, &index, false).squeeze_dim(1)
                }
                PoolingMode::Max => tokens
                    .masked_fill(&mask_f.eq(0.0), f64::NEG_INFINITY)
                    .amax([1], false),
                PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
                    let sum = (tokens * &mask_f).sum_dim_intlist(1, false, Kind::Float);
                    let count = mask_f
                        .sum_dim_intlist(1, false, Kind::Float)
                        .clamp_min(1e-9);
                    if *mode == PoolingMode::Mean {
                        sum / count
                    } else {
                        sum / count.sqrt()
                    }
                }
            });
        }
        let pooled = Tensor::cat(&parts, -1);
        if self.normalize {
            normalize(&pooled)
        } else {
            pooled
        }
    }

    /// Cosine of each hypothesis embedding with its reference's.
    pub fn cosine_similarities(
        &self,
        hypotheses: &[&str],
        references: &[&str],
    ) -> Result<Vec<f64>> {
        if hypotheses.len() != references.len() {
            bail_input!(
                "SAS: {} hypotheses but {} references",
                hypotheses.len(),
                references.len()
            );
        }
        let a = normalize(&self.embed(hypotheses)?);
        let b = normalize(&self.embed(references)?);
        let cos = (a * b).sum_dim_intlist(1, false, Kind::Float);
        Ok(Vec::<f32>::try_from(cos)?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

/// torch.nn.functional.normalize(x, p=2, dim=-1): x / max(||x||, 1e-12).
fn normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
    x / norm
}

/// Prepends a Lowercase normalizer unless the tokenizer already has one (what
/// sentence-transformers does for do_lower_case).
fn add_lowercase(tokenizer: &mut EncoderTokenizer) -> Result<()> {
    let current = tokenizer.tokenizer.get_normalizer().cloned();
    let has_lowercase = match &current {
        Some(NormalizerWrapper::Lowercase(_)) => true,
        Some(NormalizerWrapper::Sequence(seq)) => seq
            .as_ref()
            .iter()
            .any(|n| matches!(n, NormalizerWrapper::Lowercase(_))),
        _ => false,
    };
    if has_lowercase {
        return Ok(());
    }
    let mut normalizers = vec![NormalizerWrapper::Lowercase(Lowercase)];
    match current {
        Some(NormalizerWrapper::Sequence(seq)) => normalizers.extend(seq.as_ref().iter().cloned()),
        Some(other) => normalizers.push(other),
        None => {}
    }
    tokenizer
        .tokenizer
        .with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(
            normalizers,
        ))))
        .map_err(|e| anyhow::anyhow!("adding a lowercase normalizer: {e}"))?;
    Ok(())
}
