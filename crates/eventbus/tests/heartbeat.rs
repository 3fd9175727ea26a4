//! The Go SDK's health-check heartbeat on the in-memory bus: sent and seen, and a silent topic
//! graded as the Go SDK's subscriber grades it.
#![cfg(feature = "memory")]
// Test code: a failed unwrap is a failed check.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use eventbus::{
    Config, EventBus, HEARTBEAT_TOPIC, Heartbeat, HeartbeatOptions, Heartbeats, OutboundMessage,
    Severity,
};

/// A memory bus with a client ID (and metric namespace) of its own.
async fn bus(client_id: &str) -> Arc<dyn EventBus> {
    let config = Config {
        client_id: client_id.to_owned(),
        ..Config::default()
    };
    eventbus::connect(config).await.unwrap().as_event_bus()
}

/// Polls `check` until it holds, for 10 s at most.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_service_sends_heartbeats_every_interval_and_sees_them_on_the_go_topic() {
    let bus = bus("heartbeat-sender").await;
    let heartbeats = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("billing", "memory").with_interval(Duration::from_millis(30)),
    )
    .await
    .unwrap();
    eventually("three heartbeats", || heartbeats.status().received >= 3).await;
    let status = heartbeats.status();
    assert!(status.sent >= 3, "{status:?}");
    assert_eq!(status.send_failures, 0);
    let last = status.last.unwrap();
    assert_eq!(
        (last.source.as_str(), last.event_bus_type.as_str()),
        ("billing", "memory")
    );
    assert_eq!(HeartbeatOptions::new("a", "nats").topic, HEARTBEAT_TOPIC);
    heartbeats.stop().await.unwrap();
    bus.close().await.unwrap();
}

#[tokio::test]
async fn a_silent_topic_goes_from_warning_to_critical_and_a_heartbeat_clears_it() {
    let bus = bus("heartbeat-watcher").await;
    let interval = Duration::from_millis(40);
    let watcher = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("watcher", "memory")
            .with_topic("health.silent")
            .with_interval(interval)
            .with_failure_threshold(4)
            .with_publishing(false),
    )
    .await
    .unwrap();
    assert_eq!(watcher.status().severity, None);
    eventually("a warning", || {
        watcher.status().severity == Some(Severity::Warning)
    })
    .await;
    eventually("an error at half the threshold", || {
        watcher.status().severity == Some(Severity::Error)
    })
    .await;
    eventually("critical at the threshold", || {
        watcher.status().severity == Some(Severity::Critical)
    })
    .await;
    // Stale or foreign messages do not count; a fresh heartbeat does.
    bus.publish(
        "health.silent",
        OutboundMessage::new(&b"not a heartbeat"[..]),
    )
    .await
    .unwrap();
    eventually("the foreign message refused", || {
        watcher.status().refused == 1
    })
    .await;
    assert_eq!(watcher.status().severity, Some(Severity::Critical));
    let beat = Heartbeat::new("go-billing", "nats").to_bytes().unwrap();
    bus.publish("health.silent", OutboundMessage::new(beat))
        .await
        .unwrap();
    eventually("the heartbeat counted", || watcher.status().received == 1).await;
    assert_eq!(watcher.status().sent, 0, "a watcher only watches");
    assert_eq!(watcher.status().last.unwrap().source, "go-billing");
    watcher.stop().await.unwrap();
    bus.close().await.unwrap();
}
