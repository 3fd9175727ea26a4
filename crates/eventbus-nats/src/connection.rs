//! The connection: options from the configuration, and its events in health, metrics and logs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use eventbus_core::Error;

use eventbus_pool::BusSettings;

use crate::config::{AuthMethod, NatsConfig};
use crate::fetch::PullFailed;

/// What the bus knows about its connection, kept up to date by the client's event callback.
pub(crate) struct ConnectionState {
    connected: AtomicBool,
    disconnects: AtomicU64,
    last_event: Mutex<String>,
    namespace: String,
    /// What [`EventBus::connection_state`](eventbus_core::EventBus::connection_state) watches.
    watch: tokio::sync::watch::Sender<eventbus_core::ConnectionState>,
}

impl ConnectionState {
    fn new(namespace: &str) -> Self {
        Self {
            connected: AtomicBool::new(false),
            disconnects: AtomicU64::new(0),
            last_event: Mutex::new("connecting".to_owned()),
            namespace: namespace.to_owned(),
            watch: tokio::sync::watch::Sender::new(eventbus_core::ConnectionState::Reconnecting),
        }
    }

    /// A watch of the connection's state.
    pub(crate) fn watch(&self) -> eventbus_core::ConnectionWatch {
        self.watch.subscribe()
    }

    /// The bus closed: nothing reconnects any more.
    pub(crate) fn closed(&self) {
        self.watch
            .send_replace(eventbus_core::ConnectionState::Closed);
    }

    fn set(&self, state: eventbus_core::ConnectionState) {
        // A closed bus stays closed whatever the client reports while it shuts down.
        self.watch.send_if_modified(|now| {
            let changed = *now != state && *now != eventbus_core::ConnectionState::Closed;
            if changed {
                *now = state;
            }
            changed
        });
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub(crate) fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::SeqCst)
    }

    pub(crate) fn last_event(&self) -> String {
        self.last_event
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, event: &Event) {
        let name = match event {
            Event::Connected => "connected",
            Event::Disconnected => "disconnected",
            Event::LameDuckMode => "lame_duck_mode",
            Event::Draining => "draining",
            Event::Closed => "closed",
            Event::SlowConsumer(_) => "slow_consumer",
            Event::ServerError(_) => "server_error",
            Event::ClientError(_) => "client_error",
        };
        match event {
            Event::Connected => {
                self.connected.store(true, Ordering::SeqCst);
                self.set(eventbus_core::ConnectionState::Connected);
                tracing::info!("connected to NATS");
            }
            Event::Disconnected | Event::Closed => {
                if self.connected.swap(false, Ordering::SeqCst) {
                    self.disconnects.fetch_add(1, Ordering::SeqCst);
                }
                self.set(if matches!(event, Event::Closed) {
                    eventbus_core::ConnectionState::Closed
                } else {
                    eventbus_core::ConnectionState::Reconnecting
                });
                tracing::warn!(event = %event, "NATS connection lost; reconnecting");
            }
            other => tracing::warn!(event = %other, "NATS connection event"),
        }
        metrics::counter!(
            format!("{}_connection_events_total", self.namespace),
            "event" => name
        )
        .increment(1);
        metrics::gauge!(format!("{}_connected", self.namespace)).set(if self.is_connected() {
            1.0
        } else {
            0.0
        });
        *self
            .last_event
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = event.to_string();
    }
}

/// Reconnect delay: 10 ms doubled per attempt, capped at `max`.
fn reconnect_delay(attempt: usize, max: Duration) -> Duration {
    let exponent = u32::try_from(attempt.min(20)).unwrap_or(20);
    Duration::from_millis(10)
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(max)
}

/// Connects with every option of `config`. Secrets go to the client library only; nothing here
/// logs them.
pub(crate) async fn connect(
    config: &NatsConfig,
    settings: &BusSettings,
) -> Result<(Client, Arc<ConnectionState>), Error> {
    let state = Arc::new(ConnectionState::new(&settings.metrics_namespace));
    let mut options = match config.auth.method()? {
        AuthMethod::None => ConnectOptions::new(),
        AuthMethod::Token(token) => ConnectOptions::new().token(token.expose().to_owned()),
        AuthMethod::UserPassword(user, password) => {
            ConnectOptions::new().user_and_password(user.to_owned(), password.expose().to_owned())
        }
        AuthMethod::NkeySeed(seed) => ConnectOptions::new().nkey(seed.expose().to_owned()),
        AuthMethod::CredentialsFile(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|error| {
                Error::config(
                    "nats.auth.credentials_file",
                    format!("{}: {error}", path.display()),
                )
            })?,
    };
    let tls = &config.tls;
    if tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let max_delay = config.reconnect_max_delay;
    let events = state.clone();
    options = options
        .name(&settings.client_id)
        .connection_timeout(config.connection_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(config.max_reconnects)
        .reconnect_delay_callback(move |attempt| reconnect_delay(attempt, max_delay))
        .event_callback(move |event| {
            let events = events.clone();
            async move { events.record(&event) }
        });
    let urls: Vec<async_nats::ServerAddr> = config
        .urls
        .iter()
        .map(|url| {
            url.parse()
                .map_err(|error| Error::config("nats.urls", format!("{url:?}: {error}")))
        })
        .collect::<Result<_, _>>()?;
    let client = options.connect(urls).await.map_err(connect_error)?;
    // The callback may not have run yet for the first connection.
    if client.connection_state() == async_nats::connection::State::Connected {
        state.connected.store(true, Ordering::SeqCst);
        state.set(eventbus_core::ConnectionState::Connected);
    }
    Ok((client, state))
}

/// A failed first connection as an [`Error`]: credentials refused and TLS that could not be set
/// up are [`Error::Security`] (trying again does not help), the rest [`Error::Broker`].
/// async-nats reports a failed TLS handshake as an I/O error carrying rustls' error: the
/// server's certificate not trusted, or the server's alert that it wants a (trusted) client
/// certificate.
fn connect_error(error: async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind;
    let tls_failed = || {
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(&error);
        while let Some(current) = cause {
            if current.is::<async_nats::rustls::Error>()
                || current
                    .downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::get_ref)
                    .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
            cause = current.source();
        }
        false
    };
    let message = match error.kind() {
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            "NATS refused the credentials (nats.auth)"
        }
        ConnectErrorKind::Tls => "TLS with NATS could not be set up (nats.tls)",
        ConnectErrorKind::Io if tls_failed() => "TLS with NATS failed (nats.tls)",
        _ => return Error::broker("cannot connect to NATS", error),
    };
    Error::Security {
        message: message.to_owned(),
        source: Some(error.into()),
    }
}

