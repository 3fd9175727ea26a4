//! Kafka dead-letter topics, against a real broker: a dead-letter topic the bus creates keeps its
//! records with no age limit (`retention.ms=-1`), whatever `topic_defaults.retention` says, as the
//! delivery contract asks of dead-letter destinations; a dead-letter write the broker refuses
//! holds the aggregate and the partition's commit until it succeeds, and one cut off at the drain
//! deadline (unsubscribe, close) leaves the record to be read again before its successors.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::TopicOptions;
use eventbus_pool::BusSettings;
use integration_tests::{
    Recorder, collect, eventually, kafka_committed, kafka_config, kafka_group_config,
    set_kafka_topic_config,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use test_brokers::kafka_bootstrap;

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap()
}

/// Creates `{topic}.DLQ` refusing every record (its `max.message.bytes` is smaller than any
/// dead letter); returns its name.
async fn refusing_dead_letter_topic(topic: &str) -> String {
    let dead_letters = format!("{topic}.DLQ");
    let created = admin()
        .create_topics(
            [&NewTopic::new(&dead_letters, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", "64")],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for result in created {
        result.unwrap();
    }
    dead_letters
}

/// A handler recording each version into `handled` and failing v1 for good.
fn refusing_v1(handled: &Arc<Recorder<i64>>) -> Arc<dyn eventbus_core::EnvelopeHandler> {
    let handled = handled.clone();
    Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
        let handled = handled.clone();
        async move {
            handled.push(envelope.event_version);
            if envelope.event_version == 1 {
                return Err(HandlerError::permanent("cannot apply"));
            }
            Ok(())
        }
    })
}

async fn retention_ms(topic: &str) -> String {
    let results = admin()
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let resource = results.into_iter().next().unwrap().unwrap();
    resource
        .get("retention.ms")
        .and_then(|entry| entry.value.clone())
        .unwrap()
}

async fn dead_letter_one(config: eventbus_kafka::KafkaConfig, client: &str, topic: &str) {
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", client), config)
        .await
        .unwrap();
    let dead = collect(&bus, &format!("{topic}.DLQ")).await;
    bus.subscribe_envelope(
        topic,
        Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async move {
            Err::<(), _>(HandlerError::permanent("cannot apply"))
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let envelope = Envelope::new("poison", "Changed", 1, &serde_json::json!({})).unwrap();
    bus.publish_envelope(topic, &envelope).await.unwrap();
    dead.wait_for("the dead letter", |e| !e.is_empty()).await;
    bus.close().await.unwrap();
}

/// With the default configuration the dead-letter topic must keep its records without an age
/// limit (`retention.ms=-1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_created_by_the_bus_has_no_age_limit() {
    let topic = "dead_letters.default";
    let mut config = kafka_config(&kafka_bootstrap());
    config.group_id = Some("dead_letters.default".to_owned());
    dead_letter_one(config, "dead_letters.default", topic).await;
    let retention = retention_ms(&format!("{topic}.DLQ")).await;
    assert_eq!(
        retention, "-1",
        "the dead-letter topic keeps records only {retention} ms"
    );
}

/// A short retention for the bus's event topics (`topic_defaults`) must not make dead letters
/// expire with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_defaults_retention_does_not_apply_to_dead_letter_topics() {
    let topic = "dead_letters.short";
    let mut config = kafka_config(&kafka_bootstrap());
    config.group_id = Some("dead_letters.short".to_owned());
    config.topic_defaults = TopicOptions {
        partitions: Some(1),
        retention: Some(Duration::from_secs(3600)),
        ..TopicOptions::default()
    };
    dead_letter_one(config, "dead_letters.short", topic).await;
    let retention = retention_ms(&format!("{topic}.DLQ")).await;
    assert_eq!(
        retention, "-1",
        "the dead-letter topic keeps records only {retention} ms"
    );
}

