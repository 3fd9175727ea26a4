//! `[nats]`: the NATS JetStream backend's section of the configuration (feature `nats`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::{Error, Secret};
use eventbus_nats::{
    Auth, ConsumerSettings, NatsConfig, Storage, StreamDefinition, StreamLimits, TlsConfig,
    TopicOptions,
};
use serde::{Deserialize, Serialize};

/// `[nats]`: servers, credentials, TLS, streams and consumers. Every default is
/// [`NatsConfig::default`]'s; see `docs/nats.md` and `docs/configuration.md`.
///
/// At most one of `token`, `user` + `password`, `nkey_seed`, `credentials_file` may be set.
/// Secrets are [`Secret`]s: never shown by `Debug` or written back out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSection {
    /// Servers to connect to (the client fails over between them).
    pub urls: Vec<String>,
    /// Token authentication.
    pub token: Option<Secret>,
    /// User for user/password authentication.
    pub user: Option<String>,
    /// Password for user/password authentication.
    pub password: Option<Secret>,
    /// Nkey seed authentication.
    pub nkey_seed: Option<Secret>,
    /// A `.creds` file (JWT + nkey seed).
    pub credentials_file: Option<PathBuf>,
    /// TLS.
    pub tls: NatsTlsSection,
    /// How long one connection attempt may take.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Reconnect attempts before giving up; unset retries forever.
    pub max_reconnects: Option<usize>,
    /// The longest delay between reconnect attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// How long a JetStream API request may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a publish waits for its PubAck.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Prefix of the streams created per topic.
    pub stream_prefix: String,
    /// Limits of the streams created per topic.
    pub stream_limits: StreamLimitsSection,
    /// Limits of the dead-letter streams created per dead-letter topic (always file storage).
    /// Default: no age limit, the default size limits.
    pub dead_letter_limits: StreamLimitsSection,
    /// Streams created or updated at connect.
    pub streams: Vec<StreamSection>,
    /// Options per topic, by topic name.
    pub topics: BTreeMap<String, TopicSection>,
    /// The durable pull consumers.
    pub consumer: ConsumerSection,
}

/// `[nats.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsSection {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// CA certificates to trust (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    pub client_key: Option<PathBuf>,
}

/// Stream storage, as written in configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageName {
    /// On disk.
    File,
    /// In memory.
    Memory,
}

impl From<StorageName> for Storage {
    fn from(storage: StorageName) -> Self {
        match storage {
            StorageName::File => Storage::File,
            StorageName::Memory => Storage::Memory,
        }
    }
}

/// `[nats.stream_limits]`: limits of the streams created per topic; `0` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamLimitsSection {
    /// The oldest message kept (`0s`: no limit).
    #[serde(with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// The most bytes kept (`0`: no limit).
    pub max_bytes: Option<u64>,
    /// The most messages kept (`0`: no limit).
    pub max_msgs: Option<u64>,
}

impl Default for StreamLimitsSection {
    fn default() -> Self {
        StreamLimits::default().into()
    }
}

impl From<StreamLimits> for StreamLimitsSection {
    fn from(limits: StreamLimits) -> Self {
        Self {
            max_age: limits.max_age,
            max_bytes: limits.max_bytes,
            max_msgs: limits.max_msgs,
        }
    }
}

impl From<StreamLimitsSection> for StreamLimits {
    fn from(limits: StreamLimitsSection) -> Self {
        limits_of(limits.max_age, limits.max_bytes, limits.max_msgs)
    }
}

/// Limits as configured, where `0` (or `"0s"`) means unlimited, as on the server.
fn limits_of(
    max_age: Option<Duration>,
    max_bytes: Option<u64>,
    max_msgs: Option<u64>,
) -> StreamLimits {
    StreamLimits {
        max_age: max_age.filter(|age| !age.is_zero()),
        max_bytes: max_bytes.filter(|bytes| *bytes > 0),
        max_msgs: max_msgs.filter(|msgs| *msgs > 0),
    }
}

/// One `[[nats.streams]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    /// The stream name.
    pub name: String,
    /// Its subjects (`*` and `>` allowed).
    pub subjects: Vec<String>,
    /// Its storage. Default `file`.
    #[serde(default = "file")]
    pub storage: StorageName,
    /// The oldest message kept. Default 24 h.
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// The most bytes kept. Default 1 GiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: Option<u64>,
    /// The most messages kept. Default 1,000,000.
    #[serde(default = "default_max_msgs")]
    pub max_msgs: Option<u64>,
}

fn file() -> StorageName {
    StorageName::File
}

fn default_max_age() -> Option<Duration> {
    StreamLimits::default().max_age
}

fn default_max_bytes() -> Option<u64> {
    StreamLimits::default().max_bytes
}

fn default_max_msgs() -> Option<u64> {
    StreamLimits::default().max_msgs
}

/// `[nats.topics."<topic>"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicSection {
    /// Storage of the topic's stream instead of the default.
    pub storage: Option<StorageName>,
    /// Core NATS instead of JetStream (at-most-once, nothing kept).
    pub ephemeral: bool,
}

