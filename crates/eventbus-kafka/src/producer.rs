//! Publishing: an idempotent producer that waits for each record's acknowledgement, topics
//! created on first use, and the runtime's dead-letter writer.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use eventbus_core::{DeadLetterStore, Error, OutboundMessage, Position, async_trait};
use eventbus_pool::transport::{AckFuture, DeadLetterWriter, Outgoing};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::partition::lock;

/// How long a publish waits before it tries librdkafka's full queue again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(100);

/// The producer side of the bus, shared with the runtime as its [`Transport`].
pub(crate) struct Publisher {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer,
    pub(crate) admin: AdminClient<DefaultClientContext>,
    /// Topics known to exist (created here or found).
    pub(crate) known: Mutex<HashSet<String>>,
    /// The bus's client ID (its dead-letter reader's name).
    pub(crate) client_id: String,
}

/// The librdkafka configuration both clients start from.
pub(crate) fn base_config(config: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", config.bootstrap_servers.join(","))
        .set("client.id", client_id);
    for (name, value) in &config.properties.0 {
        client.set(name, value);
    }
    client
}

fn broker_error(what: &str, error: KafkaError) -> Error {
    Error::broker(what.to_owned(), error)
}

/// The position a delivery report gives a record, or an error when it gives none.
///
/// librdkafka reports a batch the broker refused as a duplicate (`DUPLICATE_SEQUENCE_NUMBER`)
/// as delivered, with no offset, on the assumption that an earlier attempt stored it. That
/// assumption does not always hold: after the producer's sequence numbers went out of step
/// (seen here on the first records written to a topic created a moment before, with the
/// broker just started), the record was in no log, and a dead letter reported written this way
/// was lost while the offset of its message was committed. So a report without an offset is
/// not a confirmation: the publish fails (`ErrorKind::Broker`), and the caller, or the runtime
/// for a dead letter, writes it again. The cost is a possible duplicate when the earlier
/// attempt did store it.
fn stored_at(partition: i32, offset: i64) -> Result<Position, Error> {
    if offset < 0 {
        return Err(Error::Broker {
            message: format!(
                "Kafka publish not confirmed: partition {partition} acknowledged the record as a \
                 duplicate of an earlier write, with no offset, so it may be in no log"
            ),
            source: None,
        });
    }
    Ok(Position::Partition { partition, offset })
}

impl Publisher {
    pub(crate) fn new(config: KafkaConfig, client_id: &str) -> Result<Self, Error> {
        let mut producer = base_config(&config, client_id);
        producer
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", config.partitioner.librdkafka_name())
            .set(
                "message.timeout.ms",
                config.publish_timeout.as_millis().to_string(),
            );
        for (name, value) in &config.producer_properties.0 {
            producer.set(name, value);
        }
        let producer: FutureProducer = producer
            .create()
            .map_err(|error| Error::config("kafka.producer_properties", error.to_string()))?;
        let admin: AdminClient<DefaultClientContext> = base_config(&config, client_id)
            .create()
            .map_err(|error| Error::config("kafka.properties", error.to_string()))?;
        Ok(Self {
            config,
            producer,
            admin,
            known: Mutex::new(HashSet::new()),
            client_id: client_id.to_owned(),
        })
    }

