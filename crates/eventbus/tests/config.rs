//! Configuration: defaults, files, environment overrides, and errors that say where and why.

use std::io::Write;
use std::time::Duration;

use eventbus::{Backend, Config, Error, ErrorKind};

#[allow(clippy::panic)] // a wrong error kind fails the test
fn field(error: Error) -> (String, String) {
    match error {
        Error::Config { field, reason } => (field, reason),
        other => panic!("{other:?}"),
    }
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn every_field_has_a_default_and_an_empty_file_is_valid() {
    let defaults = Config::default();
    assert_eq!(defaults.backend, Backend::Memory);
    assert_eq!(defaults.client_id, "eventbus");
    assert_eq!(
        (
            defaults.pool.pool_size,
            defaults.pool.inbox_size,
            defaults.pool.max_restarts
        ),
        (256, 1000, 3)
    );
    assert_eq!(defaults.retry.max_attempts, 3);
    assert_eq!(defaults.retry.initial_backoff, Duration::from_secs(1));
    assert_eq!(defaults.retry.max_backoff, Duration::from_secs(30));
    assert_eq!(defaults.drain_timeout, Duration::from_secs(30));
    assert_eq!(defaults.metrics.listen, None);
    assert!(defaults.validate().is_ok());
    assert_eq!(Config::from_toml_str("").unwrap(), defaults);
    assert_eq!(Config::from_yaml_str("").unwrap(), defaults);
}

#[test]
fn toml_and_yaml_describe_the_same_config() {
    let toml = Config::from_toml_str(
        r#"
        type = "memory"
        client_id = "billing"
        drain_timeout = "5s"
        [pool]
        pool_size = 8
        inbox_size = 50
        max_restarts = 2
        [retry]
        max_attempts = 5
        initial_backoff = "100ms"
        max_backoff = "2s"
        [metrics]
        listen = "127.0.0.1:9898"
        "#,
    )
    .unwrap();
    let yaml = Config::from_yaml_str(
        "type: memory\nclient_id: billing\ndrain_timeout: 5s\npool:\n  pool_size: 8\n  inbox_size: 50\n  max_restarts: 2\nretry:\n  max_attempts: 5\n  initial_backoff: 100ms\n  max_backoff: 2s\nmetrics:\n  listen: 127.0.0.1:9898\n",
    )
    .unwrap();
    assert_eq!(toml, yaml);
    assert_eq!(toml.metrics_namespace(), "memory_eventbus_billing");
    assert_eq!(toml.retry.initial_backoff, Duration::from_millis(100));
}

#[test]
fn unknown_keys_and_bad_values_are_errors_that_say_where() {
    let (_, reason) = field(Config::from_toml_str("[pool]\npool_sise = 3\n").unwrap_err());
    assert!(
        reason.contains("pool_sise") && reason.contains("line 2"),
        "{reason}"
    );
    let (_, reason) = field(Config::from_toml_str("type = \"rabbitmq\"").unwrap_err());
    assert!(reason.contains("rabbitmq"), "{reason}");
    let (_, reason) =
        field(Config::from_toml_str("[retry]\ninitial_backoff = \"soon\"").unwrap_err());
    assert!(
        reason.contains("soon") || reason.contains("duration"),
        "{reason}"
    );
    let (_, reason) = field(Config::from_yaml_str("pool:\n  pool_size: many\n").unwrap_err());
    assert!(
        reason.contains("pool_size") || reason.contains("invalid"),
        "{reason}"
    );
}

#[test]
fn files_are_read_by_extension_and_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("eventbus-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml = dir.join("bus.toml");
    std::fs::File::create(&toml)
        .unwrap()
        .write_all(b"client_id = \"svc\"\n")
        .unwrap();
    assert_eq!(Config::from_file(&toml).unwrap().client_id, "svc");
    let yaml = dir.join("bus.yml");
    std::fs::File::create(&yaml)
        .unwrap()
        .write_all(b"client_id: other\n")
        .unwrap();
    assert_eq!(Config::from_file(&yaml).unwrap().client_id, "other");

    let bad = dir.join("bad.toml");
    std::fs::File::create(&bad)
        .unwrap()
        .write_all(b"[pool]\npool_size = -1\n")
        .unwrap();
    let (file, _) = field(Config::from_file(&bad).unwrap_err());
    assert_eq!(file, bad.display().to_string());
    let (file, reason) = field(Config::from_file(&dir.join("missing.toml")).unwrap_err());
    assert!(
        file.ends_with("missing.toml") && reason.contains("cannot read"),
        "{reason}"
    );
    let (_, reason) = field(Config::from_file(&dir.join("bus.json")).unwrap_err());
    assert!(reason.contains(".toml"), "{reason}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn environment_variables_override_every_field() {
    let config = Config::default()
        .with_overrides(vars(&[
            ("EVENTBUS_TYPE", "memory"),
            ("EVENTBUS_CLIENT_ID", "from-env"),
            ("EVENTBUS_POOL_POOL_SIZE", "12"),
            ("EVENTBUS_POOL_INBOX_SIZE", "34"),
            ("EVENTBUS_POOL_MAX_RESTARTS", "5"),
            ("EVENTBUS_RETRY_MAX_ATTEMPTS", "6"),
            ("EVENTBUS_RETRY_INITIAL_BACKOFF", "10ms"),
            ("EVENTBUS_RETRY_MAX_BACKOFF", "1m"),
            ("EVENTBUS_DRAIN_TIMEOUT", "3s"),
            ("EVENTBUS_HANDLER_TIMEOUT", "250ms"),
            ("EVENTBUS_LANE_BLOCKED_AFTER", "2m"),
            ("EVENTBUS_PUBLISH_MAX_IN_FLIGHT", "77"),
            ("EVENTBUS_METRICS_LISTEN", "127.0.0.1:9100"),
            ("PATH", "/usr/bin"),
        ]))
        .unwrap();
    assert_eq!(config.client_id, "from-env");
    assert_eq!(
        (
            config.pool.pool_size,
            config.pool.inbox_size,
            config.pool.max_restarts
        ),
        (12, 34, 5)
    );
    assert_eq!(config.retry.max_attempts, 6);
    assert_eq!(config.retry.initial_backoff, Duration::from_millis(10));
    assert_eq!(config.retry.max_backoff, Duration::from_secs(60));
    assert_eq!(config.drain_timeout, Duration::from_secs(3));
    assert_eq!(config.handler_timeout, Some(Duration::from_millis(250)));
    assert_eq!(config.lane_blocked_after, Duration::from_secs(120));
    assert_eq!(config.publish_max_in_flight, 77);
    assert_eq!(config.bus_settings().publish_max_in_flight, 77);
    assert_eq!(
        config.metrics.listen,
        Some("127.0.0.1:9100".parse().unwrap())
    );
    let nats_variables = if cfg!(feature = "nats") { 12 } else { 0 };
    let kafka_variables = if cfg!(feature = "kafka") { 6 } else { 0 };
    assert_eq!(
        Config::environment_variables().count(),
        13 + nats_variables + kafka_variables
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    let (name, reason) = field(
        Config::default()
            .with_overrides(vars(&[("EVENTBUS_POOL_POOL_SIZE", "lots")]))
            .unwrap_err(),
    );
    assert_eq!(name, "EVENTBUS_POOL_POOL_SIZE");
    assert!(reason.contains("lots"), "{reason}");
    let (name, _) = field(
        Config::default()
            .with_overrides(vars(&[("EVENTBUS_DRAIN_TIMEOUT", "forever")]))
            .unwrap_err(),
    );
    assert_eq!(name, "EVENTBUS_DRAIN_TIMEOUT");
}

/// Kubernetes writes `EVENTBUS_SERVICE_HOST`, `EVENTBUS_PORT`, `EVENTBUS_PORT_4222_TCP...` into
/// every pod of a namespace with a Service named `eventbus`; those, and typos, are warned about
/// and ignored, never fatal.
#[test]
fn unknown_environment_variables_are_ignored_not_fatal() {
    let config = Config::default()
        .with_overrides(vars(&[
            ("EVENTBUS_SERVICE_HOST", "10.0.0.1"),
            ("EVENTBUS_SERVICE_PORT", "4222"),
            ("EVENTBUS_PORT", "tcp://10.0.0.1:4222"),
            ("EVENTBUS_PORT_4222_TCP_ADDR", "10.0.0.1"),
            ("EVENTBUS_POOLSIZE", "1"),
            ("EVENTBUS_CLIENT_ID", "billing"),
        ]))
        .unwrap();
    assert_eq!(config.client_id, "billing", "known variables still apply");
    assert_eq!(
        config.pool,
        Config::default().pool,
        "the typo changed nothing"
    );
}

#[test]
fn validation_names_the_field() {
    let mut config = Config::default();
    config.pool.pool_size = 0;
    assert_eq!(field(config.validate().unwrap_err()).0, "pool.pool_size");
    let config = Config {
        client_id: " ".into(),
        ..Config::default()
    };
    assert_eq!(field(config.validate().unwrap_err()).0, "client_id");
    let mut config = Config::default();
    config.retry.initial_backoff = Duration::from_secs(60);
    assert_eq!(config.validate().unwrap_err().kind(), ErrorKind::Config);
}

#[cfg(not(feature = "nats"))]
#[tokio::test]
async fn a_backend_that_is_not_compiled_in_is_a_config_error() {
    let mut config = Config::default();
    config.backend = eventbus::Backend::Nats;
    let error = eventbus::connect(config).await.unwrap_err();
    assert_eq!(field(error).0, "type");
}

#[cfg(feature = "kafka")]
#[test]
fn kafka_topic_specs_come_from_its_topic_tables_over_the_defaults() {
    use eventbus::TopicSpec;
    let kafka = Config::from_toml_str(
        "type = \"kafka\"\n[kafka]\nbootstrap_servers = [\"127.0.0.1:9092\"]\n\
         [kafka.topic_defaults]\nreplication_factor = 3\n\
         [kafka.topics.orders]\npartitions = 12\nretention = \"7days\"\n",
    )
    .unwrap();
    assert_eq!(
        kafka.topic_specs(),
        [TopicSpec::new("orders")
            .with_partitions(12)
            .with_replicas(3)
            .with_retention(Duration::from_secs(7 * 24 * 3600))]
    );
    assert!(Config::default().topic_specs().is_empty());
    // A dead-letter topic keeps its records for ever unless it names a retention itself.
    let dead_letters = Config::from_toml_str(
        "type = \"kafka\"\n[kafka]\nbootstrap_servers = [\"127.0.0.1:9092\"]\n\
         [kafka.topic_defaults]\nretention = \"7days\"\n\
         [kafka.topics.\"orders.DLQ\"]\npartitions = 1\n",
    )
    .unwrap();
    assert_eq!(dead_letters.topic_specs()[0].retention, None);
}

#[cfg(feature = "nats")]
#[test]
fn nats_topic_specs_come_from_its_topic_tables_without_the_ephemeral_ones() {
    use eventbus::{TopicSpec, TopicStorage};
    let nats = Config::from_toml_str(
        "type = \"nats\"\n[nats.topics.orders]\npartitions = 4\nstorage = \"memory\"\n\
         [nats.topics.pings]\nephemeral = true\n",
    )
    .unwrap();
    assert_eq!(
        nats.topic_specs(),
        [TopicSpec::new("orders")
            .with_partitions(4)
            .with_storage(TopicStorage::Memory)]
    );
}
