//! The bus configuration: defaults, TOML or YAML files, `EVENTBUS_*` environment overrides.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use eventbus_core::Error;
use eventbus_core::RetryPolicy;
use eventbus_pool::{BusSettings, PoolConfig};
use serde::{Deserialize, Serialize};

/// The backend a [`Config`] selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Backend {
    /// In-process topics (cargo feature `memory`, on by default).
    #[default]
    Memory,
    /// NATS JetStream (cargo feature `nats`; the `[nats]` section).
    Nats,
    /// Apache Kafka (cargo feature `kafka`; the `[kafka]` section).
    Kafka,
}

impl Backend {
    /// The name used in configuration, metrics and health reports.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Nats => "nats",
            Backend::Kafka => "kafka",
        }
    }
}

/// Everything a bus is built from. Every field has a default (see [docs/configuration.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/configuration.md)), so
/// an empty file is a valid configuration.
///
/// ```
/// use eventbus::Config;
///
/// let config = Config::from_toml_str(r#"
///     type = "memory"
///     client_id = "billing"
///     [pool]
///     pool_size = 64
///     [retry]
///     initial_backoff = "250ms"
/// "#)?;
/// assert_eq!(config.pool.pool_size, 64);
/// assert_eq!(config.retry.initial_backoff, std::time::Duration::from_millis(250));
/// assert_eq!(config.pool.inbox_size, 1000); // default
///
/// // The same in code: every section has defaults to fill in the rest.
/// let built = Config {
///     client_id: "billing".into(),
///     pool: eventbus::PoolSection { pool_size: 64, ..Default::default() },
///     retry: eventbus::RetrySection {
///         initial_backoff: std::time::Duration::from_millis(250),
///         ..Default::default()
///     },
///     ..Default::default()
/// };
/// assert_eq!(built, config);
/// # Ok::<(), eventbus::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The backend. Default `memory`.
    #[serde(rename = "type")]
    pub backend: Backend,
    /// Names this service in metrics (`{type}_eventbus_{client_id}`) and to the broker.
    /// Default `eventbus`.
    pub client_id: String,
    /// The ordering engine.
    pub pool: PoolSection,
    /// Retries of envelope handlers.
    pub retry: RetrySection,
    /// How long `close` lets in-flight messages finish. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long one attempt of a handler may run, for subscriptions that set none
    /// (`SubscribeOptions::with_handler_timeout`). Default: no limit.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Option<Duration>,
    /// How long an aggregate's current job may go on before its lane counts as blocked
    /// (`lanes_blocked`, a `Degraded` engine in the health report). Default `60s`.
    #[serde(with = "humantime_serde")]
    pub lane_blocked_after: Duration,
    /// How many pipelined publishes (`start_publish*`) may wait for their acknowledgement at
    /// once; also how far a `publish_results` reader may fall behind. Default `10000`.
    pub publish_max_in_flight: usize,
    /// The Prometheus endpoint.
    pub metrics: MetricsSection,
    /// The NATS backend (cargo feature `nats`): [`eventbus_nats::NatsConfig`] as is.
    #[cfg(feature = "nats")]
    pub nats: eventbus_nats::NatsConfig,
    /// The Kafka backend (cargo feature `kafka`): [`eventbus_kafka::KafkaConfig`] as is.
    #[cfg(feature = "kafka")]
    pub kafka: eventbus_kafka::KafkaConfig,
}

/// `[pool]`: the ordering engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSection {
    /// Handlers running at most at once. Default 256.
    pub pool_size: usize,
    /// Messages queued at most per aggregate. Default 1000.
    pub inbox_size: usize,
    /// Panics one message may cause before it is poison. Default 3.
    pub max_restarts: u32,
}

/// `[retry]`: retries of envelope handlers, inside the aggregate's lane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySection {
    /// Attempts in all, the first included. Default 3.
    pub max_attempts: u32,
    /// Backoff after the first failure, doubled each time. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest backoff. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Serve `/metrics` on this address when the bus connects. Default: not served.
    pub listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: Backend::Memory,
            client_id: "eventbus".to_owned(),
            pool: PoolSection::default(),
            retry: RetrySection::default(),
            drain_timeout: Duration::from_secs(30),
            handler_timeout: None,
            lane_blocked_after: Duration::from_secs(60),
            publish_max_in_flight: 10_000,
            metrics: MetricsSection::default(),
            #[cfg(feature = "nats")]
            nats: eventbus_nats::NatsConfig::default(),
            #[cfg(feature = "kafka")]
            kafka: eventbus_kafka::KafkaConfig::default(),
        }
    }
}

impl Default for PoolSection {
    fn default() -> Self {
        let defaults = PoolConfig::default();
        Self {
            pool_size: defaults.pool_size,
            inbox_size: defaults.inbox_size,
            max_restarts: defaults.max_restarts,
        }
    }
}

