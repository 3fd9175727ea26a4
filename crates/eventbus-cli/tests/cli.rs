//! The `eventbus` binary, run as a user runs it.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{
    Scratch, demo_accounting_for_every_event, eventbus, line_starting_with, padded_envelopes,
    subscribe_until_stdout_closes, summary_value, text,
};

#[test]
fn the_demo_reports_no_loss_and_no_reordering_despite_failures_and_panics() {
    let stdout = demo_accounting_for_every_event(
        &[
            "--aggregates",
            "30",
            "--versions",
            "20",
            "--failure-rate",
            "0.2",
            "--panic-rate",
            "0.05",
            "--handler-delay-us",
            "0",
        ],
        600,
    );
    assert_eq!(summary_value(&stdout, "duplicates"), 0);
    assert!(
        summary_value(&stdout, "retries") > 0,
        "failures were injected"
    );
}

/// What Kubernetes injects into every pod of a namespace with a Service named `eventbus` does
/// not stop the binary; a typo of a known variable is warned about, naming the variable meant.
#[test]
fn the_environment_a_platform_writes_does_not_stop_the_demo_and_a_typo_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["demo", "--aggregates", "2", "--versions", "2"])
        .env_remove("RUST_LOG")
        .env("EVENTBUS_SERVICE_HOST", "10.0.0.1")
        .env("EVENTBUS_PORT", "tcp://10.0.0.1:4222")
        .env("EVENTBUS_PORT_4222_TCP_ADDR", "10.0.0.1")
        .env("EVENTBUS_CLIENTID", "billing")
        .output()
        .expect("the eventbus binary runs");
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("EVENTBUS_CLIENTID") && stderr.contains("EVENTBUS_CLIENT_ID"),
        "{stderr}"
    );
    assert!(stderr.contains("EVENTBUS_SERVICE_HOST"), "{stderr}");
}

#[test]
fn bad_flags_are_explained_not_panicked_on() {
    let output = eventbus(&["demo", "--failure-rate", "2"], "");
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("--failure-rate") && stderr.contains("between 0 and 1"),
        "{stderr}"
    );
    let output = eventbus(&["demo", "--aggregates", "0"], "");
    assert_eq!(output.status.code(), Some(2));
    assert!(!text(&output.stderr).contains("panicked"));
}

#[test]
fn a_bad_config_file_names_the_file_the_field_and_the_reason() {
    let scratch = Scratch::new("bad-config");
    let path = scratch.file("eventbus.toml");
    std::fs::write(&path, "[pool]\npool_size = 0\n").unwrap();
    let output = eventbus(&["demo", "--config", path.to_str().unwrap()], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("pool.pool_size"), "{stderr}");
    std::fs::write(&path, "[pool]\npool_sise = 4\n").unwrap();
    let output = eventbus(&["demo", "--config", path.to_str().unwrap()], "");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains(path.to_str().unwrap()) && stderr.contains("pool_sise"),
        "{stderr}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn publish_on_memory_makes_a_round_trip_as_json_lines() {
    let output = eventbus(&["publish", "--topic", "smoke"], "{\"n\":1}\nplain text\n");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    // Messages without a key have no order: the two may be printed either way round.
    lines.sort_by_key(|line| line["sequence"].as_u64());
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["topic"], "smoke");
    assert_eq!(lines[0]["payload"]["n"], 1);
    assert_eq!(lines[1]["payload"], "plain text");
    assert_eq!(lines[1]["sequence"], 2);
}

#[test]
fn envelopes_round_trip_and_a_bad_line_is_reported_by_number() {
    let envelope = r#"{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1,"timestamp":"2024-01-01T00:00:00Z","payload":{"a":1}}"#;
    let output = eventbus(
        &["subscribe", "--topic", "orders", "--envelope"],
        &format!("{envelope}\n"),
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), envelope);

    let output = eventbus(
        &["publish", "--topic", "orders", "--envelope"],
        &format!("{envelope}\n{{\"event_id\":\"\"}}\n"),
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("event_id is required"),
        "{stderr}"
    );
}

