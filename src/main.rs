use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = drvkite::cli::Cli::parse();
    match drvkite::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its context chain.
            eprintln!("drvkite: {e:#}");
            ExitCode::FAILURE
        }
    }
}
