//! A Kafka offset commit that fails is counted, against a real broker killed and started again. (A test binary of its own: it installs the
//! process-wide metrics recorder.)

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::KafkaBus;
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, eventually, kafka_group_config};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use test_brokers::KafkaBroker;

/// The failed offset commits counted so far (`{namespace}_commit_failures_total`).
fn commit_failures(snapshotter: &Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name().ends_with("_commit_failures_total"))
        .map(|(.., value)| match value {
            DebugValue::Counter(count) => count,
            _ => 0,
        })
        .sum()
}

/// The offset `group` committed for partition 0 of `topic` on `bootstrap`.
fn committed(bootstrap: &str, group: &str, topic: &str) -> Option<i64> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, 0);
    let offsets = reader
        .committed_offsets(list, Duration::from_secs(5))
        .ok()?;
    match offsets.elements().first()?.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// Five records run while the broker (the group coordinator) is killed, and finish then: the
/// commit of their offsets fails once librdkafka stops waiting for the coordinator
/// (`session.timeout.ms`), and `commit_failures_total` counts it; once the broker is back the
/// group's offset reaches 5. Before, a failed commit went unseen: the counter stayed 0 (rdkafka's
/// event API reports nothing of an asynchronous manual commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_fails_while_the_coordinator_is_down_is_counted_and_the_offsets_are_committed_later()
 {
    integration_tests::capture_logs();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let mut broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let (topic, group) = ("commits.failures", "commit-failures");
    let bus = KafkaBus::connect(
        BusSettings::new("kafka", "commit-failures"),
        kafka_group_config(&bootstrap, group, topic, 1),
    )
    .await
    .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (started, finished) = (Recorder::<i64>::new(), Recorder::<i64>::new());
    let (g, s, f) = (gate.clone(), started.clone(), finished.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, s, f) = (g.clone(), s.clone(), f.clone());
            async move {
                s.push(envelope.event_version);
                g.acquire().await.map_err(HandlerError::permanent)?.forget();
                f.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for n in 0..5 {
        let envelope = Envelope::new(format!("agg-{n}"), "Changed", 1, &n).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    started
        .wait_for("five records running", |e| e.len() == 5)
        .await;
    broker.kill();
    // Records given back when the assignment is lost run again once the broker is back.
    gate.add_permits(1000);
    finished
        .wait_for("five records finished", |e| e.len() == 5)
        .await;
    eventually("the failed commit counted", || async {
        commit_failures(&snapshotter) >= 1
    })
    .await;
    broker.start_again();
    eventually("the offsets committed once the broker is back", || {
        let bootstrap = bootstrap.clone();
        async move {
            tokio::task::spawn_blocking(move || committed(&bootstrap, group, topic))
                .await
                .unwrap()
                == Some(5)
        }
    })
    .await;
    bus.close().await.unwrap();
}