#[test]
fn a_closed_stdout_stops_the_subscriber_on_memory_too() {
    subscribe_until_stdout_closes(
        &["subscribe", "--envelope", "--topic", "closed.stdout"],
        padded_envelopes(200),
        5,
        std::time::Duration::from_secs(5),
    );
}

#[test]
fn the_demo_serves_pool_metrics_while_it_runs() {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args([
            "demo",
            "--versions",
            "200",
            "--handler-delay-us",
            "2000",
            "--metrics-listen",
            &listen,
        ])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let names = [
        "memory_eventbus_eventbus_actor_pool_messages_sent_total",
        "memory_eventbus_eventbus_actor_pool_inbox_depth",
        "memory_eventbus_eventbus_actor_pool_lanes_active",
        "memory_eventbus_eventbus_actor_pool_in_flight",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    // A metric is served once it was first recorded: scrape until every one is there.
    let mut last = String::new();
    let scraped = loop {
        let response = TcpStream::connect(&listen).ok().and_then(|mut stream| {
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .ok()?;
            let mut body = String::new();
            stream.read_to_string(&mut body).ok()?;
            Some(body)
        });
        match response {
            Some(body) if names.iter().all(|name| body.contains(name)) => break body,
            _ if Instant::now() > deadline => {
                panic!("not every pool metric served on {listen} within 30 s; last scrape:\n{last}")
            }
            // Poll the endpoint until it answers with every metric; the demo is starting up.
            Some(body) => {
                last = body;
                std::thread::yield_now();
            }
            None => std::thread::yield_now(),
        }
    };
    assert!(
        demo.try_wait().unwrap().is_none(),
        "the demo was still running when scraped"
    );
    for name in names {
        assert!(scraped.contains(name), "{name} missing from:\n{scraped}");
    }
    let output = demo.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
}

/// On memory there is no broker to keep a backlog: with the handler stalled, the publisher is
/// held back once the engine is full (here 16 actors x 10 per lane), and the bench says so.
#[test]
fn bench_with_a_stalled_handler_on_memory_holds_the_publisher_back_at_the_engines_bound() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["bench", "--scenario", "stalled", "--messages", "5000"])
        .env("EVENTBUS_POOL_POOL_SIZE", "16")
        .env("EVENTBUS_POOL_INBOX_SIZE", "10")
        .output()
        .expect("eventbus runs");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(
        stdout.contains("the publisher was held back after"),
        "{stdout}"
    );
    assert!(stdout.contains("160 queued"), "{stdout}");
}

/// `eventbus bench --scenario engine` prints the engine against the Go design and the raw hop,
/// and on one thread for each key count, each as a ratio.
#[test]
fn bench_of_the_engine_prints_its_ratios_to_the_go_design_and_the_raw_hop() {
    let output = eventbus(
        &["bench", "--scenario", "engine", "--messages", "20000"],
        "",
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for what in [
        "engine no-op vs Go design",
        "engine no-op vs raw mpsc hop",
        "engine 1 thread, 10 keys, vs Go design",
        "engine 1 thread, 100000 keys, vs Go design",
    ] {
        let line = line_starting_with(&stdout, what);
        assert!(line.contains("ratio"), "{line}");
    }
}

/// `eventbus bench` with no scenario runs every one (each in a process of its own), prints each
/// ratio with its target and whether it was met, and ends with the count of targets met: on
/// memory six engine targets, the 1 ms handlers' and the stalled handler's memory.
#[test]
fn bench_runs_every_scenario_and_counts_the_targets_met() {
    let output = eventbus(&["bench", "--messages", "2000", "--aggregates", "50"], "");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for what in [
        "engine no-op vs Go design",
        "end to end",
        "1 ms handlers, memory vs engine only",
        "resident memory:",
    ] {
        line_starting_with(&stdout, what);
    }
    let with_target = stdout
        .lines()
        .filter(|line| line.contains("(target "))
        .count();
    assert_eq!(with_target, 8, "{stdout}");
    let summary = stdout
        .lines()
        .last()
        .and_then(|line| line.strip_prefix("targets: "))
        .unwrap_or_else(|| panic!("no summary line: {stdout}"));
    let counts: Vec<usize> = summary
        .split(", ")
        .map(|part| {
            part.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a count")
        })
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), 8, "{summary}");
}
