//! Where a Kafka group without committed offsets starts with `auto_offset_reset = latest`,
//! against a real broker: at the end each partition had when `subscribe` was called, so nothing
//! published after `subscribe` returned is skipped, whenever the partition is assigned, added or
//! taken over after a restart.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use eventbus_core::{Envelope, SubscribeOptions};
use eventbus_kafka::{AssignmentStrategy, GroupProtocol, KafkaConfig, OffsetReset};
use eventbus_pool::BusSettings;
use integration_tests::{eventually, kafka_group_config, record_versions};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use test_brokers::kafka_bootstrap;

fn envelope(aggregate: &str) -> Envelope {
    Envelope::new(aggregate, "Changed", 1, &serde_json::json!({"v": 1})).unwrap()
}

fn latest(topic: &str, group: &str, partitions: i32) -> KafkaConfig {
    let mut config = kafka_group_config(&kafka_bootstrap(), group, topic, partitions);
    config.auto_offset_reset = OffsetReset::Latest;
    config
}

fn count(events: &[(String, i64)], prefix: &str) -> usize {
    events.iter().filter(|(a, _)| a.starts_with(prefix)).count()
}

fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap()
}

/// Produces one envelope of `aggregate` to `partition` of `topic`, retrying while the producer
/// does not know the partition yet (one just added).
async fn send(producer: &FutureProducer, topic: &str, partition: i32, aggregate: &str) {
    let payload = envelope(aggregate).to_bytes().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(aggregate)
            .payload(payload.as_ref());
        match producer.send(record, Duration::from_secs(5)).await {
            Ok(_) => return,
            Err((error, _)) => {
                assert!(tokio::time::Instant::now() < deadline, "{error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Nothing published before `subscribe`, everything published after it returned, in `rounds`
/// fresh groups with `protocol` and `assignor`.
async fn latest_after_subscribe(
    name: &str,
    protocol: GroupProtocol,
    assignor: AssignmentStrategy,
    rounds: u32,
) {
    for round in 0..rounds {
        let topic = format!("reset.{name}.{round}");
        let group = format!("reset-{name}-{round}");
        let mut config = latest(&topic, &group, 4);
        config.group_protocol = protocol;
        config.assignment_strategy = assignor;
        if protocol == GroupProtocol::Consumer {
            // The broker owns the session with KIP-848; the client may not set it.
            config.consumer_properties.0.remove("session.timeout.ms");
            config.consumer_properties.0.remove("heartbeat.interval.ms");
        }
        let bus = eventbus_kafka::connect(BusSettings::new("kafka", name), config)
            .await
            .unwrap();
        for aggregate in 0..8 {
            bus.publish_envelope(&topic, &envelope(&format!("before-{aggregate}")))
                .await
                .unwrap();
        }
        let handled = record_versions(&bus, &topic, SubscribeOptions::new()).await;
        for aggregate in 0..16 {
            bus.publish_envelope(&topic, &envelope(&format!("after-{aggregate}")))
                .await
                .unwrap();
        }
        let events = handled
            .wait_for("the 16 published after subscribe", |e| {
                count(e, "after-") == 16
            })
            .await;
        bus.close().await.unwrap();
        assert_eq!(
            count(&events, "before-"),
            0,
            "{name} round {round}: latest read records published before subscribe: {events:?}"
        );
    }
}

/// librdkafka alone resolves "latest" at a partition's first fetch, a moment after the
/// assignment `subscribe` waits for: it skipped 10 to 13 of these 16 records in each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_reads_everything_published_after_subscribe_returned_and_nothing_before() {
    latest_after_subscribe(
        "cooperative",
        GroupProtocol::Classic,
        AssignmentStrategy::CooperativeSticky,
        3,
    )
    .await;
}

/// The same with the KIP-848 consumer group protocol (its assignments are incremental too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_with_the_consumer_group_protocol_reads_everything_after_subscribe() {
    latest_after_subscribe(
        "kip848",
        GroupProtocol::Consumer,
        AssignmentStrategy::CooperativeSticky,
        2,
    )
    .await;
}

/// The same with the eager `range` assignor of a group shared with Go services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_with_the_eager_range_assignor_reads_everything_after_subscribe() {
    latest_after_subscribe(
        "range",
        GroupProtocol::Classic,
        AssignmentStrategy::Range,
        2,
    )
    .await;
}

/// A partition added to the topic after `subscribe`: all of it was published after, so it is
/// read from its beginning, also what it got before the group assigned it here (placed at its
/// end when assigned, those 10 records were skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_reads_a_partition_added_after_subscribe_from_its_beginning() {
    let (topic, group) = ("reset.latest.grow", "reset-latest-grow");
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", "grow"), latest(topic, group, 1))
        .await
        .unwrap();
    let handled = record_versions(&bus, topic, SubscribeOptions::new()).await;
    bus.publish_envelope(topic, &envelope("p0")).await.unwrap();
    handled
        .wait_for("the record on partition 0", |e| count(e, "p0") == 1)
        .await;

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap();
    for result in admin
        .create_partitions(
            &[NewPartitions::new(topic, 3)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let producer = producer();
    for partition in 1..=2 {
        for record in 1..=5 {
            send(
                &producer,
                topic,
                partition,
                &format!("new-{partition}-{record}"),
            )
            .await;
        }
    }
    eventually("the new partitions assigned", || async {
        bus.transport().assigned_partitions() == 3
    })
    .await;
    let events = handled
        .wait_for("the 10 records of the new partitions", |e| {
            count(e, "new-") == 10
        })
        .await;
    bus.close().await.unwrap();
    assert_eq!(count(&events, "p0"), 1, "{events:?}");
}

/// A restart (close, then a new bus of the same group) reads what was published while the
/// service was down on every partition, also one that had no traffic before: the start offset
/// placed at the first assignment is committed, so the next member starts there instead of at a
/// later "latest" of its own (the record sent to that partition while down was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_after_a_restart_keeps_what_was_published_while_down_on_every_partition() {
    let (topic, group) = ("reset.latest.restart", "reset-latest-restart");
    let producer = producer();
    let first = eventbus_kafka::connect(
        BusSettings::new("kafka", "restart"),
        latest(topic, group, 2),
    )
    .await
    .unwrap();
    let handled = record_versions(&first, topic, SubscribeOptions::new()).await;
    send(&producer, topic, 0, "first-run-p0").await;
    handled
        .wait_for("the first run's record", |e| count(e, "first-run") == 1)
        .await;
    first.close().await.unwrap();

    // While the service is down (a deploy).
    send(&producer, topic, 0, "down-p0").await;
    send(&producer, topic, 1, "down-p1").await;

    let second = eventbus_kafka::connect(
        BusSettings::new("kafka", "restart"),
        latest(topic, group, 2),
    )
    .await
    .unwrap();
    let handled = record_versions(&second, topic, SubscribeOptions::new()).await;
    let events = handled
        .wait_for("both records published while down", |e| {
            count(e, "down-") == 2
        })
        .await;
    second.close().await.unwrap();
    assert_eq!(count(&events, "first-run"), 0, "{events:?}");
}
