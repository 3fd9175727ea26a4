//! `close` cut short and called again: its cancel-safety note.

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, ErrorKind, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_memory::BusSettings;
use tokio::sync::Semaphore;

/// A close dropped while a handler still runs leaves the bus refusing publishes; a second close
/// lets the handler finish and returns, and the handled message was not given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_dropped_midway_refuses_publishes_and_a_second_close_finishes_it() {
    let bus = eventbus_memory::start(BusSettings::new("memory", "close-twice")).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let started = Arc::new(Semaphore::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g, s, f) = (gate.clone(), started.clone(), finished.clone());
    bus.subscribe_envelope(
        "orders",
        Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
            let (g, s, f) = (g.clone(), s.clone(), f.clone());
            async move {
                s.add_permits(1);
                g.acquire().await.map_err(HandlerError::permanent)?.forget();
                f.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope("orders", &Envelope::new("o-1", "Placed", 1, &1).unwrap())
        .await
        .unwrap();
    started.acquire().await.unwrap().forget();

    // The first close waits for the running handler: cut it short.
    let cut = tokio::time::timeout(Duration::from_millis(100), bus.close()).await;
    assert!(cut.is_err(), "the close waits for the running handler");
    let refused = bus
        .publish_envelope("orders", &Envelope::new("o-2", "Placed", 1, &1).unwrap())
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Closed);

    // The second close runs the close again: it too waits for the running handler...
    let mut second = std::pin::pin!(bus.close());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut second)
            .await
            .is_err(),
        "the second close waits for the running handler"
    );
    // ...and returns once it has finished.
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second close returns")
        .unwrap();
    assert!(
        finished.load(std::sync::atomic::Ordering::SeqCst),
        "the second close returned once the running handler had finished"
    );
    let stats = bus.transport().stats();
    assert_eq!(
        stats.dropped, 0,
        "the running message finished, nothing given back"
    );
    assert!(!bus.health().await.is_healthy(), "closed");
}