/// Rule: "dead-letter write fails: not acknowledged (the message is redelivered or retried), the
/// lane stays blocked". The dead-letter topic exists and refuses every record (its
/// `max.message.bytes` is smaller than any dead letter): v1 of an aggregate fails for good, its
/// dead-letter write is refused again and again, so v2 must not run and the partition's commit
/// must not pass v1. Once the topic takes records again, the retried write lands, v2 runs and the
/// commit passes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_write_holds_the_aggregate_and_the_commit_until_it_lands() {
    let (topic, group) = ("dlq.refused", "dlq-refused");
    let dead_letters = refusing_dead_letter_topic(topic).await;
    let config = kafka_group_config(&kafka_bootstrap(), group, topic, 1);
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", group), config)
        .await
        .unwrap();
    let handled = Recorder::<i64>::new();
    bus.subscribe_envelope(topic, refusing_v1(&handled), SubscribeOptions::new())
        .await
        .unwrap();
    for version in 1..=2 {
        let envelope = Envelope::new("held", "Changed", version, &serde_json::json!({})).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    eventually(
        "the dead-letter write of v1 to be refused three times",
        || async { bus.consume_stats().dead_letter_failures >= 3 },
    )
    .await;
    assert_eq!(
        handled.events(),
        [1],
        "v2 ran while v1's dead letter was unwritten"
    );
    let commit =
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap();
    assert!(
        commit.is_none_or(|offset| offset == 0),
        "the commit passed v1 (offset 0) before its dead letter was written: {commit:?}"
    );

    set_kafka_topic_config(
        &kafka_bootstrap(),
        &dead_letters,
        "max.message.bytes",
        "1048588",
    )
    .await;
    let dead = collect(&bus, &dead_letters).await;
    dead.wait_for("v1's dead letter", |e| !e.is_empty()).await;
    handled.wait_for("v2 after v1", |e| e.len() == 2).await;
    assert_eq!(handled.events(), [1, 2]);
    eventually("the commit past v1 and v2", || async {
        tokio::task::spawn_blocking(move || kafka_committed(&kafka_bootstrap(), group, topic, 0))
            .await
            .unwrap()
            == Some(2)
    })
    .await;
    bus.close().await.unwrap();
}

/// Rule: "dead-letter write fails: not acknowledged ... the lane stays blocked", with
/// "Unsubscribe / Close ... running messages finish, up to the drain timeout (then they are
/// cancelled and given back)" and "a redelivery replays a suffix in order".
///
/// v1 of an aggregate fails for good and its dead-letter topic refuses every record; v2 waits
/// in the lane. At the drain deadline v1's settling is cut short: the commit must stay below
/// v1, so the next subscription of the group reads v1 before v2.
async fn dead_letter_write_cut_off_at_the_deadline(group: &str, close_the_bus: bool) {
    let topic = format!("{group}.events");
    refusing_dead_letter_topic(&topic).await;
    let config = kafka_group_config(&kafka_bootstrap(), group, &topic, 1);
    let mut settings = BusSettings::new("kafka", group);
    settings.drain_timeout = Duration::from_secs(1);
    let first_bus = eventbus_kafka::connect(settings.clone(), config.clone())
        .await
        .unwrap();
    let first = Recorder::<i64>::new();
    let subscription = first_bus
        .subscribe_envelope(&topic, refusing_v1(&first), SubscribeOptions::new())
        .await
        .unwrap();
    for version in 1..=2 {
        let envelope = Envelope::new("c-1", "Changed", version, &serde_json::json!({})).unwrap();
        first_bus.publish_envelope(&topic, &envelope).await.unwrap();
    }
    eventually("the dead-letter write of v1 to fail", || async {
        first_bus.consume_stats().dead_letter_failures >= 1
    })
    .await;
    assert_eq!(first.events(), [1], "v2 ran before v1 was settled");

    let second_bus = if close_the_bus {
        first_bus.close().await.unwrap();
        eventbus_kafka::connect(settings, config).await.unwrap()
    } else {
        subscription.unsubscribe().await.unwrap();
        first_bus
    };
    let second = Recorder::<i64>::new();
    let s = second.clone();
    second_bus
        .subscribe_envelope(
            &topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let s = s.clone();
                async move {
                    s.push(envelope.event_version);
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let events = second
        .wait_for("v1 and v2 on the next subscription", |e| {
            e.contains(&1) && e.contains(&2)
        })
        .await;
    assert_eq!(
        events.first(),
        Some(&1),
        "the next subscription handled {events:?}: the commit passed v1, cut off at the drain \
         deadline during its dead-letter write"
    );
    second_bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_leaves_a_record_cut_off_in_its_dead_letter_write_to_be_read_first() {
    dead_letter_write_cut_off_at_the_deadline("cutoff-unsubscribe", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_a_record_cut_off_in_its_dead_letter_write_to_be_read_first() {
    dead_letter_write_cut_off_at_the_deadline("cutoff-close", true).await;
}
