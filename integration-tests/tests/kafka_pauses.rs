//! Kafka backpressure across rebalances, against a real broker: a partition paused for
//! backpressure when it is revoked (an eager rebalance, an unsubscribe, a member joining) is read
//! again when it comes back to the same member. librdkafka keeps an application pause across
//! unassign and assign, so the bus resumes every partition it is assigned.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{DeadLetter, Envelope, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_kafka::{AssignmentStrategy, KafkaBus, KafkaConfig, TopicOptions};
use eventbus_pool::{BusSettings, PoolConfig};
use integration_tests::{Recorder, eventually, kafka_config};
use test_brokers::kafka_bootstrap;

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(
        aggregate,
        "Changed",
        version,
        &serde_json::json!({"v": version}),
    )
    .unwrap()
}

fn config(group: &str, topics: &[&str]) -> KafkaConfig {
    let mut config = kafka_config(&kafka_bootstrap());
    config.group_id = Some(group.to_owned());
    // Paused after 4 unfinished records of a partition.
    config.max_in_flight_per_partition = 4;
    for topic in topics {
        config.topics.insert(
            (*topic).to_owned(),
            TopicOptions {
                partitions: Some(1),
                ..TopicOptions::default()
            },
        );
    }
    config
}

fn settings(client: &str) -> BusSettings {
    BusSettings {
        pool: PoolConfig {
            pool_size: 8,
            ..PoolConfig::default()
        },
        // The gated handler is cut off quickly at the revoke.
        drain_timeout: Duration::from_secs(1),
        ..BusSettings::new("kafka", client)
    }
}

/// A handler that records each version and, while `gate_closed`, blocks until the gate opens.
fn gated_handler(
    handled: Arc<Recorder<i64>>,
    gate_closed: Arc<AtomicBool>,
    gate: Arc<tokio::sync::Notify>,
) -> Arc<dyn eventbus_core::EnvelopeHandler> {
    Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
        let (handled, gate_closed, gate) = (handled.clone(), gate_closed.clone(), gate.clone());
        async move {
            handled.push(envelope.event_version);
            while gate_closed.load(Ordering::SeqCst) {
                let notified = gate.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !gate_closed.load(Ordering::SeqCst) {
                    break;
                }
                notified.await;
            }
            Ok::<(), HandlerError>(())
        }
    })
}

/// Publishes v1..=20 of one aggregate, subscribes with a gated handler, and waits until the
/// partition holds 4 unfinished records (v1 running, v2..v4 queued in its lane): paused.
async fn paused_partition(
    bus: &KafkaBus,
    topic: &str,
    handled: &Arc<Recorder<i64>>,
    gate_closed: &Arc<AtomicBool>,
    gate: &Arc<tokio::sync::Notify>,
) -> eventbus_core::Subscription {
    for version in 1..=20 {
        bus.publish_envelope(topic, &envelope("only", version))
            .await
            .unwrap();
    }
    let subscription = bus
        .subscribe_envelope(
            topic,
            gated_handler(handled.clone(), gate_closed.clone(), gate.clone()),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    handled.wait_for("v1 started", |e| e.contains(&1)).await;
    eventually("the partition at its in-flight bound (paused)", || async {
        let stats = bus.pool_stats();
        stats.running == 1 && stats.queued >= 3
    })
    .await;
    subscription
}

fn open(gate_closed: &AtomicBool, gate: &tokio::sync::Notify) {
    gate_closed.store(false, Ordering::SeqCst);
    gate.notify_waiters();
}

/// Eager (range) assignment: subscribing a second topic on the same bus revokes every partition
/// and assigns them again to this (only) member. The first topic's partition was paused for
/// backpressure when it was revoked; after the reassignment every one of its records must still
/// be handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_revoked_is_consumed_again_after_an_eager_rebalance() {
    let (topic, other, group) = ("pauses.eager", "pauses.eager.other", "pauses.eager");
    let mut config = config(group, &[topic, other]);
    config.assignment_strategy = AssignmentStrategy::Range;
    let bus = eventbus_kafka::connect(settings("pauses.eager"), config)
        .await
        .unwrap();
    let handled = Recorder::<i64>::new();
    let gate_closed = Arc::new(AtomicBool::new(true));
    let gate = Arc::new(tokio::sync::Notify::new());
    let _subscription = paused_partition(&bus, topic, &handled, &gate_closed, &gate).await;

    // An unrelated topic joins the subscription: eager rebalance, the paused partition is
    // revoked (v1 cut off at the 1 s drain, v2..v4 given back) and assigned here again.
    let _other = integration_tests::collect(&bus, other).await;
    eventually("the first topic's partition assigned again", || async {
        bus.transport().assigned_partitions() == 2
    })
    .await;
    open(&gate_closed, &gate);

    handled
        .wait_for("all 20 versions handled after the reassignment", |e| {
            e.iter().collect::<HashSet<_>>().len() == 20
        })
        .await;
    bus.close().await.unwrap();
}

