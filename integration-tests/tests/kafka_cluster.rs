//! The Kafka backend on a 3-node KRaft cluster (`test_brokers::KafkaCluster`, every node broker
//! and controller, on loopback): replicated topics from the bus's configuration, and a leader
//! lost while publishing and consuming.

// Test code: a failed unwrap, index or expect is a failed check.
#![allow(
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::KafkaBus;
use eventbus_pool::BusSettings;
use futures::StreamExt;
use integration_tests::{assert_first_handlings_in_order, eventually, kafka_group_config};
use rdkafka::consumer::{BaseConsumer, Consumer};
use test_brokers::KafkaCluster;

fn envelope(aggregate: usize, version: i64) -> Envelope {
    Envelope::new(
        format!("agg-{aggregate}"),
        "Changed",
        version,
        &serde_json::json!({"version": version}),
    )
    .unwrap()
}

/// Every handling in order, and the distinct (aggregate, version) pairs among them.
type Handled = (Vec<(String, i64)>, HashSet<(String, i64)>);

/// The node leading partition `partition` of `topic`, as the cluster's metadata says.
fn partition_leader(bootstrap: &str, topic: &str, partition: i32) -> Option<i32> {
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()?;
    let topic = metadata.topics().iter().find(|t| t.name() == topic)?;
    let partition = topic.partitions().iter().find(|p| p.id() == partition)?;
    Some(partition.leader()).filter(|leader| *leader >= 0)
}

/// Topics made with a replication factor of 3 and `min.insync.replicas` 2; the node leading a
/// partition is killed while 5,000 envelopes over 200 aggregates are published (each
/// aggregate's in order, a failed publish retried) and consumed by one member: every envelope
/// is handled, the first handlings of each aggregate in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_killed_mid_stream_loses_nothing_and_keeps_order() {
    integration_tests::capture_logs();
    let mut cluster = tokio::task::block_in_place(|| KafkaCluster::start(3));
    let bootstrap = cluster.bootstrap();
    let topic = "cluster.orders";
    let mut config = kafka_group_config(&bootstrap, "cluster", topic, 4);
    config.topic_defaults.replication_factor = Some(3);
    config.topic_defaults.min_insync_replicas = Some(2);
    let subscriber = KafkaBus::connect(BusSettings::new("kafka", "cluster-a"), config.clone())
        .await
        .unwrap();
    let handled: Arc<Mutex<Handled>> = Arc::default();
    let recorder = handled.clone();
    let _subscription = subscriber
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let recorder = recorder.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let pair = (envelope.aggregate_id.clone(), envelope.event_version);
                    let mut handled = recorder.lock().unwrap();
                    handled.1.insert(pair.clone());
                    handled.0.push(pair);
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let publisher = Arc::new(
        KafkaBus::connect(BusSettings::new("kafka", "cluster-publisher"), config)
            .await
            .unwrap(),
    );
    let (aggregates, versions) = (200usize, 25i64);
    let failed = Arc::new(AtomicUsize::new(0));
    let (all_publisher, all_failed) = (publisher.clone(), failed.clone());
    let publishing = tokio::spawn(
        futures::stream::iter(0..aggregates)
            .map(move |aggregate| {
                let (publisher, failed) = (all_publisher.clone(), all_failed.clone());
                async move {
                    for version in 1..=versions {
                        let envelope = envelope(aggregate, version);
                        while let Err(error) = publisher.publish_envelope(topic, &envelope).await {
                            let failures = failed.fetch_add(1, Ordering::SeqCst);
                            assert!(
                                failures < 20_000,
                                "publishes keep failing: {}",
                                error.report()
                            );
                            eprintln!("publish failed, retried: {}", error.report());
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
            .buffer_unordered(aggregates)
            .collect::<Vec<()>>(),
    );
    eventually("a fifth handled", || async {
        handled.lock().unwrap().1.len() >= aggregates * 5
    })
    .await;
    let leader = tokio::task::block_in_place(|| partition_leader(&bootstrap, topic, 0))
        .expect("partition 0 has a leader");
    let index = KafkaCluster::index_of(leader).unwrap();
    eprintln!("killing node {leader}, the leader of {topic}/0");
    cluster.node(index).kill();
    tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("every envelope published within three minutes of the kill")
        .unwrap();
    let total = aggregates * usize::try_from(versions).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    while handled.lock().unwrap().1.len() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {total} handled three minutes after the kill",
            handled.lock().unwrap().1.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = handled.lock().unwrap().0.clone();
    let duplicates = assert_first_handlings_in_order(&all, aggregates, versions);
    eprintln!(
        "Kafka partition leader killed: {total} envelopes, {duplicates} handled twice, {} publishes failed and retried",
        failed.load(Ordering::SeqCst)
    );
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}
