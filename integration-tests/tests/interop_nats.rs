//! Side by side with the Go services on NATS JetStream: the Go peer (`interop/go/cmd/peer`,
//! nats.go called as the Go SDK does: the envelope's JSON as the body, no headers,
//! `PublishAsync`; a pull subscription on a durable, one message at a time) and this SDK publish
//! to and consume from the same subjects of a real nats-server.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_nats::NatsBus;
use integration_tests::go_peer::{
    GoConsumer, GoHandled, go_publish, interop_envelopes as envelopes, payloads_by_event,
};
use integration_tests::{Recorder, assert_first_handlings_in_order, nats_config, nats_settings};
use test_brokers::NatsServer;

/// The Go service publishes (its stream `STREAM_{topic}` made as its publish path makes it);
/// an ordered envelope subscription here binds to that stream and handles every event, each
/// aggregate's in version order, with the payload bytes exactly as the Go service sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_the_go_service_publishes_are_handled_here_in_order_with_identical_payloads() {
    let server = NatsServer::start();
    let topic = "interop.go-to-rust";
    let sent = envelopes("g2r", 40, 25);
    let url = server.url();
    tokio::task::block_in_place(|| {
        go_publish("nats-publish", &["-url", &url, "-topic", topic], &sent);
    });

    let bus = NatsBus::connect(nats_settings("interop-rust"), nats_config(&url))
        .await
        .unwrap();
    let handled = Recorder::<(String, i64, String, Vec<u8>)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push((
                    envelope.aggregate_id.clone(),
                    envelope.event_version,
                    envelope.event_id.clone(),
                    envelope.payload().to_vec(),
                ));
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let events = handled
        .wait_for("every event the Go service published", |e| {
            e.iter()
                .map(|(.., id, _)| id)
                .collect::<BTreeSet<_>>()
                .len()
                == sent.len()
        })
        .await;
    let order: Vec<(String, i64)> = events.iter().map(|(a, v, ..)| (a.clone(), *v)).collect();
    assert_first_handlings_in_order(&order, 40, 25);
    let expected = payloads_by_event(&sent);
    for (_, _, event_id, payload) in &events {
        assert_eq!(
            String::from_utf8_lossy(payload),
            String::from_utf8_lossy(&expected[event_id]),
            "{event_id}: the payload changed on the way"
        );
    }
    bus.close().await.unwrap();
}

/// This SDK publishes; the Go service (a pull subscription on its durable, handling one message
/// after another) handles every event with the same fields, each aggregate's in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_published_here_are_handled_by_the_go_service_with_equal_fields() {
    let server = NatsServer::start();
    let topic = "interop.rust-to-go";
    let sent = envelopes("r2g", 40, 25);
    let url = server.url();
    let bus = NatsBus::connect(nats_settings("interop-rust"), nats_config(&url))
        .await
        .unwrap();
    for envelope in &sent {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }

    let count = sent.len().to_string();
    let mut go = GoConsumer::start(
        "nats-subscribe",
        &[
            "-url",
            &url,
            "-topic",
            topic,
            "-durable",
            "business-consumer-unified_interop_rust-to-go",
            "-count",
            &count,
        ],
    );
    let mut handled: Vec<GoHandled> = Vec::new();
    go.read_until("every event published here", &mut handled, |h| {
        h.len() >= sent.len()
    })
    .await;
    let order: Vec<(String, i64)> = handled
        .iter()
        .map(|h| (h.aggregate_id.clone(), h.event_version))
        .collect();
    assert_first_handlings_in_order(&order, 40, 25);
    let by_id: HashMap<&str, &Envelope> = sent.iter().map(|e| (e.event_id.as_str(), e)).collect();
    for got in &handled {
        let envelope = by_id[got.event_id.as_str()];
        assert_eq!(got.aggregate_id, envelope.aggregate_id);
        assert_eq!(got.event_version, envelope.event_version);
        assert_eq!(got.event_type, envelope.event_type);
        let payload: serde_json::Value = serde_json::from_slice(envelope.payload()).unwrap();
        assert_eq!(got.payload, payload, "{}", got.event_id);
    }
    bus.close().await.unwrap();
}
