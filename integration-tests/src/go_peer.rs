//! The Go service of the interop tests: `interop/go/cmd/peer`, a program that runs the Go SDK
//! itself (`github.com/ChenBigdata421/jxt-core` v1.7.5) through its YAML start-up path and public
//! API, built once per test process with `go build` and run as a child process.
//!
//! Where the SDK's module comes from ([`go_binary`]): the folder named by `JXT_CORE_DIR`, else
//! `../shared/gosdk/jxt-core` beside the workspace (the unmodified extract this workplace keeps,
//! because its Go module proxy refuses the module), through a `go.work` written into
//! `target/go/` at test time; else the Go module proxy. Where none of them has it, the build
//! fails loudly and says how to provide it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use eventbus_core::Envelope;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::DEADLINE;

/// The Go SDK's module path.
pub const GO_SDK_MODULE: &str = "github.com/ChenBigdata421/jxt-core";

/// The Go SDK's version the Go module requires (as a Go service would).
pub const GO_SDK_VERSION: &str = "v1.7.5";

/// The workspace's root.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the workspace's root")
}

/// The Go module of the peer and the wire oracle.
fn module() -> PathBuf {
    workspace().join("interop/go")
}

/// Where the Go programs are built: `target/go/`.
fn go_target() -> PathBuf {
    workspace().join("target/go")
}

/// A local copy of the Go SDK's module: `JXT_CORE_DIR` (which must hold it), else
/// `../shared/gosdk/jxt-core` beside the workspace when it exists; `None` to use the Go module
/// proxy.
pub fn go_sdk_copy() -> Option<PathBuf> {
    let is_the_module = |dir: &Path| {
        std::fs::read_to_string(dir.join("go.mod"))
            .is_ok_and(|text| text.lines().next() == Some(&format!("module {GO_SDK_MODULE}")[..]))
    };
    if let Some(dir) = std::env::var_os("JXT_CORE_DIR") {
        let dir = PathBuf::from(dir);
        assert!(
            is_the_module(&dir),
            "JXT_CORE_DIR={} does not hold the Go module {GO_SDK_MODULE} (its go.mod's first \
             line must be `module {GO_SDK_MODULE}`)",
            dir.display()
        );
        return Some(dir);
    }
    let shared = workspace().join("../shared/gosdk/jxt-core");
    is_the_module(&shared).then(|| shared.canonicalize().expect("the Go SDK's folder"))
}

/// The `go.work` pointing the Go module at the local copy of the SDK, written into
/// `target/go/` (the copy itself is only read: CI mounts it read-only).
fn go_work(copy: &Path) -> PathBuf {
    let dir = go_target();
    std::fs::create_dir_all(&dir).expect("target/go");
    let path = dir.join("go.work");
    let text = format!(
        "go 1.26.0\n\nuse {}\n\nreplace {GO_SDK_MODULE} {GO_SDK_VERSION} => {}\n",
        module().display(),
        copy.display()
    );
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&path, text).expect("target/go/go.work written");
    }
    path
}

/// Builds `interop/go/cmd/{program}` against the Go SDK into `target/go/{program}` and returns
/// its path: [`try_go_binary`] with [`go_sdk_copy`]. Panics, saying what to provide, when Go is
/// missing or the SDK's module cannot be had; panics with Go's output when the build fails.
pub fn go_binary(program: &str) -> PathBuf {
    let binary = go_target().join(program);
    try_go_binary(program, go_sdk_copy().as_deref(), &binary).unwrap_or_else(|e| panic!("{e}"));
    binary
}

