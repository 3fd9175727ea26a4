//! The `eventbus` binary on Apache Kafka, against the broker this test binary starts.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use test_brokers::kafka_bootstrap;

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{
    Scratch, demo_accounting_for_every_event, eventbus, line_starting_with, next_subscriber_prints,
    padded_envelopes, subscribe_until_stdout_closes, summary_value, text,
};

/// A config file for the broker in a fresh directory, from `examples/kafka.toml` with the
/// broker's address and a client ID of its own.
fn config_file(name: &str) -> (Scratch, PathBuf) {
    let scratch = Scratch::new(name);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/kafka.toml"
    ))
    .expect("examples/kafka.toml");
    let config = example
        .replace("127.0.0.1:9092", &kafka_bootstrap())
        .replace("client_id = \"demo\"", &format!("client_id = \"{name}\""));
    let path = scratch.file("kafka.toml");
    std::fs::write(&path, config).expect("config written");
    (scratch, path)
}

#[test]
fn the_demo_runs_on_kafka_from_the_example_config_without_loss_or_reordering() {
    let (_config_dir, config) = config_file("kafka-demo");
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

/// `eventbus bench --backend kafka --scenario ratios` measures both paths against the raw client and prints a ratio
/// for each.
#[test]
fn bench_prints_publish_and_consume_ratios_against_the_raw_client() {
    let (_config_dir, config) = config_file("kafka-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "kafka",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--scenario",
            "ratios",
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
        let line = line_starting_with(&stdout, path);
        assert!(line.contains("raw") && line.contains("ratio"), "{line}");
    }
}

/// `eventbus bench --scenario handler-delay` on Kafka prints the bus against the engine alone
/// and against the Go SDK's design (one record at a time per partition), each as a ratio.
#[test]
fn bench_with_handler_delay_prints_ratios_to_the_engine_and_to_the_go_design() {
    let (_config_dir, config) = config_file("kafka-work-bench");
    let output = eventbus(
        &[
            "bench",
            "--backend",
            "kafka",
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
        "1 ms handlers, kafka vs engine only",
        "1 ms handlers, vs the Go design",
    ] {
        let line = line_starting_with(&stdout, what);
        assert!(line.contains("raw") && line.contains("ratio"), "{line}");
    }
}

/// Records in `topic` (0 if it does not exist), from its partitions' watermarks.
fn records_in(topic: &str) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .expect("a Kafka client");
    let timeout = Duration::from_secs(10);
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), timeout) else {
        return 0;
    };
    metadata
        .topics()
        .iter()
        .filter(|found| found.error().is_none())
        .flat_map(|found| found.partitions())
        .map(|partition| {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition.id(), timeout)
                .expect("the partition's watermarks");
            high - low
        })
        .sum()
}

/// `eventbus subscribe … | head -n 5` on Kafka: the subscriber stops with status 1 when its
/// output closes, dead-letters nothing, and commits nothing it did not print: the next member
/// of its group reads everything that was not printed.
#[test]
fn a_closed_stdout_stops_the_subscriber_and_the_group_reads_on_from_what_was_not_printed() {
    const TOTAL: usize = 200;
    const READ: usize = 5;
    // Lines printed into the pipe that the test never reads: the pipe buffer (64 KiB) and the
    // reader's buffer hold only a few padded envelopes.
    const UNREAD_AT_MOST: usize = 10;
    let (_config_dir, config) = config_file("kafka-closed-stdout");
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
        // Joining the group, then the close: catch-up, drain and the group leave.
        Duration::from_secs(30),
    );
    assert_eq!(
        records_in(&format!("{topic}.DLQ")),
        0,
        "nothing dead-lettered"
    );

    next_subscriber_prints(
        config,
        topic,
        TOTAL - READ - UNREAD_AT_MOST,
        Duration::from_secs(60),
    );
}
