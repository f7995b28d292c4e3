//! One module per CLI command; each takes its parsed arguments and does the job.

pub mod demo;
pub mod env;
pub mod evaluate;
pub mod export;
pub mod loss;
pub mod merge;
pub mod report;
pub mod score;
pub mod tokenize;
pub mod train;

use anyhow::Result;

use crate::cli::{Cli, Command};

/// Runs the command the user asked for.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Loss(args) => loss::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Evaluate(args) => evaluate::run(&args),
        Command::Export(args) => export::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Score(args) => score::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Env(args) => env::run(&args),
    }
}
