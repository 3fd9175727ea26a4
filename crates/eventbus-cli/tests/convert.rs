//! `eventbus config convert`: a Go SDK YAML configuration becomes an `eventbus.toml` this SDK
//! accepts, with a note on every setting that has no equivalent or means something else.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(clippy::expect_used, clippy::panic)]

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{Scratch, eventbus, text};

fn convert(yaml: &str, name: &str) -> std::process::Output {
    convert_taking_over(yaml, name, &[])
}

fn convert_taking_over(yaml: &str, name: &str, topics: &[&str]) -> std::process::Output {
    let scratch = Scratch::new(&format!("convert-{name}"));
    let path = scratch.file("go.yaml");
    std::fs::write(&path, yaml).expect("written");
    let mut args = vec![
        "config",
        "convert",
        "--from",
        path.to_str().expect("UTF-8 path"),
    ];
    for topic in topics {
        args.extend(["--take-over", topic]);
    }
    eventbus(&args, "")
}

const GO_NATS: &str = r#"
eventbus:
  type: nats
  serviceName: order-service
  publisher:
    publishTimeout: 5s
    maxReconnectAttempts: 5
  subscriber:
    maxConcurrency: 10
    errorHandling:
      deadLetterTopic: orders.failed
      maxRetryAttempts: 4
      retryBackoffBase: 1s
      retryBackoffMax: 30s
  healthCheck:
    enabled: true
  nats:
    urls: ["nats://a:4222", "nats://b:4222"]
    maxReconnects: 10
    connectionTimeout: 10s
    reconnectWait: 2s
    jetstream:
      enabled: true
      ackWait: 30s
      maxDeliver: 5
      stream:
        name: BUSINESS_STREAM
        subjects: ["business.>"]
        storage: memory
        maxAge: 24h
      consumer:
        durableName: business-consumer
        maxAckPending: 1000
  somethingElse: 1
"#;

#[test]
fn a_go_nats_configuration_becomes_an_eventbus_toml_with_a_note_on_every_difference() {
    let output = convert(GO_NATS, "nats");
    let toml = text(&output.stdout);
    assert!(output.status.success(), "{toml}{}", text(&output.stderr));
    let config = eventbus::Config::from_toml_str(&toml).expect("a valid eventbus.toml");
    assert_eq!(config.client_id, "order-service");
    assert_eq!(config.retry.max_attempts, 4);
    assert_eq!(
        config.retry.initial_backoff,
        std::time::Duration::from_secs(1)
    );
    assert_eq!(config.nats.urls, ["nats://a:4222", "nats://b:4222"]);
    assert_eq!(config.nats.max_reconnects, Some(10));
    assert_eq!(
        config.nats.publish_timeout,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(config.nats.consumer.max_deliver, 5);
    // What the Go SDK's YAML start-up really uses, whatever the YAML names.
    assert_eq!(config.nats.streams.len(), 1);
    let stream = &config.nats.streams[0];
    assert_eq!(stream.name, "BUSINESS_STREAM");
    assert_eq!(stream.subjects, ["business.>"]);
    assert_eq!(stream.storage, eventbus::nats::Storage::File);
    assert_eq!(
        (
            stream.limits.max_msgs,
            stream.limits.max_bytes,
            stream.limits.max_age
        ),
        (
            Some(10_000),
            Some(100 << 20),
            Some(std::time::Duration::from_secs(24 * 3600))
        )
    );
    assert!(
        !stream.update_limits,
        "the Go services' stream is bound as it is"
    );
    assert_eq!(config.nats.stream_prefix, "BUSINESS_STREAM_");
    assert!(config.nats.topics.is_empty(), "no takeover asked for");
    for noted in [
        "maxDeliver",
        "business-consumer-unified_",
        "with_durable",
        "take_over_from",
        "ignored by the Go SDK's YAML start-up",
        "discards the oldest",
        "deadLetterTopic",
        "maxConcurrency",
        "healthCheck",
        "reconnectWait",
        "only the first URL",
        "somethingElse: not converted",
    ] {
        assert!(toml.contains(noted), "no note on {noted}:\n{toml}");
    }
    assert!(
        !toml.contains("autoOffsetReset"),
        "a Kafka note on a NATS configuration:\n{toml}"
    );
}

#[test]
fn a_go_kafka_configuration_sets_the_group_and_what_a_mixed_group_needs() {
    let yaml = r#"
type: kafka
serviceName: billing
kafka:
  brokers: [k1:9092, k2:9092]
  producer:
    requiredAcks: -1
    flushFrequency: 500ms
  consumer:
    groupId: billing-group
    sessionTimeout: 30s
    heartbeatInterval: 3s
"#;
    let output = convert(yaml, "kafka");
    let toml = text(&output.stdout);
    assert!(output.status.success(), "{toml}{}", text(&output.stderr));
    let config = eventbus::Config::from_toml_str(&toml).expect("a valid eventbus.toml");
    assert_eq!(config.kafka.bootstrap_servers, ["k1:9092", "k2:9092"]);
    assert_eq!(config.kafka.group_id.as_deref(), Some("billing-group"));
    assert_eq!(
        config.kafka.assignment_strategy,
        eventbus::kafka::AssignmentStrategy::Range
    );
    assert_eq!(
        config.kafka.partitioner,
        eventbus::kafka::Partitioner::Sarama
    );
    assert!(
        toml.contains("\"session.timeout.ms\" = \"30000\""),
        "{toml}"
    );
    assert_eq!(
        config.kafka.auto_offset_reset,
        eventbus::kafka::OffsetReset::Latest,
        "the Go SDK's YAML default"
    );
    assert!(
        toml.contains("\"heartbeat.interval.ms\" = \"3000\""),
        "{toml}"
    );
    for noted in ["autoOffsetReset not set", "requiredAcks", "flushFrequency"] {
        assert!(toml.contains(noted), "no note on {noted}:\n{toml}");
    }
}

/// The configuration the NATS takeover interop tests run (`integration-tests/tests/interop_nats.rs`
/// reads `tests/fixtures/go-service.toml`) is exactly what `config convert --take-over` writes
/// for the Go service's YAML.
#[test]
fn a_go_services_yaml_converts_to_the_configuration_the_takeover_tests_run() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let yaml = std::fs::read_to_string(fixtures.join("go-service.yaml")).expect("the Go YAML");
    let output = convert_taking_over(
        &yaml,
        "takeover",
        &["business.handover", "business.handover-b"],
    );
    let toml = text(&output.stdout);
    assert!(output.status.success(), "{toml}{}", text(&output.stderr));
    let expected = std::fs::read_to_string(fixtures.join("go-service.toml")).expect("the TOML");
    assert_eq!(
        toml, expected,
        "regenerate tests/fixtures/go-service.toml with `eventbus config convert --from \
         tests/fixtures/go-service.yaml --take-over business.handover --take-over \
         business.handover-b` and look at what changed"
    );
    let config = eventbus::Config::from_toml_str(&toml).expect("a valid eventbus.toml");
    assert_eq!(
        config.nats.topics["business.handover"]
            .take_over_from
            .as_deref(),
        Some("business-consumer-unified_business_handover")
    );
}

#[test]
fn bad_input_is_explained_not_panicked_on() {
    for (yaml, says) in [
        ("type: rabbit", "memory, kafka or nats"),
        ("{ not yaml", "not YAML"),
    ] {
        let output = convert(yaml, "bad");
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
