//! The real `mlx-batch serve` binary on the default model, as a child
//! process on a free loopback port, for tests that need what only a
//! separate process has: its own file limit, its own memory, its RSS.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running server; killed when dropped.
pub struct RealServer {
    pub child: Child,
    pub base: String,
    pub addr: String,
    pub client: reqwest::Client,
}

impl Drop for RealServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RealServer {
    /// Starts `mlx-batch serve` with `args` and waits until it is ready;
    /// `open_files` sets its file limit (soft and hard) before it runs.
    pub async fn start(args: &[&str], open_files: Option<u64>) -> Self {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mlx-batch"));
        cmd.args(["serve", "--device", "cpu", "--port", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(limit) = open_files {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe setrlimit runs in the child
            // between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit {
                        rlim_cur: limit as libc::rlim_t,
                        rlim_max: limit as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().unwrap();
        let mut server = Self {
            child,
            base: format!("http://{addr}"),
            addr,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        };
        let start = Instant::now();
        loop {
            if let Ok(resp) = server.client.get(server.url("/health/ready")).send().await {
                if resp.status() == 200 {
                    break;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("the server exited before it was ready: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the server was not ready in 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `/health` as JSON, with its status code.
    pub async fn health(&self) -> (u16, serde_json::Value) {
        let resp = self.client.get(self.url("/health")).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    /// Waits until nothing runs, waits or is paused and no KV block is in
    /// use.
    pub async fn wait_idle(&self) -> serde_json::Value {
        for _ in 0..600 {
            let (_, h) = self.health().await;
            let e = &h["engine"];
            if e["running"] == 0
                && e["waiting"] == 0
                && e["paused"] == 0
                && e["kv_blocks_used"] == 0
            {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the server never became idle: {:?}", self.health().await);
    }

    /// A line of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = text.lines().find(|l| l.starts_with(field)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Open file descriptors of the server process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// The sum of every sample of counter `name` whose labels contain `with`
/// (all of them when `with` is empty).
pub fn counter(metrics: &str, name: &str, with: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| with.is_empty() || l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Raises this test process's soft file limit to its hard limit, for
/// tests that open many sockets.
pub fn raise_own_file_limit() -> u64 {
    server::connections::raise_file_limit().unwrap()
}
