//! Connecting, metric namespaces, typed handlers (on the memory backend).
#![cfg(feature = "memory")]

use std::sync::Arc;
use std::time::Duration;

use eventbus::{
    Config, Envelope, ErrorKind, EventBusExt, HandlerContext, Message, SubscribeOptions,
};
use serde::Deserialize;
use tokio::sync::mpsc;

fn config(client_id: &str) -> Config {
    Config {
        client_id: client_id.to_owned(),
        pool: eventbus::PoolSection {
            pool_size: 4,
            ..Default::default()
        },
        retry: eventbus::RetrySection {
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..Default::default()
        },
        ..Config::default()
    }
}

#[tokio::test]
async fn two_live_buses_never_share_a_metrics_namespace() {
    let first = eventbus::connect(config("svc-a")).await.unwrap();
    let second = eventbus::connect(config("svc-b")).await.unwrap();
    let clash = eventbus::connect(config("svc-a")).await.unwrap_err();
    assert_eq!(clash.kind(), ErrorKind::Config);
    assert!(
        clash.to_string().contains("memory_eventbus_svc_a"),
        "{clash}"
    );
    // Same namespace after sanitizing: `svc.a` and `svc-a` both become `svc_a`.
    assert!(eventbus::connect(config("svc.a")).await.is_err());
    first.close().await.unwrap();
    drop(first);
    // Released when the bus is dropped.
    let again = eventbus::connect(config("svc-a")).await.unwrap();
    again.close().await.unwrap();
    second.close().await.unwrap();
}

#[derive(Debug, Deserialize, PartialEq)]
struct Order {
    total_cents: u64,
}

#[tokio::test]
async fn typed_handlers_get_the_payload_and_undecodable_payloads_are_dead_lettered_at_once() {
    let bus = eventbus::connect(config("typed")).await.unwrap();
    let (orders, mut received) = mpsc::unbounded_channel();
    bus.subscribe_envelope_typed(
        "orders",
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
    let (dead, mut dead_letters) = mpsc::unbounded_channel();
    bus.subscribe(
        "orders.DLQ",
        Arc::new(move |_ctx: HandlerContext, message: Message| {
            let dead = dead.clone();
            async move {
                dead.send(message).unwrap();
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();

    let good = Envelope::new(
        "order-1",
        "OrderPlaced",
        1,
        &serde_json::json!({"total_cents": 1250}),
    )
    .unwrap();
    let wrong = Envelope::new(
        "order-2",
        "OrderPlaced",
        1,
        &serde_json::json!({"total": "lots"}),
    )
    .unwrap();
    bus.publish_envelope("orders", &good).await.unwrap();
    bus.publish_envelope("orders", &wrong).await.unwrap();

    let deadline = Duration::from_secs(10);
    let (aggregate, order) = tokio::time::timeout(deadline, received.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (aggregate.as_str(), order),
        ("order-1", Order { total_cents: 1250 })
    );
    let letter = tokio::time::timeout(deadline, dead_letters.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(letter.payload, wrong.to_bytes().unwrap());
    assert_eq!(
        letter.headers.get_str("X-Failed-Attempts"),
        Some("1"),
        "a decode failure is not retried"
    );
    assert!(
        letter
            .headers
            .get_str("X-Error-Message")
            .unwrap()
            .contains("total_cents")
    );
    bus.close().await.unwrap();
}

/// Built without the `prometheus` feature, a configuration that asks to serve metrics is refused
/// with the setting named, rather than connecting without them.
#[cfg(not(feature = "prometheus"))]
#[tokio::test]
async fn serving_metrics_without_the_prometheus_feature_is_a_config_error() {
    let config = Config {
        metrics: eventbus::MetricsSection {
            listen: Some("127.0.0.1:0".parse().unwrap()),
        },
        ..Config::default()
    };
    let error = eventbus::connect(config).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config);
    assert!(error.to_string().contains("metrics.listen"), "{error}");
}
