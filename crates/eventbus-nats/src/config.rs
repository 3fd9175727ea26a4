//! Configuration of the NATS bus: connection, streams, consumers.
//!
//! Every type here is also the `[nats]` section of the facade's configuration file: serde
//! reads it with defaults for what is missing and refuses unknown keys; durations are written
//! like `"30s"`, stream limits of `0` (`"0s"`) are unlimited, secrets are never written out.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use eventbus_core::{Error, Secret, validate_topic};
use serde::{Deserialize, Serialize};

/// How the client authenticates: at most one of a token, a user and password, an nkey seed or
/// a credentials file (checked by [`NatsConfig::validate`]); none by default.
///
/// ```
/// use eventbus_nats::Auth;
///
/// let auth = Auth::user_password("svc", "hunter2");
/// assert!(!format!("{auth:?}").contains("hunter2"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// A token.
    pub token: Option<Secret>,
    /// A user name, with `password`.
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<Secret>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// A `.creds` file (JWT and nkey seed), read at connect.
    pub credentials_file: Option<PathBuf>,
}

/// The one authentication method an [`Auth`] selects.
pub(crate) enum AuthMethod<'a> {
    None,
    Token(&'a Secret),
    UserPassword(&'a str, &'a Secret),
    NkeySeed(&'a Secret),
    CredentialsFile(&'a PathBuf),
}

impl Auth {
    /// Token authentication.
    pub fn token(token: impl Into<String>) -> Self {
        Self {
            token: Some(Secret::new(token)),
            ..Self::default()
        }
    }

    /// User and password authentication.
    pub fn user_password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: Some(user.into()),
            password: Some(Secret::new(password)),
            ..Self::default()
        }
    }

    /// Nkey authentication with a seed (`SU...`).
    pub fn nkey_seed(seed: impl Into<String>) -> Self {
        Self {
            nkey_seed: Some(Secret::new(seed)),
            ..Self::default()
        }
    }

    /// Authentication with a `.creds` file, read at connect.
    pub fn credentials_file(path: impl Into<PathBuf>) -> Self {
        Self {
            credentials_file: Some(path.into()),
            ..Self::default()
        }
    }

    /// The method these fields select; more than one, or half of user/password, is an error.
    pub(crate) fn method(&self) -> Result<AuthMethod<'_>, Error> {
        let mut methods = Vec::new();
        if let Some(token) = &self.token {
            methods.push(AuthMethod::Token(token));
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => methods.push(AuthMethod::UserPassword(user, password)),
            (None, None) => {}
            _ => {
                return Err(Error::config(
                    "nats.auth.user",
                    "user and password go together",
                ));
            }
        }
        if let Some(seed) = &self.nkey_seed {
            methods.push(AuthMethod::NkeySeed(seed));
        }
        if let Some(path) = &self.credentials_file {
            methods.push(AuthMethod::CredentialsFile(path));
        }
        if methods.len() > 1 {
            return Err(Error::config(
                "nats.auth",
                "set at most one of token, user/password, nkey_seed, credentials_file",
            ));
        }
        Ok(methods.pop().unwrap_or(AuthMethod::None))
    }
}

/// TLS to the server.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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

/// Where a stream keeps its messages (`file` or `memory` in configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// On disk: survives a server restart.
    File,
    /// In memory: lost when the server restarts.
    Memory,
}

/// Retention limits of a stream; `None` (`0` in configuration) is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamLimits {
    /// The oldest message kept. Default 24 h.
    #[serde(with = "unlimited::age")]
    pub max_age: Option<Duration>,
    /// The most bytes kept. Default 1 GiB.
    #[serde(with = "unlimited::count")]
    pub max_bytes: Option<u64>,
    /// The most messages kept. Default 1,000,000.
    #[serde(with = "unlimited::count")]
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

