//! Kafka dead-letter topics, against a real broker: a dead-letter topic the bus creates keeps its
//! records with no age limit (`retention.ms=-1`), whatever `topic_defaults.retention` says, as the
//! delivery contract asks of dead-letter destinations.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::{KafkaBus, TopicOptions};
use eventbus_pool::BusSettings;
use integration_tests::{collect, kafka_config};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use test_brokers::kafka_bootstrap;

async fn retention_ms(topic: &str) -> String {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap();
    let results = admin
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
    let bus = KafkaBus::connect(BusSettings::new("kafka", client), config)
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
