//! The `[kafka]` section (feature `kafka`): parsing, overrides, validation, secrets.
#![cfg(feature = "kafka")]
// Test code: an unwrap failing is a broken test.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use eventbus::kafka::{AssignmentStrategy, GroupProtocol, OffsetReset, Partitioner};
use eventbus::{Backend, Config, Error};

const FULL: &str = r#"
type = "kafka"
client_id = "billing"

[kafka]
bootstrap_servers = ["k1:9092", "k2:9092"]
group_id = "billing-consumers"
group_protocol = "classic"
assignment_strategy = "range"
auto_offset_reset = "latest"
commit_interval = "2s"
max_in_flight_per_partition = 500
publish_timeout = "3s"
partitioner = "sarama"
topic_defaults = { partitions = 12, replication_factor = 3 }

[kafka.topics."orders.placed"]
retention = "7days"

[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "PLAIN"
"sasl.username" = "svc"
"sasl.password" = "hunter2"
"#;

#[test]
fn a_full_kafka_section_becomes_the_backend_configuration() {
    let config = Config::from_toml_str(FULL).unwrap();
    assert_eq!(config.backend, Backend::Kafka);
    config.validate().unwrap();
    assert_eq!(config.metrics_namespace(), "kafka_eventbus_billing");
    let kafka = &config.kafka;
    assert_eq!(kafka.bootstrap_servers, ["k1:9092", "k2:9092"]);
    assert_eq!(kafka.group("billing"), "billing-consumers");
    assert_eq!(kafka.group_protocol, GroupProtocol::Classic);
    assert_eq!(kafka.assignment_strategy, AssignmentStrategy::Range);
    assert_eq!(kafka.auto_offset_reset, OffsetReset::Latest);
    assert_eq!(kafka.commit_interval, Duration::from_secs(2));
    assert_eq!(kafka.max_in_flight_per_partition, 500);
    assert_eq!(kafka.publish_timeout, Duration::from_secs(3));
    assert_eq!(kafka.partitioner, Partitioner::Sarama);
    let orders = kafka.topic("orders.placed");
    assert_eq!(orders.partitions, Some(12));
    assert_eq!(orders.replication_factor, Some(3));
    assert_eq!(orders.retention, Some(Duration::from_secs(7 * 86400)));
}

#[test]
fn the_sasl_password_never_shows_in_debug_output() {
    let config = Config::from_toml_str(FULL).unwrap();
    let dump = format!("{config:?}");
    assert!(!dump.contains("hunter2"), "{dump}");
    assert!(dump.contains("svc"));
}

fn field(error: Error) -> String {
    match error {
        Error::Config { field, .. } => field,
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_kafka_values_name_the_field() {
    let owned = "type = \"kafka\"\n[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n";
    let config = Config::from_toml_str(owned).unwrap();
    assert_eq!(field(config.validate().unwrap_err()), "kafka.properties");
    let zero = "type = \"kafka\"\n[kafka]\ncommit_interval = \"0s\"\n";
    let config = Config::from_toml_str(zero).unwrap();
    assert_eq!(
        field(config.validate().unwrap_err()),
        "kafka.commit_interval"
    );
    let typo = "[kafka]\nbrokers = [\"k1:9092\"]\n";
    let error = Config::from_toml_str(typo).unwrap_err().to_string();
    assert!(error.contains("unknown field"), "{error}");
}

#[test]
fn kafka_environment_variables_override_the_section() {
    let variables = [
        ("EVENTBUS_TYPE", "kafka"),
        ("EVENTBUS_KAFKA_BOOTSTRAP_SERVERS", "a:9092, b:9092"),
        ("EVENTBUS_KAFKA_GROUP_ID", "workers"),
        ("EVENTBUS_KAFKA_AUTO_OFFSET_RESET", "latest"),
        ("EVENTBUS_KAFKA_PUBLISH_TIMEOUT", "9s"),
        ("EVENTBUS_KAFKA_SASL_USERNAME", "svc"),
        ("EVENTBUS_KAFKA_SASL_PASSWORD", "pw-1"),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()));
    let config = Config::default().with_overrides(variables).unwrap();
    config.validate().unwrap();
    assert_eq!(config.backend, Backend::Kafka);
    let kafka = &config.kafka;
    assert_eq!(kafka.bootstrap_servers, ["a:9092", "b:9092"]);
    assert_eq!(kafka.group_id.as_deref(), Some("workers"));
    assert_eq!(kafka.auto_offset_reset, OffsetReset::Latest);
    assert_eq!(kafka.publish_timeout, Duration::from_secs(9));
    assert_eq!(kafka.properties.0["sasl.username"], "svc");
    assert!(!format!("{config:?}").contains("pw-1"));
}