/// Cooperative-sticky (the default): the last subscription unsubscribes while its partition is
/// paused for backpressure, then the topic is subscribed again on the same bus. The new
/// subscription must read on from the committed offset to v20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_unsubscribed_is_consumed_again_after_resubscribing() {
    let (topic, group) = ("pauses.resubscribe", "pauses.resubscribe");
    let bus = eventbus_kafka::connect(settings("pauses.resubscribe"), config(group, &[topic]))
        .await
        .unwrap();
    let handled = Recorder::<i64>::new();
    let gate_closed = Arc::new(AtomicBool::new(true));
    let gate = Arc::new(tokio::sync::Notify::new());
    let subscription = paused_partition(&bus, topic, &handled, &gate_closed, &gate).await;

    subscription.unsubscribe().await.unwrap();
    open(&gate_closed, &gate);
    let again = Recorder::<i64>::new();
    bus.subscribe_envelope(
        topic,
        gated_handler(again.clone(), gate_closed.clone(), gate.clone()),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    // v1 may have finished in the old subscription once the gate opened; the last version must
    // reach the new one.
    again
        .wait_for("v20 handled after resubscribing", |e| e.contains(&20))
        .await;
    bus.close().await.unwrap();
}

/// Cooperative-sticky with two members: both partitions of the first member are paused for
/// backpressure; a second member joins (one partition moves to it) and closes (it moves back).
/// The partition back on the first member must be consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_when_it_moved_away_is_consumed_when_it_comes_back() {
    let (topic, group) = ("pauses.members", "pauses.members");
    let mut config = config(group, &[]);
    config.topics.insert(
        topic.to_owned(),
        TopicOptions {
            partitions: Some(2),
            ..TopicOptions::default()
        },
    );
    let first = eventbus_kafka::connect(settings("pauses.a"), config.clone())
        .await
        .unwrap();
    // Ten aggregates over the two partitions, 10 versions each.
    for version in 1..=10 {
        for aggregate in 0..10 {
            first
                .publish_envelope(topic, &envelope(&format!("agg-{aggregate}"), version))
                .await
                .unwrap();
        }
    }
    let handled = Recorder::<(String, i64)>::new();
    let gate_closed = Arc::new(AtomicBool::new(true));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (h, c, g) = (handled.clone(), gate_closed.clone(), gate.clone());
    first
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (h, c, g) = (h.clone(), c.clone(), g.clone());
                async move {
                    h.push((envelope.aggregate_id.clone(), envelope.event_version));
                    while c.load(Ordering::SeqCst) {
                        let notified = g.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable();
                        if !c.load(Ordering::SeqCst) {
                            break;
                        }
                        notified.await;
                    }
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    // Both partitions at their bound: 8 unfinished records (4 each), paused.
    eventually("both partitions at their in-flight bound", || async {
        let stats = first.pool_stats();
        stats.running + stats.queued >= 8
    })
    .await;

    let second = eventbus_kafka::connect(settings("pauses.b"), config)
        .await
        .unwrap();
    let by_second = integration_tests::collect(&second, topic).await;
    eventually("one partition moved to the second member", || async {
        first.transport().assigned_partitions() == 1
            && second.transport().assigned_partitions() == 1
    })
    .await;
    second.close().await.unwrap();
    eventually("both partitions back on the first member", || async {
        first.transport().assigned_partitions() == 2
    })
    .await;
    drop(by_second);
    open(&gate_closed, &gate);
    // Records published now, on both partitions, are this member's alone.
    for version in 11..=20 {
        for aggregate in 0..10 {
            first
                .publish_envelope(topic, &envelope(&format!("agg-{aggregate}"), version))
                .await
                .unwrap();
        }
    }
    handled
        .wait_for("every envelope published after the return handled", |e| {
            e.iter()
                .filter(|(_, version)| *version > 10)
                .collect::<HashSet<_>>()
                .len()
                == 100
        })
        .await;
    first.close().await.unwrap();
}

