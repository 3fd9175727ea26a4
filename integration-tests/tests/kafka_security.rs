//! Kafka as production brokers run it: TLS with a client certificate (`SSL`), and SCRAM over
//! TLS (`SASL_SSL`), on a real broker whose certificates come from a CA made at test time. The
//! bus publishes and consumes through each; a wrong password, a broker certificate it does not
//! trust and a missing client certificate fail `connect` at once with
//! [`ErrorKind::Security`], naming the cause; no secret shows in a log line or a `Debug`
//! output.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use eventbus_core::{Envelope, ErrorKind, SubscribeOptions};
use eventbus_kafka::{KafkaBus, KafkaConfig};
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, kafka_config};
use test_brokers::{Issued, KafkaBroker, TestCa};

const USER: &str = "svc-billing";
const PASSWORD: &str = "s3cret-Pa55word";
const WRONG_PASSWORD: &str = "wr0ng-Pa55word";

/// The secured broker of this test binary, its CA and a client certificate the CA issued.
struct Secured {
    ca: TestCa,
    client: Issued,
    broker: KafkaBroker,
}

fn secured() -> &'static Secured {
    static SECURED: OnceLock<Secured> = OnceLock::new();
    SECURED.get_or_init(|| {
        capture_logs();
        let ca = TestCa::new("kafka");
        let client = ca.issue("billing", &["billing"]);
        let broker = KafkaBroker::start_secured(&ca, &[(USER, PASSWORD)]);
        Secured { ca, client, broker }
    })
}

/// Everything every test of this binary logs (the bus's `tracing` events at every level, and
/// librdkafka's through `log`), to look for secrets in.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(Arc::default)
}

#[derive(Clone)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let sink = Sink(logs().clone());
    let _ = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || sink.clone())
        .try_init();
}

fn assert_no_secret_logged() {
    let logs = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(
        !logs.is_empty(),
        "nothing was logged: the check would prove nothing"
    );
    for secret in [PASSWORD, WRONG_PASSWORD] {
        assert!(!logs.contains(secret), "a password was logged:\n{logs}");
    }
}

fn settings(client: &str) -> BusSettings {
    BusSettings::new("kafka", client)
}

fn with(bootstrap: &str, properties: &[(&str, &str)]) -> KafkaConfig {
    let mut config = kafka_config(bootstrap);
    for (name, value) in properties {
        config
            .properties
            .0
            .insert((*name).to_owned(), (*value).to_owned());
    }
    config
}

fn sasl_ssl(secured: &Secured, password: &str) -> KafkaConfig {
    let ca = secured.ca.ca_file();
    with(
        &secured.broker.bootstrap_sasl_ssl(),
        &[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", USER),
            ("sasl.password", password),
            ("ssl.ca.location", ca.to_str().unwrap()),
        ],
    )
}

fn mutual_tls(secured: &Secured, client: Option<&Issued>) -> KafkaConfig {
    let ca = secured.ca.ca_file();
    let mut config = with(
        &secured.broker.bootstrap_ssl(),
        &[
            ("security.protocol", "SSL"),
            ("ssl.ca.location", ca.to_str().unwrap()),
        ],
    );
    if let Some(client) = client {
        for (name, path) in [
            ("ssl.certificate.location", &client.cert),
            ("ssl.key.location", &client.key),
        ] {
            config
                .properties
                .0
                .insert(name.to_owned(), path.to_str().unwrap().to_owned());
        }
    }
    config
}

/// Publishes one envelope on `topic` and waits until the bus's own subscription handled it.
async fn round_trip(bus: &KafkaBus, topic: &str) {
    let handled = Recorder::<(String, i64)>::new();
    bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let envelope =
        Envelope::new("acct-1", "Charged", 1, &serde_json::json!({"cents": 100})).unwrap();
    bus.publish_envelope(topic, &envelope).await.unwrap();
    handled
        .wait_for("the envelope", |events| events.len() == 1)
        .await;
}

/// `connect` with `config`, which must fail at once with a security error whose report
/// contains `cause`.
async fn refused(config: KafkaConfig, cause: &str) {
    let started = Instant::now();
    let error = match eventbus_kafka::connect(settings("refused"), config).await {
        Ok(_) => panic!("connected although security should refuse it"),
        Err(error) => error,
    };
    let report = error.report().to_string();
    assert_eq!(error.kind(), ErrorKind::Security, "{report}");
    assert!(
        report.to_lowercase().contains(cause),
        "the error does not name the cause ({cause}): {report}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused only after {:?}: a retry loop, not an answer",
        started.elapsed()
    );
    for secret in [PASSWORD, WRONG_PASSWORD] {
        assert!(!report.contains(secret), "{report}");
        assert!(!format!("{error:?}").contains(secret), "{error:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_publishes_and_consumes() {
    let secured = secured();
    let config = sasl_ssl(secured, PASSWORD);
    assert!(!format!("{config:?}").contains(PASSWORD), "{config:?}");
    let bus = eventbus_kafka::connect(settings("scram"), config)
        .await
        .unwrap();
    round_trip(&bus, "security.scram").await;
    bus.close().await.unwrap();
    assert_no_secret_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_publishes_and_consumes() {
    let secured = secured();
    let bus = eventbus_kafka::connect(settings("mtls"), mutual_tls(secured, Some(&secured.client)))
        .await
        .unwrap();
    round_trip(&bus, "security.mtls").await;
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_connect_with_a_security_error_and_no_secret_shown() {
    let secured = secured();
    refused(sasl_ssl(secured, WRONG_PASSWORD), "authentication").await;
    assert_no_secret_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_untrusted_ca_fails_connect_with_a_security_error() {
    let secured = secured();
    let other = TestCa::new("kafka-other");
    let mut config = sasl_ssl(secured, PASSWORD);
    config.properties.0.insert(
        "ssl.ca.location".into(),
        other.ca_file().to_str().unwrap().to_owned(),
    );
    refused(config, "certificate verify failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_client_certificate_fails_connect_with_a_security_error() {
    let secured = secured();
    refused(mutual_tls(secured, None), "alert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_an_untrusted_ca_fails_connect_with_a_security_error() {
    let secured = secured();
    let other = TestCa::new("kafka-client-other");
    let stranger = other.issue("stranger", &["stranger"]);
    refused(mutual_tls(secured, Some(&stranger)), "bad certificate").await;
}
