//! Runs the chosen metrics over a list of (generated, reference) pairs: per-row
//! columns and a summary (mean over the scored rows, plus the corpus-level score for
//! the metrics that define one). Rows without a reference are not scored.
//!
//! Scales are those of the Python packages, so numbers can be compared directly:
//! sacrebleu BLEU and chrF++ 0..100, NLTK BLEU, ROUGE and BERTScore 0..1, cosine -1..1.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;
use tch::Device;

use super::bertscore::{BertScoreOptions, BertScorer, DEFAULT_BERTSCORE_MODEL};
use super::bleu::{BleuTokenizer, corpus_bleu, nltk_sentence_bleu, sentence_bleu};
use super::checks::{TaskChecks, has_latin, is_empty_output, task_checks, word_count};
use super::chrf::{ChrfConfig, corpus_chrf, sentence_chrf};
use super::encoder_model::{Located, locate_encoder};
use super::metric::Metric;
use super::normalize::Normalization;
use super::rouge::{Fpr, rouge};
use super::sentence_embedding::SentenceEncoder;
use crate::bail_input;

/// The default sentence-embedding model (fetched by scripts/setup).
pub const DEFAULT_EMBEDDING_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// What to compute and with which models.
#[derive(Debug, Clone)]
pub struct ScoreOptions {
    pub metrics: Vec<Metric>,
    /// Metrics the user named (by --metrics or by giving their model): a model that
    /// cannot be found is then an error instead of a skipped metric with a warning.
    pub explicit: BTreeSet<Metric>,
    pub normalization: Normalization,
    pub bertscore_model: String,
    pub bertscore_layer: Option<usize>,
    pub bertscore_idf: bool,
    pub bertscore_baseline: Option<PathBuf>,
    pub embedding_models: Vec<String>,
    /// bert_score's batch size (its scores can depend on it; see the CLI flag).
    pub bertscore_batch_size: usize,
    pub device: Device,
}

impl ScoreOptions {
    /// All metrics with the default models, nothing explicit.
    pub fn defaults() -> ScoreOptions {
        ScoreOptions {
            metrics: Metric::ALL.to_vec(),
            explicit: BTreeSet::new(),
            normalization: Normalization::None,
            bertscore_model: DEFAULT_BERTSCORE_MODEL.to_string(),
            bertscore_layer: None,
            bertscore_idf: false,
            bertscore_baseline: None,
            embedding_models: vec![DEFAULT_EMBEDDING_MODEL.to_string()],
            bertscore_batch_size: 64,
            device: Device::Cpu,
        }
    }
}

/// One per-row column: `None` for rows that were not scored.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

/// One line of the summary table.
#[derive(Debug, Clone, Serialize)]
pub struct SummaryLine {
    pub metric: String,
    /// Mean of the per-row scores over the scored rows.
    pub mean: Option<f64>,
    /// The corpus-level score (sacrebleu BLEU and chrF++ only).
    pub corpus: Option<f64>,
}

/// An encoder model a metric ran with, as resolved (for the summary: which folder and
/// which layer were actually used).
#[derive(Debug, Clone, Serialize)]
pub struct ModelUsed {
    /// The column (prefix) it produced: "bertscore" or "cosine_NAME".
    pub column: String,
    /// What the user (or the default) named.
    pub spec: String,
    pub folder: PathBuf,
    /// BERTScore's hidden-state layer (0 = embeddings output).
    pub layer: Option<usize>,
}

/// Everything `amthal score` reports about one file.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub rows: usize,
    pub scored_rows: usize,
    /// 0-based indices of rows with an empty reference (not scored).
    pub unscored_rows: Vec<usize>,
    #[serde(skip)]
    pub columns: Vec<Column>,
    pub summary: Vec<SummaryLine>,
    pub checks: Option<TaskChecks>,
    pub models: Vec<ModelUsed>,
    /// Metrics left out, with why (a default model that is not available offline).
    pub skipped: Vec<String>,
    /// Rows where a Python package would have raised (e.g. ROUGE of an empty text).
    pub notes: Vec<String>,
}

impl Scores {
    pub fn line(&self, metric: &str) -> Option<&SummaryLine> {
        self.summary.iter().find(|l| l.metric == metric)
    }

    /// The number a metric is reported by: its corpus score where it has one, else
    /// the mean over rows (tables, charts and the demo all show this).
    pub fn headline(&self, metric: &str) -> Option<f64> {
        self.line(metric).and_then(|l| l.corpus.or(l.mean))
    }
}

