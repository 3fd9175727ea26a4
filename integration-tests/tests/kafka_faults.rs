//! Fault injection against a real Kafka broker: a member joining and leaving mid-stream (both
//! group protocols), the consuming process SIGKILLed and restarted, the broker killed and
//! restarted.

// Test code: a failed unwrap or expect is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{ConnectionState, Envelope, HandlerContext, SubscribeOptions};
use eventbus_kafka::{GroupProtocol, KafkaBus, KafkaConfig};
use eventbus_pool::{BusSettings, PoolConfig};
use integration_tests::{
    BrokerAction, Recorder, assert_first_handlings_in_order, eventually, kafka_group_config,
    pipelined_publishes_across_a_broker_restart, read_handled, spawn_consumer,
};
use test_brokers::{KafkaBroker, kafka_bootstrap};
use tokio::sync::mpsc;

fn envelope(aggregate: usize, version: i64) -> Envelope {
    Envelope::new(
        format!("agg-{aggregate}"),
        "Changed",
        version,
        &serde_json::json!({"aggregate": aggregate, "version": version}),
    )
    .unwrap()
}

fn config(bootstrap: &str, topic: &str, group: &str, partitions: i32) -> KafkaConfig {
    kafka_group_config(bootstrap, group, topic, partitions)
}

fn settings(client: &str) -> BusSettings {
    BusSettings {
        pool: PoolConfig {
            pool_size: 16,
            ..PoolConfig::default()
        },
        drain_timeout: Duration::from_secs(10),
        ..BusSettings::new("kafka", client)
    }
}

async fn publish_all(bus: &KafkaBus, topic: &str, aggregates: usize, versions: i64) {
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            bus.publish_envelope(topic, &envelope(aggregate, version))
                .await
                .unwrap();
        }
    }
}

/// One handling: which member ran which event, and when.
#[derive(Clone, Debug)]
struct Run {
    member: &'static str,
    aggregate: String,
    version: i64,
    started: Instant,
    ended: Instant,
}

