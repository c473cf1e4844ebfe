//! Project automation: `cargo xtask setup | serve | ci | bench |
//! deploy-test`.
//!
//! Everything a developer or CI runs goes through here, written in Rust so
//! that it works wherever cargo does, with no shell-script dialects to keep
//! in step.

mod bench;
mod ci;
mod deploy_test;
mod model;
mod progress;
mod serve;
mod setup;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "mlx-batch project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compare mlx-batch with mlx-lm and llama.cpp on the same model.
    Bench(bench::BenchArgs),
    /// Set up what is missing (references included), then run every check
    /// CI runs, failing fast.
    Ci,
    /// Run two replicas behind HAProxy, scraped by Prometheus, with the
    /// configs of deploy/, and kill one mid-run (docs/deploy.md).
    DeployTest,
    /// Set up if needed, then serve the default model on 127.0.0.1:8080.
    Serve(serve::ServeArgs),
    /// Install what a fresh machine lacks: system packages (apt-get, as
    /// root), MLX, mlx-c and the default model.
    Setup(setup::SetupArgs),
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
        Command::Ci => ci::run(),
        Command::DeployTest => deploy_test::run(),
        Command::Serve(args) => serve::run(args),
        Command::Setup(args) => setup::run(args).map(drop),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One readable line (with its causes), not a backtrace: the
            // failing step has already printed its own output above.
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
