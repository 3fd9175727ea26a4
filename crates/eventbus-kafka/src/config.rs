//! Configuration of the Kafka bus: brokers, group, commits, producer, topics, and any
//! librdkafka property.
//!
//! Every type here is also the `[kafka]` section of the facade's configuration file: serde reads
//! it with defaults for what is missing and refuses unknown keys; durations are written like
//! `"10s"`.

use std::collections::BTreeMap;
use std::time::Duration;

use eventbus_core::{Error, validate_topic};
use serde::{Deserialize, Serialize};

/// The consumer group protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    /// The classic protocol (JoinGroup/SyncGroup), with the client-side
    /// [`assignment_strategy`](KafkaConfig::assignment_strategy). Every Kafka broker serves it,
    /// and it is the one a group shared with other clients (the Go services' sarama) must use.
    #[default]
    Classic,
    /// The consumer group protocol of KIP-848 (`group.protocol=consumer`): the broker assigns
    /// partitions, incrementally. Kafka 4 brokers serve it.
    Consumer,
}

/// How the classic protocol spreads partitions over the group's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AssignmentStrategy {
    /// Incremental (cooperative) rebalancing: a rebalance revokes only the partitions that move;
    /// the others keep running.
    #[default]
    CooperativeSticky,
    /// Eager range assignment (sarama's default): every rebalance revokes every partition.
    Range,
    /// Eager round-robin assignment.
    Roundrobin,
}

impl AssignmentStrategy {
    /// The librdkafka value of `partition.assignment.strategy`.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            AssignmentStrategy::CooperativeSticky => "cooperative-sticky",
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::Roundrobin => "roundrobin",
        }
    }
}

/// Where a new consumer group starts reading a partition that has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// At the oldest record kept (nothing published before the first subscription is missed).
    #[default]
    Earliest,
    /// At the next record published.
    Latest,
}

/// Which partition a keyed record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioner {
    /// librdkafka's default: CRC32 of the key (records without a key spread at random).
    #[default]
    ConsistentRandom,
    /// The Java client's: murmur2 of the key.
    Murmur2Random,
    /// The Go services' (sarama's `NewHashPartitioner`): FNV-1a 32-bit of the key as a signed
    /// integer, remainder by the partition count, absolute value. A Go and a Rust producer then
    /// put one aggregate on one partition.
    Sarama,
}

impl Partitioner {
    /// The librdkafka value of `partitioner`. librdkafka's `fnv1a_random` takes the absolute
    /// value before the remainder, which gives the same partition as sarama's order of steps.
    pub fn librdkafka_name(self) -> &'static str {
        match self {
            Partitioner::ConsistentRandom => "consistent_random",
            Partitioner::Murmur2Random => "murmur2_random",
            Partitioner::Sarama => "fnv1a_random",
        }
    }
}

/// How a topic is created when it does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicOptions {
    /// Partitions; unset uses the broker's `num.partitions`.
    pub partitions: Option<i32>,
    /// Replicas of each partition; unset uses the broker's `default.replication.factor`.
    pub replication_factor: Option<i16>,
    /// How long records are kept (`retention.ms`); unset uses the broker's default.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// The in-sync replicas a write with `acks=all` (the bus's) needs
    /// (`min.insync.replicas`); unset uses the broker's default. On a cluster with a
    /// replication factor of 3, 2 lets one broker be down without losing an acknowledged
    /// record or refusing publishes.
    pub min_insync_replicas: Option<i16>,
}

/// librdkafka properties passed through as they are (SASL, SSL, timeouts, ...). Values of
/// properties that hold secrets (a name with `password`, `secret`, `jaas`, `token`, or a PEM
/// key) never show in `Debug` output or serialized configuration.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, String>);

impl Properties {
    /// True when the value of property `name` is a secret.
    pub fn is_secret(name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        [
            "password",
            "secret",
            "jaas",
            "token",
            "key.pem",
            "oauthbearer.config",
        ]
        .iter()
        .any(|part| name.contains(part))
    }

    fn shown(&self) -> BTreeMap<&str, &str> {
        self.0
            .iter()
            .map(|(name, value)| {
                let value = if Self::is_secret(name) { "***" } else { value };
                (name.as_str(), value)
            })
            .collect()
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.shown().serialize(serializer)
    }
}

