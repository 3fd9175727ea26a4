//! A consumer process for the fault tests: subscribes to envelopes on NATS or Kafka and prints
//! `{aggregate_id} {event_version}` for each one it handled, before it is acknowledged.
//!
//! Usage: `consumer nats <url> <topic> <client_id> [partitions]` or
//! `consumer kafka <bootstrap> <topic> <group>`. Runs until killed. With `partitions`, the NATS
//! topic is partitioned (a `pinned_ttl` of 2 s) and each line also has the handling's start and
//! end, in nanoseconds since the Unix epoch: `{aggregate_id} {event_version} {start} {end}`.

// A test helper binary: its output is its interface, and a bad argument ends it loudly.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::expect_used,
    clippy::panic
)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, SubscribeOptions};
use eventbus_nats::{ConsumerSettings, NatsConfig, ScaleOutSettings, TopicOptions};
use eventbus_pool::{BusSettings, PoolConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (backend, url, topic, client_id) = (
        args.next().expect("backend"),
        args.next().expect("url"),
        args.next().expect("topic"),
        args.next().expect("client_id"),
    );
    let partitions: Option<u16> = args.next().map(|n| n.parse().expect("a partition count"));
    let settings = BusSettings {
        pool: PoolConfig {
            pool_size: 8,
            ..PoolConfig::default()
        },
        ..BusSettings::new(&backend, &client_id)
    };
    let bus: Box<dyn EventBus> = match backend.as_str() {
        "nats" => Box::new(
            eventbus_nats::connect(
                settings,
                NatsConfig {
                    urls: vec![url],
                    consumer: ConsumerSettings {
                        // Partitioned: far longer than a takeover, so that what a dead instance
                        // held comes back only through the new reader's replay from the ack
                        // floor, never through a late redelivery.
                        ack_wait: Duration::from_secs(if partitions.is_some() { 30 } else { 2 }),
                        fetch_expires: Duration::from_millis(200),
                        ..ConsumerSettings::default()
                    },
                    topics: partitions
                        .map(|n| {
                            let options = TopicOptions {
                                partitions: Some(n),
                                ..TopicOptions::default()
                            };
                            [(topic.clone(), options)].into()
                        })
                        .unwrap_or_default(),
                    scale_out: ScaleOutSettings {
                        pinned_ttl: Duration::from_secs(2),
                    },
                    ..NatsConfig::default()
                },
            )
            .await
            .expect("connect"),
        ),
        "kafka" => Box::new(
            eventbus_kafka::connect(settings, integration_tests::kafka_config(&url))
                .await
                .expect("connect"),
        ),
        other => panic!("unknown backend {other}"),
    };
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| async move {
            let start = nanos();
            // Some work, so that a kill finds messages in flight (more when partitioned: the
            // scale-out tests kill and add instances while most of the stream is still ahead).
            let work = if partitions.is_some() { 5 } else { 2 };
            tokio::time::sleep(Duration::from_millis(work)).await;
            let mut out = std::io::stdout().lock();
            if partitions.is_some() {
                writeln!(
                    out,
                    "{} {} {start} {}",
                    envelope.aggregate_id,
                    envelope.event_version,
                    nanos()
                )?;
            } else {
                writeln!(out, "{} {}", envelope.aggregate_id, envelope.event_version)?;
            }
            out.flush()?;
            Ok(())
        }),
        SubscribeOptions::new(),
    )
    .await
    .expect("subscribe");
    eprintln!("consumer: subscribed to {topic} on {backend}");
    std::future::pending::<()>().await;
}

/// Now, in nanoseconds since the Unix epoch.
fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}
