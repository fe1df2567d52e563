use std::process::ExitCode;

use clap::Parser;
use ferroblock::config::{Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match ferroblock::server::serve(args.into_config()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ferroblock: {error}");
                ExitCode::from(1)
            }
        },
        Command::Bench(args) => ferroblock::loadgen::run(args),
        Command::Plot(args) => ferroblock::plot::run(args),
    }
}