/// Configuration of a [`KafkaBus`](crate::KafkaBus): what only Kafka needs. The settings every
/// backend shares (client ID, engine, drain timeout, metric namespace) come separately, as an
/// [`eventbus_pool::BusSettings`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Brokers to bootstrap from (`bootstrap.servers`). Default `127.0.0.1:9092`.
    pub bootstrap_servers: Vec<String>,
    /// The consumer group of the bus; unset uses the client ID. Every instance of a service
    /// uses the same group, so that they share the partitions.
    pub group_id: Option<String>,
    /// The group protocol. Default classic.
    pub group_protocol: GroupProtocol,
    /// The classic protocol's assignment strategy. Default cooperative-sticky.
    pub assignment_strategy: AssignmentStrategy,
    /// Where a group without a committed offset starts. Default earliest.
    pub auto_offset_reset: OffsetReset,
    /// How often the offsets of finished records are committed (also on revoke and close).
    /// Default 1 s.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Records of one partition handed to the engine and not finished, at most: at this many
    /// the partition is paused (polling goes on), and resumed at half. Records finished behind
    /// an unfinished one do not count and take no memory (the commit tracker keeps only the
    /// unfinished ones), so a hung aggregate holds its own records, and the partition's other
    /// aggregates go on. Default 10,000: what is
    /// left when a partition resumes must last until its next records arrive (librdkafka drops
    /// what it had prefetched for a paused partition and fetches again, tens of milliseconds),
    /// or the lanes run dry on every resume; with 1,000, the ordered consume ran at 18 k/s
    /// instead of 60–110 k/s. Held records are in memory: about this many payloads per
    /// assigned partition at most.
    pub max_in_flight_per_partition: usize,
    /// How long a publish waits for the broker's acknowledgement (`message.timeout.ms`).
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Which partition a keyed record goes to. Default librdkafka's (`consistent_random`).
    pub partitioner: Partitioner,
    /// How topics this bus creates are made (a topic it publishes to or subscribes to that does
    /// not exist yet, dead-letter topics included).
    pub topic_defaults: TopicOptions,
    /// Options per topic, over `topic_defaults`.
    pub topics: BTreeMap<String, TopicOptions>,
    /// librdkafka properties for both the consumer and the producer.
    pub properties: Properties,
    /// librdkafka properties for the consumer only.
    pub consumer_properties: Properties,
    /// librdkafka properties for the producer only.
    pub producer_properties: Properties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: vec!["127.0.0.1:9092".to_owned()],
            group_id: None,
            group_protocol: GroupProtocol::default(),
            assignment_strategy: AssignmentStrategy::default(),
            auto_offset_reset: OffsetReset::default(),
            commit_interval: Duration::from_secs(1),
            max_in_flight_per_partition: 10_000,
            publish_timeout: Duration::from_secs(10),
            partitioner: Partitioner::default(),
            topic_defaults: TopicOptions::default(),
            topics: BTreeMap::new(),
            properties: Properties::default(),
            consumer_properties: Properties::default(),
            producer_properties: Properties::default(),
        }
    }
}

/// librdkafka properties the bus's consumer starts from, before
/// [`properties`](KafkaConfig::properties) and
/// [`consumer_properties`](KafkaConfig::consumer_properties), which may override them:
///
/// - `fetch.wait.max.ms` = 50: a fetch the broker holds while every partition is paused would
///   otherwise delay the first records after a resume by up to librdkafka's default 500 ms.
/// - `fetch.queue.backoff.ms` = 10: when librdkafka's prefetch queue is over
///   `queued.min.messages` or `queued.max.messages.kbytes` (a backlog), it waits this long
///   before fetching for the partition again. Its default, 1 s, stalls a consumer that drains
///   the queue faster than that: 0.6 s of nothing at each refill while reading a 200,000-record
///   backlog ([docs/benchmarks.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/benchmarks.md)). Lower values cost a little CPU while the queue is full.
pub const CONSUMER_DEFAULTS: [(&str, &str); 2] = [
    ("fetch.wait.max.ms", "50"),
    ("fetch.queue.backoff.ms", "10"),
];

/// Properties the bus sets itself: passing them through would break what it promises.
const OWNED_PROPERTIES: [&str; 6] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "acks",
    "group.id",
    "bootstrap.servers",
];

