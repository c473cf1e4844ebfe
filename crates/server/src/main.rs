//! `mlx-batch`: the command-line entry point. Thin by design: it parses
//! arguments and wires the crates together; all logic lives in the library.

fn main() {
    eprintln!("mlx-batch: serving is being wired up");
    std::process::exit(1);
}
