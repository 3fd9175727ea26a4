//! A lost assignment (the broker frozen past `session.timeout.ms`, then thawed): the group has
//! given the partition to another member already, so the member that lost it must not keep
//! running its records: its running handlers are cancelled at once (not drained for the drain
//! timeout), and they stop before the new owner runs the same aggregate (fails when a lost
//! revoke drains); and nothing unhandled is committed, so nothing is lost.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus_core::{Envelope, HandlerContext, SubscribeOptions};
use eventbus_kafka::KafkaBus;
use eventbus_pool::{BusSettings, PoolConfig};
use integration_tests::{
    Recorder, assert_first_handlings_in_order, assert_replays_are_in_order_suffixes, eventually,
    kafka_group_config,
};
use test_brokers::KafkaBroker;

#[derive(Clone, Debug)]
struct Run {
    member: &'static str,
    version: i64,
    started: Instant,
    ended: Option<Instant>,
}

/// Pushes the end of a run when dropped.
struct Ended {
    runs: Arc<Recorder<Run>>,
    member: &'static str,
    version: i64,
    started: Instant,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.runs.push(Run {
            member: self.member,
            version: self.version,
            started: self.started,
            ended: Some(Instant::now()),
        });
    }
}

fn settings(client: &str) -> BusSettings {
    BusSettings {
        pool: PoolConfig {
            pool_size: 4,
            ..PoolConfig::default()
        },
        drain_timeout: Duration::from_secs(20),
        ..BusSettings::new("kafka", client)
    }
}

async fn member(
    bus: &KafkaBus,
    topic: &str,
    name: &'static str,
    runs: Arc<Recorder<Run>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
) {
    bus.subscribe_envelope(
        topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let (runs, gate) = (runs.clone(), gate.clone());
            async move {
                let started = Instant::now();
                runs.push(Run {
                    member: name,
                    version: envelope.event_version,
                    started,
                    ended: None,
                });
                // Records the end however the run ends: returned, or dropped by the bus.
                let _ended = Ended {
                    runs: runs.clone(),
                    member: name,
                    version: envelope.event_version,
                    started,
                };
                if let Some(gate) = gate
                    && envelope.event_version == 1
                {
                    // v1 on member a: runs until the test opens the gate (well inside the
                    // 20 s drain timeout) or the bus cancels it.
                    tokio::select! {
                        permit = gate.acquire() => permit.unwrap().forget(),
                        () = ctx.cancellation().cancelled() => {}
                    }
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
}

/// Member a owns the only partition and runs v1 of aggregate x (held by a gate, or until
/// cancelled); member b is in the group with nothing assigned. The broker is frozen until a's
/// session is lost, then thawed. b gets the partition and runs x v1 again (nothing of it was
/// committed: fine); a's v1 must have ended before that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_does_not_keep_running_beside_the_new_owner() {
    let broker = KafkaBroker::start();
    let (topic, group) = ("lost.overlap", "lost-overlap");
    let config = kafka_group_config(&broker.bootstrap(), group, topic, 1);
    let a = eventbus_kafka::connect(settings("lost-a"), config.clone())
        .await
        .unwrap();
    let runs = Recorder::<Run>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    member(&a, topic, "a", runs.clone(), Some(gate.clone())).await;
    eventually("the partition on a", || async {
        a.transport().assigned_partitions() == 1
    })
    .await;
    let b = eventbus_kafka::connect(settings("lost-b"), config)
        .await
        .unwrap();
    member(&b, topic, "b", runs.clone(), None).await;

    a.publish_envelope(topic, &Envelope::new("x", "Changed", 1, &1).unwrap())
        .await
        .unwrap();
    runs.wait_for("x v1 running on a", |e| {
        e.iter().any(|r| r.member == "a" && r.version == 1)
    })
    .await;
    assert_eq!(
        a.transport().assigned_partitions(),
        1,
        "the partition stayed on a"
    );

    tokio::task::block_in_place(|| broker.freeze());
    // a's client notices the session timeout (6 s) and revokes the partition as lost.
    eventually("a's assignment lost", || async {
        a.transport().assigned_partitions() == 0
    })
    .await;
    tokio::task::block_in_place(|| broker.thaw());

    // Whoever owns the partition now (b, or a after rejoining) runs x v1 again: nothing of it
    // was committed. The first run must have ended before that second run started.
    let events = runs
        .wait_for("x v1 run again after the lost assignment", |e| {
            e.iter()
                .filter(|r| r.version == 1 && r.ended.is_none())
                .count()
                >= 2
        })
        .await;
    gate.add_permits(1);
    b.close().await.unwrap();
    a.close().await.unwrap();
    let starts: Vec<&Run> = events
        .iter()
        .filter(|r| r.version == 1 && r.ended.is_none())
        .collect();
    let (first, second) = (starts[0], starts[1]);
    let first_end = events
        .iter()
        .find(|r| r.member == first.member && r.started == first.started && r.ended.is_some())
        .and_then(|r| r.ended)
        .unwrap_or_else(|| panic!("the first run of x v1 had not ended: {events:?}"));
    assert!(
        first_end <= second.started,
        "x v1 ran twice at once: {} started it {:?} before {}'s lost run ended (the lost revoke \
         did not cancel it); runs: {events:?}",
        second.member,
        first_end - second.started,
        first.member
    );
}

/// One member, 600 envelopes over 4 partitions, the broker frozen mid-stream until the
/// assignment is lost, then thawed: nothing unhandled was committed, so every envelope is
/// handled; first handlings in order per aggregate; replays are in-order suffixes; an
/// aggregate's handlers never overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_mid_stream_loses_nothing_and_keeps_order() {
    let broker = KafkaBroker::start();
    let (topic, group) = ("lost.replay", "lost-replay");
    let (aggregates, versions) = (10usize, 60i64);
    let bus = eventbus_kafka::connect(
        BusSettings {
            pool: PoolConfig {
                pool_size: 8,
                ..PoolConfig::default()
            },
            drain_timeout: Duration::from_secs(5),
            ..BusSettings::new("kafka", "lostreplay")
        },
        kafka_group_config(&broker.bootstrap(), group, topic, 4),
    )
    .await
    .unwrap();
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            let envelope =
                Envelope::new(format!("agg-{aggregate}"), "Changed", version, &1).unwrap();
            bus.publish_envelope(topic, &envelope).await.unwrap();
        }
    }
    let total = aggregates * versions as usize;
    let handled = Recorder::<(String, i64)>::new();
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let (h, r, o) = (handled.clone(), running.clone(), overlaps.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (h, r, o) = (h.clone(), r.clone(), o.clone());
            async move {
                {
                    let mut running = r.lock().unwrap();
                    let n = running.entry(envelope.aggregate_id.clone()).or_default();
                    if *n > 0 {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    *n += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                *r.lock().unwrap().get_mut(&envelope.aggregate_id).unwrap() -= 1;
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    handled
        .wait_for("a sixth handled", |e| e.len() >= total / 6)
        .await;
    tokio::task::block_in_place(|| broker.freeze());
    eventually("the assignment lost", || async {
        bus.transport().assigned_partitions() == 0
    })
    .await;
    tokio::task::block_in_place(|| broker.thaw());
    let events = handled
        .wait_for("every envelope", |e| {
            e.iter().collect::<HashSet<_>>().len() == total
        })
        .await;
    bus.close().await.unwrap();
    let duplicates = assert_first_handlings_in_order(&events, aggregates, versions);
    assert_replays_are_in_order_suffixes(&events);
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "an aggregate's handlers overlapped"
    );
    eprintln!("lost replay: {total} envelopes, {duplicates} handled twice");
}
