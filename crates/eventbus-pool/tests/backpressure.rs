//! Bounds: a full lane or a full pool makes `submit` wait and `try_submit` fail; idle lanes go.

// Test helpers build their inputs from constants; an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{AggregateId, DeliveryClass, Error};
use eventbus_pool::{Job, Pool, PoolConfig};
use futures::FutureExt;
use tokio::sync::Semaphore;

fn key(name: &str) -> Option<AggregateId> {
    Some(AggregateId::new(name).unwrap())
}

/// A job that waits for a permit of `gate`.
fn gated(key: Option<AggregateId>, gate: &Arc<Semaphore>) -> Job {
    let gate = gate.clone();
    Job::new(key, DeliveryClass::AtLeastOnce, move |_| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Ok(())
        }
    })
}

async fn wait_until(pool: &Pool, mut condition: impl FnMut(eventbus_pool::PoolStats) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition(pool.stats()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met: {:?}",
            pool.stats()
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_full_lane_makes_submit_wait_and_try_submit_fail() {
    let pool = Pool::new(PoolConfig {
        pool_size: 2,
        inbox_size: 2,
        ..PoolConfig::default()
    })
    .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let running = pool.submit(gated(key("a"), &gate)).await.unwrap();
    wait_until(&pool, |s| s.running == 1).await;
    let queued: Vec<_> = vec![
        pool.submit(gated(key("a"), &gate)).await.unwrap(),
        pool.submit(gated(key("a"), &gate)).await.unwrap(),
    ];
    assert_eq!(pool.stats().queued, 2);

    match pool.try_submit(gated(key("a"), &gate)) {
        Err(Error::Full { what: "lane" }) => {}
        other => panic!("{other:?}"),
    }
    // Another key still gets in: only lane a is full.
    let other = pool.try_submit(gated(key("b"), &gate)).unwrap();

    let mut waiting = Box::pin(pool.submit(gated(key("a"), &gate)));
    assert!(
        (&mut waiting).now_or_never().is_none(),
        "submit must wait for room in lane a"
    );
    gate.add_permits(1); // one job of a (or b) finishes, a's lane moves on
    let late = waiting.await.unwrap();

    gate.add_permits(10);
    for handle in [running, other, late].into_iter().chain(queued) {
        assert!(handle.await.is_success());
    }
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test]
async fn a_full_pool_makes_submit_wait_and_try_submit_fail() {
    // Capacity 1 × 3 = 3 queued jobs in all.
    let pool = Pool::new(PoolConfig {
        pool_size: 1,
        inbox_size: 3,
        ..PoolConfig::default()
    })
    .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let mut handles = vec![pool.submit(gated(None, &gate)).await.unwrap()];
    wait_until(&pool, |s| s.running == 1).await;
    for name in ["a", "b", "c"] {
        handles.push(pool.submit(gated(key(name), &gate)).await.unwrap());
    }
    assert_eq!(pool.stats().queued, 3);
    match pool.try_submit(gated(key("d"), &gate)) {
        Err(Error::Full { what: "pool" }) => {}
        other => panic!("{other:?}"),
    }
    match pool.try_submit(gated(None, &gate)) {
        Err(Error::Full { what: "pool" }) => {}
        other => panic!("{other:?}"),
    }
    let mut waiting = Box::pin(pool.submit(gated(key("d"), &gate)));
    assert!((&mut waiting).now_or_never().is_none());
    gate.add_permits(1);
    handles.push(waiting.await.unwrap());
    assert!(pool.stats().queued <= 3);
    gate.add_permits(10);
    for handle in handles {
        assert!(handle.await.is_success());
    }
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test]
async fn a_dropped_submit_leaves_nothing_behind() {
    let pool = Pool::new(PoolConfig {
        pool_size: 1,
        inbox_size: 1,
        ..PoolConfig::default()
    })
    .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let first = pool.submit(gated(key("a"), &gate)).await.unwrap();
    wait_until(&pool, |s| s.running == 1).await;
    let second = pool.submit(gated(key("a"), &gate)).await.unwrap();

    let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = ran.clone();
    let mut cancelled =
        Box::pin(
            pool.submit(Job::new(key("a"), DeliveryClass::AtLeastOnce, move |_| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                async { Ok(()) }
            })),
        );
    assert!((&mut cancelled).now_or_never().is_none());
    drop(cancelled);
    assert_eq!(pool.stats().queued, 1);

    gate.add_permits(2);
    assert!(first.await.is_success());
    assert!(second.await.is_success());
    wait_until(&pool, |s| s.lanes == 0).await;
    assert!(
        !ran.load(std::sync::atomic::Ordering::SeqCst),
        "a dropped submit must not run"
    );
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test]
async fn memory_follows_active_keys_not_history() {
    let pool = Pool::new(PoolConfig {
        pool_size: 4,
        ..PoolConfig::default()
    })
    .unwrap();
    for round in 0..10 {
        let mut handles = Vec::new();
        for i in 0..500 {
            let job = Job::new(
                key(&format!("k-{round}-{i}")),
                DeliveryClass::AtLeastOnce,
                |_| async { Ok(()) },
            );
            handles.push(pool.submit(job).await.unwrap());
        }
        for handle in handles {
            assert!(handle.await.is_success());
        }
        // Every lane of the round is gone once its jobs are done.
        assert_eq!(pool.stats().lanes, 0);
    }
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}