/// A stream that holds the topics its subjects cover: made at connect when it does not exist,
/// **bound** when it does.
///
/// Binding an existing stream (one a Go service or an operator made, maybe shared with other
/// services) never narrows it: the subjects it lacks are added, the ones it has are kept (even
/// those this definition does not name), and its limits, storage and replicas stay as they are
/// unless [`update_limits`](Self::update_limits) asks for this definition's limits (and its
/// [`replicas`](Self::replicas), when given). A stream with fewer replicas than configured is
/// reported (a warning naming it) and kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDefinition {
    /// The stream name.
    pub name: String,
    /// Its subjects; NATS wildcards `*` and `>` allowed.
    pub subjects: Vec<String>,
    /// Its storage, when the bus makes it. Default file.
    #[serde(default = "file_storage")]
    pub storage: Storage,
    /// Its limits, when the bus makes it (or with `update_limits`). Default
    /// [`StreamLimits::default`].
    #[serde(default)]
    pub limits: StreamLimits,
    /// Its replicas (1 to 5, on a cluster) when the bus makes it, default
    /// [`NatsConfig::replicas`]; set on an existing stream only when given here and with
    /// [`update_limits`](Self::update_limits).
    #[serde(default)]
    pub replicas: Option<u16>,
    /// Set an existing stream's limits to [`limits`](Self::limits), and its replicas to
    /// [`replicas`](Self::replicas) when given, at connect. Default `false`: an existing stream
    /// keeps its own.
    #[serde(default)]
    pub update_limits: bool,
}

impl StreamDefinition {
    /// A file stream `name` over `subjects`, with the default limits, bound if it exists.
    pub fn new(name: impl Into<String>, subjects: Vec<String>) -> Self {
        Self {
            name: name.into(),
            subjects,
            storage: Storage::File,
            limits: StreamLimits::default(),
            replicas: None,
            update_limits: false,
        }
    }
}

fn file_storage() -> Storage {
    Storage::File
}

/// Options of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicOptions {
    /// The storage of the stream created for the topic, instead of the default (file for
    /// envelope and dead-letter topics, memory for plain ones).
    pub storage: Option<Storage>,
    /// Core NATS instead of JetStream: no stream, nothing kept, at-most-once by nature.
    pub ephemeral: bool,
    /// Split the topic into this many partitions (subjects `{topic}.0` … `{topic}.{n-1}`, an
    /// aggregate's events always on one, see [`partition_of`](crate::partition_of)) that the
    /// instances of a service share, each read by one instance at a time ([docs/nats.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/nats.md),
    /// "Scaling out"). `None` (the default): one subject, read by one instance.
    pub partitions: Option<u16>,
    /// The replicas of the stream made for the topic (1 to 5, on a cluster), instead of
    /// [`NatsConfig::replicas`]. For a dead-letter stream, set it on the dead-letter topic
    /// (`"orders.DLQ"`).
    pub replicas: Option<u16>,
    /// Take over from the durable consumer of the service this one replaces, such as a Go
    /// service's `business-consumer-unified_{topic, . as _}`. From `connect` on, the bus
    /// watches that durable's ack floor; when it makes its own durable for the topic (it has
    /// none yet), `subscribe` waits until that durable is gone (deleted by the Go SDK's `Close`,
    /// and still gone after [`TakeOverSettings::grace`]) or abandoned (nobody pulling and
    /// nothing acknowledged for [`TakeOverSettings::idle`]: a killed service), and starts its
    /// own durable right after the last ack floor it saw. A durable of that name that did not
    /// exist at `connect` is a configuration error at `subscribe` ([docs/migration.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/migration.md), "NATS:
    /// taking over a Go service's durable"). Not with `partitions` or `ephemeral`, nor with a
    /// subscription that names its durable.
    pub take_over_from: Option<String>,
}

/// The durable pull consumer made for each subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// How long the server waits for an ack before it redelivers. The bus sends in-progress
    /// acks for every message it holds well before this runs out. Default 30 s.
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "durations")]
    pub backoff: Vec<Duration>,
    /// Messages asked for per pull request. Default 256.
    pub fetch_batch: usize,
    /// How long a pull request waits for messages before the next is sent. Default 1 s;
    /// `close` may wait this long for the open request to end.
    #[serde(with = "humantime_serde")]
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

