//! Configuration of the NATS bus: connection, streams, consumers, engine.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::{Error, Secret, validate_topic};
use eventbus_pool::PoolConfig;

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// A token.
    Token(Secret),
    /// A user name and password.
    UserPassword {
        /// The user.
        user: String,
        /// The password.
        password: Secret,
    },
    /// An nkey seed (`SU...`).
    NkeySeed(Secret),
    /// A `.creds` file (JWT and nkey seed), read at connect.
    CredentialsFile(PathBuf),
}

/// TLS to the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// A PEM file of CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate (with `client_key`) for mutual TLS.
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// On disk: survives a server restart.
    File,
    /// In memory: lost when the server restarts.
    Memory,
}

/// Retention limits of a stream; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// The oldest message kept. Default 24 h.
    pub max_age: Option<Duration>,
    /// The most bytes kept. Default 1 GiB.
    pub max_bytes: Option<u64>,
    /// The most messages kept. Default 1,000,000.
    pub max_msgs: Option<u64>,
}

impl StreamLimits {
    /// The default limits of dead-letter streams: no age limit (a dead letter waits until
    /// someone looks at it), the default size limits.
    pub fn dead_letters() -> Self {
        Self {
            max_age: None,
            ..Self::default()
        }
    }
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_age: Some(Duration::from_secs(24 * 3600)),
            max_bytes: Some(1 << 30),
            max_msgs: Some(1_000_000),
        }
    }
}

/// A stream this bus creates (or updates) at connect, for the topics its subjects cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDefinition {
    /// The stream name.
    pub name: String,
    /// Its subjects; NATS wildcards `*` and `>` allowed.
    pub subjects: Vec<String>,
    /// Its storage.
    pub storage: Storage,
    /// Its limits.
    pub limits: StreamLimits,
}

/// Options of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicOptions {
    /// The storage of the stream created for the topic, instead of the default (file for
    /// envelope and dead-letter topics, memory for plain ones).
    pub storage: Option<Storage>,
    /// Core NATS instead of JetStream: no stream, nothing kept, at-most-once by nature.
    pub ephemeral: bool,
}

/// The durable pull consumer made for each subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSettings {
    /// How long the server waits for an ack before it redelivers. The bus sends in-progress
    /// acks for every message it holds well before this runs out. Default 30 s.
    pub ack_wait: Duration,
    /// Deliveries of one message at most; `-1` is unlimited (the default: a capped message is
    /// skipped by the server without a trace, and poison messages go to the dead-letter topic
    /// instead).
    pub max_deliver: i64,
    /// Messages delivered and not yet acknowledged at most (server-side flow control).
    /// Default 1000.
    pub max_ack_pending: i64,
    /// Redelivery delays after an ack timeout, one per delivery (the last repeats). Empty by
    /// default: every redelivery waits `ack_wait`.
    pub backoff: Vec<Duration>,
    /// Messages asked for per pull request. Default 256.
    pub fetch_batch: usize,
    /// How long a pull request waits for messages before the next is sent. Default 1 s;
    /// `close` may wait this long for the open request to end.
    pub fetch_expires: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 1000,
            backoff: Vec::new(),
            fetch_batch: 256,
            fetch_expires: Duration::from_secs(1),
        }
    }
}

impl ConsumerSettings {
    /// How often held messages get an in-progress ack: a third of the shortest redelivery
    /// timeout.
    pub fn progress_interval(&self) -> Duration {
        let shortest = self
            .backoff
            .iter()
            .copied()
            .chain([self.ack_wait])
            .min()
            .unwrap_or(self.ack_wait);
        (shortest / 3).max(Duration::from_millis(10))
    }
}

