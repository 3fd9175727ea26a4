//! The `eventbus` binary on NATS JetStream, against a nats-server the test starts.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::context::GetStreamByNameErrorKind;
use test_brokers::NatsServer;

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{
    Scratch, demo_accounting_for_every_event, eventbus, line_starting_with, next_subscriber_prints,
    padded_envelopes, subscribe_until_stdout_closes, summary_value, text,
};

/// A config file for `server` in a fresh directory (removed when the `Scratch` is dropped).
fn config_file(server: &NatsServer, name: &str) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(name);
    let path = scratch.file("nats.toml");
    let config = format!(
        "type = \"nats\"\nclient_id = \"{name}\"\n[retry]\ninitial_backoff = \"10ms\"\nmax_backoff = \"50ms\"\n[nats]\nurls = [\"{}\"]\n[nats.consumer]\nfetch_expires = \"200ms\"\n",
        server.url()
    );
    std::fs::write(&path, config).expect("config written");
    (scratch, path)
}

#[test]
fn the_demo_runs_on_nats_from_a_config_file_without_loss_or_reordering() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "demo");
    let stdout = demo_accounting_for_every_event(
        &[
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--aggregates",
            "50",
            "--versions",
            "20",
            "--failure-rate",
            "0.2",
            "--panic-rate",
            "0.02",
            "--handler-delay-us",
            "100",
        ],
        1000,
    );
    assert!(stdout.contains("on the nats backend"), "{stdout}");
    assert!(summary_value(&stdout, "retries") > 0, "{stdout}");

    // Another service on the same server: its new durable reads the first run's events first;
    // they are told apart and do not count as duplicates or reordering.
    let (_other_dir, other) = config_file(&server, "demo-other");
    let stdout = demo_accounting_for_every_event(
        &[
            "--config",
            other.to_str().expect("UTF-8 path"),
            "--aggregates",
            "50",
            "--versions",
            "20",
        ],
        1000,
    );
    assert_eq!(summary_value(&stdout, "duplicates"), 0);
    let earlier = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("from earlier runs"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<u64>().ok());
    assert!(earlier.is_some_and(|n| n >= 1000), "{stdout}");
}

#[test]
fn subscribe_prints_what_publish_sent_through_the_server() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "shell");
    let config = config.to_str().expect("UTF-8 path");
    let publish = eventbus(
        &["publish", "--config", config, "--topic", "shell.lines"],
        "first\nsecond\n",
    );
    assert!(publish.status.success(), "{}", text(&publish.stderr));
    // The durable consumer starts at the beginning of the stream: both lines are there.
    let mut subscriber = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args([
            "subscribe",
            "--config",
            config,
            "--topic",
            "shell.lines",
            "--count",
            "2",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the eventbus binary runs");
    let stdout = subscriber.stdout.take().expect("stdout");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map(|line| line.expect("a line"))
        .collect();
    assert!(subscriber.wait().expect("exits").success());
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, payload) in lines.iter().zip(["first", "second"]) {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(value["topic"], "shell.lines");
        assert_eq!(value["payload"], payload);
    }
}

/// How many messages the stream holding `subject` has on `server`: 0 when no stream holds it.
fn messages_stored(server: &NatsServer, subject: &str) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let client = async_nats::connect(server.url())
            .await
            .expect("connected to the server");
        let js = async_nats::jetstream::new(client);
        match js.stream_by_subject(subject).await {
            Ok(name) => {
                let mut stream = js.get_stream(name).await.expect("the stream");
                stream.info().await.expect("its info").state.messages
            }
            Err(error) if error.kind() == GetStreamByNameErrorKind::NotFound => 0,
            Err(error) => panic!("cannot look up the stream of {subject}: {error}"),
        }
    })
}

