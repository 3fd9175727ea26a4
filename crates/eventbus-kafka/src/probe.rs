//! The check `connect` makes before starting anything: can this client reach the brokers with
//! its security settings?

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::Error;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::partition::lock;
use crate::producer::base_config;

/// How long `connect` waits for an answer of the brokers at most.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one metadata request of the probe waits.
const ATTEMPT: Duration = Duration::from_millis(500);

/// What the probe's client reported.
#[derive(Default)]
struct Seen {
    /// An error of the security layer: the broker refused the credentials, or TLS failed.
    refused: Option<(RDKafkaErrorCode, String)>,
    /// Every broker was unreachable.
    all_down: bool,
}

/// The probe client's context: keeps what librdkafka reports instead of logging it.
#[derive(Default, Clone)]
struct ProbeContext {
    seen: Arc<Mutex<Seen>>,
}

impl ClientContext for ProbeContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let mut seen = lock(&self.seen);
        match error.rdkafka_error_code() {
            Some(code) if is_refusal(code, reason) => {
                seen.refused.get_or_insert((code, reason.to_owned()));
            }
            Some(RDKafkaErrorCode::AllBrokersDown) => seen.all_down = true,
            _ => {}
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// True for the errors librdkafka reports when security refused this client: SASL
/// authentication failed (`_AUTHENTICATION`), the TLS handshake failed (`_SSL`: the broker's
/// certificate is not trusted), or the broker ended TLS with an alert (with TLS 1.3 the broker
/// checks the client's certificate after the client finished its handshake, so a missing or
/// untrusted client certificate arrives as a transport failure: "SSL alert number 42", bad
/// certificate, or 116, certificate required).
fn is_refusal(code: RDKafkaErrorCode, reason: &str) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL
    ) || reason.contains("SSL handshake failed")
        || reason.contains("SSL alert")
}

/// What the brokers said to this configuration.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reached {
    /// A broker answered a metadata request.
    Yes,
    /// No broker answered (unreachable, or not within [`PROBE_TIMEOUT`]).
    NotYet,
}

/// Asks the brokers for metadata with the bus's client settings (`kafka.properties`, where
/// security settings go), until one answers, security refuses this client, or every broker was
/// found unreachable, up to [`PROBE_TIMEOUT`]. A refusal is an [`Error::Security`] naming
/// librdkafka's reason (never a secret: librdkafka does not put them in its errors).
pub(crate) async fn probe(config: &KafkaConfig, client_id: &str) -> Result<Reached, Error> {
    let context = ProbeContext::default();
    let client: BaseConsumer<ProbeContext> = base_config(config, client_id)
        .create_with_context(context.clone())
        .map_err(|error| Error::config("kafka.properties", error.to_string()))?;
    let client = Arc::new(client);
    let deadline = tokio::time::Instant::now() + PROBE_TIMEOUT;
    loop {
        let asking = client.clone();
        let answered = tokio::task::spawn_blocking(move || {
            let answered = asking.fetch_metadata(None, Timeout::After(ATTEMPT)).is_ok();
            // Errors reach the context when the client is polled.
            let _ = asking.poll(Duration::ZERO);
            answered
        })
        .await
        .unwrap_or(false);
        let seen = lock(&context.seen);
        if let Some((code, reason)) = &seen.refused {
            return Err(Error::Security {
                message: format!(
                    "Kafka refused this client ({}): {reason}",
                    if *code == RDKafkaErrorCode::Authentication {
                        "authentication failed; check sasl.* in kafka.properties"
                    } else {
                        "TLS failed; check ssl.* in kafka.properties"
                    }
                ),
                source: None,
            });
        }
        if answered {
            return Ok(Reached::Yes);
        }
        if seen.all_down || tokio::time::Instant::now() >= deadline {
            return Ok(Reached::NotYet);
        }
    }
}