/// Builds `interop/go/cmd/{program}` into `binary`, with the Go SDK from `copy` (through a
/// `go.work` in `target/go/`) or, without one, from the Go module proxy (its checksum then goes
/// into `interop/go/go.sum`, as `go get` would put it). The error says how to provide the SDK
/// when the build failed for want of it.
pub fn try_go_binary(program: &str, copy: Option<&Path>, binary: &Path) -> Result<(), String> {
    let mut command = Command::new("go");
    command
        .args(["build", "-o"])
        .arg(binary)
        .arg(format!("./cmd/{program}"))
        .current_dir(module());
    let source = match copy {
        Some(copy) => {
            command.env("GOWORK", go_work(copy));
            format!("the local copy {}", copy.display())
        }
        None => {
            command.env("GOWORK", "off").env("GOFLAGS", "-mod=mod");
            "the Go module proxy".to_owned()
        }
    };
    let output = command.output().map_err(|e| {
        format!(
            "go does not run ({e}): install Go 1.26 or newer, the interop tests build the Go SDK"
        )
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    if stderr.contains(&format!("{GO_SDK_MODULE}@")) {
        return Err(format!(
            "the Go SDK {GO_SDK_MODULE} {GO_SDK_VERSION} could not be had from {source}:\n\
             {stderr}\nProvide it: put its source (the module's go.mod, go.sum, LICENSE, sdk/ and \
             storage/ at tag {GO_SDK_VERSION}) in ../shared/gosdk/jxt-core beside this workspace, \
             or name its folder in JXT_CORE_DIR, or use a Go module proxy (GOPROXY) that serves it."
        ));
    }
    Err(format!(
        "go build of interop/go/cmd/{program} against {source} failed:\n{stderr}"
    ))
}

/// The peer's binary, built on first use in this process ([`go_binary`]).
pub fn go_peer() -> &'static Path {
    static PEER: OnceLock<PathBuf> = OnceLock::new();
    PEER.get_or_init(|| go_binary("peer"))
}

/// A file under `target/go/logs/` for a peer's error output (the Go SDK logs every fetch).
fn log_file(command: &str) -> (PathBuf, std::fs::File) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = go_target().join("logs");
    std::fs::create_dir_all(&dir).expect("target/go/logs");
    let path = dir.join(format!(
        "{command}-{}-{}.log",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::File::create(&path).expect("a log file");
    (path, file)
}

/// A Go service on one broker, run through the Go peer: what it publishes and consumes goes
/// through the Go SDK, configured by the YAML the peer writes from these settings.
#[derive(Debug, Clone)]
pub struct GoService {
    bus: &'static str,
    servers: String,
    group: String,
    name: String,
}

impl GoService {
    /// A Go service on the NATS server at `url` (`eventBus.type: nats`, `nats.urls`).
    pub fn nats(url: &str) -> Self {
        Self {
            bus: "nats",
            servers: url.to_owned(),
            group: "go-peer".into(),
            name: "go-peer".into(),
        }
    }

    /// A Go service on the Kafka cluster at `bootstrap` (`eventBus.type: kafka`,
    /// `kafka.brokers`), in consumer group `go-peer` (`kafka.consumer.groupId`) and with
    /// `autoOffsetReset: earliest`.
    pub fn kafka(bootstrap: &str) -> Self {
        Self {
            bus: "kafka",
            servers: bootstrap.to_owned(),
            group: "go-peer".into(),
            name: "go-peer".into(),
        }
    }

    /// The same service in consumer group `group`.
    pub fn with_group(mut self, group: &str) -> Self {
        self.group = group.to_owned();
        self
    }

    /// The same service named `name` (`eventBus.serviceName`, the NATS client name).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    fn args(&self, topic: &str) -> Vec<String> {
        [
            "-bus",
            self.bus,
            "-servers",
            &self.servers,
            "-topic",
            topic,
            "-group",
            &self.group,
            "-service",
            &self.name,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    }

    /// Publishes `envelopes` with the SDK's `PublishEnvelope` and returns once its
    /// publish-result channel reported every one published.
    pub fn publish(&self, topic: &str, envelopes: &[Envelope]) {
        if let Err(failure) = self.try_publish(topic, envelopes) {
            panic!("the Go service's PublishEnvelope failed: {failure}");
        }
    }

    /// [`GoService::publish`], returning the peer's output when it fails (a Go service that
    /// does not start, say).
    pub fn try_publish(&self, topic: &str, envelopes: &[Envelope]) -> Result<(), String> {
        let lines: Vec<Vec<u8>> = envelopes
            .iter()
            .map(|e| e.to_bytes().expect("an encodable envelope").to_vec())
            .collect();
        self.run_with_input("publish", topic, &lines)
    }

    /// Publishes each of `messages` with the SDK's plain `Publish` (one per line).
    pub fn publish_plain(&self, topic: &str, messages: &[&str]) {
        let lines: Vec<Vec<u8>> = messages.iter().map(|m| m.as_bytes().to_vec()).collect();
        if let Err(failure) = self.run_with_input("publish-plain", topic, &lines) {
            panic!("the Go service's Publish failed: {failure}");
        }
    }

    /// Starts the SDK's health-check publisher on `topic` and returns once the SDK counts its
    /// first message published.
    pub fn health_publish(&self, topic: &str) {
        if let Err(failure) = self.run_with_input("health-publish", topic, &[]) {
            panic!("the Go service's health-check publisher failed: {failure}");
        }
    }

    fn run_with_input(&self, command: &str, topic: &str, lines: &[Vec<u8>]) -> Result<(), String> {
        let (log, file) = log_file(command);
        let mut child = Command::new(go_peer())
            .arg(command)
            .args(self.args(topic))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("the Go peer starts");
        let mut stdin = child.stdin.take().expect("its stdin");
        for line in lines {
            stdin.write_all(line).expect("written to the Go peer");
            stdin.write_all(b"\n").expect("written to the Go peer");
        }
        drop(stdin);
        let output = child.wait_with_output().expect("the Go peer ends");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let count = if command == "health-publish" {
            1
        } else {
            lines.len()
        };
        let published = format!("\"published\":{count}");
        if output.status.success() && stdout.contains(&published) {
            Ok(())
        } else {
            Err(format!("{}: {stdout}{}", output.status, tail(&log)))
        }
    }

    /// Starts a Go service that subscribes to `topic` with the SDK's `SubscribeEnvelope` and
    /// closes its bus after `count` envelopes (`None`: when stopped).
    pub fn subscribe(&self, topic: &str, count: Option<usize>) -> GoConsumer {
        self.subscribe_working(topic, count, Duration::ZERO)
    }

    /// [`GoService::subscribe`] with a handler that works `work` on each envelope (an envelope
    /// is reported once its handler returned, with the time it began).
    pub fn subscribe_working(
        &self,
        topic: &str,
        count: Option<usize>,
        work: Duration,
    ) -> GoConsumer {
        let mut args = self.args(topic);
        args.extend(["-work".to_owned(), format!("{}ms", work.as_millis())]);
        GoConsumer::start("subscribe", args, count)
    }

    /// Starts a Go service that reads `topic` with the SDK's `Subscribe` and prints the
    /// health-check messages the SDK's parser accepts, stopping after `count`.
    pub fn health_read(&self, topic: &str, count: usize) -> GoConsumer {
        GoConsumer::start("health-read", self.args(topic), Some(count))
    }

    /// Runs `peer {command}` on `topic`, which must fail within 60 s (a Go service that cannot
    /// start, say), and returns its error output. Panics when it succeeds or keeps running.
    pub fn failure(&self, command: &str, topic: &str) -> String {
        let (log, file) = log_file(command);
        let mut child = Command::new(go_peer())
            .arg(command)
            .args(self.args(topic))
            .args(["-count", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the Go peer starts");
        let Some(status) = exit_within(&mut child, Duration::from_secs(60)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Go peer's {command} was expected to fail, and still ran after 60 s");
        };
        let stderr = tail(&log);
        assert!(
            !status.success(),
            "the Go peer's {command} was expected to fail, and succeeded: {stderr}"
        );
        stderr
    }
}

/// The last lines of a peer's log (its own message comes last).
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(20);
    format!("(log {}):\n{}", log.display(), lines[from..].join("\n"))
}

/// One envelope the Go peer handled, as it reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GoHandled {
    /// The envelope's aggregate ID.
    pub aggregate_id: String,
    /// Its version.
    pub event_version: i64,
    /// Its event ID.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Its payload, as JSON.
    pub payload: serde_json::Value,
    /// When the peer handled it: nanoseconds since the Unix epoch, by the machine's clock.
    pub handled_at_ns: i64,
}

/// A consuming Go peer (`kafka-consume` or `nats-subscribe`); killed when dropped.
pub struct GoConsumer {
    child: Child,
    lines: UnboundedReceiver<String>,
    log: PathBuf,
}

impl GoConsumer {
    /// Starts `peer {command} {args…}`, stopping after `count` lines (`None`: when stopped).
    fn start(command: &str, args: Vec<String>, count: Option<usize>) -> Self {
        let (log, file) = log_file(command);
        let mut child = Command::new(go_peer())
            .arg(command)
            .args(args)
            .args(["-count", &count.unwrap_or(0).to_string()])
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .expect("the Go peer starts");
        let stdout = child.stdout.take().expect("its stdout");
        let (sender, lines) = unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, log }
    }

    /// Reads the peer's raw output lines until `until` holds for all read so far (three
    /// [`DEADLINE`]s at most).
    pub async fn read_lines_until(
        &mut self,
        what: &str,
        lines: &mut Vec<String>,
        until: impl Fn(&[String]) -> bool,
    ) {
        let read = async {
            while !until(lines) {
                let Some(line) = self.lines.recv().await else {
                    panic!("the Go peer stopped before {what}");
                };
                lines.push(line);
            }
        };
        if tokio::time::timeout(DEADLINE * 3, read).await.is_err() {
            panic!("timed out waiting for the Go peer: {what} ({lines:?})");
        }
    }

    /// Reads what the peer reported and nobody read yet, without waiting.
    pub fn read_available(&mut self, handled: &mut Vec<GoHandled>) {
        while let Ok(line) = self.lines.try_recv() {
            handled.push(parse(&line));
        }
    }

    /// Reads what the peer handled until `until` returns true for everything read so far
    /// (three [`DEADLINE`]s at most).
    pub async fn read_until(
        &mut self,
        what: &str,
        handled: &mut Vec<GoHandled>,
        until: impl Fn(&[GoHandled]) -> bool,
    ) {
        let read = async {
            while !until(handled) {
                let Some(line) = self.lines.recv().await else {
                    panic!("the Go peer stopped before {what}");
                };
                handled.push(parse(&line));
            }
        };
        if tokio::time::timeout(DEADLINE * 3, read).await.is_err() {
            panic!(
                "timed out waiting for the Go peer: {what} ({} handled)",
                handled.len()
            );
        }
    }

    /// Waits up to 30 s for the peer to exit on its own (after `count` envelopes it closes
    /// its bus).
    pub fn wait_for_exit(&mut self) {
        let status = self.exit_within(Duration::from_secs(30));
        let status = status
            .unwrap_or_else(|| panic!("the Go peer did not exit within 30 s {}", tail(&self.log)));
        assert!(
            status.success(),
            "the Go peer failed: {status} {}",
            tail(&self.log)
        );
    }

    /// Stops the Go service the ordinary way: SIGTERM, on which it calls the SDK's `Close`
    /// (on Kafka sarama commits what it marked and leaves the group; on NATS the SDK deletes
    /// the durables it made). Waits up to 30 s for it to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        match self.exit_within(Duration::from_secs(30)) {
            None => panic!(
                "the Go peer did not exit within 30 s of SIGTERM {}",
                tail(&self.log)
            ),
            Some(status) if !status.success() => {
                panic!("the Go peer's Close failed: {status} {}", tail(&self.log))
            }
            Some(_) => {}
        }
    }

    /// Kills the Go service (SIGKILL): nothing of the SDK's `Close` runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The file the peer's error output (the Go SDK's log) goes to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        exit_within(&mut self.child, limit)
    }
}

