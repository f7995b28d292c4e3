//! `amthal report RUN.csv... --out DIR`: score each run with the same settings and
//! write the comparison report (see `crate::report`).

use std::path::Path;

use anyhow::Result;

use crate::bail_input;
use crate::cli::ReportArgs;
use crate::data::TextEncoding;
use crate::predictions::read_prediction_table;
use crate::report::{REPORT_ENTRIES, REPORT_MARKER, Run, TrainLog, read_train_log, write_report};
use crate::score::scorer::{ScoreOptions, Scores};
use crate::score::table::comparison_markdown;

/// A run's default name: the file name without extension.
fn default_name(path: &Path) -> String {
    path.file_stem()
        .map_or("run".into(), |s| s.to_string_lossy().to_string())
}

/// Names must be usable as file names and tell runs apart.
fn check_names(names: &[String]) -> Result<()> {
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            bail_input!("--names: {name:?} cannot be used as a run name (it names files)");
        }
        if names[..i].contains(name) {
            bail_input!("two runs are named {name:?}; give distinct --names");
        }
    }
    Ok(())
}

/// The report folder replaces OUT whole, so OUT must be new, empty, or an earlier
/// report: marked by amthal and holding nothing but a report's files.
fn check_out(out: &Path) -> Result<()> {
    if out.file_name().is_none() {
        bail_input!(
            "--out {}: name a folder for the report (it is replaced whole)",
            out.display()
        );
    }
    if out.is_file() {
        bail_input!("--out {}: is a file", out.display());
    }
    if !out.is_dir() {
        return Ok(());
    }
    let entries: Vec<String> = std::fs::read_dir(out)
        .map_err(|e| crate::error::bad_input(format!("--out {}: {e}", out.display())))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    let earlier_report = entries.iter().any(|e| e == REPORT_MARKER)
        && entries.iter().all(|e| REPORT_ENTRIES.contains(&e.as_str()));
    if !entries.is_empty() && !earlier_report {
        bail_input!(
            "--out {}: the folder holds other files and is not an amthal report; the report \
             replaces the folder whole, so give a new or empty one",
            out.display()
        );
    }
    Ok(())
}

/// Scores the runs and writes the report; returns its report.md path.
pub fn report(
    paths: &[&Path],
    names: &[String],
    logs: &[&Path],
    samples: usize,
    out: &Path,
    options: &ScoreOptions,
    encoding: TextEncoding,
) -> Result<Vec<Run>> {
    let names: Vec<String> = if names.is_empty() {
        paths.iter().map(|p| default_name(p)).collect()
    } else if names.len() == paths.len() {
        names.to_vec()
    } else {
        bail_input!(
            "--names gives {} names for {} prediction files",
            names.len(),
            paths.len()
        );
    };
    check_names(&names)?;
    check_out(out)?;
    let mut runs = Vec::new();
    for (path, name) in paths.iter().zip(names) {
        let table = read_prediction_table(path, encoding)?;
        if table.is_empty() {
            bail_input!("{}: no rows", path.display());
        }
        let scores = super::score::score_table(&table, options)?;
        runs.push(Run {
            name,
            path: path.to_path_buf(),
            table,
            scores,
        });
    }
    let logs = logs
        .iter()
        .map(|path| {
            Ok(TrainLog {
                name: path
                    .parent()
                    .and_then(|p| p.file_name())
                    .map_or("training".into(), |n| n.to_string_lossy().to_string()),
                entries: read_train_log(path)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    write_report(out, &runs, options, &logs, samples)?;
    Ok(runs)
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let options = super::score::options_from_args(&args.metrics)?;
    let paths: Vec<&Path> = args.runs.iter().map(|p| p.as_path()).collect();
    let logs: Vec<&Path> = args.train_logs.iter().map(|p| p.as_path()).collect();
    let runs = report(
        &paths,
        &args.names,
        &logs,
        args.samples,
        &args.out,
        &options,
        args.encoding,
    )?;
    let scores: Vec<(&str, &Scores)> = runs.iter().map(|r| (r.name.as_str(), &r.scores)).collect();
    println!("{}", comparison_markdown(&scores));
    println!(
        "report: {} (and report.html beside it)",
        args.out.join("report.md").display()
    );
    Ok(())
}