impl Default for RetrySection {
    fn default() -> Self {
        let defaults = RetryPolicy::default();
        Self {
            max_attempts: defaults.max_attempts,
            initial_backoff: defaults.initial_backoff,
            max_backoff: defaults.max_backoff,
        }
    }
}

/// One environment override: its variable, the field it sets, and how.
/// The known variable a typo of `name` most likely meant: the nearest by edit distance after
/// `EVENTBUS_`, if within a third of that part's length (what a platform's own variables, such
/// as `EVENTBUS_SERVICE_HOST`, are not).
fn closest_variable(name: &str) -> Option<&'static str> {
    let suffix = |variable: &'static str| variable.strip_prefix("EVENTBUS_").unwrap_or(variable);
    let name = name.strip_prefix("EVENTBUS_").unwrap_or(name);
    let limit = name.len() / 3;
    OVERRIDES
        .iter()
        .map(|over| {
            (
                strsim::levenshtein(name, suffix(over.variable)),
                over.variable,
            )
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, variable)| variable)
}

struct Override {
    variable: &'static str,
    apply: fn(&mut Config, &str) -> Result<(), String>,
}

fn number<T: std::str::FromStr>(value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a valid number"))
}

fn duration(value: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(value.trim())
        .map_err(|error| format!("{value:?} is not a duration like 500ms or 30s: {error}"))
}

