//! The `eventbus` binary on Apache Kafka, against the broker this test binary starts.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use test_brokers::kafka_bootstrap;

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{demo_accounting_for_every_event, eventbus, summary_value, text};

/// A config file for the broker in a fresh directory, from `examples/kafka.toml` with the
/// broker's address and a client ID of its own.
fn config_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("eventbus-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/kafka.toml"
    ))
    .expect("examples/kafka.toml");
    let config = example
        .replace("127.0.0.1:9092", &kafka_bootstrap())
        .replace("client_id = \"demo\"", &format!("client_id = \"{name}\""));
    let path = dir.join("kafka.toml");
    std::fs::write(&path, config).expect("config written");
    path
}

#[test]
fn the_demo_runs_on_kafka_from_the_example_config_without_loss_or_reordering() {
    let config = config_file("kafka-demo");
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
    assert!(stdout.contains("on the kafka backend"), "{stdout}");
    assert!(summary_value(&stdout, "retries") > 0, "{stdout}");
}

/// `eventbus bench --backend kafka` measures both paths against the raw client and prints a ratio
/// for each.
#[test]
fn bench_prints_publish_and_consume_ratios_against_the_raw_client() {
    let config = config_file("kafka-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "kafka",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--messages",
            "2000",
            "--aggregates",
            "50",
        ],
        "",
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    for path in ["publish", "consume"] {
        let line = stdout
            .lines()
            .find(|line| line.trim_start().starts_with(path))
            .unwrap_or_else(|| panic!("no {path} line: {stdout}"));
        assert!(line.contains("raw") && line.contains("ratio"), "{line}");
    }
}
