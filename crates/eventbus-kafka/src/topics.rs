//! Topic management: making a topic what a [`TopicSpec`] says (partitions, replication factor,
//! retention), as far as an [`EnsureMode`] allows.

use std::collections::BTreeMap;
use std::time::Duration;

use eventbus_core::{EnsureMode, Error, TopicMismatch, TopicReport, TopicSpec, TopicStorage};
use rdkafka::admin::{
    AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer as _;

use crate::partition::lock;
use crate::producer::Publisher;

/// How long an admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A topic as the cluster has it.
struct Described {
    partitions: u32,
    replicas: u16,
    /// `retention.ms` as a duration (`ZERO` for -1, for ever), and the topic's own settings
    /// (kept when retention is changed: Kafka's AlterConfigs replaces them all).
    retention: Option<Duration>,
    own: BTreeMap<String, String>,
}

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(ADMIN_TIMEOUT))
        .operation_timeout(Some(ADMIN_TIMEOUT))
}

fn admin_error(what: String, code: RDKafkaErrorCode) -> Error {
    Error::broker(what, KafkaError::AdminOp(code))
}

/// `retention.ms` for a retention (`ZERO`: -1, for ever).
fn retention_ms(retention: Duration) -> String {
    if retention.is_zero() {
        "-1".to_owned()
    } else {
        retention.as_millis().to_string()
    }
}