/// Configuration of a [`NatsBus`](crate::NatsBus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Names the connection (`client name`), the durable consumers (`{client_id}_{topic}`)
    /// and the metrics (`nats_eventbus_{client_id}`). Default `eventbus`.
    pub client_id: String,
    /// Servers to connect to; the client fails over between them. Default
    /// `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS.
    pub tls: TlsConfig,
    /// How long one connection attempt may take. Default 5 s.
    pub connection_timeout: Duration,
    /// Reconnect attempts after a lost connection before the client gives up; `None` (the
    /// default) retries forever.
    pub max_reconnects: Option<usize>,
    /// The longest delay between reconnect attempts (they back off exponentially from 10 ms).
    /// Default 5 s.
    pub reconnect_max_delay: Duration,
    /// How long a JetStream API request (stream, consumer) may take. Default 5 s.
    pub request_timeout: Duration,
    /// How long a publish waits for the server's PubAck. Default 5 s.
    pub publish_timeout: Duration,
    /// Prefix of the stream created per topic: `{prefix}{topic}` with `.` as `_`. Default
    /// `STREAM_` (the Go SDK's naming).
    pub stream_prefix: String,
    /// Limits of the streams created per topic.
    pub stream_limits: StreamLimits,
    /// Limits of the dead-letter streams the bus creates (always file storage). Default
    /// [`StreamLimits::dead_letters`]: no age limit.
    pub dead_letter_limits: StreamLimits,
    /// Streams created or updated at connect; a topic their subjects cover uses them.
    pub streams: Vec<StreamDefinition>,
    /// Options per topic.
    pub topics: BTreeMap<String, TopicOptions>,
    /// The durable consumers.
    pub consumer: ConsumerSettings,
    /// The ordering engine and its retry policy.
    pub pool: PoolConfig,
    /// How long `close` lets in-flight messages finish. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            client_id: "eventbus".to_owned(),
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            auth: Auth::None,
            tls: TlsConfig::default(),
            connection_timeout: Duration::from_secs(5),
            max_reconnects: None,
            reconnect_max_delay: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(5),
            stream_prefix: "STREAM_".to_owned(),
            stream_limits: StreamLimits::default(),
            dead_letter_limits: StreamLimits::dead_letters(),
            streams: Vec::new(),
            topics: BTreeMap::new(),
            consumer: ConsumerSettings::default(),
            pool: PoolConfig::default(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

fn positive(field: &str, value: Duration) -> Result<(), Error> {
    if value.is_zero() {
        return Err(Error::config(field, "must be greater than zero"));
    }
    Ok(())
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl NatsConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        if self.client_id.trim().is_empty() {
            return Err(Error::config("client_id", "must not be empty"));
        }
        if self.urls.is_empty() {
            return Err(Error::config("nats.urls", "needs at least one server URL"));
        }
        for url in &self.urls {
            if url.trim().is_empty() || url.contains(char::is_whitespace) {
                return Err(Error::config("nats.urls", format!("{url:?} is not a URL")));
            }
            let authority = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
            if authority
                .split('/')
                .next()
                .is_some_and(|host| host.contains('@'))
            {
                // The URL would show the secret wherever it is logged or printed.
                return Err(Error::config(
                    "nats.urls",
                    "credentials in a URL are refused: use nats.token or nats.user/nats.password, which are kept secret",
                ));
            }
        }
        if let Auth::UserPassword { user, .. } = &self.auth
            && user.is_empty()
        {
            return Err(Error::config("nats.auth.user", "must not be empty"));
        }
        if self.tls.client_cert.is_some() != self.tls.client_key.is_some() {
            return Err(Error::config(
                "nats.tls.client_cert",
                "client_cert and client_key go together",
            ));
        }
        positive("nats.connection_timeout", self.connection_timeout)?;
        positive("nats.reconnect_max_delay", self.reconnect_max_delay)?;
        positive("nats.request_timeout", self.request_timeout)?;
        positive("nats.publish_timeout", self.publish_timeout)?;
        if !self.stream_prefix.is_empty() && !name_ok(&self.stream_prefix) {
            return Err(Error::config(
                "nats.stream_prefix",
                "only letters, digits, '_' and '-'",
            ));
        }
        for stream in &self.streams {
            if !name_ok(&stream.name) {
                return Err(Error::config(
                    "nats.streams.name",
                    format!("{:?}: 1 to 200 letters, digits, '_' or '-'", stream.name),
                ));
            }
            if stream.subjects.is_empty() {
                return Err(Error::config(
                    "nats.streams.subjects",
                    format!("stream {} needs at least one subject", stream.name),
                ));
            }
        }
        for topic in self.topics.keys() {
            validate_topic(topic)
                .map_err(|error| Error::config("nats.topics", error.to_string()))?;
        }
        let consumer = &self.consumer;
        positive("nats.consumer.ack_wait", consumer.ack_wait)?;
        positive("nats.consumer.fetch_expires", consumer.fetch_expires)?;
        if consumer.max_deliver == 0 || consumer.max_deliver < -1 {
            return Err(Error::config(
                "nats.consumer.max_deliver",
                "must be -1 (unlimited) or at least 1",
            ));
        }
        if consumer.max_ack_pending == 0 || consumer.max_ack_pending < -1 {
            return Err(Error::config(
                "nats.consumer.max_ack_pending",
                "must be -1 (unlimited) or at least 1",
            ));
        }
        if consumer.backoff.iter().any(Duration::is_zero) {
            return Err(Error::config(
                "nats.consumer.backoff",
                "every delay must be greater than zero",
            ));
        }
        if !consumer.backoff.is_empty()
            && consumer.max_deliver != -1
            && consumer.max_deliver <= consumer.backoff.len() as i64
        {
            return Err(Error::config(
                "nats.consumer.max_deliver",
                "must be greater than the number of backoff delays (a server rule)",
            ));
        }
        if consumer.fetch_batch == 0 {
            return Err(Error::config(
                "nats.consumer.fetch_batch",
                "must be at least 1",
            ));
        }
        self.pool.validate()
    }

    /// The options of `topic` (defaults when it has none).
    pub fn topic(&self, topic: &str) -> TopicOptions {
        self.topics.get(topic).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = NatsConfig {
            auth: Auth::UserPassword {
                user: "svc".into(),
                password: Secret::new("hunter2"),
            },
            ..NatsConfig::default()
        };
        let dump = format!("{config:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("svc"));
        for auth in [
            Auth::Token(Secret::new("tok-123")),
            Auth::NkeySeed(Secret::new(
                "SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY",
            )),
        ] {
            let dump = format!("{auth:?}");
            assert!(
                !dump.contains("tok-123") && !dump.contains("SUAMK"),
                "{dump}"
            );
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(NatsConfig, &str)> = vec![
            (
                NatsConfig {
                    urls: vec![],
                    ..NatsConfig::default()
                },
                "nats.urls",
            ),
            (
                NatsConfig {
                    urls: vec!["nats://a b".into()],
                    ..NatsConfig::default()
                },
                "nats.urls",
            ),
            (
                NatsConfig {
                    consumer: ConsumerSettings {
                        max_deliver: 0,
                        ..ConsumerSettings::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.consumer.max_deliver",
            ),
            (
                NatsConfig {
                    consumer: ConsumerSettings {
                        max_deliver: 2,
                        backoff: vec![Duration::from_secs(1), Duration::from_secs(2)],
                        ..ConsumerSettings::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.consumer.max_deliver",
            ),
            (
                NatsConfig {
                    consumer: ConsumerSettings {
                        ack_wait: Duration::ZERO,
                        ..ConsumerSettings::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.consumer.ack_wait",
            ),
            (
                NatsConfig {
                    tls: TlsConfig {
                        client_cert: Some("c.pem".into()),
                        ..TlsConfig::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.tls.client_cert",
            ),
            (
                NatsConfig {
                    streams: vec![StreamDefinition {
                        name: "bad.name".into(),
                        subjects: vec!["a".into()],
                        storage: Storage::File,
                        limits: StreamLimits::default(),
                    }],
                    ..NatsConfig::default()
                },
                "nats.streams.name",
            ),
            (
                NatsConfig {
                    stream_prefix: "A.B".into(),
                    ..NatsConfig::default()
                },
                "nats.stream_prefix",
            ),
            (
                NatsConfig {
                    client_id: " ".into(),
                    ..NatsConfig::default()
                },
                "client_id",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(Error::Config { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(NatsConfig::default().validate().is_ok());
    }

    #[test]
    fn progress_acks_come_well_before_the_shortest_redelivery_timeout() {
        let mut consumer = ConsumerSettings::default();
        assert_eq!(consumer.progress_interval(), Duration::from_secs(10));
        consumer.backoff = vec![Duration::from_secs(3), Duration::from_secs(60)];
        assert_eq!(consumer.progress_interval(), Duration::from_secs(1));
    }
}
