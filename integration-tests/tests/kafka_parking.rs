//! Parking on Kafka across a rebalance, against a real broker: an aggregate parked behind its
//! dead letter by one member of a group stays parked when its partition moves to another member.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::KafkaBus;
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, eventually, kafka_group_config};
use test_brokers::kafka_bootstrap;

/// Aggregates parked by the first member: enough that every partition holds some.
const PARKED: usize = 40;

/// A parking subscription of `topic` on a new member of `group`; it refuses v1 of every
/// `p-*` aggregate for good and records what it handled as `(member, aggregate, version)`.
async fn member(
    group: &str,
    topic: &str,
    name: &'static str,
    handled: &Arc<Recorder<(&'static str, String, i64)>>,
) -> KafkaBus {
    let settings = BusSettings::new("kafka", name);
    let bus = KafkaBus::connect(
        settings,
        kafka_group_config(&kafka_bootstrap(), group, topic, 4),
    )
    .await
    .unwrap();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                let aggregate = envelope.aggregate_id.to_string();
                h.push((name, aggregate.clone(), envelope.event_version));
                if aggregate.starts_with("p-") && envelope.event_version == 1 {
                    return Err(HandlerError::permanent("cannot apply"));
                }
                Ok(())
            }
        }),
        SubscribeOptions::new().with_park_on_dead_letter(true),
    )
    .await
    .unwrap();
    bus
}

async fn publish(bus: &KafkaBus, topic: &str, aggregates: &str, version: i64) {
    let envelopes: Vec<Envelope> = (0..PARKED)
        .map(|i| {
            Envelope::new(
                format!("{aggregates}-{i}"),
                "Changed",
                version,
                &serde_json::json!({}),
            )
            .unwrap()
        })
        .collect();
    for result in bus.publish_envelope_batch(topic, &envelopes).await {
        result.unwrap();
    }
}

/// Rule: "dead-lettered envelope with parking on: the aggregate's later envelopes are
/// dead-lettered unhandled, marked `X-Parked`, until a replay" — whichever member of the group
/// reads them. Member A dead-letters v1 of 40 aggregates (parking them); member B joins and
/// takes some partitions over; then v2 of every parked aggregate and v1 of 40 others are
/// published. No v2 may run, on A or on B, and B must have handled some of the others (so it
/// did own partitions with parked aggregates on them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_parked_by_one_member_stays_parked_after_its_partition_moves_to_another() {
    integration_tests::capture_logs();
    let (topic, group) = ("parking.rebalance", "parking-rebalance");
    let handled = Recorder::new();
    let first = member(group, topic, "a", &handled).await;
    publish(&first, topic, "p", 1).await;
    eventually("A to dead-letter v1 of every p-* aggregate", || async {
        first.stats().dead_lettered >= PARKED as u64
    })
    .await;

    let second = member(group, topic, "b", &handled).await;
    publish(&first, topic, "p", 2).await;
    publish(&first, topic, "ok", 1).await;
    let events = handled
        .wait_for("every ok-* aggregate handled", |events| {
            let ok = events
                .iter()
                .filter(|(_, aggregate, _)| aggregate.starts_with("ok-"));
            ok.count() >= PARKED
        })
        .await;
    assert!(
        events
            .iter()
            .any(|(member, aggregate, _)| *member == "b" && aggregate.starts_with("ok-")),
        "B handled nothing: it owns no partition, so the test proves nothing: {events:?}"
    );
    let ran_v2 = || -> Vec<_> {
        handled
            .events()
            .into_iter()
            .filter(|(_, aggregate, version)| aggregate.starts_with("p-") && *version == 2)
            .collect()
    };
    let dead_letter_topic = format!("{topic}.DLQ");
    // The distinct aggregates with a dead letter of `version`, parked or not.
    let stored = |version: i64, parked: bool| {
        let (bus, dead_letter_topic) = (&first, &dead_letter_topic);
        async move {
            let letters = bus.dead_letters(dead_letter_topic).await.unwrap();
            let mut aggregates: Vec<String> = letters
                .iter()
                .filter(|letter| letter.is_parked() == parked)
                .filter_map(|letter| letter.envelope())
                .filter(|envelope| envelope.event_version == version)
                .map(|envelope| envelope.aggregate_id.to_string())
                .collect();
            aggregates.sort();
            aggregates.dedup();
            aggregates
        }
    };
    eventually("v2 of every p-* aggregate parked or run", || async {
        stored(2, true).await.len() + ran_v2().len() >= PARKED
    })
    .await;
    let failed = stored(1, false).await;
    assert_eq!(
        failed.len(),
        PARKED,
        "a dead letter reported written is not in the dead-letter topic (found {failed:?})"
    );
    let ran = ran_v2();
    assert!(
        ran.is_empty(),
        "v2 of a parked aggregate ran while its v1 waits in the dead-letter topic: {ran:?}"
    );
    assert_eq!(
        stored(2, true).await.len(),
        PARKED,
        "every v2 is in the dead-letter topic, marked parked"
    );
    second.close().await.unwrap();
    first.close().await.unwrap();
}
