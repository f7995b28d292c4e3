//! `amthal report RUN.csv... --out DIR`: score each run with the same settings and
//! write the comparison report (see `crate::report`).

use std::path::Path;

use anyhow::Result;

use crate::bail_input;
use crate::cli::ReportArgs;
use crate::report::{Run, TrainLog, read_train_log, write_report};
use crate::score::input::read_prediction_table;
use crate::score::scorer::ScoreOptions;

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

/// The report folder replaces OUT whole, so OUT must be empty, absent, or an earlier report.
fn check_out(out: &Path) -> Result<()> {
    if out.is_file() {
        bail_input!("--out {}: is a file", out.display());
    }
    if out.is_dir() && !out.join("report.md").is_file() && std::fs::read_dir(out)?.next().is_some()
    {
        bail_input!(
            "--out {}: folder exists and is not an amthal report; the report replaces the folder \
             whole, so give a new or empty one",
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
) -> Result<std::path::PathBuf> {
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
        let table = read_prediction_table(path)?;
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
    write_report(out, &runs, options, &logs, samples)
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let options = super::score::options_from_args(&args.metrics)?;
    let paths: Vec<&Path> = args.runs.iter().map(|p| p.as_path()).collect();
    let logs: Vec<&Path> = args.train_logs.iter().map(|p| p.as_path()).collect();
    let path = report(
        &paths,
        &args.names,
        &logs,
        args.samples,
        &args.out,
        &options,
    )?;
    let markdown = std::fs::read_to_string(&path)?;
    // The scores section is what a reader wants in the terminal.
    if let Some(table) = markdown
        .split("## Scores")
        .nth(1)
        .and_then(|s| s.split("## Charts").next())
    {
        println!("{}", table.trim());
    }
    println!("\nreport: {} (and report.html beside it)", path.display());
    Ok(())
}
