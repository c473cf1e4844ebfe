//! Long set-up steps with visible progress and quiet logs.
//!
//! A first run downloads wheels, builds mlx-c and imports the model: minutes
//! of work. Each such step shows a spinner (or a bar, when the tool prints
//! percentages, as cmake does) with its elapsed time and the latest line its
//! tool printed, and ends with one `done in N s` line. The tool's whole
//! output goes to a log file under `.mlx/logs/`; only a failure prints its
//! tail. indicatif draws nothing when stderr is not a terminal, so CI logs
//! get just the start and end lines, without escape codes.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

/// How many lines of a failed step's log are printed.
const TAIL_LINES: usize = 40;

/// How wide the latest output line shown beside the spinner may be.
const MESSAGE_WIDTH: usize = 70;

/// One visible step: a spinner or bar on a terminal, two plain lines
/// elsewhere.
pub struct Step {
    what: String,
    bar: ProgressBar,
    started: Instant,
}

impl Step {
    /// Starts a step and prints what it does.
    pub fn start(what: &str) -> Self {
        eprintln!("xtask: {what} ...");
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("  {spinner} [{elapsed}] {wide_msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            what: what.to_owned(),
            bar,
            started: Instant::now(),
        }
    }

    /// Shows the tool's latest line beside the spinner.
    fn message(&self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let short: String = line.chars().take(MESSAGE_WIDTH).collect();
        self.bar.set_message(short);
    }

    /// Turns the spinner into a bar once the tool reports a percentage.
    fn percent(&self, percent: u64) {
        if self.bar.length().is_none() {
            self.bar.set_length(100);
            if let Ok(style) =
                ProgressStyle::with_template("  [{elapsed}] {bar:30} {pos:>3}% {wide_msg}")
            {
                self.bar.set_style(style);
            }
        }
        self.bar.set_position(percent.min(100));
    }

    /// Ends the step and prints its time.
    pub fn done(self) {
        self.bar.finish_and_clear();
        eprintln!(
            "xtask: {}: done in {:.1} s",
            self.what,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Step {
    /// A step that ends without [`Step::done`] (it failed) clears its line,
    /// so the error printed next is not mixed into a spinner.
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Runs `cmd` as a visible step, its output going to `log`; fails with the
/// log's tail when the command fails.
pub fn run_logged(what: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<()> {
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file =
        fs::File::create(log).with_context(|| format!("creating the log {}", log.display()))?;
    writeln!(file, "$ {cmd:?}").with_context(|| format!("writing {}", log.display()))?;

    let step = Step::start(what);
    // One pipe for both streams keeps the tool's lines in the order it wrote
    // them.
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let writer_err = writer.try_clone().context("sharing a pipe")?;
    let child = cmd
        .current_dir(crate::util::workspace_root())
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_err)
        .spawn();
    // The command keeps the pipe's write end until it is replaced: without
    // this the read below would never see the end of the output.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            drop(step);
            return Err(err).with_context(|| format!("{what}: could not start {cmd:?}"));
        }
    };
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        // A log that cannot be written loses lines, not the step.
        let _ = writeln!(file, "{line}");
        if let Some(percent) = cmake_percent(&line) {
            step.percent(percent);
        }
        step.message(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("{what}: waiting for {cmd:?}"))?;
    if status.success() {
        step.done();
        return Ok(());
    }
    drop(step);
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "{}",
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    );
    bail!(
        "{what} failed ({status}); the whole output is in {}",
        log.display()
    )
}

/// The log file of a set-up step, under `.mlx/logs/`.
pub fn log_path(name: &str) -> PathBuf {
    crate::util::workspace_root()
        .join(".mlx")
        .join("logs")
        .join(format!("{name}.log"))
}

/// The percentage at the start of a cmake build line (`[ 42%] Building ...`).
fn cmake_percent(line: &str) -> Option<u64> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (number, _) = rest.split_once("%]")?;
    number.trim().parse().ok()
}

/// A wall time for a person: `42 s` under a minute, `12 min 5 s` above.
pub fn minutes(elapsed: std::time::Duration) -> String {
    let secs = elapsed.as_secs();
    if secs < 60 {
        format!("{:.1} s", elapsed.as_secs_f64())
    } else {
        format!("{} min {} s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn cmake_percentages_are_read_and_other_lines_are_not() {
        assert_eq!(
            cmake_percent("[ 42%] Building CXX object CMakeFiles/mlxc.dir/ops.cpp.o"),
            Some(42)
        );
        assert_eq!(
            cmake_percent("[100%] Linking CXX static library"),
            Some(100)
        );
        assert_eq!(cmake_percent("-- Configuring done"), None);
        assert_eq!(cmake_percent("[warning] 5% of something"), None);
    }

    #[test]
    fn a_failing_command_fails_the_step_and_keeps_its_output_in_the_log() {
        let log = std::env::temp_dir().join(format!("xtask-progress-{}.log", std::process::id()));
        let err = run_logged(
            "a failing step",
            Command::new("sh").args(["-c", "echo first; echo second >&2; exit 3"]),
            &log,
        )
        .unwrap_err();
        assert!(err.to_string().contains("a failing step failed"), "{err}");
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("first") && text.contains("second"), "{text}");
        run_logged("a passing step", Command::new("true").arg("x"), &log).unwrap();
        fs::remove_file(&log).unwrap();
    }

    #[test]
    fn wall_times_read_in_seconds_then_minutes() {
        use std::time::Duration;
        assert_eq!(minutes(Duration::from_millis(42_300)), "42.3 s");
        assert_eq!(minutes(Duration::from_secs(725)), "12 min 5 s");
    }
}
