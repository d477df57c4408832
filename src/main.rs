//! The `drvkite` binary: parse the command line, run it through
//! `drvkite::cli`, and print any error on one line.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = drvkite::cli::Cli::parse();
    match drvkite::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its context chain. A line break in
            // a label or path would split it, an escape sequence would
            // reach the job's log: shown escaped.
            let line = format!("{e:#}");
            eprintln!("drvkite: {}", drvkite::pipeline::text::printable(&line));
            ExitCode::FAILURE
        }
    }
}
