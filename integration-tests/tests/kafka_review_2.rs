//! Review: unsubscribing the last subscription of a topic returns before the topic's partitions
//! are drained and committed.
//!
//! `Control::unsubscribe` (bus.rs) waits in `Group::wait_revoked` (group.rs) until no partition
//! of the topic is in `Group::assigned`; but `Group::revoke` takes the partitions out of
//! `assigned` first and only then drains their readers (up to the drain timeout) and commits.
//! Whenever the revoke callback starts before the waiting task looks, the check passes at once.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::{KafkaBus, KafkaConfig, TopicOptions};
use eventbus_pool::{BusSettings, PoolConfig};
use integration_tests::{Recorder, kafka_config};
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

fn config(group: &str, topic: &str) -> KafkaConfig {
    let mut config = kafka_config(&kafka_bootstrap());
    config.group_id = Some(group.to_owned());
    config.topics.insert(
        topic.to_owned(),
        TopicOptions {
            partitions: Some(1),
            ..TopicOptions::default()
        },
    );
    config
}

fn settings(client: &str, drain: Duration) -> BusSettings {
    BusSettings {
        pool: PoolConfig {
            pool_size: 4,
            ..PoolConfig::default()
        },
        drain_timeout: drain,
        ..BusSettings::new("kafka", client)
    }
}

/// The offset `group` committed for partition 0 of `topic`, read by a client outside the group.
fn committed(group: &str, topic: &str) -> Option<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, 0);
    let offsets = reader
        .committed_offsets(list, Duration::from_secs(5))
        .unwrap();
    match offsets.elements().first()?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
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
    let (topic, group) = ("review2.unsubscribe", "review2-unsubscribe");
    let bus = KafkaBus::connect(
        settings("review2", Duration::from_secs(10)),
        config(group, topic),
    )
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
    while bus.assigned_partitions() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoke never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // The gate opens 3 s from now (well inside the 10 s drain): unsubscribe must still be
    // waiting for v1 until then.
    let opener = {
        let gate = gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            gate.add_permits(1);
        })
    };
    unsubscribe.await.unwrap().unwrap();
    let at_return = steps.events();
    let took = started.elapsed();
    let committed_at_return = tokio::task::spawn_blocking(move || committed(group, topic))
        .await
        .unwrap();
    opener.await.unwrap();
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
