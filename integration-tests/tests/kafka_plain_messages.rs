//! Plain messages on Kafka are at-most-once (docs/semantics.md): a plain record given back
//! unhandled (queued behind a running one of its key when its subscription stops) is dropped,
//! not left below the commit, where it would make the partition's next reader run every later
//! record of the partition again. Both tests fail when a given-back plain record stays
//! unfinished.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus_core::{HandlerContext, Message, OutboundMessage, SubscribeOptions};
use eventbus_kafka::KafkaBus;
use eventbus_pool::{BusSettings, PoolConfig};
use integration_tests::{Recorder, kafka_group_config};
use test_brokers::kafka_bootstrap;

fn settings(client: &str, drain: Duration) -> BusSettings {
    BusSettings {
        pool: PoolConfig {
            pool_size: 4,
            ..PoolConfig::default()
        },
        drain_timeout: drain,
        ..BusSettings::new("kafka", client)
    }
}

/// A plain handler recording each payload; the first run of `slow` waits for cancellation
/// (it is cut off at the drain deadline, and then acknowledged as a plain message that ran).
fn handler(
    seen: Arc<Recorder<String>>,
    slow_once: Arc<AtomicBool>,
) -> Arc<dyn eventbus_core::MessageHandler> {
    Arc::new(move |ctx: HandlerContext, message: Message| {
        let (seen, slow_once) = (seen.clone(), slow_once.clone());
        async move {
            let payload = String::from_utf8_lossy(&message.payload).into_owned();
            seen.push(payload.clone());
            if payload == "slow" && !slow_once.swap(true, Ordering::SeqCst) {
                ctx.cancellation().cancelled().await;
            }
            Ok(())
        }
    })
}

async fn publish_all(bus: &KafkaBus, topic: &str) {
    // Key "a": `slow` runs, `queued` waits behind it in its lane. Key "b": five fast ones.
    for (payload, key) in [
        ("slow", "a"),
        ("queued", "a"),
        ("fast-1", "b"),
        ("fast-2", "b"),
        ("fast-3", "b"),
        ("fast-4", "b"),
        ("fast-5", "b"),
    ] {
        bus.publish(
            topic,
            OutboundMessage::new(payload.as_bytes().to_vec()).with_key(key),
        )
        .await
        .unwrap();
    }
}

fn count(events: &[String], payload: &str) -> usize {
    events.iter().filter(|e| e.as_str() == payload).count()
}

async fn wait_for_slow_running_and_the_fast_ones_run(seen: &Recorder<String>) {
    seen.wait_for("slow running and the five fast ones run", |e| {
        count(e, "slow") == 1 && (1..=5).all(|i| count(e, &format!("fast-{i}")) == 1)
    })
    .await;
}

/// The five fast records that ran before the stop did not run again after it.
fn assert_the_fast_records_ran_once(events: &[String]) {
    let twice: Vec<String> = (1..=5)
        .map(|i| format!("fast-{i}"))
        .filter(|p| count(events, p) > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "plain records ran twice: {twice:?}; every handling: {events:?}"
    );
}

/// The only subscription unsubscribes while `slow` runs and `queued` waits behind it; the
/// topic is subscribed again on the same bus. `queued` is read again (it never ran: fine),
/// but the five fast records that already ran must not run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_records_run_once_across_unsubscribe_and_resubscribe() {
    let (topic, group) = ("plain.resub", "plain-resub");
    let config = kafka_group_config(&kafka_bootstrap(), group, topic, 1);
    let bus = eventbus_kafka::connect(settings("plain-resub", Duration::from_secs(1)), config)
        .await
        .unwrap();
    let seen = Recorder::<String>::new();
    let slow_once = Arc::new(AtomicBool::new(false));
    let first = bus
        .subscribe(
            topic,
            handler(seen.clone(), slow_once.clone()),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    publish_all(&bus, topic).await;
    wait_for_slow_running_and_the_fast_ones_run(&seen).await;
    first.unsubscribe().await.unwrap();
    bus.subscribe(
        topic,
        handler(seen.clone(), slow_once),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish(topic, OutboundMessage::new(&b"after"[..]).with_key("c"))
        .await
        .unwrap();
    let events = seen
        .wait_for("the record published after re-subscribing", |e| {
            count(e, "after") == 1
        })
        .await;
    bus.close().await.unwrap();
    assert_the_fast_records_ran_once(&events);
}

/// The same with `close` and a second bus of the group: `slow` outlives the drain timeout
/// (cut off, acknowledged), `queued` is given back; the fast records already ran and must not
/// run again on the next bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_records_run_once_across_close_and_a_new_bus() {
    let (topic, group) = ("plain.close", "plain-close");
    let config = kafka_group_config(&kafka_bootstrap(), group, topic, 1);
    let bus = eventbus_kafka::connect(
        settings("plain-close-1", Duration::from_secs(1)),
        config.clone(),
    )
    .await
    .unwrap();
    let seen = Recorder::<String>::new();
    let slow_once = Arc::new(AtomicBool::new(false));
    bus.subscribe(
        topic,
        handler(seen.clone(), slow_once.clone()),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    publish_all(&bus, topic).await;
    wait_for_slow_running_and_the_fast_ones_run(&seen).await;
    bus.close().await.unwrap();
    let next = eventbus_kafka::connect(settings("plain-close-2", Duration::from_secs(1)), config)
        .await
        .unwrap();
    next.subscribe(
        topic,
        handler(seen.clone(), slow_once),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    next.publish(topic, OutboundMessage::new(&b"after"[..]).with_key("c"))
        .await
        .unwrap();
    let events = seen
        .wait_for("the record published after the restart", |e| {
            count(e, "after") == 1
        })
        .await;
    next.close().await.unwrap();
    assert_the_fast_records_ran_once(&events);
}
