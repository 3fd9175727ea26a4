//! Kafka commits and partitioning against a real broker: a commit never passes an unfinished
//! record, a poison envelope is dead-lettered and the partition moves on, and the sarama
//! partitioner puts each key where the Go services' producers do.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{
    Envelope, HandlerContext, HandlerError, Message, OutboundMessage, Position, SubscribeOptions,
};
use eventbus_kafka::{GroupProtocol, KafkaConfig, Partitioner};
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, collect, eventually, kafka_committed, kafka_group_config};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use test_brokers::kafka_bootstrap;

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(
        aggregate,
        "Changed",
        version,
        &serde_json::json!({"v": version}),
    )
    .unwrap()
}

/// A config whose `topic` has `partitions` partitions.
fn config_with(topic: &str, partitions: i32, group: &str) -> KafkaConfig {
    kafka_group_config(&kafka_bootstrap(), group, topic, partitions)
}

/// Offsets 0..5 finish, offset 5 hangs in its handler, 6..=105 finish: the committed offset
/// reaches 5 and stays there while 5 runs (watched over many commit intervals), then passes
/// everything once 5 finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_never_passes_an_unfinished_record() {
    let (topic, group) = ("commits.watermark", "watermark");
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "watermark"),
        config_with(topic, 1, group),
    )
    .await
    .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Recorder::<String>::new();
    let (g, h) = (gate.clone(), handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, h) = (g.clone(), h.clone());
            async move {
                if envelope.aggregate_id == "slow" {
                    let _permit = g.acquire().await.map_err(HandlerError::permanent)?;
                }
                h.push(envelope.aggregate_id.clone());
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for n in 0..5 {
        bus.publish_envelope(topic, &envelope(&format!("fast-{n}"), 1))
            .await
            .unwrap();
    }
    bus.publish_envelope(topic, &envelope("slow", 1))
        .await
        .unwrap();
    for n in 5..105 {
        bus.publish_envelope(topic, &envelope(&format!("fast-{n}"), 1))
            .await
            .unwrap();
    }
    handled
        .wait_for("every record but the slow one", |e| e.len() == 105)
        .await;
    eventually("the offsets before the slow record committed", || async {
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap()
            == Some(5)
    })
    .await;
    // For twenty commit intervals (100 ms each) with everything after the slow record finished,
    // every read of the group's offset shows the commit held at the slow record.
    let watched = std::time::Instant::now();
    let mut reads = 0;
    while watched.elapsed() < Duration::from_secs(2) {
        let now = tokio::task::spawn_blocking(move || {
            kafka_committed(&kafka_bootstrap(), group, topic, 0)
        })
        .await
        .unwrap();
        assert_eq!(now, Some(5), "a commit passed the unfinished record");
        reads += 1;
    }
    assert!(reads > 1, "the committed offset was read {reads} time(s)");
    gate.add_permits(1);
    handled
        .wait_for("the slow record", |e| e.len() == 106)
        .await;
    eventually("everything committed", || async {
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap()
            == Some(106)
    })
    .await;
    bus.close().await.unwrap();
}

/// With at most 10 unfinished records per partition, a single-partition topic of 300 records is
/// paused and resumed some 30 times: every record is handled, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_for_backpressure_resumes_and_loses_nothing() {
    let (topic, group) = ("commits.backpressure", "backpressure");
    let mut config = config_with(topic, 1, group);
    config.max_in_flight_per_partition = 10;
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", "backpressure"), config)
        .await
        .unwrap();
    for version in 1..=300 {
        bus.publish_envelope(topic, &envelope("only", version))
            .await
            .unwrap();
    }
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let versions = handled
        .wait_for("every record through the pauses", |e| e.len() >= 300)
        .await;
    assert_eq!(versions, (1..=300).collect::<Vec<_>>());
    bus.close().await.unwrap();
}

