//! Parking on Kafka across a rebalance, against a real broker: an aggregate parked behind its
//! dead letter by one member of a group stays parked when its partition moves to another member.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
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
    member_with(BusSettings::new("kafka", name), group, topic, name, handled).await
}

/// [`member`] with `settings`.
async fn member_with(
    settings: BusSettings,
    group: &str,
    topic: &str,
    name: &'static str,
    handled: &Arc<Recorder<(&'static str, String, i64)>>,
) -> KafkaBus {
    let bus = eventbus_kafka::connect(
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
        first.consume_stats().dead_lettered >= PARKED as u64
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

/// Rule: "dead-letter failure: not acknowledged; the DLQ write is retried with backoff; the lane
/// stays blocked; nothing is lost", for parked events, across a rebalance. Member A parks 40
/// aggregates; the dead-letter topic then refuses every record, and v2 of each (to be parked
/// behind its v1) fails to be written. Member B joins while those writes fail: the partitions
/// that move are given back with their v2 unfinished, and B (which restores the parked set from
/// the dead-letter topic) parks them too. No v2 runs anywhere; once the topic takes records
/// again, every v2 lands in it, marked parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_event_whose_dead_letter_write_fails_during_a_rebalance_never_runs() {
    integration_tests::capture_logs();
    let (topic, group) = ("parking.refused", "parking-refused");
    let dead_letter_topic = format!("{topic}.DLQ");
    let settings = |name: &str| BusSettings {
        // The revoke gives the refused writes back after a second.
        drain_timeout: std::time::Duration::from_secs(1),
        ..BusSettings::new("kafka", name)
    };
    let handled = Recorder::new();
    let first = member_with(settings("refused-a"), group, topic, "a", &handled).await;
    publish(&first, topic, "p", 1).await;
    eventually("A to dead-letter v1 of every p-* aggregate", || async {
        first.consume_stats().dead_lettered >= PARKED as u64
    })
    .await;
    integration_tests::set_kafka_topic_config(
        &kafka_bootstrap(),
        &dead_letter_topic,
        "max.message.bytes",
        "64",
    )
    .await;
    publish(&first, topic, "p", 2).await;
    eventually("A's parked dead-letter writes refused", || async {
        first.consume_stats().dead_letter_failures >= 1
    })
    .await;
    let second = member_with(settings("refused-b"), group, topic, "b", &handled).await;
    publish(&first, topic, "ok", 1).await;
    handled
        .wait_for(
            "B handling some ok-* aggregates (it owns partitions)",
            |events| {
                events
                    .iter()
                    .any(|(member, aggregate, _)| *member == "b" && aggregate.starts_with("ok-"))
            },
        )
        .await;
    integration_tests::set_kafka_topic_config(
        &kafka_bootstrap(),
        &dead_letter_topic,
        "max.message.bytes",
        "1048588",
    )
    .await;
    let parked_v2 = || {
        let (bus, dead_letter_topic) = (&first, &dead_letter_topic);
        async move {
            let mut aggregates: Vec<String> = bus
                .dead_letters(dead_letter_topic)
                .await
                .unwrap()
                .iter()
                .filter(|letter| letter.is_parked())
                .filter_map(|letter| letter.envelope())
                .filter(|envelope| envelope.event_version == 2)
                .map(|envelope| envelope.aggregate_id.to_string())
                .collect();
            aggregates.sort();
            aggregates.dedup();
            aggregates
        }
    };
    eventually(
        "v2 of every p-* aggregate in the dead-letter topic, parked",
        || async { parked_v2().await.len() == PARKED },
    )
    .await;
    let ran: Vec<_> = handled
        .events()
        .into_iter()
        .filter(|(_, aggregate, version)| aggregate.starts_with("p-") && *version == 2)
        .collect();
    assert!(ran.is_empty(), "a parked v2 ran: {ran:?}");
    second.close().await.unwrap();
    first.close().await.unwrap();
}
