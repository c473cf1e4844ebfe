//! `mlx-batch`: the command-line entry point. Thin by design: it parses
//! arguments and hands over to the library; errors end up as one line on
//! stderr and a non-zero exit code, never a panic backtrace.

use clap::Parser;
use server::{
    cli::{Cli, Command},
    commands, telemetry,
};

fn main() {
    let cli = Cli::parse();
    telemetry::init_logging(cli.log_format);
    if let Err(e) = run(&cli) {
        // `{:#}` joins the error's context chain on one line.
        eprintln!("mlx-batch: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if matches!(cli.command, Command::Serve(_) | Command::Generate(_)) {
        // It may change this process's PATH, which is only safe before
        // other threads start (the runtime's, the engine's).
        backend_mlx::jit::enable();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match &cli.command {
            Command::Serve(args) => commands::serve::run(args).await,
            Command::Generate(args) => commands::generate::run(args).await,
            Command::ImportGguf(args) => commands::import::run(args),
            Command::Bench(args) => loadgen::run(args.clone())
                .await
                .map(|_| ())
                .map_err(Into::into),
        }
    })
}
