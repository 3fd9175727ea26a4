//! End-to-end ratios on a real nats-server, each against a raw async-nats baseline measured in
//! the same run:
//!
//! - publish: raw `jetstream.publish` awaiting each PubAck vs `NatsBus::publish_envelope`
//!   (headers, `Nats-Msg-Id`, PubAck);
//! - consume: a raw durable pull consumer that acks each message vs an ordered envelope
//!   subscription (decode, lanes, in-progress acks, ack) on the same stream contents.
//!
//! ```text
//! cargo xtask brokers up            # prints NATS_URL=nats://127.0.0.1:PORT
//! NATS_URL=nats://127.0.0.1:PORT cargo run --release -p eventbus-nats --example ratios
//! ```
//!
//! `MESSAGES` (default 50000) and `AGGREGATES` (default 1000) size the run.

// A benchmark binary: it prints its figures, and a broken setup ends it loudly.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::expect_used,
    clippy::unwrap_used
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use eventbus_core::{Envelope, EventBus, HandlerContext, SubscribeOptions};
use eventbus_nats::{BusSettings, ConsumerSettings, NatsBus, NatsConfig};
use futures::StreamExt;
use tokio::sync::Notify;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn envelopes(count: usize, aggregates: usize) -> Vec<Envelope> {
    (0..count)
        .map(|i| {
            let version = (i / aggregates + 1) as i64;
            Envelope::new(
                format!("order-{}", i % aggregates),
                "OrderUpdated",
                version,
                &serde_json::json!({"line": i, "total": 12.5}),
            )
            .unwrap()
        })
        .collect()
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| {
        eprintln!("set NATS_URL (e.g. from `cargo xtask brokers up`)");
        std::process::exit(2);
    });
    let count = env("MESSAGES", 50_000);
    let aggregates = env("AGGREGATES", 1000);
    let run = std::process::id();
    let envelopes = envelopes(count, aggregates);
    let client = async_nats::connect(&url).await.expect("connect");
    let js = jetstream::new(client);

    // Publish: raw into one stream, ours into another, both file storage.
    let raw_topic = format!("bench{run}.raw");
    js.create_stream(stream::Config {
        name: format!("BENCH_RAW_{run}"),
        subjects: vec![raw_topic.clone()],
        storage: stream::StorageType::File,
        ..stream::Config::default()
    })
    .await
    .unwrap();
    let payloads: Vec<_> = envelopes.iter().map(|e| e.to_bytes().unwrap()).collect();
    let started = Instant::now();
    for payload in &payloads {
        js.publish(raw_topic.clone(), payload.clone())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let raw_publish = rate(count, started.elapsed());

    let settings = BusSettings {
        pool: eventbus_pool::PoolConfig {
            pool_size: env("POOL_SIZE", 256),
            ..eventbus_pool::PoolConfig::default()
        },
        ..BusSettings::new("nats", &format!("bench-{run}"))
    };
    let bus = NatsBus::connect(
        settings,
        NatsConfig {
            urls: vec![url.clone()],
            consumer: ConsumerSettings {
                max_ack_pending: 20_000,
                fetch_batch: 1000,
                ..ConsumerSettings::default()
            },
            ..NatsConfig::default()
        },
    )
    .await
    .unwrap();
    let topic = format!("bench{run}.ours");
    let started = Instant::now();
    for envelope in &envelopes {
        bus.publish_envelope(&topic, envelope).await.unwrap();
    }
    let our_publish = rate(count, started.elapsed());

    // Consume: a raw durable pull consumer that acks each message, over the stream our publish
    // filled (envelopes with their headers), then ours over the same stream contents.
    let raw_stream = js.stream_by_subject(&topic).await.unwrap();
    let raw_stream = js.get_stream(raw_stream).await.unwrap();
    let consumer = raw_stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..pull::Config::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .unwrap();
    let mut received = 0;
    while received < count {
        let message = messages.next().await.unwrap().unwrap();
        message.ack().await.unwrap();
        received += 1;
    }
    let raw_consume = rate(count, started.elapsed());
    drop(messages);

    // Ours: an ordered envelope subscription over the stream our publish filled.
    let handled = Arc::new(AtomicU64::new(0));
    let all_handled = Arc::new(Notify::new());
    let (h, done) = (handled.clone(), all_handled.clone());
    let started = Instant::now();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
            if h.fetch_add(1, Ordering::Relaxed) + 1 == count as u64 {
                done.notify_one();
            }
            async { Ok(()) }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    all_handled.notified().await;
    let our_consume = rate(count, started.elapsed());
    bus.close().await.unwrap();

    println!("nats end to end: {count} envelopes, {aggregates} aggregates, file storage");
    println!(
        "  publish  raw {raw_publish:>10.0}/s   ours {our_publish:>10.0}/s   ratio {:.2}x (target 0.8x)",
        our_publish / raw_publish
    );
    println!(
        "  consume  raw {raw_consume:>10.0}/s   ours {our_consume:>10.0}/s   ratio {:.2}x (target 0.9x)",
        our_consume / raw_consume
    );
    for name in [
        format!("BENCH_RAW_{run}"),
        format!("STREAM_bench{run}_ours"),
    ] {
        let _ = js.delete_stream(name).await;
    }
}
