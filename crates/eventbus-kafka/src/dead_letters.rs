//! Reading and removing stored dead letters (`eventbus dlq`). A dead-letter topic is read from
//! each partition's low watermark to its high watermark as they are when asked, by a consumer
//! assigned to the partitions (no group membership, no commits). Kafka cannot delete one
//! record, so a replayed dead letter is recorded in `{dead-letter topic}.replayed` and no
//! longer listed.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use eventbus_core::{Error, Message, OutboundMessage, Position, StoredDeadLetter};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::group::record_message;
use crate::producer::{Publisher, base_config};

/// The topic that records which dead letters of a dead-letter topic were replayed.
pub const REPLAYED_SUFFIX: &str = ".replayed";

/// How long one metadata or watermark request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading one topic to its end may take in all.
const READ_LIMIT: Duration = Duration::from_secs(120);

fn read_error(topic: &str, error: impl std::fmt::Display) -> Error {
    Error::Broker {
        message: format!("cannot read the dead letters of {topic}: {error}"),
        source: None,
    }
}

/// The marker of a replayed dead letter: its partition and offset.
fn marker(partition: i32, offset: i64) -> String {
    format!("{partition}/{offset}")
}

/// The records of `topic` from each partition's start to its end as they are now, ordered by
/// partition then offset; none when the topic does not exist.
fn read_topic(consumer: &BaseConsumer, topic: &str) -> Result<Vec<Message>, Error> {
    let metadata = consumer
        .fetch_metadata(None, REQUEST_TIMEOUT)
        .map_err(|error| read_error(topic, error))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    let mut list = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for partition in found.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), REQUEST_TIMEOUT)
            .map_err(|error| read_error(topic, error))?;
        if high > low {
            list.add_partition_offset(topic, partition.id(), Offset::Offset(low))
                .map_err(|error| read_error(topic, error))?;
            ends.insert(partition.id(), high);
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer
        .assign(&list)
        .map_err(|error| read_error(topic, error))?;
    let deadline = Instant::now() + READ_LIMIT;
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                operation: "reading a dead-letter topic to its end",
                after: READ_LIMIT,
            });
        }
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let record = match polled {
            // The partition's end: its last offsets may hold no record (a transaction's
            // control record, compaction).
            Err(KafkaError::PartitionEOF(partition)) => {
                ends.remove(&partition);
                continue;
            }
            polled => polled.map_err(|error| read_error(topic, error))?,
        };
        let (partition, offset) = (record.partition(), record.offset());
        let Some(end) = ends.get(&partition).copied() else {
            continue;
        };
        if offset < end {
            records.push(record_message(&record, record.topic()));
        }
        if offset + 1 >= end {
            ends.remove(&partition);
        }
    }
    consumer
        .unassign()
        .map_err(|error| read_error(topic, error))?;
    records.sort_by_key(|message| match message.meta.position {
        Position::Partition { partition, offset } => (partition, offset),
        _ => (i32::MAX, i64::MAX),
    });
    Ok(records)
}

/// The dead letters `topic` holds now and that were not replayed, by partition then offset.
///
/// # Cancel safety
///
/// The reading runs on a blocking thread; a dropped call lets it finish on its own (it
/// commits nothing and leaves no group behind).
pub(crate) async fn read(
    config: &KafkaConfig,
    client_id: &str,
    topic: &str,
) -> Result<Vec<StoredDeadLetter>, Error> {
    let client = reader_config(config, client_id);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client
            .create()
            .map_err(|error| Error::config("kafka.properties", error.to_string()))?;
        let replayed: HashSet<String> =
            read_topic(&consumer, &format!("{topic}{REPLAYED_SUFFIX}"))?
                .into_iter()
                .filter_map(|record| String::from_utf8(record.payload.to_vec()).ok())
                .collect();
        Ok(read_topic(&consumer, &topic)?
            .into_iter()
            .filter(|message| match message.meta.position {
                Position::Partition { partition, offset } => {
                    !replayed.contains(&marker(partition, offset))
                }
                _ => true,
            })
            .map(|message| StoredDeadLetter { message })
            .collect())
    })
    .await
    .map_err(|error| Error::broker("the dead-letter reader ended", error))?
}