/// `child`'s exit status, polled until `limit`; `None` while it still runs.
fn exit_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// One line of a consuming peer.
fn parse(line: &str) -> GoHandled {
    let value: serde_json::Value =
        serde_json::from_str(line).expect("a JSON line from the Go peer");
    let text = |field: &str| value[field].as_str().unwrap_or_default().to_owned();
    GoHandled {
        aggregate_id: text("aggregate_id"),
        event_version: value["event_version"].as_i64().expect("a version"),
        event_id: text("event_id"),
        event_type: text("event_type"),
        payload: value["payload"].clone(),
        handled_at_ns: value["handled_at_ns"].as_i64().unwrap_or_default(),
    }
}

impl Drop for GoConsumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `aggregates` × `versions` envelopes, version-major (every aggregate's v1, then every v2, …),
/// with payloads whose bytes must arrive untouched: spaces, escapes, non-ASCII and HTML
/// characters, numbers in several notations.
pub fn interop_envelopes(prefix: &str, aggregates: usize, versions: i64) -> Vec<Envelope> {
    let mut all = Vec::new();
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            let text = format!(
                r#"{{"event_id":"{prefix}-{aggregate}-{version}","aggregate_id":"{prefix}-{aggregate}","event_type":"Interop.Changed","event_version":{version},"timestamp":"2026-11-28T10:00:00.123456789Z","trace_id":"t-{version}","tenant_id":7,"payload": {{ "n" : {version}, "s":"h\u00e9llo <b>&amp;</b> \"q\"", "x":[1.50, 2e3, null] }} }}"#
            );
            all.push(Envelope::from_bytes(text.as_bytes()).expect("a valid envelope"));
        }
    }
    all
}

