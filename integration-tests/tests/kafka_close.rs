//! Kafka close with the broker gone, against a real broker that is killed: `close` returns
//! within the drain timeout plus a few seconds (catching up respects its deadline; the commit
//! and the group leave are left to finish in the background).

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::{KafkaBus, TopicOptions};
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, eventually, kafka_config};
use test_brokers::KafkaBroker;

/// 8 partitions assigned, every record handled, then the broker is killed: `close` with a 2 s
/// drain timeout has nothing in flight to wait for and must return within the documented
/// budget (1 s catch-up + 2 s drain + 5 s producer flush), give or take a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_the_broker_down_returns_within_the_drain_budget() {
    let mut broker = KafkaBroker::start();
    let topic = "close.down";
    let mut config = kafka_config(&broker.bootstrap());
    config.group_id = Some("close.down".to_owned());
    config.topics.insert(
        topic.to_owned(),
        TopicOptions {
            partitions: Some(8),
            ..TopicOptions::default()
        },
    );
    let drain = Duration::from_secs(2);
    let bus = KafkaBus::connect(
        BusSettings {
            drain_timeout: drain,
            ..BusSettings::new("kafka", "close.down")
        },
        config,
    )
    .await
    .unwrap();
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_version);
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    eventually("8 partitions assigned", || async {
        bus.assigned_partitions() == 8
    })
    .await;
    for version in 1..=16 {
        let envelope = Envelope::new(
            format!("agg-{version}"),
            "Changed",
            1,
            &serde_json::json!({"v": version}),
        )
        .unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    handled.wait_for("every record", |e| e.len() == 16).await;

    tokio::task::block_in_place(|| broker.kill());
    let budget = drain / 2 + drain + Duration::from_secs(5);
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(50), bus.close()).await;
    let took = started.elapsed();
    assert!(closed.is_ok(), "close did not return within 50 s");
    assert!(
        took <= budget + Duration::from_secs(5),
        "close took {took:?} with a {drain:?} drain timeout (budget {budget:?})"
    );
}
