//! A real Apache Kafka broker (KRaft: one node that is broker and controller), started on free
//! loopback ports and stopped by PID when dropped. The jars come from `KAFKA_LIBS` (set by
//! `cargo xtask test-matrix`, fetched from Maven Central by `cargo xtask brokers install`);
//! without them the test fails, loudly.

use crate::free_port;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cluster ID every broker started here uses (22 characters of base64, as `kafka-storage
/// random-uuid` prints): one fixed ID lets one formatted store serve as the template of all.
const CLUSTER_ID: &str = "ZXZlbnRidXMtdGVzdHMtMQ";

/// A running Kafka broker.
pub struct KafkaBroker {
    libs: PathBuf,
    child: Child,
    watchdog: Option<Child>,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    /// The ports of the `SSL` and `SASL_SSL` listeners of a broker started with
    /// [`start_secured`](KafkaBroker::start_secured).
    secured: Option<(u16, u16)>,
}

/// The `bootstrap.servers` of the broker tests share: `KAFKA_BOOTSTRAP` when set (a broker run
/// outside the tests, e.g. CI's Kafka service container), else this process's
/// [`KafkaBroker::shared`] broker.
pub fn kafka_bootstrap() -> String {
    match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(bootstrap) if !bootstrap.trim().is_empty() => bootstrap,
        _ => KafkaBroker::shared().bootstrap(),
    }
}

/// The directory of the broker's jars, from `KAFKA_LIBS`.
pub fn kafka_libs() -> PathBuf {
    let Some(path) = std::env::var_os("KAFKA_LIBS") else {
        panic!(
            "KAFKA_LIBS is not set: run the tests through `cargo xtask test-matrix`, or \
             `cargo xtask brokers install` and set KAFKA_LIBS=target/brokers/kafka/libs"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        has_kafka_jar(&path),
        "KAFKA_LIBS={} holds no Kafka jars: run `cargo xtask brokers install`",
        path.display()
    );
    path
}

fn has_kafka_jar(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("kafka_2.13-")
        })
    })
}

/// Broker settings: one node, replication factors 1, no initial rebalance delay, short group
/// timeouts so that group tests move fast (the clients lower theirs to match).
fn server_properties(port: u16, controller_port: u16, data: &Path) -> String {
    node_properties(
        1,
        port,
        controller_port,
        &format!("1@127.0.0.1:{controller_port}"),
        1,
        data,
    )
}

/// The settings of node `node_id` of a KRaft cluster whose controllers are `voters`
/// (`id@host:port,...`), every node both broker and controller; internal topics replicated
/// `replication` times (at least 2 in sync when more than 1).
fn node_properties(
    node_id: u32,
    port: u16,
    controller_port: u16,
    voters: &str,
    replication: u32,
    data: &Path,
) -> String {
    let min_isr = if replication > 1 { 2 } else { 1 };
    format!(
        "process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor={replication}
offsets.topic.replication.factor={replication}
offsets.topic.num.partitions=1
transaction.state.log.replication.factor={replication}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replication}
share.coordinator.state.topic.min.isr={min_isr}
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.session.timeout.ms=1000
group.consumer.heartbeat.interval.ms=500
group.consumer.min.heartbeat.interval.ms=100
num.network.threads=2
num.io.threads=2
log.flush.interval.messages=1
",
        data = data.display()
    )
}

const LOG4J: &str = "status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
";

fn java(libs: &Path, dir: &Path) -> Command {
    let mut command = Command::new("java");
    command
        .arg("-Xms128m")
        .arg("-Xmx512m")
        .arg("-XX:+UseSerialGC")
        .arg("-XX:TieredStopAtLevel=1")
        .arg(format!("-Dkafka.logs.dir={}", dir.display()))
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs.display()));
    command
}

/// A formatted, empty store, made once per process and copied for every broker.
static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();

fn template(libs: &Path) -> &'static Path {
    TEMPLATE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("eventbus-kafka-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("a Kafka template directory");
        std::fs::write(dir.join("log4j2.properties"), LOG4J).expect("log4j2.properties");
        // The ports only name the quorum; formatting does not listen.
        std::fs::write(
            dir.join("server.properties"),
            server_properties(1, 2, &dir.join("data")),
        )
        .expect("server.properties");
        let output = java(libs, &dir)
            .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
            .arg(dir.join("server.properties"))
            .output()
            .expect("java runs (install Java 17)");
        assert!(
            output.status.success(),
            "kafka-storage format failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        // Statics are never dropped: a process of its own removes the template once this
        // process is gone, however it ends.
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "while kill -0 {} 2>/dev/null; do sleep 1; done; rm -rf '{}'",
                    std::process::id(),
                    dir.display()
                ),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        dir.join("data")
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("a Kafka data directory");
    for entry in std::fs::read_dir(from).expect("the template store") {
        let entry = entry.expect("a template entry");
        let target = to.join(entry.file_name());
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("a template file copied");
        }
    }
}