#[test]
fn a_closed_stdout_stops_the_subscriber_and_gives_the_event_back() {
    const TOTAL: usize = 200;
    const READ: usize = 5;
    // Lines printed into the pipe that the test never reads: the pipe buffer (64 KiB) and the
    // reader's buffer hold only a few padded envelopes.
    const UNREAD_AT_MOST: usize = 10;
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "closed-stdout");
    let config = config.to_str().expect("UTF-8 path");
    let topic = "closed.stdout";
    let publish = eventbus(
        &[
            "publish",
            "--envelope",
            "--config",
            config,
            "--topic",
            topic,
        ],
        &padded_envelopes(TOTAL),
    );
    assert!(publish.status.success(), "{}", text(&publish.stderr));

    // `eventbus subscribe … | head -n 5`.
    subscribe_until_stdout_closes(
        &[
            "subscribe",
            "--envelope",
            "--config",
            config,
            "--topic",
            topic,
        ],
        String::new(),
        READ,
        Duration::from_secs(5),
    );
    assert_eq!(
        messages_stored(&server, &format!("{topic}.DLQ")),
        0,
        "nothing dead-lettered"
    );

    // The next subscriber of the durable gets what was not printed: it was not acknowledged.
    next_subscriber_prints(
        config,
        topic,
        TOTAL - READ - UNREAD_AT_MOST,
        Duration::from_secs(30),
    );
}

/// `eventbus bench --backend nats --instances 2` measures one and two instances sharing a
/// partitioned topic and prints the second as a ratio to the first.
#[test]
fn bench_with_instances_prints_each_count_as_a_ratio_to_one_instance() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "scale-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "nats",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--messages",
            "2000",
            "--aggregates",
            "100",
            "--instances",
            "2",
        ],
        "",
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for count in ["1 instance,", "2 instances,"] {
        let line = line_starting_with(&stdout, count);
        assert!(line.contains("ratio"), "{line}");
    }
}

/// `--instances` is a NATS measurement: another backend refuses it with a clear error.
#[test]
fn bench_refuses_instances_on_another_backend() {
    let output = eventbus(&["bench", "--backend", "memory", "--instances", "2"], "");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("--backend nats"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn topics_ensure_reports_creates_then_validates_the_configured_streams() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "topics");
    let mut text_of_config = std::fs::read_to_string(&config).expect("config read");
    text_of_config.push_str("[nats.topics.\"cli.managed\"]\nstorage = \"file\"\n");
    std::fs::write(&config, text_of_config).expect("config written");
    let ensure = |mode: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args([
                "topics",
                "ensure",
                "--config",
                config.to_str().expect("UTF-8 path"),
            ])
            .args(["--mode", mode])
            .output()
            .expect("eventbus runs");
        (
            output.status.code(),
            text(&output.stdout),
            text(&output.stderr),
        )
    };
    let (status, stdout, stderr) = ensure("validate-only");
    assert_eq!(status, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("cli.managed: differs (exists: wanted yes, has no)"),
        "{stdout}"
    );
    let (status, stdout, stderr) = ensure("create-only");
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "cli.managed: created");
    let (status, stdout, stderr) = ensure("validate-only");
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "cli.managed: as specified");
}

/// `eventbus bench --scenario handler-delay` on NATS prints the bus against the engine alone
/// and against the Go SDK's design, each as a ratio.
#[test]
fn bench_with_handler_delay_prints_ratios_to_the_engine_and_to_the_go_design() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "work-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "nats",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--scenario",
            "handler-delay",
            "--messages",
            "1000",
            "--aggregates",
            "200",
        ],
        "",
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for what in [
        "1 ms handlers, nats vs engine only",
        "1 ms handlers, vs the Go design",
    ] {
        let line = line_starting_with(&stdout, what);
        assert!(line.contains("raw") && line.contains("ratio"), "{line}");
    }
}

/// `eventbus bench --scenario stalled` on NATS publishes everything while the handler waits
/// (the broker keeps the backlog) and prints the resident memory at each quarter.
#[test]
fn bench_with_a_stalled_handler_publishes_everything_and_prints_resident_memory() {
    let server = NatsServer::start();
    let (_config_dir, config) = config_file(&server, "stalled-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "nats",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--scenario",
            "stalled",
            "--messages",
            "20000",
        ],
        "",
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(stdout.contains("20000 envelopes published in"), "{stdout}");
    let memory = line_starting_with(&stdout, "resident memory:");
    // Before, the peak, the target, then one figure per quarter.
    assert_eq!(memory.matches(" MB").count(), 3 + 4, "{memory}");
}