/// A backlog many times larger than one round of the poll loop (which takes up to 512 records
/// before handing them to the partition's dispatcher) is handled whole: every record once, each
/// aggregate's in order, and the commit reaches its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_larger_than_one_poll_round_is_handled_whole_and_committed() {
    let (topic, group) = ("commits.backlog", "backlog");
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "backlog"),
        config_with(topic, 1, group),
    )
    .await
    .unwrap();
    let (aggregates, versions) = (30, 100_i64);
    // Each aggregate's events one after the other, the aggregates side by side.
    let publishers = (0..aggregates).map(|a| {
        let bus = &bus;
        async move {
            for version in 1..=versions {
                bus.publish_envelope(topic, &envelope(&format!("agg-{a}"), version))
                    .await
                    .unwrap();
            }
        }
    });
    futures::future::join_all(publishers).await;
    let count = aggregates * versions as usize;
    let handled = Recorder::<(String, i64)>::new();
    bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let events = handled
        .wait_for("the whole backlog", |e| e.len() >= count)
        .await;
    assert_eq!(events.len(), count, "every record handled once");
    for a in 0..aggregates {
        let aggregate = format!("agg-{a}");
        let seen: Vec<i64> = events
            .iter()
            .filter(|(id, _)| *id == aggregate)
            .map(|(_, version)| *version)
            .collect();
        assert_eq!(seen, (1..=versions).collect::<Vec<_>>(), "{aggregate}");
    }
    eventually("the commit at the end of the backlog", || async {
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap()
            == Some(count as i64)
    })
    .await;
    bus.close().await.unwrap();
}

#[derive(Clone, Debug, PartialEq)]
enum Step {
    Started(i64),
    Finished(i64),
}

/// v1 runs (held by a gate) when the only subscription unsubscribes, with a 10 s drain timeout.
/// `unsubscribe` is documented to return once the partition is revoked here: queued records
/// given back, running ones finished up to the drain timeout, finished offsets committed. So it
/// must not return while v1 is still running (well within the drain timeout), and when it
/// returns v1 must be finished and its offset committed.
///
/// Deterministic form of a race: the runtime thread is kept busy until the poll thread has
/// entered the revoke, as a loaded runtime would be.
#[tokio::test(flavor = "current_thread")]
async fn unsubscribe_returns_only_after_the_running_record_finished_and_was_committed() {
    let (topic, group) = ("commits.unsubscribe", "unsubscribe");
    let settings = BusSettings {
        drain_timeout: Duration::from_secs(10),
        ..BusSettings::new("kafka", "unsubscribe")
    };
    let bus = eventbus_kafka::connect(settings, config_with(topic, 1, group))
        .await
        .unwrap();
    for version in 1..=3 {
        bus.publish_envelope(topic, &envelope("only", version))
            .await
            .unwrap();
    }
    let steps = Recorder::<Step>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (s, g) = (steps.clone(), gate.clone());
    let subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    s.push(Step::Started(envelope.event_version));
                    if envelope.event_version == 1 {
                        g.acquire().await.map_err(HandlerError::permanent)?.forget();
                    }
                    s.push(Step::Finished(envelope.event_version));
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    steps
        .wait_for("v1 running", |e| e.contains(&Step::Started(1)))
        .await;

    let started = std::time::Instant::now();
    let unsubscribe = tokio::spawn(subscription.unsubscribe());
    // Model a busy runtime: once the unsubscribe task has had a turn (to hand its command to
    // the poll thread), keep this (only) runtime thread from running it again until the poll
    // thread has entered the revoke callback, which takes the partition out of the assigned map
    // first and then drains. Polled with a deadline.
    tokio::task::yield_now().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bus.transport().assigned_partitions() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoke never started"
        );
        std::thread::yield_now();
    }
    // v1 still runs, well inside the 10 s drain: for 3 s unsubscribe must keep waiting for it.
    let mut unsubscribe = unsubscribe;
    let early = tokio::time::timeout(Duration::from_secs(3), &mut unsubscribe).await;
    let returned_early = early.is_ok();
    gate.add_permits(1);
    if let Ok(result) = early {
        result.unwrap().unwrap();
    } else {
        unsubscribe.await.unwrap().unwrap();
    }
    let at_return = steps.events();
    let took = started.elapsed();
    let committed_at_return =
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap();
    assert!(
        !returned_early,
        "unsubscribe returned after {took:?} while v1 was still running"
    );
    assert!(
        at_return.contains(&Step::Finished(1)),
        "unsubscribe returned after {took:?} while v1 was still running (steps so far: {at_return:?})"
    );
    assert_eq!(
        committed_at_return,
        Some(1),
        "unsubscribe returned before v1's offset was committed"
    );
    bus.close().await.unwrap();
}