impl Publisher {
    /// The topic as the cluster has it; `None` when it does not exist.
    async fn describe(&self, topic: &str) -> Result<Option<Described>, Error> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        // Metadata of every topic: asking for one by name may create it (auto.create.topics).
        let shape = tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(None, ADMIN_TIMEOUT)?;
            Ok::<_, KafkaError>(
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == name)
                    .map(|t| {
                        let replicas = t.partitions().first().map_or(0, |p| p.replicas().len());
                        (
                            u32::try_from(t.partitions().len()).unwrap_or(u32::MAX),
                            u16::try_from(replicas).unwrap_or(u16::MAX),
                        )
                    }),
            )
        })
        .await
        .map_err(|error| Error::broker("topic metadata lookup ended", error))?
        .map_err(|error| Error::broker(format!("cannot read the metadata of {topic}"), error))?;
        let Some((partitions, replicas)) = shape else {
            return Ok(None);
        };
        let configs = self
            .admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &admin_options())
            .await
            .map_err(|error| Error::broker(format!("cannot describe {topic}"), error))?;
        let mut retention = None;
        let mut own = BTreeMap::new();
        for resource in configs {
            let resource =
                resource.map_err(|code| admin_error(format!("cannot describe {topic}"), code))?;
            for entry in &resource.entries {
                if entry.name == "retention.ms" {
                    retention = entry
                        .value
                        .as_deref()
                        .and_then(|value| value.parse::<i64>().ok())
                        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
                }
                if matches!(entry.source, ConfigSource::DynamicTopic)
                    && let Some(value) = &entry.value
                {
                    own.insert(entry.name.clone(), value.clone());
                }
            }
        }
        Ok(Some(Described {
            partitions,
            replicas,
            retention,
            own,
        }))
    }

    /// Makes `spec.name` what `spec` says as far as `mode` allows (see
    /// [`TopicAdmin::ensure_topic`](eventbus_core::TopicAdmin::ensure_topic)). Kafka can add
    /// partitions and change retention; the replication factor is fixed once created, and
    /// storage is always `File`.
    ///
    /// # Cancel safety
    ///
    /// A dropped call may leave a topic created or partly updated (librdkafka completes an
    /// admin request it has sent), which the next call reports or finishes.
    pub(crate) async fn ensure_spec(
        &self,
        spec: &TopicSpec,
        mode: EnsureMode,
    ) -> Result<TopicReport, Error> {
        let topic = spec.name.as_str();
        let mut report = TopicReport::default();
        if let Some(mismatch) = TopicMismatch::compare("storage", spec.storage, TopicStorage::File)
        {
            report.mismatches.push(mismatch);
        }
        let Some(described) = self.describe(topic).await? else {
            if mode == EnsureMode::ValidateOnly {
                report.mismatches.push(TopicMismatch::missing());
                return Ok(report);
            }
            self.create(spec).await?;
            report.created = true;
            return Ok(report);
        };
        lock(&self.known).insert(topic.to_owned());
        let update = mode.updates();
        if let Some(mut mismatch) =
            TopicMismatch::compare("partitions", spec.partitions, described.partitions)
        {
            let wanted = spec.partitions.unwrap_or_default();
            let refused = update
                && wanted > described.partitions
                && mode != EnsureMode::CreateOrUpdateAllowingRepartition
                && self.holds_records(topic, described.partitions).await?;
            if refused {
                tracing::warn!(
                    topic,
                    wanted,
                    partitions = described.partitions,
                    "partitions not added: the topic holds records"
                );
                mismatch.actual = format!(
                    "{}; not changed: the topic holds records, and more partitions move \
                     aggregates to other partitions, where their next events can be consumed \
                     before the ones still waiting (EnsureMode::CreateOrUpdateAllowingRepartition, \
                     `topics ensure --mode create-or-update-allowing-repartition`, asks for it)",
                    mismatch.actual
                );
                report.mismatches.push(mismatch);
            } else if update && wanted > described.partitions {
                let grow = NewPartitions::new(topic, usize::try_from(wanted).unwrap_or(usize::MAX));
                for result in self
                    .admin
                    .create_partitions([&grow], &admin_options())
                    .await
                    .map_err(|error| {
                        Error::broker(format!("cannot add partitions to {topic}"), error)
                    })?
                {
                    result.map_err(|(_, code)| {
                        admin_error(format!("cannot add partitions to {topic}"), code)
                    })?;
                }
                report.updated.push(mismatch);
            } else {
                report.mismatches.push(mismatch);
            }
        }
        if let Some(mismatch) =
            TopicMismatch::compare("replicas", spec.replicas, described.replicas)
        {
            report.mismatches.push(mismatch);
        }
        if let Some(wanted) = spec.retention
            && described.retention != Some(wanted)
        {
            let mismatch = TopicMismatch {
                field: "retention",
                wanted: format!("{wanted:?}"),
                actual: described
                    .retention
                    .map_or_else(|| "unknown".to_owned(), |actual| format!("{actual:?}")),
            };
            if update {
                let mut own = described.own.clone();
                own.insert("retention.ms".to_owned(), retention_ms(wanted));
                let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
                for (name, value) in &own {
                    alter = alter.set(name, value);
                }
                for result in self
                    .admin
                    .alter_configs([&alter], &admin_options())
                    .await
                    .map_err(|error| Error::broker(format!("cannot change {topic}"), error))?
                {
                    result
                        .map_err(|(_, code)| admin_error(format!("cannot change {topic}"), code))?;
                }
                report.updated.push(mismatch);
            } else {
                report.mismatches.push(mismatch);
            }
        }
        Ok(report)
    }

    /// Whether any of the `partitions` of `topic` holds a record (its end offset above its
    /// start offset).
    async fn holds_records(&self, topic: &str, partitions: u32) -> Result<bool, Error> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
                let (low, high) =
                    producer
                        .client()
                        .fetch_watermarks(&name, partition, ADMIN_TIMEOUT)?;
                if high > low {
                    return Ok(true);
                }
            }
            Ok::<_, KafkaError>(false)
        })
        .await
        .map_err(|error| Error::broker("watermark lookup ended", error))?
        .map_err(|error| Error::broker(format!("cannot read the offsets of {topic}"), error))
    }

    async fn create(&self, spec: &TopicSpec) -> Result<(), Error> {
        let topic = spec.name.as_str();
        let partitions = spec.partitions.map_or(-1, |partitions| {
            i32::try_from(partitions).unwrap_or(i32::MAX)
        });
        let replication = TopicReplication::Fixed(spec.replicas.map_or(-1, i32::from));
        // A dead-letter topic keeps its records for ever unless the spec says otherwise, as
        // when the bus makes it.
        let retention = match spec.retention {
            Some(retention) => Some(retention_ms(retention)),
            None if topic.ends_with(eventbus_core::DEAD_LETTER_SUFFIX) => Some("-1".to_owned()),
            None => None,
        };
        let mut new = NewTopic::new(topic, partitions, replication);
        if let Some(retention) = &retention {
            new = new.set("retention.ms", retention);
        }
        // Not a field of the spec (NATS has no such setting): the configuration's, as when the
        // bus makes the topic on first use.
        let min_insync = self
            .config
            .topic(topic)
            .min_insync_replicas
            .map(|n| n.to_string());
        if let Some(min_insync) = &min_insync {
            new = new.set("min.insync.replicas", min_insync);
        }
        for result in self
            .admin
            .create_topics([&new], &admin_options())
            .await
            .map_err(|error| Error::broker(format!("cannot create Kafka topic {topic}"), error))?
        {
            match result {
                // Made meanwhile by someone else: the next call compares it.
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(admin_error(
                        format!("cannot create Kafka topic {topic}"),
                        code,
                    ));
                }
            }
        }
        lock(&self.known).insert(topic.to_owned());
        tracing::info!(topic, ?spec, "Kafka topic created");
        Ok(())
    }
}
