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
        // clap lets --config and --node come only together.
        Command::Serve(mut args_for_cluster)
            if args_for_cluster.config.is_some() && args_for_cluster.node.is_some() =>
        {
            let config = args_for_cluster.config.take().unwrap_or_default();
            let node = args_for_cluster.node.take().unwrap_or_default();
            match ferroblock::cluster::command::load_serve_node(&config, &node) {
                Err(error) => {
                    eprintln!("ferroblock: {error}");
                    ExitCode::from(2)
                }
                Ok(cluster) => {
                    match ferroblock::server::serve_node(
                        &cluster,
                        &node,
                        args_for_cluster.into_config(),
                    ) {
                        Ok(()) => ExitCode::SUCCESS,
                        Err(error) => {
                            eprintln!("ferroblock: {error}");
                            ExitCode::from(1)
                        }
                    }
                }
            }
        }
        Command::Serve(args) => match ferroblock::server::serve(args.into_config()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("ferroblock: {error}");
                ExitCode::from(1)
            }
        },
        Command::Bench(args) => ferroblock::loadgen::run(args),
        Command::Plot(args) => ferroblock::plot::run(args),
        Command::Cluster(args) => ferroblock::cluster::command::run_cluster(args),
        Command::Status(args) => ferroblock::cluster::command::run_status(args),
    }
}