/// A permanently failing envelope goes to `{topic}.DLQ` with its key and the reason, and the
/// partition's commit moves past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_envelope_is_dead_lettered_and_the_partition_moves_on() {
    let (topic, group) = ("commits.poison", "poison");
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "poison"),
        config_with(topic, 1, group),
    )
    .await
    .unwrap();
    let dead = collect(&bus, &format!("{topic}.DLQ")).await;
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.aggregate_id == "poison" {
                    return Err(HandlerError::permanent("cannot apply"));
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(topic, &envelope("poison", 1))
        .await
        .unwrap();
    for version in 1..=10 {
        bus.publish_envelope(topic, &envelope("healthy", version))
            .await
            .unwrap();
    }
    handled
        .wait_for("the healthy aggregate", |e| e.len() == 10)
        .await;
    let letters = dead.wait_for("the dead letter", |e| !e.is_empty()).await;
    let letter: &Message = &letters[0];
    assert_eq!(letter.key.as_deref(), Some(&b"poison"[..]));
    assert_eq!(
        letter.headers.get_str("X-Error-Message"),
        Some("cannot apply")
    );
    eventually("the commit past the poison envelope", || async {
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap()
            == Some(11)
    })
    .await;
    bus.close().await.unwrap();
}

/// Sarama's `NewHashPartitioner`, written from its definition: FNV-1a 32-bit of the key, as a
/// signed 32-bit integer, remainder by the partition count (truncating, as Go's `%`), then the
/// absolute value.
fn sarama_partition(key: &[u8], partitions: i32) -> i32 {
    let mut hash: u32 = 2_166_136_261;
    for byte in key {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(16_777_619);
    }
    let signed = hash as i32;
    let remainder = signed % partitions;
    if remainder < 0 { -remainder } else { remainder }
}

#[test]
fn the_reference_sarama_partitioner_matches_known_values() {
    // Published FNV-1a 32-bit vectors: "a" = 0xe40c292c, "foobar" = 0xbf9cf968 (both negative
    // as signed integers: the remainder is negative, then made positive).
    assert_eq!(0xe40c_292c_u32 as i32, -468_965_076);
    assert_eq!(sarama_partition(b"a", 1_000_000), 468_965_076 % 1_000_000);
    assert_eq!(0xbf9c_f968_u32 as i32, -1_080_231_576);
    assert_eq!(sarama_partition(b"foobar", 7), 1_080_231_576 % 7);
    // The offset basis (empty key) is negative too.
    assert_eq!(
        sarama_partition(b"", 10),
        (2_166_136_261_u32 as i32 % 10).abs()
    );
}

/// Keys chosen to cover both signs of the hash land on the partition sarama computes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sarama_partitioner_puts_each_key_where_the_go_services_do() {
    let topic = "commits.sarama";
    let partitions = 8;
    let mut config = config_with(topic, partitions, "sarama");
    config.partitioner = Partitioner::Sarama;
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", "sarama"), config)
        .await
        .unwrap();
    let seen = collect(&bus, topic).await;
    let keys: Vec<String> = (0..64).map(|n| format!("order-{n}")).collect();
    assert!(
        keys.iter().any(|key| {
            let mut hash: u32 = 2_166_136_261;
            for byte in key.bytes() {
                hash ^= u32::from(byte);
                hash = hash.wrapping_mul(16_777_619);
            }
            (hash as i32) < 0
        }),
        "some key must have a negative signed hash"
    );
    for key in &keys {
        bus.publish(
            topic,
            OutboundMessage {
                key: Some(key.clone().into()),
                ..OutboundMessage::new(key.clone().into_bytes())
            },
        )
        .await
        .unwrap();
    }
    let messages = seen
        .wait_for("every keyed record", |e| e.len() == keys.len())
        .await;
    for message in &messages {
        let key = message.key.as_deref().unwrap();
        let Position::Partition { partition, .. } = message.meta.position else {
            panic!("a Kafka record has a partition");
        };
        assert_eq!(
            partition,
            sarama_partition(key, partitions),
            "key {}",
            String::from_utf8_lossy(key)
        );
    }
    bus.close().await.unwrap();
}