async fn subscribe_member(
    bus: &KafkaBus,
    topic: &str,
    member: &'static str,
    runs: Arc<Recorder<Run>>,
) {
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let runs = runs.clone();
            async move {
                let started = Instant::now();
                tokio::time::sleep(Duration::from_millis(2)).await;
                runs.push(Run {
                    member,
                    aggregate: envelope.aggregate_id.clone(),
                    version: envelope.event_version,
                    started,
                    ended: Instant::now(),
                });
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
}

/// Distinct (aggregate, version) pairs handled so far.
fn distinct(runs: &[Run]) -> usize {
    runs.iter()
        .map(|run| (run.aggregate.clone(), run.version))
        .collect::<HashSet<_>>()
        .len()
}

/// A second member joins the group mid-stream and later leaves: nothing is lost, first
/// handlings stay in order per aggregate, and no aggregate ever runs on both members at once.
/// The stream comes in three phases (one member, two members, one member again), so every
/// membership change happens while events keep arriving.
async fn a_member_joining_and_leaving_mid_stream(protocol: GroupProtocol, name: &str) {
    let topic = format!("faults.members.{name}");
    let group = format!("members-{name}");
    let (aggregates, versions) = (60usize, 60i64);
    let mut base = config(&kafka_bootstrap(), &topic, &group, 8);
    base.group_protocol = protocol;
    if protocol == GroupProtocol::Consumer {
        // The broker keeps the session under this protocol.
        base.consumer_properties.0.remove("session.timeout.ms");
        base.consumer_properties.0.remove("heartbeat.interval.ms");
    }
    let first = eventbus_kafka::connect(settings("member-a"), base.clone())
        .await
        .unwrap();
    let publish = |from: i64, to: i64| {
        let (first, topic) = (&first, &topic);
        async move {
            for version in from..=to {
                for aggregate in 0..aggregates {
                    first
                        .publish_envelope(topic, &envelope(aggregate, version))
                        .await
                        .unwrap();
                }
            }
        }
    };
    let phase = |n: i64| aggregates * n as usize;
    let runs = Recorder::<Run>::new();
    subscribe_member(&first, &topic, "a", runs.clone()).await;
    publish(1, 20).await;
    runs.wait_for("phase one", |e| distinct(e) == phase(20))
        .await;

    let second = eventbus_kafka::connect(settings("member-b"), base)
        .await
        .unwrap();
    subscribe_member(&second, &topic, "b", runs.clone()).await;
    eventually("partitions on the second member", || async {
        second.transport().assigned_partitions() > 0
    })
    .await;
    publish(21, 40).await;
    runs.wait_for("phase two", |e| distinct(e) == phase(40))
        .await;
    second.close().await.unwrap();

    publish(41, versions).await;
    let total = phase(versions);
    let events = runs
        .wait_for("every envelope", |e| distinct(e) == total)
        .await;
    let handled: Vec<(String, i64)> = events
        .iter()
        .map(|run| (run.aggregate.clone(), run.version))
        .collect();
    let duplicates = assert_first_handlings_in_order(&handled, aggregates, versions);
    let mut per_aggregate: HashMap<&str, Vec<&Run>> = HashMap::new();
    for run in &events {
        per_aggregate.entry(&run.aggregate).or_default().push(run);
    }
    for (aggregate, runs) in per_aggregate {
        for (i, one) in runs.iter().enumerate() {
            for other in runs.iter().skip(i + 1) {
                let overlap = one.member != other.member
                    && one.started < other.ended
                    && other.started < one.ended;
                assert!(
                    !overlap,
                    "{aggregate} ran on both members at once: v{} on {} and v{} on {}",
                    one.version, one.member, other.version, other.member
                );
            }
        }
    }
    let by_b = events.iter().filter(|run| run.member == "b").count();
    assert!(by_b > 0, "the second member handled nothing");
    eprintln!("{name}: {total} envelopes, {by_b} handled by the second member, {duplicates} twice");
    first.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_and_leaving_mid_stream_loses_nothing_with_the_classic_protocol() {
    a_member_joining_and_leaving_mid_stream(GroupProtocol::Classic, "classic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_and_leaving_mid_stream_loses_nothing_with_the_consumer_protocol() {
    a_member_joining_and_leaving_mid_stream(GroupProtocol::Consumer, "kip848").await;
}

/// The consuming process is SIGKILLed three times mid-stream (no close, no commit of what it
/// held) and restarted: 10,000 envelopes over 100 aggregates and 8 partitions all handled,
/// first handlings in order per aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_process_killed_three_times_loses_nothing_and_keeps_order() {
    let bootstrap = kafka_bootstrap();
    let (topic, group) = ("faults.sigkill", "sigkill");
    let (aggregates, versions) = (100usize, 100i64);
    let publisher =
        eventbus_kafka::connect(settings("publisher"), config(&bootstrap, topic, group, 8))
            .await
            .unwrap();
    publish_all(&publisher, topic, aggregates, versions).await;
    let total = aggregates * versions as usize;

    let (sender, mut lines) = mpsc::unbounded_channel();
    let mut handled = Vec::new();
    for round in 1..=3 {
        let mut child = spawn_consumer(
            env!("CARGO_BIN_EXE_consumer"),
            ["kafka", &bootstrap, topic, group],
            sender.clone(),
        );
        let distinct = handled.iter().collect::<HashSet<_>>().len();
        read_handled(&mut lines, &mut handled, distinct + total / 5).await;
        // SIGKILL: no close, no commit of what it held.
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("sigkill round {round}: {} handlings so far", handled.len());
    }
    let mut last = spawn_consumer(
        env!("CARGO_BIN_EXE_consumer"),
        ["kafka", &bootstrap, topic, group],
        sender,
    );
    read_handled(&mut lines, &mut handled, total).await;
    last.kill().unwrap();
    last.wait().unwrap();
    let duplicates = assert_first_handlings_in_order(&handled, aggregates, versions);
    eprintln!("sigkill: {total} envelopes, {duplicates} handled twice");
    publisher.close().await.unwrap();
}

/// The broker is SIGKILLed mid-stream and restarted on the same store: the bus resumes by
/// itself (publishing and consuming what is published after the restart), nothing is lost,
/// first handlings stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_mid_stream_loses_nothing() {
    let mut broker = KafkaBroker::start();
    let (topic, group) = ("faults.broker", "broker");
    let (aggregates, versions) = (20usize, 100i64);
    let bus = eventbus_kafka::connect(
        settings("restart"),
        config(&broker.bootstrap(), topic, group, 4),
    )
    .await
    .unwrap();
    publish_all(&bus, topic, aggregates, versions).await;
    let total = aggregates * versions as usize;
    let runs = Recorder::<Run>::new();
    subscribe_member(&bus, topic, "a", runs.clone()).await;
    let states = integration_tests::record_connection_states(bus.connection_state());
    runs.wait_for("a quarter handled", |e| e.len() >= total / 4)
        .await;
    tokio::task::block_in_place(|| broker.start_again());
    let events = runs
        .wait_for("every envelope after the restart", |e| {
            e.iter()
                .map(|run| (run.aggregate.clone(), run.version))
                .collect::<HashSet<_>>()
                .len()
                == total
        })
        .await;
    let handled: Vec<(String, i64)> = events
        .iter()
        .map(|run| (run.aggregate.clone(), run.version))
        .collect();
    let duplicates = assert_first_handlings_in_order(&handled, aggregates, versions);
    eprintln!("broker restart: {total} envelopes, {duplicates} handled twice");
    // The watch saw every broker go and come back.
    states
        .wait_for("reconnecting, then connected", |e| {
            e.iter()
                .skip_while(|state| **state != ConnectionState::Reconnecting)
                .any(|state| *state == ConnectionState::Connected)
        })
        .await;
    bus.close().await.unwrap();
}

/// Pipelined publishes with the broker killed while they are in flight, more started while it
/// is down, more once it is back: each settles once, in its `PendingPublish` and on the results
/// stream, what was confirmed is consumed, and no aggregate's stored events go backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_across_a_broker_restart_settle_once_and_keep_each_aggregates_order() {
    let mut broker = KafkaBroker::start();
    let (topic, group) = ("faults.pipelined", "pipelined");
    let mut config = config(&broker.bootstrap(), topic, group, 4);
    config.publish_timeout = Duration::from_secs(3);
    let bus = Arc::new(
        eventbus_kafka::connect(settings("pipelined-restart"), config)
            .await
            .unwrap(),
    );
    // The topic exists before the broker goes.
    bus.publish_envelope(topic, &envelope(99, 1)).await.unwrap();
    let (confirmed, failed, refused) =
        pipelined_publishes_across_a_broker_restart(bus, topic, &mut |action| match action {
            BrokerAction::Kill => broker.kill(),
            BrokerAction::StartAgain => broker.start_again(),
        })
        .await;
    eprintln!(
        "pipelined restart: {confirmed} confirmed, {failed} failed, {refused} not handed over"
    );
    assert!(confirmed > 0, "nothing was confirmed");
}
