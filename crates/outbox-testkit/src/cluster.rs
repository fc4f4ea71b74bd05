//! A private PostgreSQL cluster for tests that stop, crash or restart the database: its own data
//! directory in a temporary folder and its own loopback port, so the shared server other tests
//! use is never touched.
//!
//! The server runs as the `postgres` OS user (PostgreSQL refuses to run as root; tests here run
//! as root) with trust authentication. Dropping the cluster stops it and removes its folder, also
//! when the test panics; a watchdog process does the same if the test process itself is killed
//! before it could drop the cluster.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail, ensure};

/// How the server is stopped, as `pg_ctl stop -m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnects every session, rolls back their transactions and shuts down cleanly.
    Fast,
    /// Kills the server at once, as a crash would; the next start replays the WAL.
    Immediate,
}

impl StopMode {
    fn arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running (or stopped) private cluster. See the module docs.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    watchdog: Option<Child>,
    /// Extra `-c name=value` server settings.
    settings: Vec<String>,
}

impl PgCluster {
    /// Creates a cluster with `initdb` in a fresh folder and starts it on a free port.
    pub fn start_new() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Like [`PgCluster::start_new`], with server settings such as `wal_level=logical`.
    pub fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new().prefix("outbox-pg-").tempdir()?;
        if as_root()? {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()?;
            ensure!(status.success(), "chown of {} failed", dir.path().display());
        }
        let mut cluster = Self {
            dir,
            bin,
            port: free_port()?,
            watchdog: None,
            settings: settings.iter().map(|s| format!(" -c {s}")).collect(),
        };
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.initdb()?;
        cluster.start()?;
        Ok(cluster)
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Starts the stopped server on the same port and data, and waits until it accepts
    /// connections (after crash recovery, for an immediate stop).
    pub fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off{}",
            self.port,
            self.dir.path().display(),
            self.settings.concat()
        );
        let log = self.dir.path().join("server.log");
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-o",
            &options,
            "-l",
            log.to_str().context("non-UTF-8 temp dir")?,
        ])
        .with_context(|| format!("server log:\n{}", self.log_tail()))
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-w", "-t", "60", "-m", mode.arg()])
    }

    /// Stops the server with `mode` and starts it again.
    pub fn restart(&self, mode: StopMode) -> anyhow::Result<()> {
        self.stop(mode)?;
        self.start()
    }

    /// Whether the server runs (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"]).is_ok()
    }

    /// Creates a database in the cluster.
    pub fn create_database(&self, name: &str) -> anyhow::Result<()> {
        let out = self
            .as_postgres(&self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), name])
            .output()?;
        ensure!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn initdb(&self) -> anyhow::Result<()> {
        let out = self
            .as_postgres(&self.bin.join("initdb"))
            .arg("-D")
            .arg(self.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()?;
        ensure!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl {}: {}{}",
                args[0],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// A command run as the `postgres` user when the tests run as root.
    fn as_postgres(&self, program: &Path) -> Command {
        let mut c = if as_root().unwrap_or(false) {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.stdin(Stdio::null()).current_dir(self.dir.path());
        c
    }

    /// A process outside the test's process group (so that a harness that kills the group on a
    /// timeout does not take it along) that stops the server and removes its folder once this
    /// process is gone. `pg_ctl` detaches the server into a session of its own, so nothing else
    /// would stop it.
    fn spawn_watchdog(&self) -> anyhow::Result<Child> {
        let runuser = if as_root()? {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {runuser}'{pg_ctl}' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bin.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.path().display(),
        );
        Ok(Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop(StopMode::Immediate);
        }
        // The folder itself goes with `self.dir`; the watchdog has nothing left to do.
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// The newest installed PostgreSQL's binaries (`/usr/lib/postgresql/N/bin`).
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries not found in /usr/lib/postgresql")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .context("no PostgreSQL with pg_ctl in /usr/lib/postgresql")
}

fn as_root() -> anyhow::Result<bool> {
    Ok(std::fs::metadata("/proc/self")?.uid() == 0)
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
