//! Shutdown: stop intake, drain until the deadline, cancel the rest, leave no task behind.

// Test helpers build their inputs from constants; an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{AggregateId, DeliveryClass, Error, HandlerError, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};
use futures::FutureExt;
use tokio::sync::{Notify, Semaphore};

fn key(name: &str) -> Option<AggregateId> {
    Some(AggregateId::new(name).unwrap())
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test]
async fn shutdown_drains_queued_and_running_jobs_before_the_deadline() {
    let before = alive_tasks();
    let pool = Pool::new(PoolConfig {
        pool_size: 3,
        ..PoolConfig::default()
    })
    .unwrap();
    assert_eq!(pool.live_tasks(), 3);
    let mut handles = Vec::new();
    for i in 0..50 {
        handles.push(
            pool.submit(Job::new(
                key(&format!("k{}", i % 5)),
                DeliveryClass::AtLeastOnce,
                |_| async {
                    tokio::task::yield_now().await;
                    Ok(())
                },
            ))
            .await
            .unwrap(),
        );
    }
    let report = pool.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained);
    assert_eq!(report.cancelled, 0);
    for handle in handles {
        assert!(handle.await.is_success());
    }
    assert_eq!(pool.live_tasks(), 0);
    assert_eq!(alive_tasks(), before, "no task of the pool may outlive it");
    match pool
        .submit(Job::new(None, DeliveryClass::AtMostOnce, |_| async {
            Ok(())
        }))
        .await
    {
        Err(Error::Closed) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn at_the_deadline_running_queued_and_retrying_jobs_are_cancelled() {
    let before = alive_tasks();
    let pool = Pool::new(PoolConfig {
        pool_size: 2,
        retry: RetryPolicy::new()
            .with_max_attempts(5)
            .with_backoff(Duration::from_secs(60), Duration::from_secs(60)),
        ..PoolConfig::default()
    })
    .unwrap();
    let started = Arc::new(Notify::new());
    // Runs forever unless cancelled; it watches its cancellation token like a good handler.
    let s = started.clone();
    let stuck = pool
        .submit(Job::new(
            key("stuck"),
            DeliveryClass::AtLeastOnce,
            move |ctx| {
                let s = s.clone();
                async move {
                    s.notify_one();
                    ctx.cancellation().cancelled().await;
                    Err(HandlerError::transient("cancelled"))
                }
            },
        ))
        .await
        .unwrap();
    started.notified().await;
    // Queued behind the stuck one, in its lane.
    let queued = pool
        .submit(Job::new(
            key("stuck"),
            DeliveryClass::AtLeastOnce,
            |_| async { Ok(()) },
        ))
        .await
        .unwrap();
    // Fails once, then waits out a 60 s backoff.
    let retrying = pool
        .submit(Job::new(
            key("flaky"),
            DeliveryClass::AtLeastOnce,
            |_| async { Err(HandlerError::transient("down")) },
        ))
        .await
        .unwrap();
    while pool.stats().retrying == 0 {
        tokio::task::yield_now().await;
    }

    let report = pool.shutdown(Duration::from_secs(5)).await;
    assert!(!report.drained);
    assert_eq!(
        report.cancelled, 3,
        "the running, the queued and the retrying job are cancelled"
    );
    assert!(matches!(stuck.await, Outcome::Cancelled { attempts: 1 }));
    assert!(matches!(queued.await, Outcome::Cancelled { attempts: 0 }));
    assert!(matches!(retrying.await, Outcome::Cancelled { attempts: 1 }));
    assert_eq!(pool.live_tasks(), 0);
    assert_eq!(alive_tasks(), before);
}

#[tokio::test]
async fn a_submitter_waiting_for_room_learns_that_the_pool_closed() {
    let pool = Arc::new(
        Pool::new(PoolConfig {
            pool_size: 1,
            inbox_size: 1,
            ..PoolConfig::default()
        })
        .unwrap(),
    );
    let gate = Arc::new(Semaphore::new(0));
    let gated = |gate: &Arc<Semaphore>| {
        let gate = gate.clone();
        Job::new(key("a"), DeliveryClass::AtLeastOnce, move |_| {
            let gate = gate.clone();
            async move {
                let _permit = gate.acquire().await;
                Ok(())
            }
        })
    };
    let first = pool.submit(gated(&gate)).await.unwrap();
    while pool.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let second = pool.submit(gated(&gate)).await.unwrap();
    let mut waiting = Box::pin(pool.submit(gated(&gate)));
    assert!((&mut waiting).now_or_never().is_none());

    let closing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.shutdown(Duration::from_secs(10)).await })
    };
    assert!(matches!(waiting.await, Err(Error::Closed)));
    gate.add_permits(2);
    assert!(first.await.is_success());
    assert!(second.await.is_success());
    assert!(closing.await.unwrap().drained);
}

#[tokio::test]
async fn dropping_the_pool_cancels_what_is_left_and_its_tasks_end() {
    let before = alive_tasks();
    let pool = Pool::new(PoolConfig {
        pool_size: 2,
        ..PoolConfig::default()
    })
    .unwrap();
    let forever = pool
        .submit(Job::new(key("a"), DeliveryClass::AtLeastOnce, |_| {
            std::future::pending()
        }))
        .await
        .unwrap();
    let queued = pool
        .submit(Job::new(key("a"), DeliveryClass::AtLeastOnce, |_| async {
            Ok(())
        }))
        .await
        .unwrap();
    drop(pool);
    assert!(matches!(forever.await, Outcome::Cancelled { .. }));
    assert!(matches!(queued.await, Outcome::Cancelled { attempts: 0 }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while alive_tasks() != before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool tasks still alive"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn shutdown_twice_is_harmless() {
    let pool = Pool::new(PoolConfig {
        pool_size: 1,
        ..PoolConfig::default()
    })
    .unwrap();
    assert!(pool.shutdown(Duration::from_secs(1)).await.drained);
    assert!(pool.shutdown(Duration::from_secs(1)).await.drained);
    assert_eq!(pool.live_tasks(), 0);
}

#[test]
fn creating_a_pool_outside_a_runtime_is_a_typed_error() {
    let error = Pool::new(PoolConfig::default()).err().unwrap();
    assert_eq!(error.kind(), eventbus_core::ErrorKind::Config);
}