    /// Creates `topic` with its [`TopicOptions`](crate::TopicOptions) unless it is known to
    /// exist; an existing topic is left as it is.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<(), Error> {
        self.create_topic(topic, false).await
    }

    /// Creates `topic` unless it is known to exist. A dead-letter topic (written to as one, or
    /// named `….DLQ`, which a subscription reading dead letters may create first) keeps its records
    /// forever (`retention.ms=-1`) unless `[kafka.topics."<topic>"]` gives it a retention:
    /// a dead letter waits until someone looks at it.
    pub(crate) async fn create_topic(&self, topic: &str, dead_letters: bool) -> Result<(), Error> {
        if lock(&self.known).contains(topic) {
            return Ok(());
        }
        let dead_letters = dead_letters || topic.ends_with(eventbus_core::DEAD_LETTER_SUFFIX);
        let mut options = self.config.topic(topic);
        if dead_letters {
            options.retention = self.config.topics.get(topic).and_then(|own| own.retention);
        }
        let replication = TopicReplication::Fixed(options.replication_factor.map_or(-1, i32::from));
        let retention = match options.retention {
            Some(retention) => Some(retention.as_millis().to_string()),
            None if dead_letters => Some("-1".to_owned()),
            None => None,
        };
        let mut new = NewTopic::new(topic, options.partitions.unwrap_or(-1), replication);
        if let Some(retention) = &retention {
            new = new.set("retention.ms", retention);
        }
        let min_insync = options.min_insync_replicas.map(|n| n.to_string());
        if let Some(min_insync) = &min_insync {
            new = new.set("min.insync.replicas", min_insync);
        }
        let admin_options =
            AdminOptions::new().request_timeout(Some(Timeout::After(Duration::from_secs(10))));
        let results = self
            .admin
            .create_topics([&new], &admin_options)
            .await
            .map_err(|error| broker_error("cannot create Kafka topic", error))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(Error::broker(
                        format!("cannot create Kafka topic {name}"),
                        KafkaError::AdminOp(code),
                    ));
                }
            }
        }
        lock(&self.known).insert(topic.to_owned());
        Ok(())
    }

    /// Publishes `message` to `topic` and waits for the broker's acknowledgement (all in-sync
    /// replicas, idempotent).
    pub(crate) async fn publish(
        &self,
        topic: &str,
        message: &OutboundMessage,
    ) -> Result<Position, Error> {
        self.start_publish(topic, message).await?.await
    }

    /// Hands `message` to librdkafka's queue for `topic` (made if needed) and returns the future
    /// of the broker's acknowledgement: the record's partition and offset. While the queue is
    /// full it tries again every 100 ms, as rdkafka's `FutureProducer::send` does, for up to
    /// `publish_timeout`. The idempotent producer keeps the order of the records of one
    /// partition (so of one aggregate) with many in flight, retries included.
    pub(crate) async fn start_publish(
        &self,
        topic: &str,
        message: &OutboundMessage,
    ) -> Result<AckFuture, Error> {
        self.ensure_topic(topic).await?;
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in message.headers.iter() {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .payload(&message.payload[..])
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(&key[..]);
        }
        let timeout = self.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let delivery = loop {
            match self.producer.send_result(record) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = returned;
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    return Err(Error::Timeout {
                        operation: "publish (waiting for room in the producer's queue)",
                        after: timeout,
                    });
                }
                Err((error, _)) => return Err(broker_error("Kafka publish failed", error)),
            }
        };
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(delivery)) => stored_at(delivery.partition, delivery.offset),
                Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                    Err(Error::Timeout {
                        operation: "publish (waiting for the broker's acknowledgement)",
                        after: timeout,
                    })
                }
                Ok(Err((error, _))) => Err(broker_error("Kafka publish failed", error)),
                // librdkafka dropped the record's report: only when the producer is destroyed.
                Err(_) => Err(Error::Closed),
            }
        }))
    }

    /// Waits until every record sent is acknowledged (or `timeout` passes).
    pub(crate) fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(%error, "Kafka producer flush at close did not finish");
        }
    }
}

#[async_trait]
impl DeadLetterStore for Publisher {
    async fn dead_letters(
        &self,
        topic: &str,
    ) -> Result<Vec<eventbus_core::StoredDeadLetter>, Error> {
        crate::dead_letters::read(&self.config, &self.client_id, topic).await
    }

    async fn dead_letter_at(
        &self,
        topic: &str,
        position: Position,
    ) -> Result<Option<eventbus_core::StoredDeadLetter>, Error> {
        crate::dead_letters::read_at(&self.config, &self.client_id, topic, position).await
    }

    async fn remove_dead_letter(
        &self,
        letter: &eventbus_core::StoredDeadLetter,
    ) -> Result<(), Error> {
        crate::dead_letters::remove(self, &letter.message.topic, letter.position()).await
    }
}

#[async_trait]
impl DeadLetterWriter for Publisher {
    fn store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    /// Dead letters keep the record's key, payload and headers (the runtime adds the reason
    /// headers); the idempotent producer stores a retried write once per producer session. A
    /// dead-letter topic the bus creates keeps its records forever unless configured otherwise.
    async fn publish_dead_letter(&self, letter: Outgoing<'_>) -> Result<(), Error> {
        self.create_topic(letter.topic, true).await?;
        self.publish(letter.topic, &letter.message)
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_report_without_an_offset_is_not_a_confirmation() {
        let error = stored_at(1, -1001).unwrap_err();
        assert_eq!(error.kind(), eventbus_core::ErrorKind::Broker);
        assert!(error.to_string().contains("not confirmed"), "{error}");
        assert_eq!(
            stored_at(1, 0).unwrap(),
            Position::Partition {
                partition: 1,
                offset: 0
            }
        );
    }
}
