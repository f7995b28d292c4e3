//! Markdown renderings of scores: one file's summary, and several runs side by side.

use super::checks::TaskChecks;
use super::scorer::Scores;

/// Text made safe for a Markdown table cell: backslashes and pipes escaped, `<` and
/// `&` as entities (model output such as `<think>` would otherwise vanish as HTML),
/// line breaks as spaces.
pub fn markdown_cell(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace(['\n', '\r'], " ")
}

/// A score with four decimals, or "–" when there is none.
pub fn format_score(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"))
}

/// The summary of one file: a `| metric | mean | corpus |` table, then the task checks.
pub fn summary_markdown(scores: &Scores) -> String {
    let mut text = String::from("| metric | mean | corpus |\n|---|---:|---:|\n");
    for line in &scores.summary {
        text += &format!(
            "| {} | {} | {} |\n",
            line.metric,
            format_score(line.mean),
            format_score(line.corpus)
        );
    }
    text += &format!("\n{} of {} rows scored", scores.scored_rows, scores.rows);
    if !scores.unscored_rows.is_empty() {
        text += &format!(
            "; not scored (no reference): data rows {}",
            row_list(&scores.unscored_rows)
        );
    }
    text += ".\n";
    if let Some(checks) = &scores.checks {
        text += &checks_markdown(checks);
    }
    for line in scores.skipped.iter().chain(&scores.notes) {
        text += &format!("- {line}\n");
    }
    text
}

/// Data row numbers (1 = the first row after the header), shortened past ten.
fn row_list(rows: &[usize]) -> String {
    let mut shown: Vec<String> = rows.iter().take(10).map(|r| (r + 1).to_string()).collect();
    if rows.len() > 10 {
        shown.push(format!("… ({} in all)", rows.len()));
    }
    shown.join(", ")
}

pub fn checks_markdown(checks: &TaskChecks) -> String {
    let mut text = format!(
        "- outputs with Latin letters: {} of {} ({:.1}%)\n- empty outputs: {}\n",
        checks.with_latin,
        checks.outputs,
        100.0 * checks.latin_share,
        checks.empty
    );
    for (what, stats) in [
        ("generated", &checks.generated_words),
        ("reference", &checks.reference_words),
    ] {
        if let Some(s) = stats {
            text += &format!(
                "- words per {what} explanation: min {}, median {}, mean {:.1}, max {}\n",
                s.min, s.median, s.mean, s.max
            );
        }
    }
    text
}

/// One row of a comparison: a label and one value per run, shown with `decimals`.
pub struct ComparisonRow {
    pub label: String,
    pub values: Vec<Option<f64>>,
    pub decimals: usize,
    /// Whether higher is better (marks the best run); false for the task checks.
    pub higher_is_better: bool,
}

impl ComparisonRow {
    pub fn text(&self, index: usize) -> String {
        self.values[index].map_or_else(|| "–".into(), |v| format!("{v:.*}", self.decimals))
    }

    /// Whether run `index` has the best value (only when runs differ in quality).
    pub fn is_best(&self, index: usize) -> bool {
        let best = self
            .values
            .iter()
            .flatten()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        self.higher_is_better && self.values.len() > 1 && self.values[index] == Some(best)
    }
}

/// Several runs side by side: one row per metric (the corpus score where the metric
/// has one, else the mean), then the task checks.
pub fn comparison_rows(runs: &[(&str, &Scores)]) -> Vec<ComparisonRow> {
    let mut rows: Vec<ComparisonRow> = metric_names(runs)
        .into_iter()
        .map(|metric| ComparisonRow {
            label: headline_label(runs, &metric),
            values: runs.iter().map(|(_, s)| s.headline(&metric)).collect(),
            decimals: 4,
            higher_is_better: true,
        })
        .collect();
    if runs.iter().any(|(_, s)| s.checks.is_some()) {
        for (label, pick) in [
            (
                "outputs with Latin letters (%)",
                (|c: &TaskChecks| Some(100.0 * c.latin_share)) as fn(&TaskChecks) -> Option<f64>,
            ),
            ("empty outputs", |c| Some(c.empty as f64)),
            ("mean words per output", |c| {
                c.generated_words.map(|s| s.mean)
            }),
        ] {
            rows.push(ComparisonRow {
                label: label.to_string(),
                values: runs
                    .iter()
                    .map(|(_, s)| s.checks.as_ref().and_then(pick))
                    .collect(),
                decimals: 1,
                higher_is_better: false,
            });
        }
    }
    rows
}

/// The comparison as a Markdown table, one column per run.
pub fn comparison_markdown(runs: &[(&str, &Scores)]) -> String {
    let mut text = String::from("| metric |");
    for (name, _) in runs {
        text += &format!(" {} |", markdown_cell(name));
    }
    text += "\n|---|";
    text += &"---:|".repeat(runs.len());
    text += "\n";
    for row in comparison_rows(runs) {
        text += &format!("| {} |", row.label);
        for index in 0..runs.len() {
            text += &format!(" {} |", row.text(index));
        }
        text += "\n";
    }
    text
}

/// Metric names in first-seen order over all runs.
pub fn metric_names(runs: &[(&str, &Scores)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, scores) in runs {
        for line in &scores.summary {
            if !names.contains(&line.metric) {
                names.push(line.metric.clone());
            }
        }
    }
    names
}

/// "bleu (corpus)" when any run has a corpus score for it, else "rouge1_f (mean)".
fn headline_label(runs: &[(&str, &Scores)], metric: &str) -> String {
    let corpus = runs
        .iter()
        .any(|(_, s)| s.line(metric).is_some_and(|l| l.corpus.is_some()));
    format!("{metric} ({})", if corpus { "corpus" } else { "mean" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_cells_keep_tables_intact() {
        assert_eq!(
            markdown_cell("a|b \\| <think> & x\ny"),
            "a\\|b \\\\\\| &lt;think> &amp; x y"
        );
        assert_eq!(markdown_cell("يضرب لمن"), "يضرب لمن");
    }
}
