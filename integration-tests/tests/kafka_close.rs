//! Kafka close with the broker gone, against a real broker that is killed: `close` returns
//! within the drain timeout plus a few seconds (catching up respects its deadline; the commit
//! and the group leave are left to finish in the background), and nothing it leaves behind
//! holds up the shutdown of the caller's runtime.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::TopicOptions;
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, eventually, kafka_config};
use test_brokers::KafkaBroker;

/// The broker killed: connections refused from then on.
#[test]
fn close_with_the_broker_killed_returns_within_the_drain_budget_and_lets_the_runtime_stop() {
    close_with_the_broker_gone("close.killed", KafkaBroker::kill);
}

/// The broker frozen (SIGSTOP): connections stay open and nothing is answered, so every request
/// waits for its own timeout.
#[test]
fn close_with_the_broker_frozen_returns_within_the_drain_budget_and_lets_the_runtime_stop() {
    close_with_the_broker_gone("close.frozen", |broker| broker.freeze());
}

/// 8 partitions assigned, every record handled, then the broker goes away (`gone`): `close`
/// with a 2 s drain timeout has nothing in flight to wait for and must return within the
/// documented budget (1 s catch-up + 2 s drain + 5 s for the commit and the group leave), give
/// or take a few seconds. Then the runtime the bus ran on is dropped, as `main` returning would:
/// tokio waits for every blocking task, so a close that parked a wait on librdkafka's group
/// leave (which, with the broker gone, may never finish) on a blocking task would hang the
/// program here.
fn close_with_the_broker_gone(group: &str, gone: impl FnOnce(&mut KafkaBroker)) {
    let mut broker = KafkaBroker::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let topic = group;
    let drain = Duration::from_secs(2);
    let (bus, _handled) = runtime.block_on(async {
        let mut config = kafka_config(&broker.bootstrap());
        config.group_id = Some(group.to_owned());
        config.topics.insert(
            topic.to_owned(),
            TopicOptions {
                partitions: Some(8),
                ..TopicOptions::default()
            },
        );
        let bus = eventbus_kafka::connect(
            BusSettings {
                drain_timeout: drain,
                ..BusSettings::new("kafka", group)
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
            bus.transport().assigned_partitions() == 8
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
        (bus, handled)
    });

    gone(&mut broker);
    let budget = drain / 2 + drain + Duration::from_secs(5);
    let started = Instant::now();
    let closed = runtime.block_on(async {
        let closed = tokio::time::timeout(Duration::from_secs(50), bus.close()).await;
        drop(bus);
        closed
    });
    let took = started.elapsed();
    assert!(closed.is_ok(), "close did not return within 50 s");
    assert!(
        took <= budget + Duration::from_secs(5),
        "close took {took:?} with a {drain:?} drain timeout (budget {budget:?})"
    );

    // Dropped on a thread of its own so that a hang fails this test instead of stalling it.
    let (stopped, stop) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        drop(runtime);
        let _ = stopped.send(());
    });
    let shutdown = stop.recv_timeout(Duration::from_secs(30));
    assert!(
        shutdown.is_ok(),
        "the runtime had not stopped 30 s after close returned: something close left behind blocks it"
    );
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "the runtime took {:?} to stop after close",
        started.elapsed()
    );
}
