//! Helpers shared by the CLI's test files: run the binary as a user does, read its summary.

use std::io::Write;
use std::process::{Command, Output, Stdio};

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
