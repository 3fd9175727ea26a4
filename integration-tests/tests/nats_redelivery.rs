//! Redelivery against a real nats-server: a pull request read late while the runtime makes room,
//! a durable made again while a message is held (it resumes at the bus's position), and plain
//! messages cut off at the unsubscribe deadline (acknowledged, not run twice). Each test names
//! the rule of `docs/semantics.md` it holds the bus to.

// Test code: a failed unwrap or expect is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus_core::{Envelope, HandlerContext, Message, OutboundMessage, SubscribeOptions};
use integration_tests::{
    Recorder, assert_first_handlings_in_order, assert_replays_are_in_order_suffixes, eventually,
    nats_config, nats_settings,
};
use test_brokers::NatsServer;

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(aggregate, "Changed", version, &version).unwrap()
}

/// Rule: "handlers of one aggregate in one subscription never overlap and start in publish
/// order" (envelopes, at-least-once, nothing lost).
///
/// `fetch::pull_loop` sends the next pull request as soon as the current one has arrived in
/// full, then delivers the current one's messages, waiting for room in the lane. async-nats ends
/// a `Batch` stream once `expires + 5 s` have passed since the request was made, even when its
/// messages sit unread in the inbox: if delivering the current batch waits longer than that,
/// the pipelined request's messages are dropped unread. The server counts them as delivered;
/// they come back only after `ack_wait`, after newer events of their aggregate.
///
/// Here: batches of 2, a lane of 2, version 1 runs 7 s. Request 2 ([3, 4]) is read while
/// 1 runs and 2 is queued; request 3 ([5, 6]) is sent at once; delivering 4 waits for room
/// until version 1 ends (7 s > 0.2 s + 5 s), by then request 3 has timed out on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_pull_request_read_late_loses_nothing_and_keeps_order() {
    let server = NatsServer::start();
    let (mut settings, mut config) = (nats_settings("pipelined"), nats_config(&server.url()));
    config.consumer.fetch_batch = 2;
    config.consumer.ack_wait = Duration::from_secs(10);
    settings.pool = eventbus_pool::PoolConfig {
        pool_size: 1,
        inbox_size: 2,
        ..eventbus_pool::PoolConfig::default()
    };
    let bus = eventbus_nats::connect(settings.clone(), config)
        .await
        .unwrap();
    let topic = "orders.pipelined";
    for version in 1..=10 {
        bus.publish_envelope(topic, &envelope("x", version))
            .await
            .unwrap();
    }
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                if envelope.event_version == 1 {
                    // A slow handler (a slow downstream call), not a wait on a condition.
                    tokio::time::sleep(Duration::from_secs(7)).await;
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let events = handled
        .wait_for("every version handled once", |e| {
            (1..=10).all(|v| e.iter().any(|(_, version)| *version == v))
        })
        .await;
    bus.close().await.unwrap();
    assert_first_handlings_in_order(&events, 1, 10);
}

/// Rule: "a redelivery after a crash replays a suffix in order" (and: "a redelivered copy of a
/// held message is dropped").
///
/// When the durable is made again from an earlier position while the bus still holds a message
/// (the consumer deleted under a live subscription, or `reconcile` re-creating it from the ack
/// floor after a lost server), the replay brings the aggregate's already-acknowledged events
/// again, queued behind the held one, and then the held one's copy: `Consumer::deliver` drops
/// that copy (swapping its receipt), so the replay goes 1, 2, then 4, skipping 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_meets_a_held_message_is_still_an_in_order_suffix() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("remade"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "orders.remade";
    let handled = Recorder::<(String, i64)>::new();
    let release = Arc::new(tokio::sync::Notify::new());
    let held_once = Arc::new(AtomicBool::new(false));
    let (h, r, once) = (handled.clone(), release.clone(), held_once.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (h, r, once) = (h.clone(), r.clone(), once.clone());
            async move {
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                if envelope.event_version == 3 && !once.swap(true, Ordering::SeqCst) {
                    r.notified().await;
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=3 {
        bus.publish_envelope(topic, &envelope("k", version))
            .await
            .unwrap();
    }
    handled
        .wait_for("version 3 running", |e| e.iter().any(|(_, v)| *v == 3))
        .await;
    bus.transport()
        .delete_consumer(topic, &bus.transport().durable_name(topic, 1))
        .await
        .unwrap();
    bus.publish_envelope(topic, &envelope("k", 4))
        .await
        .unwrap();
    // The durable is made again from the bus's position (the held version 3): the copy of 3
    // meets the held message and is dropped, 4 queues behind it.
    eventually("the replay reached the bus", || {
        let (stats, pool) = (bus.transport().stats(), bus.pool_stats());
        async move { stats.redeliveries_dropped >= 1 && pool.queued >= 1 }
    })
    .await;
    release.notify_one();
    let events = handled
        .wait_for("version 4", |e| e.iter().any(|(_, v)| *v == 4))
        .await;
    bus.close().await.unwrap();
    assert_replays_are_in_order_suffixes(&events);
}

/// Rule: "A plain message is consumed through `subscribe`: any bytes, delivered
/// **at-most-once**" (docs/architecture.md: "An at-most-once job runs once whatever happens").
///
/// A plain handler still running at the unsubscribe drain deadline is cancelled and its
/// message settles as `Outcome::Cancelled`, which `Outcome::settlement` maps to `Redeliver`
/// for every class: the message is nak'd and the next subscription runs its handler again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_message_cut_off_at_the_unsubscribe_deadline_is_not_handled_again() {
    let server = NatsServer::start();
    let (mut settings, config) = (nats_settings("plaincut"), nats_config(&server.url()));
    settings.drain_timeout = Duration::from_millis(300);
    let bus = eventbus_nats::connect(settings.clone(), config)
        .await
        .unwrap();
    let topic = "plain.cut";
    let seen = Recorder::<Vec<u8>>::new();
    let started_once = Arc::new(AtomicBool::new(false));
    let handler = {
        let (s, once) = (seen.clone(), started_once.clone());
        Arc::new(move |ctx: HandlerContext, message: Message| {
            let (s, once) = (s.clone(), once.clone());
            async move {
                s.push(message.payload.to_vec());
                if message.payload.as_ref() == b"slow" && !once.swap(true, Ordering::SeqCst) {
                    // Still running at the drain deadline.
                    ctx.cancellation().cancelled().await;
                }
                Ok(())
            }
        })
    };
    let first = bus
        .subscribe(topic, handler.clone(), SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(topic, OutboundMessage::new(&b"slow"[..]).with_key("k"))
        .await
        .unwrap();
    seen.wait_for("slow running", |e| e.iter().any(|m| m == b"slow"))
        .await;
    first.unsubscribe().await.unwrap();
    bus.subscribe(topic, handler, SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish(topic, OutboundMessage::new(&b"after"[..]).with_key("k"))
        .await
        .unwrap();
    let events = seen
        .wait_for("the message after", |e| e.iter().any(|m| m == b"after"))
        .await;
    bus.close().await.unwrap();
    let slow = events.iter().filter(|m| m.as_slice() == b"slow").count();
    let shown: Vec<String> = events
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(slow, 1, "the plain message ran {slow} times: {shown:?}");
}
