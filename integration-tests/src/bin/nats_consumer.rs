//! A consumer process for the fault tests: subscribes to envelopes on NATS and prints
//! `{aggregate_id} {event_version}` for each one it handled, before it is acknowledged.
//!
//! Usage: `nats_consumer <url> <topic> <client_id>`. Runs until killed.

// A test helper binary: its output is its interface, and a bad argument ends it loudly.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, SubscribeOptions};
use eventbus_nats::{ConsumerSettings, NatsBus, NatsConfig};
use eventbus_pool::{BusSettings, PoolConfig};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (url, topic, client_id) = (
        args.next().expect("url"),
        args.next().expect("topic"),
        args.next().expect("client_id"),
    );
    let settings = BusSettings {
        pool: PoolConfig {
            pool_size: 8,
            ..PoolConfig::default()
        },
        ..BusSettings::new("nats", &client_id)
    };
    let bus = NatsBus::connect(
        settings,
        NatsConfig {
            urls: vec![url],
            consumer: ConsumerSettings {
                ack_wait: Duration::from_secs(2),
                fetch_expires: Duration::from_millis(200),
                ..ConsumerSettings::default()
            },
            ..NatsConfig::default()
        },
    )
    .await
    .expect("connect");
    bus.subscribe_envelope(
        &topic,
        Arc::new(|_ctx: HandlerContext, envelope: Envelope| async move {
            // Some work, so that a kill finds messages in flight.
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{} {}", envelope.aggregate_id, envelope.event_version)?;
            out.flush()?;
            Ok(())
        }),
        SubscribeOptions::new(),
    )
    .await
    .expect("subscribe");
    eprintln!("nats_consumer: subscribed to {topic}");
    std::future::pending::<()>().await;
}