/// How many requests in a row may fail for want of a leader before the bus looks further (a
/// pull: the stream and consumer are looked up again; a read at subscribe: it fails), about
/// 3 s of backoff.
pub(crate) const LEADER_RETRIES: u32 = 5;

/// True for a request that failed because what it asks (a consumer, a stream, a bucket) has no
/// leader now (no responders, 503) or its leader changed (409 Leadership Change): a cluster
/// electing one, or a replicated stream made a moment ago. (One that is gone answers no
/// responders too, hence the bound [`LEADER_RETRIES`].) Looks through `error`'s sources for
/// the async-nats errors that say so.
pub(crate) fn leader_away(error: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::stream::{
        ConsumerError, ConsumerErrorKind, DirectGetError, DirectGetErrorKind,
    };
    use async_nats::{StatusCode, jetstream::context};
    std::iter::successors(Some(error), |error| error.source()).any(|error| {
        if let Some(error) = error.downcast_ref::<PullFailed>() {
            error.leader_away()
        } else if let Some(error) = error.downcast_ref::<context::RequestError>() {
            error.kind() == context::RequestErrorKind::NoResponders
        } else if let Some(error) = error.downcast_ref::<async_nats::RequestError>() {
            error.kind() == async_nats::RequestErrorKind::NoResponders
        } else if let Some(error) = error.downcast_ref::<ConsumerError>() {
            matches!(error.kind(), ConsumerErrorKind::JetStream(error) if error.code() == 503)
        } else if let Some(error) = error.downcast_ref::<DirectGetError>() {
            matches!(error.kind(), DirectGetErrorKind::ErrorResponse(status, _) if status == StatusCode::NO_RESPONDERS)
        } else if let Some(error) = error.downcast_ref::<async_nats::jetstream::Error>() {
            error.code() == 503
        } else {
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_back_off_exponentially_up_to_the_cap() {
        let max = Duration::from_secs(5);
        assert_eq!(reconnect_delay(0, max), Duration::from_millis(10));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(80));
        assert_eq!(reconnect_delay(12, max), max);
        assert_eq!(reconnect_delay(usize::MAX, max), max);
    }

    #[test]
    fn a_request_without_a_leader_is_told_from_other_failures() {
        use async_nats::StatusCode;
        use async_nats::jetstream::context::{RequestError, RequestErrorKind};
        use async_nats::jetstream::kv::{EntryError, EntryErrorKind};
        use async_nats::jetstream::stream::{
            ConsumerError, ConsumerErrorKind, DirectGetError, DirectGetErrorKind,
        };
        let pull = |status: u16, description: &str| {
            PullFailed::new(StatusCode::from_u16(status).unwrap(), description)
        };
        assert!(leader_away(&pull(503, "")));
        assert!(leader_away(&pull(409, "Leadership Change")));
        assert!(!leader_away(&pull(409, "Consumer Deleted")));
        assert!(!leader_away(&pull(400, "Bad Request")));
        let consumer_read = ConsumerError::with_source(
            ConsumerErrorKind::Request,
            RequestError::new(RequestErrorKind::NoResponders),
        );
        assert!(leader_away(&consumer_read));
        assert!(!leader_away(&ConsumerError::new(
            ConsumerErrorKind::TimedOut
        )));
        let bucket_read = EntryError::with_source(
            EntryErrorKind::Other,
            DirectGetError::new(DirectGetErrorKind::ErrorResponse(
                StatusCode::NO_RESPONDERS,
                "no responders".to_owned(),
            )),
        );
        assert!(leader_away(&bucket_read));
        let boxed: async_nats::Error = Box::new(pull(503, ""));
        assert!(leader_away(&*boxed));
        assert!(!leader_away(&EntryError::new(EntryErrorKind::TimedOut)));
    }
}
