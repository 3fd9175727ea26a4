//! Review: with `auto_offset_reset = latest`, an envelope published right after `subscribe`
//! returned is not handled.
//!
//! `subscribe_handler` (bus.rs) returns once an assignment arrived (`Group::wait_assignment`),
//! but librdkafka resolves a partition without a committed offset to "latest" only afterwards,
//! asynchronously (an offset lookup on the broker): a record published in between lies below
//! the resolved position and is skipped for good.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::{KafkaBus, OffsetReset, TopicOptions};
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, kafka_config};
use test_brokers::kafka_bootstrap;

/// Every round: a new group subscribes to a fresh topic with `latest`, then one envelope is
/// published after `subscribe` returned. Each must be handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_published_after_subscribe_returned_is_handled_with_latest() {
    for round in 0..5 {
        let topic = format!("review6.latest.{round}");
        let mut config = kafka_config(&kafka_bootstrap());
        config.group_id = Some(format!("review6-latest-{round}"));
        config.auto_offset_reset = OffsetReset::Latest;
        config.topics.insert(
            topic.clone(),
            TopicOptions {
                partitions: Some(4),
                ..TopicOptions::default()
            },
        );
        let bus = KafkaBus::connect(BusSettings::new("kafka", "review6"), config)
            .await
            .unwrap();
        let handled = Recorder::<String>::new();
        let h = handled.clone();
        bus.subscribe_envelope(
            &topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let h = h.clone();
                async move {
                    h.push(envelope.aggregate_id.clone());
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
        let envelope = Envelope::new("after", "Changed", 1, &serde_json::json!({})).unwrap();
        bus.publish_envelope(&topic, &envelope).await.unwrap();
        handled
            .wait_for(
                &format!("round {round}: the envelope published after subscribe"),
                |e| !e.is_empty(),
            )
            .await;
        bus.close().await.unwrap();
    }
}