/// Configuration of a [`NatsBus`](crate::NatsBus): what only NATS needs. The settings every
/// backend shares (client ID, engine, drain timeout, metric namespace) come separately, as an
/// [`eventbus_pool::BusSettings`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Servers to connect to; the client fails over between them. Default
    /// `nats://127.0.0.1:4222`.
    pub urls: Vec<String>,
    /// Credentials.
    pub auth: Auth,
    /// TLS.
    pub tls: TlsConfig,
    /// How long one connection attempt may take. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub connection_timeout: Duration,
    /// Reconnect attempts after a lost connection before the client gives up; `None` (the
    /// default) retries forever.
    pub max_reconnects: Option<usize>,
    /// The longest delay between reconnect attempts (they back off exponentially from 10 ms).
    /// Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// How long a JetStream API request (stream, consumer) may take. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a publish waits for the server's PubAck. Default 5 s.
    #[serde(with = "humantime_serde")]
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
    /// The replicas of every stream the bus makes: the topics' and the dead letters' streams,
    /// the declared [`streams`](Self::streams) made at connect, the scale-out groups' buckets and
    /// the stream-lock bucket (1 to 5; more than 1 needs a JetStream cluster of at least that
    /// many servers). A topic's own [`TopicOptions::replicas`] wins. Streams that exist keep
    /// theirs (one with fewer is reported with a warning). Default 1.
    pub replicas: u16,
    /// Options per topic.
    pub topics: BTreeMap<String, TopicOptions>,
    /// The durable consumers.
    pub consumer: ConsumerSettings,
    /// How the instances of a service share a partitioned topic.
    pub scale_out: ScaleOutSettings,
    /// How a topic's [`TopicOptions::take_over_from`] tells that the other service stopped.
    pub take_over: TakeOverSettings,
}

/// How the bus tells that the service it takes a topic over from ([`TopicOptions::take_over_from`])
/// stopped: its durable deleted and still gone after `grace`, or idle for `idle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TakeOverSettings {
    /// How long the other durable may go without a pull request waiting and without its ack
    /// floor moving before the bus takes its service for dead (killed: its durable stays). A
    /// live Go service does not pull while a handler runs: set this above its longest handler.
    /// Default 60 s.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
    /// How long after the other durable was deleted (the Go SDK's `Close`) the bus waits before
    /// it starts: the Go SDK deletes its durables first and then still handles what it had
    /// fetched until its `Close` returns. A durable made again meanwhile (the service restarted)
    /// is watched again. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for TakeOverSettings {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            grace: Duration::from_secs(30),
        }
    }
}

/// How the instances of a service (one `client_id`) share the partitions of a topic
/// ([`TopicOptions::partitions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScaleOutSettings {
    /// How long an instance that stopped pulling (or renewing its claims) keeps its partitions:
    /// the `priority_timeout` of each partition's pinned consumer and the age at which its claims
    /// and its membership expire. A dead instance's partitions move to the others after about
    /// this long; a smaller value fails over sooner and renews more often (every fifth of it).
    /// Default 5 s; at least twice `consumer.fetch_expires`.
    #[serde(with = "humantime_serde")]
    pub pinned_ttl: Duration,
}

impl Default for ScaleOutSettings {
    fn default() -> Self {
        Self {
            pinned_ttl: Duration::from_secs(5),
        }
    }
}

impl ScaleOutSettings {
    /// How often an instance renews its membership and claims and looks at the others: a fifth
    /// of `pinned_ttl`.
    pub fn renew_interval(&self) -> Duration {
        renew_interval(self.pinned_ttl)
    }
}

/// How often claims that expire after `ttl` are renewed: a fifth of it.
pub(crate) fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(10))
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            auth: Auth::default(),
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
            replicas: 1,
            topics: BTreeMap::new(),
            consumer: ConsumerSettings::default(),
            scale_out: ScaleOutSettings::default(),
            take_over: TakeOverSettings::default(),
        }
    }
}

/// The partitioned topic of `topics` that `subject` is or is a partition of (`{topic}.{n}`,
/// `n` below its partition count, written without leading zeros), with its partition count.
pub(crate) fn partitioned<'a>(
    topics: &'a BTreeMap<String, TopicOptions>,
    subject: &'a str,
) -> Option<(&'a str, u16)> {
    match topics.get(subject).and_then(|options| options.partitions) {
        Some(partitions) => Some((subject, partitions)),
        None => partition_parent(topics, subject),
    }
}

/// The partitioned topic of `topics` that has `subject` among its partition subjects.
fn partition_parent<'a>(
    topics: &'a BTreeMap<String, TopicOptions>,
    subject: &'a str,
) -> Option<(&'a str, u16)> {
    let (topic, index) = subject.rsplit_once('.')?;
    let (topic, options) = topics.get_key_value(topic)?;
    let partitions = options.partitions?;
    let parsed: u16 = index.parse().ok()?;
    (parsed < partitions && parsed.to_string() == index).then_some((topic.as_str(), partitions))
}