/// The dead letter at `partition`/`offset` of `topic`; `None` when the partition no longer (or
/// never) holds a record at that offset. Replay markers are not read here: recording a dead
/// letter replayed twice is harmless.
///
/// # Cancel safety
///
/// The reading runs on a blocking thread; a dropped call lets it finish on its own.
pub(crate) async fn read_at(
    config: &KafkaConfig,
    client_id: &str,
    topic: &str,
    position: Position,
) -> Result<Option<StoredDeadLetter>, Error> {
    let Position::Partition { partition, offset } = position else {
        return Err(Error::config(
            "position",
            "a Kafka dead letter sits at a partition and offset",
        ));
    };
    let client = reader_config(config, client_id);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client
            .create()
            .map_err(|error| Error::config("kafka.properties", error.to_string()))?;
        let (low, high) = match consumer.fetch_watermarks(&topic, partition, REQUEST_TIMEOUT) {
            Ok(watermarks) => watermarks,
            Err(KafkaError::MetadataFetch(_)) => return Ok(None),
            Err(error) => return Err(read_error(&topic, error)),
        };
        if offset < low || offset >= high {
            return Ok(None);
        }
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&topic, partition, Offset::Offset(offset))
            .map_err(|error| read_error(&topic, error))?;
        consumer
            .assign(&list)
            .map_err(|error| read_error(&topic, error))?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(record)) if record.offset() == offset => {
                    return Ok(Some(StoredDeadLetter {
                        message: record_message(&record, &topic),
                    }));
                }
                // Past it (a compacted offset, a control record): nothing there.
                Some(Ok(record)) if record.offset() > offset => return Ok(None),
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
                Some(Err(error)) => return Err(read_error(&topic, error)),
                _ => {}
            }
        }
        Err(Error::Timeout {
            operation: "reading one dead letter",
            after: REQUEST_TIMEOUT,
        })
    })
    .await
    .map_err(|error| Error::broker("the dead-letter reader ended", error))?
}

/// The dead-letter reader's client: tuned as the bus's consumer is
/// ([`KafkaConfig::consumer_tuning`]: without `fetch.queue.backoff.ms` at 10 ms, librdkafka
/// stops fetching for a second whenever its prefetch queue fills, and a parking subscription's
/// start-up, which reads the whole dead-letter topic, stalls on a large one), assigned to
/// partitions (its group ID names it, it never joins or commits), reporting each partition's
/// end.
fn reader_config(config: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut client = base_config(config, client_id);
    for (name, value) in config.consumer_tuning() {
        client.set(name, value);
    }
    client
        .set("group.id", format!("{client_id}-dead-letter-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    client
}

/// Records the dead letter at `position` of `topic` as replayed in `{topic}.replayed` (kept for
/// ever, like the dead letters). Recording one twice is no error.
pub(crate) async fn remove(
    publisher: &Publisher,
    topic: &str,
    position: Position,
) -> Result<(), Error> {
    let Position::Partition { partition, offset } = position else {
        return Err(Error::config(
            "position",
            "a Kafka dead letter is removed by its partition and offset",
        ));
    };
    let markers = format!("{topic}{REPLAYED_SUFFIX}");
    publisher.create_topic(&markers, true).await?;
    let marker = marker(partition, offset);
    publisher
        .publish(
            &markers,
            &OutboundMessage::new(marker.clone().into_bytes()).with_key(marker.into_bytes()),
        )
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_reader_is_tuned_as_the_consumer_and_never_commits() {
        let mut config = KafkaConfig::default();
        config
            .consumer_properties
            .0
            .insert("fetch.wait.max.ms".to_owned(), "20".to_owned());
        let client = reader_config(&config, "svc");
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(
            client.get("fetch.wait.max.ms"),
            Some("20"),
            "configured wins"
        );
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("group.id"), Some("svc-dead-letter-reader"));
    }
}