/// The payload bytes of each envelope, by event ID.
pub fn payloads_by_event(envelopes: &[Envelope]) -> HashMap<String, Vec<u8>> {
    envelopes
        .iter()
        .map(|e| (e.event_id.clone(), e.payload().to_vec()))
        .collect()
}

/// Nanoseconds since the Unix epoch, by the machine's clock (the Go peer reports the same), to
/// merge this SDK's handlings with a Go service's.
pub fn now_ns() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970");
    i64::try_from(since.as_nanos()).expect("nanoseconds within i64")
}

/// What a handler of [`record_with_time`] records: aggregate, version, event ID, and when it
/// began ([`now_ns`]).
pub type HandledAt = (String, i64, String, i64);

/// A handler that records every envelope it is given in `handled`, with the time it began.
pub fn record_with_time(
    handled: &std::sync::Arc<crate::Recorder<HandledAt>>,
) -> std::sync::Arc<dyn eventbus_core::EnvelopeHandler> {
    let h = handled.clone();
    std::sync::Arc::new(
        move |_ctx: eventbus_core::HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push((
                    envelope.aggregate_id.clone(),
                    envelope.event_version,
                    envelope.event_id.clone(),
                    now_ns(),
                ));
                Ok::<(), eventbus_core::HandlerError>(())
            }
        },
    )
}

