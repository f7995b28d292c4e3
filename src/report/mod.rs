//! `amthal report`: several prediction files (zero-shot, few-shot, fine-tuned, ...)
//! scored with the same settings and compared in one folder:
//!   report.md, report.html   the metric table, charts, loss curves, samples
//!   scores/NAME.scores.csv   per-row scores of each run (as `amthal score` writes)
//!   scores/NAME.scores.json  each run's summary
//!   charts/METRIC.{svg,png}  one bar chart per headline metric (a bar per run)
//!   charts/loss.{svg,png}    training loss curves, when --train-log is given
//! The folder is built under a temp name and renamed into place, so a crash leaves
//! the previous report whole.

pub mod charts;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::bail_input;
use crate::predictions::PredictionTable;
use crate::score::scorer::{ScoreOptions, Scores};
use crate::score::table::{comparison_markdown, comparison_rows, markdown_cell, metric_names};
use crate::train::plot::Curve;
use crate::train::state::LogEntry;

static HTML_TEMPLATE: &str = include_str!("../../assets/report.html.jinja");

/// The file that marks a folder as an amthal report.
pub const REPORT_MARKER: &str = ".amthal-report";

/// What a report folder holds; a folder with anything else is not replaced.
pub const REPORT_ENTRIES: [&str; 5] = [
    REPORT_MARKER,
    "report.md",
    "report.html",
    "charts",
    "scores",
];

/// One scored run.
pub struct Run {
    pub name: String,
    pub path: PathBuf,
    pub table: PredictionTable,
    pub scores: Scores,
}

/// A training log to draw.
pub struct TrainLog {
    pub name: String,
    pub entries: Vec<LogEntry>,
}

/// Reads an amthal log.jsonl (one JSON object per line; bad lines name the line).
pub fn read_train_log(path: &Path) -> Result<Vec<LogEntry>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::error::bad_input(format!("{}: cannot read: {e}", path.display())))?;
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        entries.push(serde_json::from_str(line).map_err(|e| {
            crate::error::bad_input(format!(
                "{}: line {}: not an amthal log entry: {e}",
                path.display(),
                index + 1
            ))
        })?);
    }
    Ok(entries)
}

/// Whether a metric gets a chart: the headline ones (F of ROUGE and BERTScore, not P/R;
/// no per-row task-check columns).
fn charted(metric: &str) -> bool {
    !(metric.ends_with("_p") || metric.ends_with("_r"))
}

/// A file-name-safe version of a metric name ("chrf++" -> "chrf_pp").
fn file_name_for(metric: &str) -> String {
    metric.replace("++", "_pp").replace(['/', ' '], "_")
}

#[derive(Serialize)]
struct Cell {
    text: String,
    best: bool,
}

#[derive(Serialize)]
struct MetricRow {
    label: String,
    cells: Vec<Cell>,
}

#[derive(Serialize)]
struct Sample {
    proverb: String,
    reference: String,
    outputs: Vec<String>,
}

/// The rows shown side by side: the first run's rows in order, matched in each other
/// run to the first unused row with the same proverb (by position when either file has
/// no proverb column), keeping only proverbs every run has.
fn samples(runs: &[Run], count: usize) -> Vec<Sample> {
    let first = &runs[0].table;
    let mut used: Vec<Vec<bool>> = runs.iter().map(|r| vec![false; r.table.len()]).collect();
    let mut out = Vec::new();
    for row in 0..first.len() {
        if out.len() == count {
            break;
        }
        let proverb = first.proverb(row);
        let mut matched_rows = Vec::new();
        for (run, used) in runs.iter().zip(&used) {
            let by_position = !first.has_proverbs() || !run.table.has_proverbs();
            let matched = if by_position {
                (row < run.table.len()).then_some(row)
            } else {
                (0..run.table.len()).find(|&r| !used[r] && run.table.proverb(r) == proverb)
            };
            match matched {
                Some(r) => matched_rows.push(r),
                None => break,
            }
        }
        if matched_rows.len() < runs.len() {
            continue;
        }
        for (used, &r) in used.iter_mut().zip(&matched_rows) {
            used[r] = true;
        }
        out.push(Sample {
            proverb: proverb.to_string(),
            reference: first.reference(row).to_string(),
            outputs: runs
                .iter()
                .zip(&matched_rows)
                .map(|(run, &r)| run.table.generated(r).to_string())
                .collect(),
        });
    }
    out
}

fn metric_rows(runs: &[Run]) -> Vec<MetricRow> {
    let pairs: Vec<(&str, &Scores)> = runs.iter().map(|r| (r.name.as_str(), &r.scores)).collect();
    comparison_rows(&pairs)
        .into_iter()
        .map(|row| MetricRow {
            cells: (0..runs.len())
                .map(|i| Cell {
                    text: row.text(i),
                    best: row.is_best(i),
                })
                .collect(),
            label: row.label,
        })
        .collect()
}

/// The runs' skipped metrics and notes; one shared by every run is shown once.
fn notes(runs: &[Run]) -> Vec<String> {
    let all = |r: &Run| -> Vec<String> {
        r.scores
            .skipped
            .iter()
            .chain(&r.scores.notes)
            .cloned()
            .collect()
    };
    let mut out = Vec::new();
    for run in runs {
        for note in all(run) {
            if runs.len() > 1 && runs.iter().all(|r| all(r).contains(&note)) {
                let shared = format!("all runs: {note}");
                if !out.contains(&shared) {
                    out.push(shared);
                }
            } else {
                out.push(format!("{}: {note}", run.name));
            }
        }
    }
    out
}

