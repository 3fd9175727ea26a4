//! The conformance suite against the in-memory backend, plus what only memory can show.

// A factory that cannot build its bus fails the test that asked for it.
#![allow(clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{EventBus, HandlerContext, Message, OutboundMessage, SubscribeOptions};
use eventbus_memory::BusSettings;
use integration_tests::{BusFactory, Settings};

struct Memory;

#[async_trait]
impl BusFactory for Memory {
    async fn bus(&self, settings: Settings) -> Arc<dyn EventBus> {
        match eventbus_memory::start(settings.bus_settings("memory")) {
            Ok(bus) => Arc::new(bus),
            Err(error) => panic!("memory bus: {error}"),
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("conformance.{name}")
    }

    fn redelivers(&self) -> bool {
        false
    }
}

integration_tests::conformance_suite!(Memory);

/// Memory has no broker to hold messages, so a slow handler must slow its publishers: the engine
/// never holds more than its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_makes_publishers_wait_and_memory_stays_bounded() {
    let bus = Arc::new(
        eventbus_memory::start(
            Settings {
                pool_size: 1,
                inbox_size: 5,
                ..Settings::default()
            }
            .bus_settings("memory"),
        )
        .unwrap(),
    );
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (g, h) = (gate.clone(), handled.clone());
    bus.subscribe(
        "slow",
        Arc::new(move |_ctx: HandlerContext, _message: Message| {
            let (g, h) = (g.clone(), h.clone());
            async move {
                g.acquire().await.unwrap().forget();
                h.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let (bus, published) = (bus.clone(), published.clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                bus.publish(
                    "slow",
                    OutboundMessage::new(&b"work"[..]).with_key("one-key"),
                )
                .await
                .unwrap();
                published.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // One job runs (blocked on the gate) and five wait in the key's lane: the lane is full, so
    // the seventh publish cannot complete until a job finishes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stats = bus.pool_stats();
        if stats.running == 1 && stats.queued == 5 && published.load(Ordering::SeqCst) == 6 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "engine never filled: {stats:?}"
        );
        tokio::task::yield_now().await;
    }
    assert!(!publisher.is_finished());
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    gate.add_permits(100);
    publisher.await.unwrap();
    assert_eq!(published.load(Ordering::SeqCst), 20);
    bus.close().await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn publishing_to_an_invalid_topic_or_a_closed_bus_is_a_typed_error() {
    let bus = eventbus_memory::start(BusSettings::new("memory", "eventbus")).unwrap();
    let invalid = bus
        .publish("not a topic", OutboundMessage::new(&b"x"[..]))
        .await
        .unwrap_err();
    assert_eq!(invalid.kind(), eventbus_core::ErrorKind::InvalidTopic);
    bus.close().await.unwrap();
    let closed = bus
        .publish("fine", OutboundMessage::new(&b"x"[..]))
        .await
        .unwrap_err();
    assert_eq!(closed.kind(), eventbus_core::ErrorKind::Closed);
    let handler = Arc::new(|_ctx: HandlerContext, _m: Message| async { Ok(()) });
    let subscribe = bus
        .subscribe("fine", handler, SubscribeOptions::new())
        .await;
    assert_eq!(
        subscribe.unwrap_err().kind(),
        eventbus_core::ErrorKind::Closed
    );
    assert!(!bus.health().await.is_healthy());
}

/// Memory cannot redeliver: with dead-lettering disabled an exhausted envelope keeps retrying in
/// its lane (the aggregate waits, the health report shows it), and what close gives back at its
/// deadline is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettering_disabled_keeps_the_envelope_in_its_lane_until_close() {
    let settings = Settings {
        max_attempts: 2,
        backoff: Duration::from_millis(5),
        drain_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let bus = eventbus_memory::start(settings.bus_settings("memory")).unwrap();
    let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = handled.clone();
    let handler = Arc::new(move |_ctx: HandlerContext, e: eventbus_core::Envelope| {
        let h = h.clone();
        async move {
            h.lock().unwrap().push(e.event_version);
            if e.event_version == 1 {
                return Err(eventbus_core::HandlerError::permanent("no"));
            }
            Ok(())
        }
    });
    bus.subscribe_envelope(
        "nodlq",
        handler,
        SubscribeOptions::new().with_dead_letter(eventbus_core::DeadLetter::Disabled),
    )
    .await
    .unwrap();
    for version in 1..=2 {
        let envelope = eventbus_core::Envelope::new("a", "T", version, &1).unwrap();
        bus.publish_envelope("nodlq", &envelope).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while handled.lock().unwrap().len() < 5 || bus.pool_stats().stalled == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            bus.pool_stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        handled.lock().unwrap().iter().all(|version| *version == 1),
        "version 2 ran while version 1 was unsettled: {:?}",
        handled.lock().unwrap()
    );
    let report = bus.health().await;
    assert_eq!(
        report.status(),
        eventbus_core::HealthStatus::Degraded,
        "{report:?}"
    );
    bus.close().await.unwrap();
    let stats = bus.transport().stats();
    assert_eq!((stats.dead_lettered, stats.dropped), (0, 2));
}

#[tokio::test]
async fn health_reports_the_backend_and_its_engine() {
    let bus = eventbus_memory::start(BusSettings::new("memory", "eventbus")).unwrap();
    let report = bus.health().await;
    assert_eq!(report.backend, "memory");
    assert!(report.is_healthy());
    assert!(report.components.iter().any(|c| c.name == "engine"));
    bus.close().await.unwrap();
}

/// A relay pipelining into one aggregate holds the publish window while it waits for room in
/// that aggregate's lane; the lane's handler then pipelines a publish of its own. The handler
/// does not wait for the window (it goes over the bound), so both go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_pipelining_while_a_relay_holds_the_window_does_not_deadlock() {
    let mut settings = Settings {
        pool_size: 1,
        inbox_size: 1,
        drain_timeout: Duration::from_secs(1),
        ..Settings::default()
    }
    .bus_settings("memory");
    settings.publish_max_in_flight = 1;
    let bus = Arc::new(eventbus_memory::start(settings).unwrap());
    let weak = Arc::downgrade(&bus);
    let handled = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, g) = (handled.clone(), gate.clone());
    let _subscription = bus
        .subscribe(
            "relayed",
            Arc::new(move |_ctx: HandlerContext, _message: Message| {
                let (weak, h, g) = (weak.clone(), h.clone(), g.clone());
                async move {
                    g.acquire().await.unwrap().forget();
                    let bus = weak.upgrade().unwrap();
                    bus.start_publish("projections", OutboundMessage::new(&b"p"[..]))
                        .await?
                        .await
                        .map_err(eventbus_core::HandlerError::transient)?;
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    let relay = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..10u32 {
                let message =
                    OutboundMessage::new(i.to_string().into_bytes()).with_key("one-aggregate");
                drop(bus.start_publish("relayed", message).await.unwrap());
            }
        })
    };
    // The handler runs the first message (held at its gate), the lane holds the next one, and
    // the relay holds the window waiting for room for the third.
    integration_tests::eventually("the relay to wait for room in the lane", || {
        let stats = bus.pool_stats();
        async move { stats.running == 1 && stats.queued == 1 }
    })
    .await;
    gate.add_permits(100);
    tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .expect("the relay and the handler both went on")
        .unwrap();
    integration_tests::eventually("every relayed message handled", || {
        let handled = handled.load(Ordering::SeqCst);
        async move { handled == 10 }
    })
    .await;
    bus.close().await.unwrap();
}