/// How many times a broker that exits while starting is started again on other ports.
const START_ATTEMPTS: u32 = 3;

impl KafkaBroker {
    /// Starts a broker with an empty store from the jars in `KAFKA_LIBS`; returns once it
    /// answers the Kafka protocol.
    pub fn start() -> Self {
        Self::start_from(&kafka_libs())
    }

    /// Starts a broker with an empty store from the jars in `libs`; returns once it answers
    /// the Kafka protocol.
    pub fn start_from(libs: &Path) -> Self {
        // As for nats-server: a broker that exits while starting (a port taken between
        // `free_port` and its bind) is started again on other ports.
        let mut attempt = 1;
        loop {
            let (port, controller_port) = (free_port(), free_port());
            let dir =
                std::env::temp_dir().join(format!("eventbus-kafka-{}-{port}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            copy_dir(template(libs), &dir.join("data"));
            std::fs::write(dir.join("log4j2.properties"), LOG4J).expect("log4j2.properties");
            std::fs::write(
                dir.join("server.properties"),
                server_properties(port, controller_port, &dir.join("data")),
            )
            .expect("server.properties");
            let mut broker = Self {
                libs: libs.to_owned(),
                child: Self::spawn(libs, &dir),
                watchdog: None,
                port,
                controller_port,
                dir,
                secured: None,
            };
            broker.watch();
            match broker.wait_ready() {
                Ok(()) => return broker,
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!("{exited}; starting it again on other ports");
                    attempt += 1;
                }
                Err(exited) => panic!("{exited}, {START_ATTEMPTS} times"),
            }
        }
    }

    /// Starts a broker (from `KAFKA_LIBS`) that clients reach through TLS besides plain text:
    /// an `SSL` listener that wants a client certificate its CA trusts (mutual TLS), and a
    /// `SASL_SSL` listener with `SCRAM-SHA-512` for `users` (name, password). Its certificate,
    /// for `127.0.0.1` and `localhost`, comes from `ca`. The plain listener
    /// ([`bootstrap`](Self::bootstrap)) serves the brokers' own traffic and the readiness
    /// probe.
    pub fn start_secured(ca: &crate::TestCa, users: &[(&str, &str)]) -> Self {
        let libs = kafka_libs();
        let server = ca.issue("kafka-broker", &["127.0.0.1", "localhost"]);
        let mut attempt = 1;
        loop {
            let (port, controller_port) = (free_port(), free_port());
            let (ssl_port, sasl_port) = (free_port(), free_port());
            let dir = std::env::temp_dir().join(format!(
                "eventbus-kafka-secured-{}-{port}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("data")).expect("a Kafka data directory");
            std::fs::write(dir.join("log4j2.properties"), LOG4J).expect("log4j2.properties");
            let plain = server_properties(port, controller_port, &dir.join("data"));
            let properties = plain
                .replace(
                    &format!("listeners=PLAINTEXT://127.0.0.1:{port},"),
                    &format!(
                        "listeners=PLAINTEXT://127.0.0.1:{port},SSL://127.0.0.1:{ssl_port},SASL_SSL://127.0.0.1:{sasl_port},"
                    ),
                )
                .replace(
                    &format!("advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"),
                    &format!(
                        "advertised.listeners=PLAINTEXT://127.0.0.1:{port},SSL://127.0.0.1:{ssl_port},SASL_SSL://127.0.0.1:{sasl_port}\n"
                    ),
                )
                .replace(
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL\n",
                )
                + &format!(
                    "ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={ca}
listener.name.ssl.ssl.client.auth=required
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
",
                    keystore = server.key_and_cert.display(),
                    ca = ca.ca_file().display(),
                );
            std::fs::write(dir.join("server.properties"), properties).expect("server.properties");
            // SCRAM credentials live in the cluster's metadata, written when the store is
            // formatted.
            let mut format = java(&libs, &dir);
            format.args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"]);
            format.arg(dir.join("server.properties"));
            for (name, password) in users {
                format.args([
                    "--add-scram",
                    &format!("SCRAM-SHA-512=[name={name},password={password}]"),
                ]);
            }
            let output = format.output().expect("java runs (install Java 17)");
            assert!(
                output.status.success(),
                "kafka-storage format failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            let mut broker = Self {
                libs: libs.clone(),
                child: Self::spawn(&libs, &dir),
                watchdog: None,
                port,
                controller_port,
                dir,
                secured: Some((ssl_port, sasl_port)),
            };
            broker.watch();
            match broker.wait_ready() {
                Ok(()) => return broker,
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!("{exited}; starting it again on other ports");
                    attempt += 1;
                }
                Err(exited) => panic!("{exited}, {START_ATTEMPTS} times"),
            }
        }
    }

    /// The `bootstrap.servers` of the `SSL` listener (mutual TLS) of a broker started with
    /// [`start_secured`](Self::start_secured).
    pub fn bootstrap_ssl(&self) -> String {
        let (ssl, _) = self.secured.expect("a broker started with start_secured");
        format!("127.0.0.1:{ssl}")
    }

    /// The `bootstrap.servers` of the `SASL_SSL` listener (SCRAM-SHA-512) of a broker started
    /// with [`start_secured`](Self::start_secured).
    pub fn bootstrap_sasl_ssl(&self) -> String {
        let (_, sasl) = self.secured.expect("a broker started with start_secured");
        format!("127.0.0.1:{sasl}")
    }

    /// One broker for the whole test process, started on first use. A watchdog process stops
    /// it by PID when the test process exits (statics are never dropped).
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<KafkaBroker> = OnceLock::new();
        SHARED.get_or_init(Self::start)
    }

    fn spawn(libs: &Path, dir: &Path) -> Child {
        java(libs, dir)
            .arg("kafka.Kafka")
            .arg(dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java runs (install Java 17)")
    }

    /// Starts (again) a process that kills the broker by PID once this test process is gone,
    /// so that a test killed or aborted leaves no broker behind.
    fn watch(&mut self) {
        self.stop_watchdog();
        // The process's template store too, if it made one (a cluster's nodes and a secured
        // broker format their own).
        let template = TEMPLATE
            .get()
            .and_then(|data| data.parent())
            .map(|template| format!(" '{}'", template.display()))
            .unwrap_or_default();
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 1; done; kill -9 {broker} 2>/dev/null; \
             rm -rf '{dir}'{template}",
            parent = std::process::id(),
            broker = self.child.id(),
            dir = self.dir.display(),
        );
        self.watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }

    /// Polls with a Kafka `ApiVersions` request until the broker answers without error (60 s
    /// deadline, then a panic; a JVM start on 2 busy cores takes 5 to 15 s); an error when the
    /// broker exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the Kafka broker exited with {status} (ports {} and {} taken?)",
                    self.port, self.controller_port
                ));
            }
            if self.answers() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "the Kafka broker did not answer within 60 s; see {}",
                self.dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True when the broker answers an `ApiVersions` (v0) request with error code 0.
    pub fn answers(&self) -> bool {
        api_versions_ok(self.port)
    }

    /// The `bootstrap.servers` value.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker with SIGKILL (no clean shutdown) and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the broker with SIGSTOP: its sockets stay open and accept connections, but nothing
    /// is answered (a broker hung in a long GC pause, or a host that vanished without closing
    /// its connections). [`thaw`](Self::thaw) lets it go on; dropping the broker kills it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`freeze`](Self::freeze)d broker go on (SIGCONT).
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

    /// Starts the broker again on the same ports with the same store (after
    /// [`kill`](Self::kill)); returns once it answers.
    pub fn start_again(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.libs, &self.dir);
        self.watch();
        if let Err(exited) = self.wait_ready() {
            panic!("{exited}; see {}", self.dir.join("server.log").display());
        }
    }

    /// The controller's port (for tests that need to know it is taken).
    pub fn controller_port(&self) -> u16 {
        self.controller_port
    }

    /// Leaves the broker running after this value is gone (for `cargo xtask brokers up`);
    /// returns its PID and its directory (store and log). Whoever keeps them stops the broker
    /// and removes the directory.
    pub fn detach(mut self) -> (u32, PathBuf) {
        self.stop_watchdog();
        let pid = self.child.id();
        let dir = std::mem::take(&mut self.dir);
        // The process's formatted template store (if it made one), which the stopped watchdog
        // would have removed.
        if let Some(template) = TEMPLATE.get().and_then(|data| data.parent()) {
            let _ = std::fs::remove_dir_all(template);
        }
        std::mem::forget(self);
        (pid, dir)
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop_watchdog();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Sends `ApiVersions` v0 to `127.0.0.1:port` and checks the error code of the answer.
fn api_versions_ok(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let client = b"probe";
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // version 0
    body.extend_from_slice(&7i32.to_be_bytes()); // correlation ID
    body.extend_from_slice(&(client.len() as i16).to_be_bytes());
    body.extend_from_slice(client);
    let mut request = (body.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    if stream.write_all(&request).is_err() {
        return false;
    }
    let mut header = [0u8; 10]; // size, correlation ID, error code
    if stream.read_exact(&mut header).is_err() {
        return false;
    }
    let correlation = i32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let error = i16::from_be_bytes([header[8], header[9]]);
    correlation == 7 && error == 0
}

/// A KRaft cluster of Kafka nodes on loopback, each broker and controller (a quorum of all of
/// them), internal topics replicated on every node (`min.insync.replicas` 2 for them), small
/// heaps; every node can be killed, frozen and started again on its ports and store. Stopped
/// (each node killed by PID, its store removed) when dropped.
pub struct KafkaCluster {
    nodes: Vec<KafkaBroker>,
}

impl KafkaCluster {
    /// Starts `size` nodes from the jars in `KAFKA_LIBS` and returns once each answers the
    /// Kafka protocol (which a node does only once the controllers have a quorum).
    pub fn start(size: usize) -> Self {
        Self::start_from(&kafka_libs(), size)
    }

    /// Like [`start`](Self::start), with the jars in `libs`.
    pub fn start_from(libs: &Path, size: usize) -> Self {
        assert!(size >= 1, "a cluster has a node");
        let libs = libs.to_owned();
        let mut attempt = 1;
        loop {
            let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
            let voters: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(index, (_, controller))| format!("{}@127.0.0.1:{controller}", index + 1))
                .collect();
            let voters = voters.join(",");
            let run = format!("{}-{}", std::process::id(), free_port());
            let replication = u32::try_from(size.min(3)).unwrap_or(3);
            let mut nodes = Vec::new();
            for (index, (port, controller_port)) in ports.iter().enumerate() {
                let node_id = u32::try_from(index + 1).unwrap_or(u32::MAX);
                let dir =
                    std::env::temp_dir().join(format!("eventbus-kafka-cluster-{run}-{node_id}"));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(dir.join("data")).expect("a Kafka data directory");
                std::fs::write(dir.join("log4j2.properties"), LOG4J).expect("log4j2.properties");
                std::fs::write(
                    dir.join("server.properties"),
                    node_properties(
                        node_id,
                        *port,
                        *controller_port,
                        &voters,
                        replication,
                        &dir.join("data"),
                    ),
                )
                .expect("server.properties");
                let output = java(&libs, &dir)
                    .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
                    .arg(dir.join("server.properties"))
                    .output()
                    .expect("java runs (install Java 17)");
                assert!(
                    output.status.success(),
                    "kafka-storage format failed: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                let mut node = KafkaBroker {
                    libs: libs.clone(),
                    child: KafkaBroker::spawn(&libs, &dir),
                    watchdog: None,
                    port: *port,
                    controller_port: *controller_port,
                    dir,
                    secured: None,
                };
                node.watch();
                nodes.push(node);
            }
            let mut cluster = Self { nodes };
            match cluster
                .nodes
                .iter_mut()
                .try_for_each(KafkaBroker::wait_ready)
            {
                Ok(()) => return cluster,
                Err(exited) if attempt < START_ATTEMPTS => {
                    eprintln!("{exited}; starting the cluster again on other ports");
                    attempt += 1;
                }
                Err(exited) => panic!("{exited}, {START_ATTEMPTS} times"),
            }
        }
    }

    /// The `bootstrap.servers` value naming every node.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(KafkaBroker::bootstrap)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Leaves every node running after this value is gone (for `cargo xtask brokers up
    /// --cluster`); returns each node's PID and directory (store and log).
    pub fn detach(self) -> Vec<(u32, PathBuf)> {
        self.nodes.into_iter().map(KafkaBroker::detach).collect()
    }

    /// Node `index` (node ID `index + 1`): its address, and killing, freezing or starting it
    /// again.
    pub fn node(&mut self, index: usize) -> &mut KafkaBroker {
        let size = self.nodes.len();
        self.nodes
            .get_mut(index)
            .unwrap_or_else(|| panic!("the cluster has {size} nodes, not node {index}"))
    }

    /// The index of the node with Kafka node ID `id` (as metadata names partition leaders).
    pub fn index_of(id: i32) -> Option<usize> {
        usize::try_from(id).ok()?.checked_sub(1)
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
