//! The processes the test starts, and the guard that stops them.

use std::{
    fs,
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::Context;

/// Every process the test started. Dropping it kills those still running,
/// so an error or a panic anywhere in the test leaves nothing behind.
#[derive(Default)]
pub struct Fleet {
    procs: Vec<(String, Child)>,
}

/// Which process of a [`Fleet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId(usize);

impl Fleet {
    /// Starts `cmd` as `name`, its standard output and error going to
    /// `log`.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<ProcId> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        eprintln!(
            "xtask: deploy-test: starting {name} (log: {}): {cmd:?}",
            log.display()
        );
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        self.procs.push((name.to_owned(), child));
        Ok(ProcId(self.procs.len() - 1))
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self, id: ProcId) -> bool {
        let (_, child) = &mut self.procs[id.0];
        !matches!(child.try_wait(), Ok(None))
    }

    /// Sends SIGKILL, as a crash or the kernel's OOM killer would end it,
    /// and reaps it.
    pub fn kill(&mut self, id: ProcId) -> anyhow::Result<()> {
        let (name, child) = &mut self.procs[id.0];
        child.kill().with_context(|| format!("killing {name}"))?;
        child.wait().with_context(|| format!("reaping {name}"))?;
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (name, child) in &mut self.procs {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("xtask: deploy-test: stopped {name}");
            }
        }
    }
}

/// `n` distinct loopback ports that were free a moment ago: all listeners
/// stay open until every port is chosen, so none is handed out twice.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(("127.0.0.1", 0)).context("finding a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct, and never a port in use. (Whether a port is still free
    /// when it is bound later cannot be tested: any process on the machine
    /// may take it meanwhile, as an outgoing connection's source port.)
    #[test]
    fn free_ports_are_distinct_and_not_in_use() {
        let held = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let held_port = held.local_addr().unwrap().port();
        let ports = free_ports(20).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 20, "{ports:?}");
        assert!(
            !ports.contains(&held_port),
            "{held_port} is in use: {ports:?}"
        );
        assert!(ports.iter().all(|&p| p != 0), "{ports:?}");
    }

    #[test]
    fn dropping_the_fleet_kills_what_still_runs() {
        let dir = std::env::temp_dir().join(format!("xtask-fleet-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut fleet = Fleet::default();
        let id = fleet
            .spawn(
                "sleep",
                Command::new("sleep").arg("60"),
                &dir.join("sleep.log"),
            )
            .unwrap();
        #[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
        let pid = fleet.procs[id.0].1.id();
        assert!(!fleet.exited(id));
        drop(fleet);
        // Killed and reaped by the drop, so the process table no longer
        // has it.
        #[cfg(target_os = "linux")]
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} still runs"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
