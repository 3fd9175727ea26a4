//! The facade on NATS (feature `nats`): `type = "nats"` connects to a real server.
#![cfg(feature = "nats")]
// Test code: an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use eventbus::{
    Backend, Config, Envelope, ErrorKind, EventBusExt, HandlerContext, SubscribeOptions,
};
use serde::Deserialize;
use test_brokers::NatsServer;
use tokio::sync::mpsc;

#[derive(Debug, Deserialize, PartialEq)]
struct Order {
    total_cents: u64,
}

fn config(server: &NatsServer, client_id: &str) -> Config {
    let text = format!(
        "type = \"nats\"\nclient_id = \"{client_id}\"\n[nats]\nurls = [\"{}\"]\n[nats.consumer]\nfetch_expires = \"200ms\"\n",
        server.url()
    );
    Config::from_toml_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_config_connects_and_typed_envelopes_make_the_round_trip() {
    let server = NatsServer::start();
    let bus = eventbus::connect(config(&server, "facade")).await.unwrap();
    assert_eq!(bus.backend(), Backend::Nats);
    let (orders, mut received) = mpsc::unbounded_channel();
    bus.subscribe_envelope_typed(
        "orders.placed",
        move |_ctx: HandlerContext, envelope: Envelope, order: Order| {
            let orders = orders.clone();
            async move {
                orders.send((envelope.aggregate_id, order)).unwrap();
                Ok(())
            }
        },
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let envelope = Envelope::new(
        "order-1",
        "OrderPlaced",
        1,
        &serde_json::json!({"total_cents": 1250}),
    )
    .unwrap();
    bus.publish_envelope("orders.placed", &envelope)
        .await
        .unwrap();
    let (aggregate, order) = tokio::time::timeout(Duration::from_secs(20), received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(aggregate, "order-1");
    assert_eq!(order, Order { total_cents: 1250 });
    assert!(bus.health().await.is_healthy());

    let clash = eventbus::connect(config(&server, "facade"))
        .await
        .unwrap_err();
    assert_eq!(clash.kind(), ErrorKind::Config, "{clash}");
    assert!(
        clash.to_string().contains("nats_eventbus_facade"),
        "{clash}"
    );
    bus.close().await.unwrap();
}