/// Mean of the present values that are numbers (None when there are none). NaN rows
/// (BERTScore with all-zero idf weights, as bert_score gives) are left out of the mean
/// and counted in the notes, so one such row does not make the whole mean NaN.
fn mean(values: &[Option<f64>]) -> Option<f64> {
    let present: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| !v.is_nan())
        .collect();
    (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
}

/// Collects per-row values for the scored rows into full-length columns.
struct Builder<'a> {
    rows: usize,
    scored: &'a [usize],
    columns: Vec<Column>,
    summary: Vec<SummaryLine>,
}

impl Builder<'_> {
    fn add(&mut self, name: &str, scored_values: Vec<f64>, corpus: Option<f64>) {
        let mut values = vec![None; self.rows];
        for (&row, value) in self.scored.iter().zip(scored_values) {
            values[row] = Some(value);
        }
        self.summary.push(SummaryLine {
            metric: name.to_string(),
            mean: mean(&values),
            corpus,
        });
        self.columns.push(Column {
            name: name.to_string(),
            values,
        });
    }

    /// A column over every row (task checks), without a summary line.
    fn add_all_rows(&mut self, name: &str, values: Vec<f64>) {
        self.columns.push(Column {
            name: name.to_string(),
            values: values.into_iter().map(Some).collect(),
        });
    }
}

/// A short, file-name-safe name for an embedding model spec ("all-MiniLM-L6-v2").
pub fn model_short_name(spec: &str) -> String {
    let trimmed = spec.trim_end_matches(['/', '\\']);
    trimmed
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(trimmed)
        .to_string()
}

/// Finds an encoder model folder; unavailable models are skipped (with the reason)
/// unless the metric was asked for explicitly, which makes them an error.
fn find_model(
    spec: &str,
    metric: Metric,
    options: &ScoreOptions,
    skipped: &mut Vec<String>,
) -> Result<Option<PathBuf>> {
    let reason = match locate_encoder(spec)? {
        Located::Folder(folder) => return Ok(Some(folder)),
        Located::Unavailable(reason) => reason,
    };
    if options.explicit.contains(&metric) {
        bail_input!(
            "{metric}: model {spec} is not available: {reason}. Download it, pass a local \
             folder, or leave {metric} out of --metrics"
        );
    }
    let flag = if metric == Metric::BertScore {
        "--bertscore-model"
    } else {
        "--embedding-model"
    };
    let note = format!(
        "{metric} skipped: model {spec} is not available ({reason}); pass a folder with {flag}"
    );
    // Once per process: `report` and the demo score several files.
    static WARNED: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());
    if WARNED
        .lock()
        .map(|mut w| w.insert(note.clone()))
        .unwrap_or(true)
    {
        tracing::warn!("{note}");
    }
    skipped.push(note);
    Ok(None)
}