/// Every override: `EVENTBUS_` followed by the field's path with `.` as `_`, upper case.
const OVERRIDES: &[Override] = &[
    Override {
        variable: "EVENTBUS_TYPE",
        apply: |c, v| {
            c.backend = match v.trim() {
                "memory" => Backend::Memory,
                "nats" => Backend::Nats,
                "kafka" => Backend::Kafka,
                other => return Err(format!("{other:?} is not a backend (memory, nats, kafka)")),
            };
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_CLIENT_ID",
        apply: |c, v| {
            c.client_id = v.to_owned();
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_POOL_POOL_SIZE",
        apply: |c, v| {
            c.pool.pool_size = number(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_POOL_INBOX_SIZE",
        apply: |c, v| {
            c.pool.inbox_size = number(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_POOL_MAX_RESTARTS",
        apply: |c, v| {
            c.pool.max_restarts = number(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_RETRY_MAX_ATTEMPTS",
        apply: |c, v| {
            c.retry.max_attempts = number(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_RETRY_INITIAL_BACKOFF",
        apply: |c, v| {
            c.retry.initial_backoff = duration(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_RETRY_MAX_BACKOFF",
        apply: |c, v| {
            c.retry.max_backoff = duration(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_DRAIN_TIMEOUT",
        apply: |c, v| {
            c.drain_timeout = duration(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_HANDLER_TIMEOUT",
        apply: |c, v| {
            c.handler_timeout = Some(duration(v)?);
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_LANE_BLOCKED_AFTER",
        apply: |c, v| {
            c.lane_blocked_after = duration(v)?;
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_PUBLISH_MAX_IN_FLIGHT",
        apply: |c, v| {
            c.publish_max_in_flight = number(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_URLS",
        apply: |c, v| {
            c.nats.urls = v
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect();
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_AUTH_TOKEN",
        apply: |c, v| {
            c.nats.auth.token = Some(eventbus_core::Secret::new(v));
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_AUTH_USER",
        apply: |c, v| {
            c.nats.auth.user = Some(v.to_owned());
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_AUTH_PASSWORD",
        apply: |c, v| {
            c.nats.auth.password = Some(eventbus_core::Secret::new(v));
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_AUTH_NKEY_SEED",
        apply: |c, v| {
            c.nats.auth.nkey_seed = Some(eventbus_core::Secret::new(v));
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_AUTH_CREDENTIALS_FILE",
        apply: |c, v| {
            c.nats.auth.credentials_file = Some(v.trim().into());
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_PUBLISH_TIMEOUT",
        apply: |c, v| {
            c.nats.publish_timeout = duration(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_CONSUMER_ACK_WAIT",
        apply: |c, v| {
            c.nats.consumer.ack_wait = duration(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_CONSUMER_MAX_DELIVER",
        apply: |c, v| {
            c.nats.consumer.max_deliver = number(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_CONSUMER_MAX_ACK_PENDING",
        apply: |c, v| {
            c.nats.consumer.max_ack_pending = number(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_REPLICAS",
        apply: |c, v| {
            c.nats.replicas = number(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "nats")]
    Override {
        variable: "EVENTBUS_NATS_SCALE_OUT_PINNED_TTL",
        apply: |c, v| {
            c.nats.scale_out.pinned_ttl = duration(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_BOOTSTRAP_SERVERS",
        apply: |c, v| {
            c.kafka.bootstrap_servers = v
                .split(',')
                .map(str::trim)
                .filter(|server| !server.is_empty())
                .map(str::to_owned)
                .collect();
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_GROUP_ID",
        apply: |c, v| {
            c.kafka.group_id = Some(v.trim().to_owned()).filter(|group| !group.is_empty());
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_AUTO_OFFSET_RESET",
        apply: |c, v| {
            c.kafka.auto_offset_reset = match v.trim() {
                "earliest" => eventbus_kafka::OffsetReset::Earliest,
                "latest" => eventbus_kafka::OffsetReset::Latest,
                other => return Err(format!("{other:?} is not earliest or latest")),
            };
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_PUBLISH_TIMEOUT",
        apply: |c, v| {
            c.kafka.publish_timeout = duration(v)?;
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_SASL_USERNAME",
        apply: |c, v| {
            c.kafka
                .properties
                .0
                .insert("sasl.username".to_owned(), v.to_owned());
            Ok(())
        },
    },
    #[cfg(feature = "kafka")]
    Override {
        variable: "EVENTBUS_KAFKA_SASL_PASSWORD",
        apply: |c, v| {
            c.kafka
                .properties
                .0
                .insert("sasl.password".to_owned(), v.to_owned());
            Ok(())
        },
    },
    Override {
        variable: "EVENTBUS_METRICS_LISTEN",
        apply: |c, v| {
            c.metrics.listen = if v.trim().is_empty() {
                None
            } else {
                Some(
                    v.trim()
                        .parse()
                        .map_err(|_| format!("{v:?} is not an address like 127.0.0.1:9898"))?,
                )
            };
            Ok(())
        },
    },
];

impl Config {
    /// The names of every environment override, in documentation order.
    pub fn environment_variables() -> impl Iterator<Item = &'static str> {
        OVERRIDES.iter().map(|o| o.variable)
    }

    /// Reads TOML. Unknown keys are errors (a typo must not pass silently).
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|error| {
            Error::config(
                "toml",
                error.message().to_owned() + &location(text, error.span()),
            )
        })
    }

    /// Reads YAML. Unknown keys are errors.
    pub fn from_yaml_str(text: &str) -> Result<Self, Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        yaml_serde::from_str(text).map_err(|error| Error::config("yaml", error.to_string()))
    }

    /// Reads a `.toml`, `.yaml` or `.yml` file. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let parse: fn(&str) -> Result<Self, Error> = match path.extension().and_then(|e| e.to_str())
        {
            Some("toml") => Self::from_toml_str,
            Some("yaml" | "yml") => Self::from_yaml_str,
            _ => {
                return Err(Error::config(
                    &shown,
                    "unknown format: the file name must end in .toml, .yaml or .yml",
                ));
            }
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| Error::config(&shown, format!("cannot read it: {error}")))?;
        let parsed = parse(&text);
        parsed.map_err(|error| match error {
            Error::Config { reason, .. } => Error::config(&shown, reason),
            other => other,
        })
    }

    /// Applies `EVENTBUS_*` overrides from `variables` (usually `std::env::vars()`). An
    /// `EVENTBUS_` variable that is not an override is ignored with a warning (a `tracing`
    /// event naming the closest known variable, so a typo shows): platforms write such
    /// variables themselves (Kubernetes injects `EVENTBUS_SERVICE_HOST`, `EVENTBUS_PORT`, ...
    /// into every pod of a namespace with a Service named `eventbus`), and they must not stop
    /// the service. A known variable with a bad value is an error.
    pub fn with_overrides(
        mut self,
        variables: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        for (name, value) in variables {
            if !name.starts_with("EVENTBUS_") {
                continue;
            }
            let Some(over) = OVERRIDES.iter().find(|o| o.variable == name) else {
                match closest_variable(&name) {
                    Some(closest) => tracing::warn!(
                        variable = %name,
                        closest,
                        "unknown EVENTBUS_ variable ignored; did you mean {closest}? (docs/configuration.md)"
                    ),
                    None => tracing::warn!(
                        variable = %name,
                        "unknown EVENTBUS_ variable ignored (docs/configuration.md)"
                    ),
                }
                continue;
            };
            (over.apply)(&mut self, &value).map_err(|reason| Error::config(&name, reason))?;
        }
        Ok(self)
    }

    /// Defaults, then `file` if given, then the process environment; validated.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        let config = match file {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        let config = config.with_overrides(std::env::vars())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        self.bus_settings().validate()?;
        #[cfg(feature = "nats")]
        if self.backend == Backend::Nats {
            self.nats.validate()?;
        }
        #[cfg(feature = "kafka")]
        if self.backend == Backend::Kafka {
            self.kafka.validate()?;
        }
        Ok(())
    }

    /// The settings every backend shares, computed once from this config: client ID, metric
    /// namespace, engine, drain timeout.
    pub fn bus_settings(&self) -> BusSettings {
        BusSettings {
            client_id: self.client_id.clone(),
            metrics_namespace: self.metrics_namespace(),
            pool: self.pool_config(),
            settlement: eventbus_core::Backoff::default(),
            drain_timeout: self.drain_timeout,
            handler_timeout: self.handler_timeout,
            lane_blocked_after: self.lane_blocked_after,
            publish_max_in_flight: self.publish_max_in_flight,
        }
    }

    /// What the configuration says each of its backend's configured topics should be, for
    /// [`TopicAdmin::ensure_topic`](eventbus_core::TopicAdmin::ensure_topic) (and `eventbus topics
    /// ensure`): Kafka's `[kafka.topics."t"]` over `[kafka.topic_defaults]` (partitions,
    /// replication factor, retention), NATS's
    /// `[nats.topics."t"]` (storage, partitions, replicas; ephemeral topics have no stream and
    /// are left out). The memory backend has none.
    pub fn topic_specs(&self) -> Vec<eventbus_core::TopicSpec> {
        match self.backend {
            Backend::Memory => Vec::new(),
            #[cfg(feature = "kafka")]
            Backend::Kafka => self
                .kafka
                .topics
                .keys()
                .map(|name| {
                    // The topic's own options over `topic_defaults`; a dead-letter topic keeps
                    // its records for ever unless it names a retention itself.
                    let mut options = self.kafka.topic(name);
                    if name.ends_with(eventbus_core::DEAD_LETTER_SUFFIX) {
                        options.retention =
                            self.kafka.topics.get(name).and_then(|own| own.retention);
                    }
                    let mut spec = eventbus_core::TopicSpec::new(name);
                    spec.partitions = options
                        .partitions
                        .and_then(|partitions| u32::try_from(partitions).ok());
                    spec.replicas = options
                        .replication_factor
                        .and_then(|replicas| u16::try_from(replicas).ok());
                    spec.retention = options.retention;
                    spec
                })
                .collect(),
            #[cfg(feature = "nats")]
            Backend::Nats => self
                .nats
                .topics
                .iter()
                .filter(|(_, options)| !options.ephemeral)
                .map(|(name, options)| {
                    let mut spec = eventbus_core::TopicSpec::new(name);
                    spec.partitions = Some(options.partitions.map_or(1, u32::from));
                    spec.storage = options.storage.map(|storage| match storage {
                        eventbus_nats::Storage::File => eventbus_core::TopicStorage::File,
                        eventbus_nats::Storage::Memory => eventbus_core::TopicStorage::Memory,
                    });
                    // The topic's own replicas only: a stream is made with `nats.replicas`
                    // when the topic names none, but an existing one is never set to the
                    // bus-wide value (it would lower an R5 stream, or a stream shared with other
                    // topics, to it).
                    spec.replicas = options.replicas;
                    spec
                })
                .collect(),
            #[allow(unreachable_patterns)]
            _ => Vec::new(),
        }
    }

    /// The engine configuration this config describes.
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            pool_size: self.pool.pool_size,
            inbox_size: self.pool.inbox_size,
            max_restarts: self.pool.max_restarts,
            retry: RetryPolicy::new()
                .with_max_attempts(self.retry.max_attempts)
                .with_backoff(self.retry.initial_backoff, self.retry.max_backoff),
        }
    }

    /// The metric namespace of the bus this config describes: `{type}_eventbus_{client_id}`.
    pub fn metrics_namespace(&self) -> String {
        eventbus_core::metric_namespace(self.backend.name(), &self.client_id)
    }
}

/// ` at line L, column C` for a byte span of `text`.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(" (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::closest_variable;

    #[test]
    fn a_typo_is_matched_to_the_closest_known_variable() {
        assert_eq!(
            closest_variable("EVENTBUS_CLIENTID"),
            Some("EVENTBUS_CLIENT_ID")
        );
        assert_eq!(
            closest_variable("EVENTBUS_DRAIN_TIMOUT"),
            Some("EVENTBUS_DRAIN_TIMEOUT")
        );
    }

    #[test]
    fn what_a_platform_writes_is_no_typo_of_anything() {
        for name in [
            "EVENTBUS_SERVICE_HOST",
            "EVENTBUS_SERVICE_PORT",
            "EVENTBUS_PORT",
            "EVENTBUS_PORT_4222_TCP",
            "EVENTBUS_PORT_4222_TCP_PROTO",
            "EVENTBUS_PORT_4222_TCP_ADDR",
        ] {
            assert_eq!(closest_variable(name), None, "{name}");
        }
    }
}
