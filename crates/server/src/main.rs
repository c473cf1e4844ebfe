//! `mlx-batch`: the command-line entry point. Thin by design: it parses
//! arguments and wires the crates together; all logic lives in the libraries.

use clap::Parser;

/// An OpenAI-compatible LLM server with continuous batching on MLX.
#[derive(Debug, Parser)]
#[command(name = "mlx-batch", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("serving is not implemented yet")
}