fn markdown(
    runs: &[Run],
    charts: &[String],
    loss_chart: Option<&str>,
    samples: &[Sample],
) -> String {
    let pairs: Vec<(&str, &Scores)> = runs.iter().map(|r| (r.name.as_str(), &r.scores)).collect();
    let mut text = String::from(
        "# amthal report\n\n## Runs\n\n| run | predictions | rows scored |\n|---|---|---:|\n",
    );
    for run in runs {
        text += &format!(
            "| {} | {} | {} / {} |\n",
            markdown_cell(&run.name),
            markdown_cell(&run.path.display().to_string()),
            run.scores.scored_rows,
            run.scores.rows
        );
    }
    text += "\n## Scores\n\nScales as in the Python packages: sacrebleu BLEU and chrF++ 0–100; NLTK BLEU, \
             ROUGE, BERTScore 0–1; cosine −1–1.\n\n";
    text += &comparison_markdown(&pairs);
    for note in notes(runs) {
        text += &format!("\n- {note}");
    }
    text += "\n\n## Charts\n\n";
    for chart in charts {
        text += &format!("![{chart}]({chart})\n");
    }
    if let Some(loss) = loss_chart {
        text += &format!("\n## Training loss\n\n![training loss]({loss})\n");
    }
    text += "\n## Samples\n\n| proverb | reference |";
    for run in runs {
        text += &format!(" {} |", markdown_cell(&run.name));
    }
    text += "\n|---|---|";
    text += &"---|".repeat(runs.len());
    text += "\n";
    for sample in samples {
        text += &format!(
            "| {} | {} |",
            markdown_cell(&sample.proverb),
            markdown_cell(&sample.reference)
        );
        for output in &sample.outputs {
            text += &format!(" {} |", markdown_cell(output));
        }
        text += "\n";
    }
    text
}

fn html(
    runs: &[Run],
    charts: &[String],
    loss_chart: Option<&str>,
    samples: &[Sample],
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::Html);
    env.add_template("report.html", HTML_TEMPLATE)?;
    let notes = notes(runs);
    let run_info: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name, "path": r.path.display().to_string(),
                "scored": r.scores.scored_rows, "rows": r.scores.rows,
            })
        })
        .collect();
    let text = env
        .get_template("report.html")?
        .render(minijinja::value::Serde(serde_json::json!({
            "title": "amthal report",
            "version": env!("CARGO_PKG_VERSION"),
            "runs": run_info,
            "metric_rows": metric_rows(runs),
            "notes": notes,
            // Bare chart names: the template adds "charts/" and ".svg" (HTML escaping
            // would otherwise write the slash as &#x2f;).
            "charts": charts
                .iter()
                .map(|c| c.trim_start_matches("charts/").trim_end_matches(".svg"))
                .collect::<Vec<_>>(),
            "loss_chart": loss_chart.is_some(),
            "samples": samples,
        })))?;
    Ok(text)
}

/// Writes the report folder (see the module docs) and returns the report.md path.
pub fn write_report(
    out: &Path,
    runs: &[Run],
    options: &ScoreOptions,
    logs: &[TrainLog],
    sample_count: usize,
) -> Result<PathBuf> {
    if runs.is_empty() {
        bail_input!("report: no prediction files");
    }
    let samples = samples(runs, sample_count);
    crate::atomic::write_dir_with(out, |dir| {
        // Marks the folder as a report, so a later report may replace it (and only such
        // a folder; see commands::report).
        std::fs::write(dir.join(REPORT_MARKER), "written by amthal report\n")?;
        let scores_dir = dir.join("scores");
        let charts_dir = dir.join("charts");
        std::fs::create_dir_all(&scores_dir)?;
        std::fs::create_dir_all(&charts_dir)?;
        for run in runs {
            let csv = crate::commands::score::scores_csv(&run.table, &run.scores)?;
            std::fs::write(scores_dir.join(format!("{}.scores.csv", run.name)), csv)?;
            let summary = crate::commands::score::summary_json(&run.path, options, &run.scores);
            std::fs::write(
                scores_dir.join(format!("{}.scores.json", run.name)),
                serde_json::to_string_pretty(&summary)?,
            )?;
        }
        let pairs: Vec<(&str, &Scores)> =
            runs.iter().map(|r| (r.name.as_str(), &r.scores)).collect();
        let mut charts = Vec::new();
        for metric in metric_names(&pairs).into_iter().filter(|m| charted(m)) {
            let bars: Vec<(String, f64)> = runs
                .iter()
                .filter_map(|r| r.scores.headline(&metric).map(|v| (r.name.clone(), v)))
                .collect();
            if bars.is_empty() {
                continue;
            }
            let name = file_name_for(&metric);
            charts::write_bar_chart(&charts_dir, &name, &metric, &bars)
                .with_context(|| format!("chart for {metric}"))?;
            charts.push(format!("charts/{name}.svg"));
        }
        let curves: Vec<Curve> = logs
            .iter()
            .flat_map(|log| {
                crate::train::plot::loss_curves(&log.entries)
                    .into_iter()
                    .filter(|c| !c.points.is_empty())
                    .map(move |c| Curve {
                        name: if logs.len() > 1 {
                            format!("{} {}", log.name, c.name)
                        } else {
                            c.name
                        },
                        points: c.points,
                    })
            })
            .collect();
        let loss_chart = if curves.is_empty() {
            None
        } else {
            charts::write_loss_chart(&charts_dir, &curves)?;
            Some("charts/loss.svg")
        };
        std::fs::write(
            dir.join("report.md"),
            markdown(runs, &charts, loss_chart, &samples),
        )?;
        std::fs::write(
            dir.join("report.html"),
            html(runs, &charts, loss_chart, &samples)?,
        )?;
        Ok(())
    })?;
    Ok(out.join("report.md"))
}
