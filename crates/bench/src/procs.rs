//! The processes a benchmark measures: the real `tenantmesh up` binary,
//! the baseline, a standalone data service, the emulator. Each runs as its
//! own process so its CPU time and resident memory are its own, read from
//! `/proc`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use tenantmesh_service::runtime::shutdown_signal;

/// A binary built beside this one (`target/release/<name>`).
pub fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let path = exe.parent().ok_or("no parent dir")?.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!("{} is not built (run `cargo xtask bench`, which builds it)", path.display()))
    }
}

/// A running child process, stopped (SIGINT, then SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU time used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Resident memory, bytes.
    pub fn rss(&self) -> u64 {
        rss(self.pid())
    }

    /// SIGINT, and waits up to `grace` for a clean exit.
    pub fn stop(mut self, grace: Duration) -> Result<(), String> {
        let _ = Command::new("kill").args(["-INT", &self.pid().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return if status.success() { Ok(()) } else { Err(format!("{} exited with {status}", self.name)) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{} did not stop within {grace:?}", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `cmd` with stdout piped and stderr to `log`, and reads stdout
/// lines until `ready` returns `Some` (or the process exits or `timeout`
/// passes). The rest of stdout is drained in the background.
pub fn spawn_until<T: Send + 'static>(
    name: &str,
    mut cmd: Command,
    log: PathBuf,
    timeout: Duration,
    mut ready: impl FnMut(&str) -> Option<T> + Send + 'static,
) -> Result<(Proc, T), String> {
    let err = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(err).stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut found = None;
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some(t) = ready(&line) {
                found = Some(t);
                break;
            }
        }
        let _ = tx.send(found);
        for _ in lines {}
    });
    let proc = Proc { name: name.to_owned(), child, log: log.clone() };
    match rx.recv_timeout(timeout) {
        Ok(Some(t)) => Ok((proc, t)),
        Ok(None) => Err(format!("{name} exited before it was ready; see {}", log.display())),
        Err(_) => Err(format!("{name} not ready within {timeout:?}; see {}", log.display())),
    }
}

/// The addresses `tenantmesh up` printed.
#[derive(Debug, Clone, Copy)]
pub struct MeshAddrs {
    pub registry: SocketAddr,
    pub auth: SocketAddr,
    pub onboarding: SocketAddr,
    pub data: SocketAddr,
}

/// The bootstrap admin password of every benchmark mesh.
pub const ADMIN_PASSWORD: &str = "bench-platform-admin-password";

/// Runs the real `tenantmesh up` on free ports with `data_dir`, plus
/// `env` (the bootstrap password and a one-hour token lifetime are set;
/// the example application service runs only if `env` asks for it with
/// `TENANTMESH_NO_EXAMPLE=false`, on a free port; the console never).
pub fn start_mesh(data_dir: &Path, env: &HashMap<String, String>) -> Result<(Proc, MeshAddrs), String> {
    start_mesh_of(&sibling("tenantmesh")?, data_dir, env)
}

/// [`start_mesh`] with the `tenantmesh` binary at `binary` (another build's,
/// to compare two builds in one sitting).
pub fn start_mesh_of(
    binary: &Path,
    data_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(Proc, MeshAddrs), String> {
    let mut cmd = Command::new(binary);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--registry-port", "0", "--auth-port", "0", "--onboarding-port", "0", "--data-port", "0"])
        .env("TENANTMESH_BOOTSTRAP_PASSWORD", ADMIN_PASSWORD)
        .env("TENANTMESH_ACCESS_TOKEN_TTL_SECS", "3600")
        // Variables, not flags: a build from before the example (or the
        // console) ignores them. No console: it is not on the request path.
        .env("TENANTMESH_NO_EXAMPLE", "true")
        .env("TENANTMESH_ORDERS_PORT", "0")
        .env("TENANTMESH_NO_CONSOLE", "true")
        .env("TENANTMESH_CONSOLE_PORT", "0")
        .envs(env);
    let mut found: HashMap<String, SocketAddr> = HashMap::new();
    let log = data_dir.with_extension("log");
    let (proc, addrs) = spawn_until("tenantmesh up", cmd, log, Duration::from_secs(120), move |line| {
        let mut words = line.split_whitespace();
        if let (Some(name), Some(addr)) = (words.next(), words.next())
            && let Ok(addr) = addr.parse()
        {
            found.insert(name.to_owned(), addr);
        }
        if line.starts_with("Press Ctrl-C") {
            return Some(MeshAddrs {
                registry: *found.get("tenant-registry")?,
                auth: *found.get("auth")?,
                onboarding: *found.get("onboarding")?,
                data: *found.get("data")?,
            });
        }
        None
    })?;
    Ok((proc, addrs))
}

/// Runs the baseline server (`tenantmesh-bench baseline`) on a free port.
pub fn start_baseline(data_dir: &Path) -> Result<(Proc, SocketAddr), String> {
    let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    cmd.arg("baseline").arg("--data-dir").arg(data_dir);
    spawn_until("baseline", cmd, data_dir.with_extension("log"), Duration::from_secs(30), |line| {
        line.strip_prefix("listening ").and_then(|a| a.parse().ok())
    })
}

/// User + system CPU time of process `pid` (including its exited threads).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): state is 3rd.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// Resident set size of process `pid`, bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A free loopback port (bound and released: a benchmark, not a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The moto emulator installed by `cargo xtask setup`, on a free port.
pub fn start_moto(root: &Path, dir: &Path) -> Result<(Proc, String), String> {
    let bin = root.join(".tools/bin/moto_server");
    if !bin.exists() {
        return Err(format!("{} is missing: run `cargo xtask setup`", bin.display()));
    }
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let proc = {
        let err = std::fs::File::create(dir.join("moto.log")).map_err(|e| e.to_string())?;
        let child = cmd.stdout(Stdio::null()).stderr(err).spawn().map_err(|e| format!("moto_server: {e}"))?;
        Proc { name: "moto".into(), child, log: dir.join("moto.log") }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((proc, format!("http://127.0.0.1:{port}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err("moto_server did not start".into())
}
