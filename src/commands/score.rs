//! `amthal score`: per-row scores and a summary for one predictions CSV.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::atomic::write_file;
use crate::bail_input;
use crate::cli::{MetricArgs, ScoreArgs};
use crate::predictions::{PredictionTable, read_prediction_table};
use crate::score::metric::Metric;
use crate::score::scorer::{ScoreOptions, Scores, model_short_name, score};
use crate::score::table::summary_markdown;

/// The scoring options the flags describe. A metric counts as asked for explicitly
/// when --metrics names it or when its model flag is given.
pub fn options_from_args(args: &MetricArgs) -> Result<ScoreOptions> {
    let mut options = ScoreOptions::defaults();
    if !args.metrics.is_empty() {
        options.metrics = Metric::parse_list(&args.metrics)?;
        options.explicit = options.metrics.iter().copied().collect();
    }
    let mut explicit_models = BTreeSet::new();
    if let Some(model) = &args.bertscore_model {
        options.bertscore_model = model.clone();
        explicit_models.insert(Metric::BertScore);
    }
    if !args.embedding_models.is_empty() {
        options.embedding_models = args.embedding_models.clone();
        explicit_models.insert(Metric::Cosine);
    }
    // Each embedding model gets a column named after it; two with one name would clash.
    let mut names = BTreeSet::new();
    for spec in &options.embedding_models {
        if !names.insert(model_short_name(spec)) {
            bail_input!(
                "--embedding-model: two models are named {:?} (columns are cosine_NAME); \
                 give each once, from folders with different names",
                model_short_name(spec)
            );
        }
    }
    let bertscore_settings =
        args.bertscore_layer.is_some() || args.bertscore_idf || args.bertscore_baseline.is_some();
    if bertscore_settings && !options.metrics.contains(&Metric::BertScore) {
        bail_input!(
            "--bertscore-layer/--bertscore-idf/--bertscore-baseline were given, but --metrics leaves bertscore out"
        );
    }
    for metric in explicit_models {
        if !options.metrics.contains(&metric) {
            bail_input!("a model was given for {metric}, but --metrics leaves {metric} out");
        }
        options.explicit.insert(metric);
    }
    if let Some(baseline) = &args.bertscore_baseline
        && !baseline.is_file()
    {
        bail_input!("--bertscore-baseline {}: no such file", baseline.display());
    }
    if args.bertscore_batch_size == 0 {
        bail_input!("--bertscore-batch-size must be at least 1");
    }
    options.bertscore_layer = args.bertscore_layer;
    options.bertscore_idf = args.bertscore_idf;
    options.bertscore_baseline = args.bertscore_baseline.clone();
    options.normalization = args.normalize;
    options.bertscore_batch_size = args.bertscore_batch_size;
    options.device = crate::device::parse_device(&args.device)?;
    Ok(options)
}

/// Scores every row of a predictions table.
pub fn score_table(table: &PredictionTable, options: &ScoreOptions) -> Result<Scores> {
    let generated: Vec<&str> = (0..table.len()).map(|i| table.generated(i)).collect();
    let references: Vec<&str> = (0..table.len()).map(|i| table.reference(i)).collect();
    score(&generated, &references, options)
}

/// The per-row scores file: the input's columns plus one per metric (blank where a
/// row was not scored), UTF-8 with a BOM like the predictions file.
pub fn scores_csv(table: &PredictionTable, scores: &Scores) -> Result<Vec<u8>> {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    {
        let mut writer = csv::Writer::from_writer(&mut bytes);
        let mut header = table.headers.clone();
        header.extend(scores.columns.iter().map(|c| c.name.clone()));
        writer.write_record(&header)?;
        for (row, record) in table.records.iter().enumerate() {
            let mut fields = record.clone();
            fields.extend(
                scores
                    .columns
                    .iter()
                    .map(|c| c.values[row].map_or(String::new(), |v| v.to_string())),
            );
            writer.write_record(&fields)?;
        }
        writer.flush()?;
    }
    Ok(bytes)
}