/// What a subscription of this SDK recorded of an envelope: aggregate, version, event ID and
/// payload bytes.
pub type HandledHere = (String, i64, String, Vec<u8>);

/// Subscribes a handler to `topic` that records every envelope it is given.
pub async fn record_envelopes(
    bus: &dyn eventbus_core::EventBus,
    topic: &str,
) -> std::sync::Arc<crate::Recorder<HandledHere>> {
    let handled = crate::Recorder::<HandledHere>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        std::sync::Arc::new(
            move |_ctx: eventbus_core::HandlerContext, envelope: Envelope| {
                let h = h.clone();
                async move {
                    h.push((
                        envelope.aggregate_id.clone(),
                        envelope.event_version,
                        envelope.event_id.clone(),
                        envelope.payload().to_vec(),
                    ));
                    Ok::<(), eventbus_core::HandlerError>(())
                }
            },
        ),
        eventbus_core::SubscribeOptions::new(),
    )
    .await
    .expect("subscribed");
    handled
}

/// Waits until `handled` holds every envelope of `sent` (the [`interop_envelopes`] of
/// `aggregates` × `versions`), then checks each aggregate's first handlings follow its versions
/// and every payload arrived byte for byte as sent.
pub async fn assert_handled_here_as_sent(
    handled: &crate::Recorder<HandledHere>,
    sent: &[Envelope],
    aggregates: usize,
    versions: i64,
) {
    let events = handled
        .wait_for("every event the Go service published", |e| {
            e.iter()
                .map(|(.., id, _)| id)
                .collect::<std::collections::BTreeSet<_>>()
                .len()
                == sent.len()
        })
        .await;
    let order: Vec<(String, i64)> = events.iter().map(|(a, v, ..)| (a.clone(), *v)).collect();
    crate::assert_first_handlings_in_order(&order, aggregates, versions);
    let expected = payloads_by_event(sent);
    for (_, _, event_id, payload) in &events {
        assert_eq!(
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&expected[event_id]),
            "{event_id}: the payload changed on the way"
        );
    }
}

/// Checks what the Go service handled against `sent` (`aggregates` × `versions`): each
/// aggregate's first handlings follow its versions, and every field is the one sent.
pub fn assert_handled_by_go_as_sent(
    handled: &[GoHandled],
    sent: &[Envelope],
    aggregates: usize,
    versions: i64,
) {
    let order: Vec<(String, i64)> = handled
        .iter()
        .map(|h| (h.aggregate_id.clone(), h.event_version))
        .collect();
    crate::assert_first_handlings_in_order(&order, aggregates, versions);
    let by_id: HashMap<&str, &Envelope> = sent.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for got in handled {
        let envelope = by_id[got.event_id.as_str()];
        assert_eq!(got.aggregate_id, envelope.aggregate_id);
        assert_eq!(got.event_version, envelope.event_version);
        assert_eq!(got.event_type, envelope.event_type);
        let payload: serde_json::Value =
            serde_json::from_slice(envelope.payload()).expect("a JSON payload");
        assert_eq!(got.payload, payload, "{}", got.event_id);
    }
}

/// The `source` of each health-check message line the Go peer's `health-read` printed.
pub fn heartbeat_sources(lines: &[String]) -> std::collections::BTreeSet<String> {
    lines
        .iter()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).expect("a JSON line from the Go peer");
            value["source"]
                .as_str()
                .expect("a health-check source")
                .to_owned()
        })
        .collect()
}