/// Each partition of `topic` (with `partitions` partitions): the offset `group` committed and
/// the end offset, read by a client outside the group.
fn committed_and_ends(group: &str, topic: &str, partitions: i32) -> Vec<(Option<i64>, i64)> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let committed = reader
        .committed_offsets(list, Duration::from_secs(5))
        .unwrap();
    committed
        .elements()
        .iter()
        .map(|element| {
            let (_, end) = reader
                .fetch_watermarks(topic, element.partition(), Duration::from_secs(5))
                .unwrap();
            match element.offset() {
                Offset::Offset(offset) => (Some(offset), end),
                _ => (None, end),
            }
        })
        .collect()
}

/// A member handles a backlog while a second member joins (a cooperative rebalance, or one of
/// the KIP-848 protocol): commits sent while the group rebalances fail, and the partitions that
/// stay with the first member must still end up committed. With both members idle, every
/// partition's committed offset reaches its end offset (no handled record is left uncommitted
/// to be handled again after a restart).
async fn handled_records_are_committed_across_a_rebalance(protocol: GroupProtocol, name: &str) {
    let (topic, group) = (
        format!("commits.rebalance.{name}"),
        format!("rebalance-{name}"),
    );
    let partitions = 4;
    let mut config = config_with(&topic, partitions, &group);
    config.group_protocol = protocol;
    if protocol == GroupProtocol::Consumer {
        // The broker keeps the session under this protocol.
        config.consumer_properties.0.remove("session.timeout.ms");
        config.consumer_properties.0.remove("heartbeat.interval.ms");
    }
    let handled = Recorder::<(String, i64)>::new();
    let handler = |recorder: Arc<Recorder<(String, i64)>>| {
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let recorder = recorder.clone();
            async move {
                // Slow enough that records finish while the group rebalances.
                tokio::time::sleep(Duration::from_millis(50)).await;
                recorder.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok::<(), HandlerError>(())
            }
        })
    };
    let first = eventbus_kafka::connect(BusSettings::new("kafka", "rebalance-a"), config.clone())
        .await
        .unwrap();
    let second = eventbus_kafka::connect(BusSettings::new("kafka", "rebalance-b"), config)
        .await
        .unwrap();
    first
        .subscribe_envelope(&topic, handler(handled.clone()), SubscribeOptions::new())
        .await
        .unwrap();
    let (aggregates, versions) = (40, 10);
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            first
                .publish_envelope(&topic, &envelope(&format!("agg-{aggregate}"), version))
                .await
                .unwrap();
        }
    }
    handled
        .wait_for("the first member handling", |events| events.len() >= 20)
        .await;
    second
        .subscribe_envelope(&topic, handler(handled.clone()), SubscribeOptions::new())
        .await
        .unwrap();
    let total = (aggregates * versions) as usize;
    handled
        .wait_for("every record handled", |events| {
            events
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                == total
        })
        .await;
    let (group, topic) = (group.clone(), topic.clone());
    eventually(
        "every partition committed up to its end with both members idle",
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                let offsets = tokio::task::spawn_blocking(move || {
                    committed_and_ends(&group, &topic, partitions)
                })
                .await
                .unwrap();
                offsets.len() == partitions as usize
                    && offsets
                        .iter()
                        .all(|(committed, end)| *committed == Some(*end))
            }
        },
    )
    .await;
    second.close().await.unwrap();
    first.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handled_records_are_committed_across_a_cooperative_rebalance() {
    integration_tests::capture_logs();
    handled_records_are_committed_across_a_rebalance(GroupProtocol::Classic, "cooperative").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handled_records_are_committed_across_a_kip_848_rebalance() {
    integration_tests::capture_logs();
    handled_records_are_committed_across_a_rebalance(GroupProtocol::Consumer, "kip848").await;
}