/// Scores `generated[i]` against `references[i]` for every row with a reference.
pub fn score(generated: &[&str], references: &[&str], options: &ScoreOptions) -> Result<Scores> {
    assert_eq!(generated.len(), references.len());
    let rows = generated.len();
    let scored: Vec<usize> = (0..rows)
        .filter(|&i| !references[i].trim().is_empty())
        .collect();
    let unscored_rows: Vec<usize> = (0..rows)
        .filter(|&i| references[i].trim().is_empty())
        .collect();
    // The string metrics see normalised text; the embedding metrics the raw text.
    let norm_hyp: Vec<String> = scored
        .iter()
        .map(|&i| options.normalization.apply(generated[i]))
        .collect();
    let norm_ref: Vec<String> = scored
        .iter()
        .map(|&i| options.normalization.apply(references[i]))
        .collect();
    let pairs: Vec<(&str, &str)> = norm_hyp
        .iter()
        .zip(&norm_ref)
        .map(|(h, r)| (h.as_str(), r.as_str()))
        .collect();
    let raw_hyp: Vec<&str> = scored.iter().map(|&i| generated[i]).collect();
    let raw_ref: Vec<&str> = scored.iter().map(|&i| references[i]).collect();

    let mut out = Builder {
        rows,
        scored: &scored,
        columns: Vec::new(),
        summary: Vec::new(),
    };
    let mut skipped = Vec::new();
    let mut notes = Vec::new();
    let mut checks = None;
    let mut models = Vec::new();
    // With no row to score, only the task checks mean anything (and no model is loaded).
    let metrics: Vec<Metric> = if scored.is_empty() {
        options
            .metrics
            .iter()
            .copied()
            .filter(|&m| m == Metric::Checks)
            .collect()
    } else {
        options.metrics.clone()
    };
    for &metric in &metrics {
        match metric {
            Metric::Bleu | Metric::BleuIntl => {
                let (tokenizer, name) = if metric == Metric::Bleu {
                    (BleuTokenizer::Thirteen13a, "bleu")
                } else {
                    (BleuTokenizer::Intl, "bleu_intl")
                };
                let values = pairs
                    .iter()
                    .map(|(h, r)| sentence_bleu(h, r, tokenizer))
                    .collect();
                out.add(name, values, Some(corpus_bleu(&pairs, tokenizer)));
            }
            Metric::NltkBleu => {
                let values = pairs
                    .iter()
                    .map(|(h, r)| nltk_sentence_bleu(h, r))
                    .collect();
                out.add("nltk_bleu", values, None);
            }
            Metric::Rouge => {
                let all: Vec<_> = pairs.iter().map(|(h, r)| rouge(h, r)).collect();
                let empty = all.iter().filter(|s| s.empty).count();
                if empty > 0 {
                    notes.push(format!(
                        "rouge: {empty} row(s) with an empty text scored 0 (the rouge package raises there)"
                    ));
                }
                for (index, variant) in ["rouge1", "rouge2", "rougeL"].into_iter().enumerate() {
                    let fpr: Vec<Fpr> = all.iter().map(|s| s.variants()[index]).collect();
                    out.add(
                        &format!("{variant}_f"),
                        fpr.iter().map(|x| x.f).collect(),
                        None,
                    );
                    out.add(
                        &format!("{variant}_p"),
                        fpr.iter().map(|x| x.p).collect(),
                        None,
                    );
                    out.add(
                        &format!("{variant}_r"),
                        fpr.iter().map(|x| x.r).collect(),
                        None,
                    );
                }
            }
            Metric::ChrfPlusPlus => {
                let config = ChrfConfig::chrf_plus_plus();
                let values = pairs
                    .iter()
                    .map(|(h, r)| sentence_chrf(h, r, &config))
                    .collect();
                out.add("chrf++", values, Some(corpus_chrf(&pairs, &config)));
            }
            Metric::BertScore => {
                let Some(folder) =
                    find_model(&options.bertscore_model, metric, options, &mut skipped)?
                else {
                    continue;
                };
                let scorer = BertScorer::load(
                    &folder,
                    BertScoreOptions {
                        layer: options.bertscore_layer,
                        idf: options.bertscore_idf,
                        baseline: options.bertscore_baseline.clone(),
                        batch_size: options.bertscore_batch_size,
                    },
                    options.device,
                )?;
                models.push(ModelUsed {
                    column: "bertscore".into(),
                    spec: options.bertscore_model.clone(),
                    folder: folder.clone(),
                    layer: Some(scorer.layer()),
                });
                let values = scorer.score(&raw_hyp, &raw_ref)?;
                let nan = values
                    .iter()
                    .filter(|v| v.p.is_nan() || v.r.is_nan())
                    .count();
                if nan > 0 {
                    notes.push(format!(
                        "bertscore: {nan} row(s) have NaN P or R (every token's idf weight is 0, as in \
                         bert_score); means leave them out"
                    ));
                }
                out.add("bertscore_p", values.iter().map(|v| v.p).collect(), None);
                out.add("bertscore_r", values.iter().map(|v| v.r).collect(), None);
                out.add("bertscore_f", values.iter().map(|v| v.f).collect(), None);
            }
            Metric::Cosine => {
                for spec in &options.embedding_models {
                    let Some(folder) = find_model(spec, metric, options, &mut skipped)? else {
                        continue;
                    };
                    let encoder = SentenceEncoder::load(&folder, options.device)?;
                    let values = encoder.cosine_similarities(&raw_hyp, &raw_ref)?;
                    let column = format!("cosine_{}", model_short_name(spec));
                    models.push(ModelUsed {
                        column: column.clone(),
                        spec: spec.clone(),
                        folder: folder.clone(),
                        layer: None,
                    });
                    out.add(&column, values, None);
                }
            }
            Metric::Checks => {
                checks = Some(task_checks(generated, references));
                out.add_all_rows(
                    "has_latin",
                    generated
                        .iter()
                        .map(|t| f64::from(u8::from(has_latin(t))))
                        .collect(),
                );
                out.add_all_rows(
                    "empty",
                    generated
                        .iter()
                        .map(|t| f64::from(u8::from(is_empty_output(t))))
                        .collect(),
                );
                out.add_all_rows(
                    "words",
                    generated.iter().map(|t| word_count(t) as f64).collect(),
                );
            }
        }
    }
    Ok(Scores {
        rows,
        scored_rows: scored.len(),
        unscored_rows,
        columns: out.columns,
        summary: out.summary,
        checks,
        models,
        skipped,
        notes,
    })
}