impl KafkaConfig {
    /// The librdkafka properties a consumer of this configuration is tuned with, in the order
    /// they apply (a later one wins): [`CONSUMER_DEFAULTS`], then
    /// [`properties`](Self::properties), then [`consumer_properties`](Self::consumer_properties).
    pub fn consumer_tuning(&self) -> impl Iterator<Item = (&str, &str)> {
        let configured = self.properties.0.iter().chain(&self.consumer_properties.0);
        CONSUMER_DEFAULTS
            .into_iter()
            .chain(configured.map(|(name, value)| (name.as_str(), value.as_str())))
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        if self.bootstrap_servers.is_empty()
            || self
                .bootstrap_servers
                .iter()
                .any(|server| server.trim().is_empty() || server.contains(char::is_whitespace))
        {
            return Err(Error::config(
                "kafka.bootstrap_servers",
                "needs at least one host:port, without spaces",
            ));
        }
        if self
            .group_id
            .as_ref()
            .is_some_and(|group| group.trim().is_empty())
        {
            return Err(Error::config("kafka.group_id", "must not be empty"));
        }
        if self.commit_interval.is_zero() {
            return Err(Error::config(
                "kafka.commit_interval",
                "must be longer than 0",
            ));
        }
        if self.publish_timeout < Duration::from_millis(1) {
            return Err(Error::config(
                "kafka.publish_timeout",
                "must be at least 1 ms",
            ));
        }
        if self.max_in_flight_per_partition == 0 {
            return Err(Error::config(
                "kafka.max_in_flight_per_partition",
                "must be at least 1",
            ));
        }
        for (field, options) in std::iter::once(("kafka.topic_defaults", &self.topic_defaults))
            .chain(
                self.topics
                    .values()
                    .map(|options| ("kafka.topics", options)),
            )
        {
            if options.partitions.is_some_and(|n| n < 1) {
                return Err(Error::config(field, "partitions must be at least 1"));
            }
            if options.replication_factor.is_some_and(|n| n < 1) {
                return Err(Error::config(
                    field,
                    "replication_factor must be at least 1",
                ));
            }
            if options.retention.is_some_and(|age| age.is_zero()) {
                return Err(Error::config(field, "retention must be longer than 0"));
            }
            if options.min_insync_replicas.is_some_and(|n| n < 1) {
                return Err(Error::config(
                    field,
                    "min_insync_replicas must be at least 1",
                ));
            }
        }
        for topic in self.topics.keys() {
            validate_topic(topic)
                .map_err(|error| Error::config("kafka.topics", error.to_string()))?;
        }
        for (field, properties) in [
            ("kafka.properties", &self.properties),
            ("kafka.consumer_properties", &self.consumer_properties),
            ("kafka.producer_properties", &self.producer_properties),
        ] {
            if let Some(owned) = properties
                .0
                .keys()
                .find(|name| OWNED_PROPERTIES.contains(&name.as_str()))
            {
                return Err(Error::config(
                    field,
                    format!("{owned} is set by the bus (see docs/kafka.md); use the named setting"),
                ));
            }
        }
        Ok(())
    }

    /// The options of `topic`: its own over `topic_defaults`.
    pub fn topic(&self, topic: &str) -> TopicOptions {
        let own = self.topics.get(topic).copied().unwrap_or_default();
        let defaults = self.topic_defaults;
        TopicOptions {
            partitions: own.partitions.or(defaults.partitions),
            replication_factor: own.replication_factor.or(defaults.replication_factor),
            retention: own.retention.or(defaults.retention),
            min_insync_replicas: own.min_insync_replicas.or(defaults.min_insync_replicas),
        }
    }

    /// The consumer group: `group_id`, or the client ID.
    pub fn group<'a>(&'a self, client_id: &'a str) -> &'a str {
        self.group_id.as_deref().unwrap_or(client_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(config: KafkaConfig) -> String {
        match config.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        KafkaConfig::default().validate().unwrap();
        assert_eq!(
            field(KafkaConfig {
                bootstrap_servers: vec![],
                ..KafkaConfig::default()
            }),
            "kafka.bootstrap_servers"
        );
        assert_eq!(
            field(KafkaConfig {
                commit_interval: Duration::ZERO,
                ..KafkaConfig::default()
            }),
            "kafka.commit_interval"
        );
        let mut owned = KafkaConfig::default();
        owned
            .consumer_properties
            .0
            .insert("enable.auto.commit".into(), "true".into());
        assert_eq!(field(owned), "kafka.consumer_properties");
        let mut zero = KafkaConfig::default();
        zero.topics.insert(
            "orders".into(),
            TopicOptions {
                partitions: Some(0),
                ..TopicOptions::default()
            },
        );
        assert_eq!(field(zero), "kafka.topics");
    }

    #[test]
    fn secret_properties_never_show_in_debug_or_serialized_output() {
        let mut config = KafkaConfig::default();
        config
            .properties
            .0
            .insert("sasl.password".into(), "hunter2".into());
        config
            .properties
            .0
            .insert("sasl.username".into(), "svc".into());
        let dump = format!("{config:?} {}", toml::to_string(&config).unwrap());
        assert!(!dump.contains("hunter2"), "{dump}");
        assert!(dump.contains("svc"));
    }

    #[test]
    fn configuration_text_reads_into_the_same_types() {
        let config: KafkaConfig = toml::from_str(
            r#"
            bootstrap_servers = ["k1:9092", "k2:9092"]
            group_protocol = "consumer"
            assignment_strategy = "range"
            auto_offset_reset = "latest"
            commit_interval = "250ms"
            partitioner = "sarama"
            topic_defaults = { partitions = 8 }
            [topics.orders]
            retention = "7days"
            [properties]
            "security.protocol" = "SASL_SSL"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.group_protocol, GroupProtocol::Consumer);
        assert_eq!(config.assignment_strategy, AssignmentStrategy::Range);
        assert_eq!(config.auto_offset_reset, OffsetReset::Latest);
        assert_eq!(config.commit_interval, Duration::from_millis(250));
        assert_eq!(config.partitioner.librdkafka_name(), "fnv1a_random");
        let orders = config.topic("orders");
        assert_eq!(orders.partitions, Some(8));
        assert_eq!(orders.retention, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(config.topic("other").retention, None);
        assert!(toml::from_str::<KafkaConfig>("brokers = []").is_err());
    }
}