/// One record hangs in its handler while the partition's later records (other aggregates)
/// finish: it holds its own aggregate only. All 40 later records are handled while it hangs,
/// though the bound is 4 (it counts unfinished records; those finished behind the hung one take
/// no entry in the commit tracker), and the last one once it finishes. Tried with the bound
/// counting what the commit had not passed: the partition stopped after 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_record_holds_only_its_aggregate_and_the_partition_goes_on() {
    let topic = "pauses.hung";
    let bus = eventbus_kafka::connect(settings("pauses-hung"), config("pauses-hung", &[topic]))
        .await
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Recorder::<String>::new();
    let (g, h) = (gate.clone(), handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, h) = (g.clone(), h.clone());
            async move {
                if envelope.aggregate_id == "hung" {
                    g.acquire().await.map_err(HandlerError::permanent)?.forget();
                }
                h.push(envelope.aggregate_id.clone());
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(topic, &envelope("hung", 1))
        .await
        .unwrap();
    for n in 0..40 {
        bus.publish_envelope(topic, &envelope(&format!("later-{n}"), 1))
            .await
            .unwrap();
    }
    handled
        .wait_for("the 40 later records while the first one hangs", |e| {
            e.len() == 40
        })
        .await;
    gate.add_permits(1);
    handled
        .wait_for("the hung record once released", |e| e.len() == 41)
        .await;
    bus.close().await.unwrap();
}

/// With dead-lettering switched off an exhausted envelope stays in its lane, retried at the
/// maximum backoff: the aggregate waits, and only it (the engine's property 2). The partition's
/// 20 records of other aggregates behind it are handled, with a bound of 4. (Found by review:
/// the bound counting what the commit had not passed stopped the partition after 3.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_waiting_in_its_lane_does_not_stop_the_other_aggregates_of_its_partition() {
    let topic = "pauses.waiting";
    let settings = BusSettings {
        pool: PoolConfig {
            pool_size: 8,
            retry: RetryPolicy::new()
                .with_max_attempts(1)
                .with_backoff(Duration::from_millis(50), Duration::from_millis(200)),
            ..PoolConfig::default()
        },
        drain_timeout: Duration::from_secs(1),
        ..BusSettings::new("kafka", "pauses-waiting")
    };
    let bus = eventbus_kafka::connect(settings, config("pauses-waiting", &[topic]))
        .await
        .unwrap();
    let handled = Recorder::<String>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.aggregate_id == "stuck" {
                    return Err(HandlerError::transient("the downstream refuses it"));
                }
                h.push(envelope.aggregate_id.clone());
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new().with_dead_letter(DeadLetter::Disabled),
    )
    .await
    .unwrap();
    bus.publish_envelope(topic, &envelope("stuck", 1))
        .await
        .unwrap();
    for n in 0..20 {
        bus.publish_envelope(topic, &envelope(&format!("other-{n}"), 1))
            .await
            .unwrap();
    }
    handled
        .wait_for(
            "the 20 other aggregates handled while `stuck` waits in its lane",
            |events| events.len() == 20,
        )
        .await;
    bus.close().await.unwrap();
}
