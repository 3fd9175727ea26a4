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

use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_pool::BusSettings;
use futures::StreamExt;
use integration_tests::{
    Poisoned, assert_first_handlings_in_order_until, eventually, kafka_group_config,
};
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

/// Every handling in order, the distinct (aggregate, version) pairs among them, and when each
/// handling ended.
type Handled = (
    Vec<(String, i64)>,
    HashSet<(String, i64)>,
    Vec<std::time::Instant>,
);

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
    failover(Fault::PartitionLeaderKilled).await;
}

/// As above, the group's coordinator killed (the leader of `__consumer_offsets`, one
/// partition here): the member finds the new coordinator, commits go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_coordinator_killed_mid_stream_loses_nothing_and_keeps_order() {
    failover(Fault::CoordinatorKilled).await;
}

/// As above, a partition's leader paused (SIGSTOP) for 15 s, longer than the member's
/// session timeout (6 s): its sockets stay open and answer nothing, then it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_paused_mid_stream_loses_nothing_and_keeps_order() {
    failover(Fault::PartitionLeaderPaused(Duration::from_secs(15))).await;
}

/// As above, every node restarted in turn (killed, started again on its store, the next one
/// once every replica of the topic and of `__consumer_offsets` is in sync again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_nothing_and_keeps_order() {
    failover(Fault::RollingRestart).await;
}

/// What a failover test does to the cluster once a fifth of the envelopes were handled.
#[derive(Debug, Clone, Copy)]
enum Fault {
    PartitionLeaderKilled,
    CoordinatorKilled,
    PartitionLeaderPaused(Duration),
    RollingRestart,
}

/// True when every partition of `topics` has all its replicas in sync.
fn in_sync(bootstrap: &str, topics: &[&str]) -> bool {
    let Ok(client) = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create::<BaseConsumer>()
    else {
        return false;
    };
    topics.iter().all(|topic| {
        client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .is_ok_and(|metadata| {
                metadata.topics().iter().all(|t| {
                    !t.partitions().is_empty()
                        && t.partitions()
                            .iter()
                            .all(|p| p.isr().len() == p.replicas().len() && p.leader() >= 0)
                })
            })
    })
}

/// Publishes and consumes 5,000 envelopes over 200 aggregates on topics with a replication
/// factor of 3 and `min.insync.replicas` 2, doing `fault` to the cluster mid-stream; checks
/// that every envelope was handled and each aggregate's first handlings are in version order.
/// Two aggregates are refused for good ([`Poisoned`]), one before the fault and one after, with
/// parking on: each one's refused event and every later one end in the dead-letter topic (RF 3
/// too), the later ones marked parked and never handled.
async fn failover(fault: Fault) {
    // One failover at a time: two 3-node clusters would share the 2 cores of the test machine.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_AT_A_TIME.lock().await;
    integration_tests::capture_logs();
    let mut cluster = tokio::task::block_in_place(|| KafkaCluster::start(3));
    let bootstrap = cluster.bootstrap();
    let topic = "cluster.orders";
    let mut config = kafka_group_config(&bootstrap, "cluster", topic, 4);
    config.topic_defaults.replication_factor = Some(3);
    config.topic_defaults.min_insync_replicas = Some(2);
    let subscriber =
        eventbus_kafka::connect(BusSettings::new("kafka", "cluster-a"), config.clone())
            .await
            .unwrap();
    let (aggregates, versions) = (200usize, 25i64);
    let poisoned = Poisoned::new(versions);
    let handled: Arc<Mutex<Handled>> = Arc::default();
    let recorder = handled.clone();
    let options = SubscribeOptions::new().with_park_on_dead_letter(true);
    let dead_letter_topic = options.dead_letter_topic(topic).unwrap().unwrap();
    let _subscription = subscriber
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let recorder = recorder.clone();
                async move {
                    if poisoned.refuses(&envelope) {
                        return Err(HandlerError::permanent("poisoned"));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let pair = (envelope.aggregate_id.clone(), envelope.event_version);
                    let mut handled = recorder.lock().unwrap();
                    handled.1.insert(pair.clone());
                    handled.0.push(pair);
                    handled.2.push(std::time::Instant::now());
                    Ok::<(), HandlerError>(())
                }
            }),
            options,
        )
        .await
        .unwrap();
    let publisher = Arc::new(
        eventbus_kafka::connect(BusSettings::new("kafka", "cluster-publisher"), config)
            .await
            .unwrap(),
    );
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
    let fault_began = std::time::Instant::now();
    match fault {
        Fault::PartitionLeaderKilled | Fault::PartitionLeaderPaused(_) => {
            let leader = tokio::task::block_in_place(|| partition_leader(&bootstrap, topic, 0))
                .expect("partition 0 has a leader");
            let index = KafkaCluster::index_of(leader).unwrap();
            eprintln!("{fault:?}: node {leader} leads {topic}/0");
            if let Fault::PartitionLeaderPaused(paused_for) = fault {
                cluster.node(index).freeze();
                tokio::time::sleep(paused_for).await;
                cluster.node(index).thaw();
            } else {
                cluster.node(index).kill();
            }
        }
        Fault::CoordinatorKilled => {
            // offsets.topic.num.partitions is 1: its leader coordinates every group.
            let coordinator = tokio::task::block_in_place(|| {
                partition_leader(&bootstrap, "__consumer_offsets", 0)
            })
            .expect("__consumer_offsets has a leader");
            let index = KafkaCluster::index_of(coordinator).unwrap();
            eprintln!("{fault:?}: node {coordinator} coordinates the group");
            cluster.node(index).kill();
        }
        Fault::RollingRestart => {
            for node in 0..cluster.len() {
                tokio::task::block_in_place(|| cluster.node(node).start_again());
                let started = std::time::Instant::now();
                eventually("every replica in sync again", || async {
                    let bootstrap = bootstrap.clone();
                    tokio::task::spawn_blocking(move || {
                        in_sync(&bootstrap, &[topic, "__consumer_offsets"])
                    })
                    .await
                    .unwrap()
                })
                .await;
                eprintln!(
                    "node {} restarted, replicas in sync {:?} later",
                    node + 1,
                    started.elapsed()
                );
            }
        }
    }
    tokio::time::timeout(Duration::from_secs(180), publishing)
        .await
        .expect("every envelope published within three minutes of the kill")
        .unwrap();
    let total = aggregates * usize::try_from(versions).unwrap() - poisoned.unhandled();
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
    let duplicates = assert_first_handlings_in_order_until(&all, aggregates, |aggregate| {
        poisoned.last_handled(aggregate)
    });
    poisoned
        .wait_dead_lettered(&subscriber, &dead_letter_topic)
        .await;
    let pause = integration_tests::longest_pause_after(&handled.lock().unwrap().2, fault_began);
    eprintln!(
        "{fault:?}: {total} envelopes, {duplicates} handled twice, {} publishes failed and retried, longest pause in handling after the fault began {pause:?}",
        failed.load(Ordering::SeqCst)
    );
    subscriber.close().await.unwrap();
    publisher.close().await.unwrap();
}
