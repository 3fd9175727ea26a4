//! Side by side with the Go services on Apache Kafka: the Go peer (`interop/go/cmd/peer`,
//! sarama configured and called as the Go SDK does) and this SDK publish to and consume from
//! the same topics of a real broker.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, Position, SubscribeOptions};
use eventbus_kafka::{KafkaBus, Partitioner};
use eventbus_pool::BusSettings;
use integration_tests::go_peer::{
    GoConsumer, GoHandled, go_publish, interop_envelopes as envelopes, payloads_by_event,
};
use integration_tests::{Recorder, assert_first_handlings_in_order, kafka_group_config};
use test_brokers::kafka_bootstrap;

/// The Go service publishes; an ordered envelope subscription here handles every event, each
/// aggregate's in version order, with the payload bytes exactly as the Go service sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_the_go_service_publishes_are_handled_here_in_order_with_identical_payloads() {
    let (topic, group) = ("interop.go-to-rust", "interop-go-to-rust");
    let sent = envelopes("g2r", 40, 25);
    let bus = KafkaBus::connect(
        BusSettings::new("kafka", group),
        kafka_group_config(&kafka_bootstrap(), group, topic, 8),
    )
    .await
    .unwrap();
    let handled = Recorder::<(String, i64, String, Vec<u8>)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push((
                    envelope.aggregate_id.clone(),
                    envelope.event_version,
                    envelope.event_id.clone(),
                    envelope.payload().to_vec(),
                ));
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();

    let bootstrap = kafka_bootstrap();
    tokio::task::block_in_place(|| {
        go_publish(
            "kafka-publish",
            &["-brokers", &bootstrap, "-topic", topic],
            &sent,
        );
    });

    let events = handled
        .wait_for("every event the Go service published", |e| {
            e.iter()
                .map(|(.., id, _)| id)
                .collect::<BTreeSet<_>>()
                .len()
                == sent.len()
        })
        .await;
    let order: Vec<(String, i64)> = events.iter().map(|(a, v, ..)| (a.clone(), *v)).collect();
    assert_first_handlings_in_order(&order, 40, 25);
    let expected = payloads_by_event(&sent);
    for (_, _, event_id, payload) in &events {
        assert_eq!(
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&expected[event_id]),
            "{event_id}: the payload changed on the way"
        );
    }
    bus.close().await.unwrap();
}

/// This SDK publishes; the Go service (sarama consumer group, its serial path) handles every
/// event with the same fields, each aggregate's in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_published_here_are_handled_by_the_go_service_with_equal_fields() {
    let (topic, group) = ("interop.rust-to-go", "interop-rust-to-go");
    let sent = envelopes("r2g", 40, 25);
    let bus = KafkaBus::connect(
        BusSettings::new("kafka", "interop-rust-publisher"),
        kafka_group_config(&kafka_bootstrap(), group, topic, 8),
    )
    .await
    .unwrap();
    for envelope in &sent {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }

    let bootstrap = kafka_bootstrap();
    let count = sent.len().to_string();
    let mut go = GoConsumer::start(
        "kafka-consume",
        &[
            "-brokers", &bootstrap, "-topic", topic, "-group", group, "-count", &count,
        ],
    );
    let mut handled: Vec<GoHandled> = Vec::new();
    go.read_until("every event published here", &mut handled, |h| {
        h.len() >= sent.len()
    })
    .await;
    let order: Vec<(String, i64)> = handled
        .iter()
        .map(|h| (h.aggregate_id.clone(), h.event_version))
        .collect();
    assert_first_handlings_in_order(&order, 40, 25);
    let by_id: HashMap<&str, &Envelope> = sent.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for got in &handled {
        let envelope = by_id[got.event_id.as_str()];
        assert_eq!(got.aggregate_id, envelope.aggregate_id);
        assert_eq!(got.event_version, envelope.event_version);
        assert_eq!(got.event_type, envelope.event_type);
        let payload: serde_json::Value = serde_json::from_slice(envelope.payload()).unwrap();
        assert_eq!(got.payload, payload, "{}", got.event_id);
    }
    bus.close().await.unwrap();
}

/// Co-publishing: the Go service (sarama's hash partitioner) and this SDK with
/// `partitioner = "sarama"` publish events of the same 200 aggregates to one 8-partition topic;
/// every aggregate's events must all be on one partition, or the aggregate's order is lost
/// between the two producers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_service_and_this_sdk_put_each_aggregate_on_the_same_partition() {
    let (topic, group) = ("interop.co-publish", "interop-co-publish");
    let mut config = kafka_group_config(&kafka_bootstrap(), group, topic, 8);
    config.partitioner = Partitioner::Sarama;
    let bus = KafkaBus::connect(BusSettings::new("kafka", group), config)
        .await
        .unwrap();
    let go_sent = envelopes("co", 200, 1);
    let rust_sent: Vec<Envelope> = (0..200)
        .map(|aggregate| {
            Envelope::new(
                format!("co-{aggregate}"),
                "Interop.Changed",
                2,
                &serde_json::json!({"n": 2}),
            )
            .unwrap()
        })
        .collect();
    // The topic exists (made by the bus, with 8 partitions) before the Go service writes to it.
    bus.publish_envelope(topic, &rust_sent[0]).await.unwrap();
    for envelope in &rust_sent[1..] {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }
    let bootstrap = kafka_bootstrap();
    tokio::task::block_in_place(|| {
        go_publish(
            "kafka-publish",
            &["-brokers", &bootstrap, "-topic", topic],
            &go_sent,
        );
    });

    let partitions = Recorder::<(String, i32)>::new();
    let p = partitions.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let p = p.clone();
            async move {
                if let Position::Partition { partition, .. } = ctx.meta().position {
                    p.push((envelope.aggregate_id.clone(), partition));
                }
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let seen = partitions
        .wait_for("all 400 records", |e| e.len() >= 400)
        .await;
    let mut per_aggregate: HashMap<&str, BTreeSet<i32>> = HashMap::new();
    for (aggregate, partition) in &seen {
        per_aggregate
            .entry(aggregate)
            .or_default()
            .insert(*partition);
    }
    assert_eq!(per_aggregate.len(), 200);
    let split: Vec<_> = per_aggregate.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(
        split.is_empty(),
        "aggregates on more than one partition: {split:?}"
    );
    let used: BTreeSet<i32> = seen.iter().map(|(_, p)| *p).collect();
    assert!(used.len() > 1, "every record on one partition: {used:?}");
    bus.close().await.unwrap();
}