/// sacrebleu's metric signatures for the metrics computed, so a paper can state
/// exactly what was measured (sentence scores use effective order, corpus BLEU not).
fn signatures(options: &ScoreOptions) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let version = "version:2.6.0";
    // sacrebleu's own format; --normalize is recorded under settings, not here.
    let case = "case:mixed";
    // Keyed by the summary's metric names (the column names).
    for (metric, column, tokenizer) in [
        (Metric::Bleu, "bleu", "13a"),
        (Metric::BleuIntl, "bleu_intl", "intl"),
    ] {
        if options.metrics.contains(&metric) {
            out.insert(
                column.to_string(),
                serde_json::json!({
                    "sentence": format!("nrefs:1|{case}|eff:yes|tok:{tokenizer}|smooth:exp|{version}"),
                    "corpus": format!("nrefs:1|{case}|eff:no|tok:{tokenizer}|smooth:exp|{version}"),
                }),
            );
        }
    }
    if options.metrics.contains(&Metric::ChrfPlusPlus) {
        out.insert(
            "chrf++".into(),
            format!("nrefs:1|{case}|eff:yes|nc:6|nw:2|space:no|{version}").into(),
        );
    }
    serde_json::Value::Object(out)
}

/// The summary JSON: settings, row counts, metric means/corpus scores and checks.
pub fn summary_json(source: &Path, options: &ScoreOptions, scores: &Scores) -> serde_json::Value {
    serde_json::json!({
        "predictions": source.display().to_string(),
        "amthal_version": env!("CARGO_PKG_VERSION"),
        "settings": {
            "metrics": options.metrics.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "normalize": options.normalization,
            "bertscore_model": options.bertscore_model,
            "bertscore_layer": options.bertscore_layer,
            "bertscore_idf": options.bertscore_idf,
            "bertscore_baseline": options.bertscore_baseline.as_ref().map(|p| p.display().to_string()),
            "bertscore_batch_size": options.bertscore_batch_size,
            "embedding_models": options.embedding_models,
        },
        "sacrebleu_signatures": signatures(options),
        // The encoders as resolved: folder and the BERTScore layer actually used.
        "models": scores.models,
        "rows": scores.rows,
        "scored_rows": scores.scored_rows,
        // Data row numbers as in the file (1 = first row after the header).
        "unscored_rows": scores.unscored_rows.iter().map(|r| r + 1).collect::<Vec<_>>(),
        "summary": scores.summary,
        "checks": scores.checks,
        "skipped": scores.skipped,
        "notes": scores.notes,
    })
}

/// Whether two paths name the same file (same folder after resolving links and
/// `..`, same file name), whether or not the file exists yet.
fn same_file(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (
            std::fs::canonicalize(parent).ok(),
            p.file_name().map(|n| n.to_os_string()),
        )
    };
    let (a, b) = (resolved(a), resolved(b));
    a.0.is_some() && a == b
}

/// `NAME.csv` -> `NAME.scores.EXT` beside it.
fn beside(pred: &Path, extension: &str) -> PathBuf {
    let stem = pred
        .file_stem()
        .map_or("predictions".into(), |s| s.to_string_lossy().to_string());
    pred.with_file_name(format!("{stem}.scores.{extension}"))
}

pub fn run(args: &ScoreArgs) -> Result<()> {
    let options = options_from_args(&args.metrics)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| beside(&args.pred, "csv"));
    let summary_path = args
        .summary
        .clone()
        .unwrap_or_else(|| beside(&args.pred, "json"));
    for path in [&out, &summary_path] {
        if same_file(path, &args.pred) {
            bail_input!(
                "{}: refusing to overwrite the predictions file with scores",
                path.display()
            );
        }
    }
    if same_file(&out, &summary_path) {
        bail_input!(
            "--out and --summary are the same file ({}); give two paths",
            out.display()
        );
    }
    let table = read_prediction_table(&args.pred, args.encoding)?;
    if table.is_empty() {
        bail_input!("{}: no rows to score", args.pred.display());
    }
    let scores = score_table(&table, &options)?;
    write_file(&out, &scores_csv(&table, &scores)?)?;
    let summary = summary_json(&args.pred, &options, &scores);
    write_file(
        &summary_path,
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    println!("{}", summary_markdown(&scores));
    println!(
        "per-row scores: {}\nsummary: {}",
        out.display(),
        summary_path.display()
    );
    Ok(())
}