/// `[nats.consumer]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSection {
    /// How long the server waits for an ack before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Deliveries per message at most; -1 unlimited.
    pub max_deliver: i64,
    /// Unacknowledged messages at most.
    pub max_ack_pending: i64,
    /// Redelivery delays, e.g. `["1s", "5s", "30s"]`.
    #[serde(with = "durations")]
    pub backoff: Vec<Duration>,
    /// Messages per pull request.
    pub fetch_batch: usize,
    /// How long a pull request waits for messages.
    #[serde(with = "humantime_serde")]
    pub fetch_expires: Duration,
}

impl Default for ConsumerSection {
    fn default() -> Self {
        let consumer = ConsumerSettings::default();
        Self {
            ack_wait: consumer.ack_wait,
            max_deliver: consumer.max_deliver,
            max_ack_pending: consumer.max_ack_pending,
            backoff: consumer.backoff,
            fetch_batch: consumer.fetch_batch,
            fetch_expires: consumer.fetch_expires,
        }
    }
}

/// A list of durations written like `"1s"`.
mod durations {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        durations: &[Duration],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        durations
            .iter()
            .map(|d| humantime_serde::re::humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .serialize(serializer)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        Vec::<String>::deserialize(deserializer)?
            .iter()
            .map(|text| {
                humantime_serde::re::humantime::parse_duration(text).map_err(|error| {
                    serde::de::Error::custom(format!("{text:?} is not a duration: {error}"))
                })
            })
            .collect()
    }
}

impl Default for NatsSection {
    fn default() -> Self {
        let defaults = NatsConfig::default();
        Self {
            urls: defaults.urls,
            token: None,
            user: None,
            password: None,
            nkey_seed: None,
            credentials_file: None,
            tls: NatsTlsSection::default(),
            connection_timeout: defaults.connection_timeout,
            max_reconnects: defaults.max_reconnects,
            reconnect_max_delay: defaults.reconnect_max_delay,
            request_timeout: defaults.request_timeout,
            publish_timeout: defaults.publish_timeout,
            stream_prefix: defaults.stream_prefix,
            stream_limits: StreamLimitsSection::default(),
            dead_letter_limits: StreamLimits::dead_letters().into(),
            streams: Vec::new(),
            topics: BTreeMap::new(),
            consumer: ConsumerSection::default(),
        }
    }
}

impl NatsSection {
    /// The authentication these fields describe; more than one method is an error.
    pub fn auth(&self) -> Result<Auth, Error> {
        let mut methods = Vec::new();
        if let Some(token) = &self.token {
            methods.push(Auth::Token(token.clone()));
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => methods.push(Auth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }),
            (None, None) => {}
            _ => {
                return Err(Error::config("nats.user", "user and password go together"));
            }
        }
        if let Some(seed) = &self.nkey_seed {
            methods.push(Auth::NkeySeed(seed.clone()));
        }
        if let Some(path) = &self.credentials_file {
            methods.push(Auth::CredentialsFile(path.clone()));
        }
        if methods.len() > 1 {
            return Err(Error::config(
                "nats",
                "set at most one of token, user/password, nkey_seed, credentials_file",
            ));
        }
        Ok(methods.pop().unwrap_or_default())
    }

    /// The backend configuration for a bus named `client_id` with `pool` and `drain_timeout`.
    pub fn to_nats_config(
        &self,
        client_id: &str,
        pool: eventbus_pool::PoolConfig,
        drain_timeout: Duration,
    ) -> Result<NatsConfig, Error> {
        let config = NatsConfig {
            client_id: client_id.to_owned(),
            urls: self.urls.clone(),
            auth: self.auth()?,
            tls: TlsConfig {
                required: self.tls.required,
                ca_file: self.tls.ca_file.clone(),
                client_cert: self.tls.client_cert.clone(),
                client_key: self.tls.client_key.clone(),
            },
            connection_timeout: self.connection_timeout,
            max_reconnects: self.max_reconnects,
            reconnect_max_delay: self.reconnect_max_delay,
            request_timeout: self.request_timeout,
            publish_timeout: self.publish_timeout,
            stream_prefix: self.stream_prefix.clone(),
            stream_limits: self.stream_limits.into(),
            dead_letter_limits: self.dead_letter_limits.into(),
            streams: self
                .streams
                .iter()
                .map(|stream| StreamDefinition {
                    name: stream.name.clone(),
                    subjects: stream.subjects.clone(),
                    storage: stream.storage.into(),
                    limits: limits_of(stream.max_age, stream.max_bytes, stream.max_msgs),
                })
                .collect(),
            topics: self
                .topics
                .iter()
                .map(|(topic, options)| {
                    (
                        topic.clone(),
                        TopicOptions {
                            storage: options.storage.map(Storage::from),
                            ephemeral: options.ephemeral,
                        },
                    )
                })
                .collect(),
            consumer: ConsumerSettings {
                ack_wait: self.consumer.ack_wait,
                max_deliver: self.consumer.max_deliver,
                max_ack_pending: self.consumer.max_ack_pending,
                backoff: self.consumer.backoff.clone(),
                fetch_batch: self.consumer.fetch_batch,
                fetch_expires: self.consumer.fetch_expires,
            },
            pool,
            drain_timeout,
        };
        config.validate()?;
        Ok(config)
    }
}