/// Limits where `0` (`"0s"`) means unlimited, as on the server.
mod unlimited {
    pub(super) mod age {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(
            age: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            humantime_serde::serialize(&age.unwrap_or(Duration::ZERO), serializer)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            let age: humantime_serde::Serde<Duration> = Deserialize::deserialize(deserializer)?;
            Ok(Some(age.into_inner()).filter(|age| !age.is_zero()))
        }
    }

    pub(super) mod count {
        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(
            count: &Option<u64>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            serializer.serialize_u64(count.unwrap_or(0))
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<u64>, D::Error> {
            Ok(Some(u64::deserialize(deserializer)?).filter(|count| *count != 0))
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
        Vec::<humantime_serde::Serde<Duration>>::deserialize(deserializer)
            .map(|durations| durations.into_iter().map(|d| d.into_inner()).collect())
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

/// JetStream keeps 1 to 5 replicas of a stream.
pub(crate) fn replicas_ok(field: &'static str, replicas: u16) -> Result<(), Error> {
    if (1..=5).contains(&replicas) {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!("{replicas}: JetStream keeps 1 to 5 replicas of a stream"),
        ))
    }
}

impl NatsConfig {
    /// The replicas of the stream the bus makes for `topic` (a partition: its topic's): the
    /// topic's own, else [`replicas`](Self::replicas).
    pub fn replicas_of(&self, topic: &str) -> u16 {
        self.topic(topic).replicas.unwrap_or(self.replicas)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
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
                    "credentials in a URL are refused: use nats.auth.token or nats.auth.user/nats.auth.password, which are kept secret",
                ));
            }
        }
        self.auth.method()?;
        if self.auth.user.as_ref().is_some_and(String::is_empty) {
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
        replicas_ok("nats.replicas", self.replicas)?;
        for stream in &self.streams {
            if let Some(replicas) = stream.replicas {
                replicas_ok("nats.streams.replicas", replicas)?;
            }
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
        for (topic, options) in &self.topics {
            validate_topic(topic)
                .map_err(|error| Error::config("nats.topics", error.to_string()))?;
            if let Some(replicas) = options.replicas {
                replicas_ok("nats.topics.replicas", replicas)?;
            }
            if let Some(durable) = &options.take_over_from {
                crate::names::validate_durable_name(durable).map_err(|error| {
                    Error::config("nats.topics.take_over_from", format!("{topic}: {error}"))
                })?;
                if options.partitions.is_some() || options.ephemeral {
                    return Err(Error::config(
                        "nats.topics.take_over_from",
                        format!(
                            "{topic}: a partitioned or ephemeral topic has no one durable to take over with"
                        ),
                    ));
                }
            }
            match options.partitions {
                Some(0) => {
                    return Err(Error::config(
                        "nats.topics.partitions",
                        format!("{topic}: at least 1"),
                    ));
                }
                Some(_) if options.ephemeral => {
                    return Err(Error::config(
                        "nats.topics.partitions",
                        format!("{topic}: an ephemeral topic has no stream to partition"),
                    ));
                }
                _ => {}
            }
            if let Some((partitioned, _)) = partition_parent(&self.topics, topic) {
                return Err(Error::config(
                    "nats.topics",
                    format!(
                        "{topic} is a partition subject of the partitioned topic {partitioned}"
                    ),
                ));
            }
        }
        if self.scale_out.pinned_ttl < Duration::from_secs(1) {
            return Err(Error::config(
                "nats.scale_out.pinned_ttl",
                "at least 1s (the age limit of the group's key-value bucket)",
            ));
        }
        if self.scale_out.pinned_ttl < self.consumer.fetch_expires * 2 {
            return Err(Error::config(
                "nats.scale_out.pinned_ttl",
                "must be at least twice nats.consumer.fetch_expires: a pinned instance pulls again only when its request expires",
            ));
        }
        positive("nats.take_over.idle", self.take_over.idle)?;
        positive("nats.take_over.grace", self.take_over.grace)?;
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
        Ok(())
    }

    /// The options of `topic` (defaults when it has none). A partition's subject
    /// (`{topic}.{n}`) has its topic's options.
    pub fn topic(&self, topic: &str) -> TopicOptions {
        let topic = self.partitioned(topic).map_or(topic, |(topic, _)| topic);
        self.topics.get(topic).cloned().unwrap_or_default()
    }

    /// The partitioned topic that `subject` is or is a partition of, with its partition count.
    pub(crate) fn partitioned<'a>(&'a self, subject: &'a str) -> Option<(&'a str, u16)> {
        partitioned(&self.topics, subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config = NatsConfig {
            auth: Auth::user_password("svc", "hunter2"),
            ..NatsConfig::default()
        };
        let dump = format!("{config:?}");
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("svc"));
        for auth in [
            Auth::token("tok-123"),
            Auth::nkey_seed("SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY"),
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
                    streams: vec![StreamDefinition::new("bad.name", vec!["a".into()])],
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
                    auth: Auth {
                        user: Some("svc".into()),
                        ..Auth::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.auth.user",
            ),
            (
                NatsConfig {
                    auth: Auth {
                        credentials_file: Some("svc.creds".into()),
                        ..Auth::token("t")
                    },
                    ..NatsConfig::default()
                },
                "nats.auth",
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
    fn a_takeover_without_one_durable_to_start_is_refused_by_field() {
        let taking_over = |durable: &str, partitions: Option<u16>, ephemeral: bool| NatsConfig {
            topics: [(
                "business.orders".to_owned(),
                TopicOptions {
                    take_over_from: Some(durable.to_owned()),
                    partitions,
                    ephemeral,
                    ..TopicOptions::default()
                },
            )]
            .into(),
            ..NatsConfig::default()
        };
        for config in [
            taking_over("business-consumer-unified_business_orders", Some(4), false),
            taking_over("business-consumer-unified_business_orders", None, true),
            taking_over("not.a.durable", None, false),
        ] {
            let refused = config.validate().expect_err("refused");
            assert!(
                refused.to_string().contains("nats.topics.take_over_from"),
                "{refused}"
            );
        }
        taking_over("business-consumer-unified_business_orders", None, false)
            .validate()
            .expect("one durable of one topic");
        let no_grace = NatsConfig {
            take_over: TakeOverSettings {
                grace: Duration::ZERO,
                ..TakeOverSettings::default()
            },
            ..NatsConfig::default()
        };
        let refused = no_grace.validate().expect_err("no grace");
        assert!(
            refused.to_string().contains("nats.take_over.grace"),
            "{refused}"
        );
    }

    #[test]
    fn partition_settings_that_cannot_work_are_refused_by_field() {
        let with_topics = |topics: &[(&str, TopicOptions)]| NatsConfig {
            topics: topics
                .iter()
                .map(|(name, options)| ((*name).to_owned(), options.clone()))
                .collect(),
            ..NatsConfig::default()
        };
        let partitions = |n| TopicOptions {
            partitions: Some(n),
            ..TopicOptions::default()
        };
        let cases = [
            (
                with_topics(&[("orders", partitions(0))]),
                "nats.topics.partitions",
            ),
            (
                with_topics(&[(
                    "presence",
                    TopicOptions {
                        partitions: Some(2),
                        ephemeral: true,
                        ..TopicOptions::default()
                    },
                )]),
                "nats.topics.partitions",
            ),
            // A wildcard is no topic, partitioned or not.
            (with_topics(&[("orders.*", partitions(2))]), "nats.topics"),
            (
                with_topics(&[("orders", partitions(3)), ("orders.1", partitions(2))]),
                "nats.topics",
            ),
            (
                NatsConfig {
                    scale_out: ScaleOutSettings {
                        pinned_ttl: Duration::from_millis(500),
                    },
                    consumer: ConsumerSettings {
                        fetch_expires: Duration::from_millis(100),
                        ..ConsumerSettings::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.scale_out.pinned_ttl",
            ),
            (
                NatsConfig {
                    scale_out: ScaleOutSettings {
                        pinned_ttl: Duration::from_secs(3),
                    },
                    consumer: ConsumerSettings {
                        fetch_expires: Duration::from_secs(2),
                        ..ConsumerSettings::default()
                    },
                    ..NatsConfig::default()
                },
                "nats.scale_out.pinned_ttl",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(Error::Config { field: named, .. }) => assert_eq!(named, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // `orders.10` is no partition of a topic with 3; `orders.01` is not written as one.
        let fine = with_topics(&[
            ("orders", partitions(3)),
            ("orders.10", TopicOptions::default()),
            ("orders.01", TopicOptions::default()),
        ]);
        assert!(fine.validate().is_ok());
        assert_eq!(fine.partitioned("orders.2"), Some(("orders", 3)));
        assert_eq!(fine.partitioned("orders"), Some(("orders", 3)));
        assert_eq!(fine.partitioned("orders.10"), None);
        assert_eq!(fine.partitioned("orders.01"), None);
    }

    #[test]
    fn replicas_outside_one_to_five_are_refused_and_a_topics_own_win() {
        let refused_field = |config: &NatsConfig| match config.validate() {
            Err(Error::Config { field, .. }) => field.to_string(),
            other => panic!("a Config error, not {other:?}"),
        };
        let mut config = NatsConfig {
            replicas: 3,
            ..NatsConfig::default()
        };
        config.topics.insert(
            "audit".into(),
            TopicOptions {
                replicas: Some(1),
                ..TopicOptions::default()
            },
        );
        config.validate().unwrap();
        assert_eq!(config.replicas_of("audit"), 1);
        assert_eq!(config.replicas_of("orders"), 3);
        for replicas in [0, 6] {
            let bad = NatsConfig {
                replicas,
                ..config.clone()
            };
            assert_eq!(refused_field(&bad), "nats.replicas", "{replicas}");
        }
        let mut bad = config.clone();
        bad.topics.insert(
            "audit".into(),
            TopicOptions {
                replicas: Some(7),
                ..TopicOptions::default()
            },
        );
        assert_eq!(refused_field(&bad), "nats.topics.replicas");
        let mut bad = config;
        let mut stream = StreamDefinition::new("S", vec!["s.>".into()]);
        stream.replicas = Some(0);
        bad.streams.push(stream);
        assert_eq!(refused_field(&bad), "nats.streams.replicas");
    }

    #[test]
    fn progress_acks_come_well_before_the_shortest_redelivery_timeout() {
        let mut consumer = ConsumerSettings::default();
        assert_eq!(consumer.progress_interval(), Duration::from_secs(10));
        consumer.backoff = vec![Duration::from_secs(3), Duration::from_secs(60)];
        assert_eq!(consumer.progress_interval(), Duration::from_secs(1));
    }

    #[test]
    fn configuration_text_reads_into_the_same_types_with_zero_as_unlimited() {
        let config: NatsConfig = toml::from_str(
            r#"
            urls = ["nats://a:4222"]
            auth = { token = "tok-1" }
            stream_limits = { max_age = "0s", max_msgs = 0 }
            [consumer]
            ack_wait = "10s"
            backoff = ["1s", "5s"]
            [[streams]]
            name = "ORDERS"
            subjects = ["orders.>"]
            limits = { max_bytes = 1024 }
            [topics."metrics.cpu"]
            storage = "memory"
            "#,
        )
        .unwrap();
        assert_eq!(config.auth, Auth::token("tok-1"));
        assert_eq!(
            config.stream_limits,
            StreamLimits {
                max_age: None,
                max_bytes: StreamLimits::default().max_bytes,
                max_msgs: None,
            }
        );
        assert_eq!(config.consumer.ack_wait, Duration::from_secs(10));
        assert_eq!(
            config.consumer.backoff,
            [Duration::from_secs(1), Duration::from_secs(5)]
        );
        assert_eq!(config.consumer.fetch_batch, 256);
        assert_eq!(config.streams[0].storage, Storage::File);
        assert_eq!(config.streams[0].limits.max_bytes, Some(1024));
        assert_eq!(
            config.streams[0].limits.max_age,
            StreamLimits::default().max_age
        );
        assert_eq!(config.topic("metrics.cpu").storage, Some(Storage::Memory));
        assert_eq!(config.dead_letter_limits, StreamLimits::dead_letters());
        config.validate().unwrap();

        let written = toml::to_string(&config).unwrap();
        assert!(!written.contains("tok-1"), "{written}");
        let unknown = toml::from_str::<NatsConfig>("token = \"x\"").unwrap_err();
        assert!(unknown.message().contains("unknown field"), "{unknown}");
    }
}
