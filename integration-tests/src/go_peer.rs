//! The Go service of the interop tests: `interop/go/cmd/peer` (sarama and nats.go called as the
//! Go SDK calls them), built once per test process with `go build`, run as a child process.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use eventbus_core::Envelope;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::DEADLINE;

/// The Go module of the peer and the wire oracle.
fn module() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/go")
}

/// The peer's binary, built on first use (`go build`, modules from the Go module proxy) into
/// the workspace's `target/go-peer/` (the Go build cache makes later builds quick). A missing Go
/// fails the test here, loudly.
pub fn go_peer() -> &'static Path {
    static PEER: OnceLock<PathBuf> = OnceLock::new();
    PEER.get_or_init(|| {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go-peer/peer");
        let output = Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg("./cmd/peer")
            .current_dir(module())
            .output()
            .expect("go runs (install Go 1.26 or newer: the interop tests build the Go peer)");
        assert!(
            output.status.success(),
            "go build of interop/go/cmd/peer failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        binary
    })
}

/// Publishes `envelopes` through the Go peer (`kafka-publish` or `nats-publish` with `args`)
/// and returns once the peer has every acknowledgement.
pub fn go_publish(command: &str, args: &[&str], envelopes: &[Envelope]) {
    if let Err(failure) = try_go_publish(command, args, envelopes) {
        panic!("the Go peer's {command} failed: {failure}");
    }
}

/// [`go_publish`], returning the peer's error output when it fails (a Go service that does not
/// start, say).
pub fn try_go_publish(command: &str, args: &[&str], envelopes: &[Envelope]) -> Result<(), String> {
    let mut child = Command::new(go_peer())
        .arg(command)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the Go peer starts");
    let mut stdin = child.stdin.take().expect("its stdin");
    for envelope in envelopes {
        stdin
            .write_all(&envelope.to_bytes().expect("an encodable envelope"))
            .expect("written to the Go peer");
        stdin.write_all(b"\n").expect("written to the Go peer");
    }
    drop(stdin);
    let output = child.wait_with_output().expect("the Go peer ends");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let published = if envelopes.is_empty() && command == "health-publish" {
        "\"published\":1".to_owned()
    } else {
        format!("\"published\":{}", envelopes.len())
    };
    if output.status.success() && stdout.contains(&published) {
        Ok(())
    } else {
        Err(format!(
            "{}: {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Runs `peer {command} {args…}`, which must fail within 60 s (a Go service that cannot
/// start, say), and returns its error output. Panics when the peer succeeds or keeps running.
pub fn go_failure(command: &str, args: &[&str]) -> String {
    let mut child = Command::new(go_peer())
        .arg(command)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the Go peer starts");
    let Some(status) = exit_within(&mut child, Duration::from_secs(60)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the Go peer's {command} was expected to fail, and still ran after 60 s");
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(
        !status.success(),
        "the Go peer's {command} was expected to fail, and succeeded: {stderr}"
    );
    stderr
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
    /// The Kafka partition (0 on NATS).
    pub partition: i32,
    /// The Kafka offset or the stream sequence.
    pub offset: i64,
    /// When the peer handled it: nanoseconds since the Unix epoch, by the machine's clock.
    pub handled_at_ns: i64,
}

/// A consuming Go peer (`kafka-consume` or `nats-subscribe`); killed when dropped.
pub struct GoConsumer {
    child: Child,
    lines: UnboundedReceiver<String>,
}

impl GoConsumer {
    /// Starts `peer {command} {args…}`.
    pub fn start(command: &str, args: &[&str]) -> Self {
        let mut child = Command::new(go_peer())
            .arg(command)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        Self { child, lines }
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

    /// Waits up to 30 s for the peer to exit on its own (after `-count` envelopes).
    pub fn wait_for_exit(&mut self) {
        let status = self.exit_within(Duration::from_secs(30));
        let status = status.unwrap_or_else(|| panic!("the Go peer did not exit within 30 s"));
        assert!(status.success(), "the Go peer failed: {status}");
    }

    /// Stops the peer with SIGTERM (it closes its consumer: sarama commits what it marked) and
    /// waits up to 30 s for it to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        if self.exit_within(Duration::from_secs(30)).is_none() {
            panic!("the Go peer did not exit within 30 s of SIGTERM");
        }
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
        partition: i32::try_from(value["partition"].as_i64().unwrap_or(-1)).unwrap_or(-1),
        offset: value["offset"].as_i64().unwrap_or(-1),
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
