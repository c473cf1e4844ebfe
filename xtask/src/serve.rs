//! `cargo xtask serve`: set up what is missing, then serve the default
//! model on 127.0.0.1:8080.
//!
//! Setup is idempotent and returns at once when everything is installed, so
//! this is the one command a fresh checkout needs to get a running server.

use clap::Args;

use crate::util::{build_release_server, cargo, run as run_step};

/// Options of `cargo xtask serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Extra arguments for `mlx-batch serve`, for example `--port 9000`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub extra: Vec<String>,
}

/// Installs MLX and the default model if needed, then runs the server in
/// the foreground until it is stopped (Ctrl-C).
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    // Setup ends by making sure the default model exists and returns its
    // folder, so the model is checked once, not twice.
    let model = crate::setup::run(crate::setup::SetupArgs {
        cuda: false,
        references: false,
    })?;
    // Built as its own step so that the first run can say how long setup
    // and the build took before the server starts loading.
    build_release_server("build the server")?;
    eprintln!(
        "xtask: setup and build took {}; starting the server",
        crate::progress::minutes(started.elapsed())
    );
    run_step(
        "serve",
        cargo()
            .args([
                "run",
                "--release",
                "--package",
                "server",
                "--bin",
                "mlx-batch",
                "--",
                "serve",
                "--model",
            ])
            .arg(&model)
            .args(&args.extra),
    )
}
