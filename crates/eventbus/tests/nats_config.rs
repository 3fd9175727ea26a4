//! The `[nats]` section (feature `nats`): parsing, overrides, validation, secrets.
#![cfg(feature = "nats")]
// Test code: an unwrap failing is a broken test.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use eventbus::nats::{Auth, Storage};
use eventbus::{Backend, Config, Error};

const FULL: &str = r#"
type = "nats"
client_id = "billing"

[nats]
urls = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
auth = { user = "svc", password = "hunter2" }
connection_timeout = "2s"
max_reconnects = 60
publish_timeout = "3s"
stream_prefix = "BILLING_"

[nats.tls]
required = true
ca_file = "/etc/ssl/nats-ca.pem"

[nats.stream_limits]
max_age = "7days"
max_bytes = 0
max_msgs = 5000

[[nats.streams]]
name = "ORDERS"
subjects = ["orders.>"]
storage = "file"
limits = { max_bytes = 1048576 }

[nats.topics."metrics.tick"]
ephemeral = true

[nats.topics."audit.log"]
storage = "file"

[nats.consumer]
ack_wait = "10s"
max_deliver = 10
max_ack_pending = 500
backoff = ["1s", "5s", "30s"]
fetch_batch = 64
fetch_expires = "500ms"
"#;

#[test]
fn a_full_nats_section_becomes_the_backend_configuration() {
    let config = Config::from_toml_str(FULL).unwrap();
    assert_eq!(config.backend, Backend::Nats);
    config.validate().unwrap();
    assert_eq!(config.bus_settings().client_id, "billing");
    let nats = &config.nats;
    assert_eq!(nats.urls.len(), 2);
    assert_eq!(nats.auth, Auth::user_password("svc", "hunter2"));
    assert!(nats.tls.required);
    assert_eq!(nats.connection_timeout, Duration::from_secs(2));
    assert_eq!(nats.max_reconnects, Some(60));
    assert_eq!(nats.publish_timeout, Duration::from_secs(3));
    assert_eq!(nats.stream_prefix, "BILLING_");
    assert_eq!(
        nats.stream_limits.max_age,
        Some(Duration::from_secs(7 * 86400))
    );
    assert_eq!(nats.stream_limits.max_msgs, Some(5000));
    assert_eq!(nats.stream_limits.max_bytes, None, "0 is unlimited");
    assert_eq!(nats.streams[0].name, "ORDERS");
    assert_eq!(nats.streams[0].limits.max_bytes, Some(1 << 20));
    assert_eq!(
        nats.streams[0].limits.max_age,
        Some(Duration::from_secs(86400))
    );
    assert!(nats.topic("metrics.tick").ephemeral);
    assert_eq!(nats.topic("audit.log").storage, Some(Storage::File));
    assert_eq!(nats.topic("other").storage, None);
    assert_eq!(nats.consumer.ack_wait, Duration::from_secs(10));
    assert_eq!(nats.consumer.backoff.len(), 3);
    assert_eq!(nats.consumer.fetch_batch, 64);
    assert_eq!(config.metrics_namespace(), "nats_eventbus_billing");
}

#[test]
fn the_password_never_shows_in_debug_output() {
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
fn bad_nats_values_name_the_field() {
    let two_methods = "type = \"nats\"\n[nats.auth]\ntoken = \"t\"\nnkey_seed = \"SU\"\n";
    let config = Config::from_toml_str(two_methods).unwrap();
    assert_eq!(field(config.validate().unwrap_err()), "nats.auth");
    let lonely_user = "type = \"nats\"\n[nats.auth]\nuser = \"svc\"\n";
    let config = Config::from_toml_str(lonely_user).unwrap();
    assert_eq!(field(config.validate().unwrap_err()), "nats.auth.user");
    let zero_wait = "type = \"nats\"\n[nats.consumer]\nack_wait = \"0s\"\n";
    let config = Config::from_toml_str(zero_wait).unwrap();
    assert_eq!(
        field(config.validate().unwrap_err()),
        "nats.consumer.ack_wait"
    );
    let bad_backoff = "[nats.consumer]\nbackoff = [\"soon\"]\n";
    let error = Config::from_toml_str(bad_backoff).unwrap_err().to_string();
    assert!(error.contains("soon"), "{error}");
    let typo = "[nats]\nurl = \"nats://x\"\n";
    let error = Config::from_toml_str(typo).unwrap_err().to_string();
    assert!(error.contains("unknown field"), "{error}");
}

#[test]
fn nats_environment_variables_override_the_section() {
    let variables = [
        ("EVENTBUS_TYPE", "nats"),
        ("EVENTBUS_NATS_URLS", "nats://a:4222, nats://b:4222"),
        ("EVENTBUS_NATS_AUTH_TOKEN", "tok-1"),
        ("EVENTBUS_NATS_PUBLISH_TIMEOUT", "9s"),
        ("EVENTBUS_NATS_CONSUMER_ACK_WAIT", "45s"),
        ("EVENTBUS_NATS_CONSUMER_MAX_DELIVER", "7"),
        ("EVENTBUS_NATS_CONSUMER_MAX_ACK_PENDING", "99"),
        ("EVENTBUS_NATS_SCALE_OUT_PINNED_TTL", "12s"),
        ("EVENTBUS_NATS_REPLICAS", "3"),
    ]
    .map(|(name, value)| (name.to_owned(), value.to_owned()));
    let config = Config::default().with_overrides(variables).unwrap();
    config.validate().unwrap();
    let nats = &config.nats;
    assert_eq!(nats.urls, ["nats://a:4222", "nats://b:4222"]);
    assert_eq!(nats.auth, Auth::token("tok-1"));
    assert_eq!(nats.publish_timeout, Duration::from_secs(9));
    assert_eq!(nats.consumer.ack_wait, Duration::from_secs(45));
    assert_eq!(nats.consumer.max_deliver, 7);
    assert_eq!(nats.consumer.max_ack_pending, 99);
    assert_eq!(nats.scale_out.pinned_ttl, Duration::from_secs(12));
    assert_eq!(nats.replicas, 3);
    assert!(!format!("{config:?}").contains("tok-1"));
}

#[test]
fn user_and_password_from_the_environment_make_one_method_in_any_order() {
    for variables in [
        [
            ("EVENTBUS_NATS_AUTH_USER", "svc"),
            ("EVENTBUS_NATS_AUTH_PASSWORD", "pw"),
        ],
        [
            ("EVENTBUS_NATS_AUTH_PASSWORD", "pw"),
            ("EVENTBUS_NATS_AUTH_USER", "svc"),
        ],
    ] {
        let variables = variables.map(|(name, value)| (name.to_owned(), value.to_owned()));
        let config = Config {
            backend: Backend::Nats,
            ..Config::default()
        }
        .with_overrides(variables)
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.nats.auth, Auth::user_password("svc", "pw"));
    }
}
