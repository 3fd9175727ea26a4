//! Helpers shared by the CLI's test files: run the binary as a user does, read its summary.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs `eventbus` with `args`, `stdin` on its standard input, and waits for it.
pub(crate) fn eventbus(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the eventbus binary runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    child
        .wait_with_output()
        .expect("the eventbus binary finishes")
}

/// Bytes as text, lossily.
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first line of `stdout` that starts with `start` (after its indentation); panics with the
/// whole output when there is none.
pub(crate) fn line_starting_with<'a>(stdout: &'a str, start: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| line.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in: {stdout}"))
}

/// The number after `label` in the demo's summary.
pub(crate) fn summary_value(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find(|line| line.trim_start().starts_with(label))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} in the summary:\n{stdout}"))
}

/// Runs `eventbus demo` with `args`, checks that it exited successfully, and checks its summary:
/// `total` events published, each handled or dead-lettered, none lost, none out of order.
/// Returns the summary for further checks.
pub(crate) fn demo_accounting_for_every_event(args: &[&str], total: u64) -> String {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    let output = eventbus(&all, "");
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        text(&output.stderr)
    );
    assert_eq!(summary_value(&stdout, "published"), total);
    assert_eq!(summary_value(&stdout, "lost"), 0);
    assert_eq!(summary_value(&stdout, "order violations"), 0);
    assert_eq!(
        summary_value(&stdout, "handled") + summary_value(&stdout, "dead-lettered"),
        total
    );
    stdout
}

/// Starts `eventbus` with `args`, its standard output and error piped; writes `stdin` to its
/// standard input on a thread of its own, then closes it.
pub(crate) fn spawn_eventbus(args: &[&str], stdin: String) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the eventbus binary runs");
    let mut input = child.stdin.take().expect("stdin");
    // A binary that stops early closes its standard input: what is left unwritten does not matter.
    std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    child
}

/// Reads `stream` to its end on a thread of its own, so that the process writing it never blocks
/// on a full pipe.
pub(crate) fn read_to_end_in_background(
    mut stream: impl Read + Send + 'static,
) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).expect("the pipe is read");
        text(&bytes)
    })
}

/// Reads `lines` envelope lines from `stdout`, then closes it, as `head -n {lines}` does.
pub(crate) fn read_lines_then_close(stdout: ChildStdout, lines: usize) {
    let mut stdout = BufReader::new(stdout);
    for _ in 0..lines {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("a line");
        let envelope: serde_json::Value = serde_json::from_str(&line).expect("an envelope");
        assert!(
            envelope
                .get("event_id")
                .is_some_and(serde_json::Value::is_string),
            "{line}"
        );
    }
}

/// Waits up to `limit` for `child` to exit; kills it and returns `None` if it is still running.
pub(crate) fn exit_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("the binary's status") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last characters of `stderr`, enough to see why a run failed.
pub(crate) fn tail(stderr: &str) -> &str {
    let start = stderr.len().saturating_sub(4000);
    stderr.get(start..).unwrap_or(stderr)
}

/// `total` envelope lines for 20 aggregates, each padded to 16 KiB: the 64 KiB buffer of a pipe
/// holds only a few of them.
pub(crate) fn padded_envelopes(total: usize) -> String {
    let pad = "x".repeat(16 * 1024);
    (0..total)
        .map(|n| {
            format!(
                "{{\"event_id\":\"e-{n}\",\"aggregate_id\":\"order-{}\",\"event_type\":\"T\",\
                 \"event_version\":{},\"timestamp\":\"2024-01-01T00:00:00Z\",\
                 \"payload\":{{\"pad\":\"{pad}\"}}}}\n",
                n % 20,
                n / 20 + 1
            )
        })
        .collect()
}

/// Runs `eventbus subscribe` with `args` and `stdin`, reads `lines` lines and closes its
/// standard output, as `| head -n {lines}` does; checks that it stops within `limit` with
/// status 1, says why on stderr and panics nowhere.
pub(crate) fn subscribe_until_stdout_closes(
    args: &[&str],
    stdin: String,
    lines: usize,
    limit: Duration,
) {
    let mut subscriber = spawn_eventbus(args, stdin);
    let stderr = read_to_end_in_background(subscriber.stderr.take().expect("stderr"));
    read_lines_then_close(subscriber.stdout.take().expect("stdout"), lines);
    let status = exit_within(&mut subscriber, limit);
    let stderr = stderr.join().expect("stderr read");
    let Some(status) = status else {
        panic!(
            "still running {limit:?} after its output closed:\n{}",
            tail(&stderr)
        );
    };
    assert_eq!(status.code(), Some(1), "{}", tail(&stderr));
    assert!(
        stderr.contains("standard output closed"),
        "{}",
        tail(&stderr)
    );
    assert!(!stderr.contains("panicked"), "{}", tail(&stderr));
}

/// Runs `eventbus subscribe --envelope --config {config} --topic {topic} --count {count}` and
/// checks that it exits 0 within `limit` having printed `count` envelopes: the next subscriber
/// after one whose output closed gets what that one did not print.
pub(crate) fn next_subscriber_prints(config: &str, topic: &str, count: usize, limit: Duration) {
    let count_text = count.to_string();
    let mut next = spawn_eventbus(
        &[
            "subscribe",
            "--envelope",
            "--config",
            config,
            "--topic",
            topic,
            "--count",
            &count_text,
        ],
        String::new(),
    );
    let stdout = read_to_end_in_background(next.stdout.take().expect("stdout"));
    let stderr = read_to_end_in_background(next.stderr.take().expect("stderr"));
    let status = exit_within(&mut next, limit);
    let (stdout, stderr) = (
        stdout.join().expect("stdout read"),
        stderr.join().expect("stderr read"),
    );
    assert!(
        status.is_some_and(|status| status.success()),
        "{status:?}: {} lines\n{}",
        stdout.lines().count(),
        tail(&stderr)
    );
    assert!(stdout.lines().count() >= count);
}

/// A directory of this test process under the system's temporary directory, removed with
/// everything in it when dropped (also when the test fails).
pub(crate) struct Scratch(std::path::PathBuf);

impl Scratch {
    /// `{tmp}/eventbus-cli-{name}-{pid}`, made empty.
    pub(crate) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("eventbus-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }

    /// The path of `file` in the directory.
    pub(crate) fn file(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
