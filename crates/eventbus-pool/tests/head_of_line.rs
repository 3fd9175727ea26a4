//! No head-of-line blocking: a stalled key holds one actor and its own lane, nothing else.

// Test helpers build their inputs from constants; an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbus_core::{AggregateId, DeliveryClass, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};
use tokio::sync::{Barrier, Notify};

fn key(name: &str) -> Option<AggregateId> {
    Some(AggregateId::new(name).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_blocked_forever_does_not_hold_up_a_thousand_other_keys() {
    let pool = Pool::new(PoolConfig {
        pool_size: 4,
        inbox_size: 10,
        ..PoolConfig::default()
    })
    .unwrap();

    // Key A's handler waits on a barrier nobody else will reach.
    let barrier = Arc::new(Barrier::new(2));
    let a_started = Arc::new(Notify::new());
    let (b, started) = (barrier.clone(), a_started.clone());
    let blocked = pool
        .submit(Job::new(key("a"), DeliveryClass::AtLeastOnce, move |_| {
            let (b, started) = (b.clone(), started.clone());
            async move {
                started.notify_one();
                b.wait().await;
                Ok(())
            }
        }))
        .await
        .unwrap();
    a_started.notified().await;

    // A's later jobs wait in A's lane.
    let a_later_ran = Arc::new(AtomicUsize::new(0));
    let mut a_later = Vec::new();
    for _ in 0..5 {
        let ran = a_later_ran.clone();
        a_later.push(
            pool.submit(Job::new(key("a"), DeliveryClass::AtLeastOnce, move |_| {
                let ran = ran.clone();
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }))
            .await
            .unwrap(),
        );
    }

    // A thousand other keys, some hashing anywhere, all complete.
    let done = Arc::new(AtomicUsize::new(0));
    let mut others = Vec::new();
    for i in 0..1000 {
        let done = done.clone();
        others.push(
            pool.submit(Job::new(
                key(&format!("other-{i}")),
                DeliveryClass::AtLeastOnce,
                move |_| {
                    let done = done.clone();
                    async move {
                        done.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    }
                },
            ))
            .await
            .unwrap(),
        );
    }
    let all_others = async {
        for handle in others {
            assert!(handle.await.is_success());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all_others)
        .await
        .expect("the other keys must complete while key a is blocked");
    assert_eq!(done.load(Ordering::SeqCst), 1000);

    // A still holds exactly its actor and its lane.
    let stats = pool.stats();
    assert_eq!((stats.running, stats.queued, stats.lanes), (1, 5, 1));
    assert_eq!(a_later_ran.load(Ordering::SeqCst), 0);

    // Releasing A lets its lane continue in order.
    barrier.wait().await;
    assert!(blocked.await.is_success());
    for handle in a_later {
        assert!(handle.await.is_success());
    }
    assert_eq!(a_later_ran.load(Ordering::SeqCst), 5);
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_jobs_spread_over_every_free_actor() {
    let pool = Pool::new(PoolConfig {
        pool_size: 8,
        ..PoolConfig::default()
    })
    .unwrap();
    // Eight jobs that can only finish when all eight run at the same time.
    let barrier = Arc::new(Barrier::new(8));
    let mut handles = Vec::new();
    for _ in 0..8 {
        let barrier = barrier.clone();
        handles.push(
            pool.submit(Job::new(None, DeliveryClass::AtMostOnce, move |_| {
                let barrier = barrier.clone();
                async move {
                    barrier.wait().await;
                    Ok(())
                }
            }))
            .await
            .unwrap(),
        );
    }
    let all = async {
        for handle in handles {
            assert!(handle.await.is_success());
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("eight unkeyed jobs must run on eight actors at once");
    assert!(pool.shutdown(Duration::from_secs(5)).await.drained);
}

#[tokio::test(start_paused = true)]
async fn a_retrying_lane_frees_its_actor_but_keeps_its_later_jobs_waiting() {
    let pool = Pool::new(PoolConfig {
        pool_size: 1,
        retry: eventbus_core::RetryPolicy::new()
            .with_max_attempts(3)
            .with_backoff(Duration::from_secs(10), Duration::from_secs(10)),
        ..PoolConfig::default()
    })
    .unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = |name: &'static str, fail_first: bool| {
        let order = order.clone();
        move |ctx: eventbus_pool::JobContext| {
            let order = order.clone();
            async move {
                order
                    .lock()
                    .unwrap()
                    .push(format!("{name}#{}", ctx.attempt()));
                if fail_first && ctx.attempt() == 1 {
                    return Err(eventbus_core::HandlerError::transient("first try fails"));
                }
                Ok(())
            }
        }
    };
    let a1 = pool
        .submit(Job::new(
            key("a"),
            DeliveryClass::AtLeastOnce,
            record("a1", true),
        ))
        .await
        .unwrap();
    let a2 = pool
        .submit(Job::new(
            key("a"),
            DeliveryClass::AtLeastOnce,
            record("a2", false),
        ))
        .await
        .unwrap();
    let b1 = pool
        .submit(Job::new(
            key("b"),
            DeliveryClass::AtLeastOnce,
            record("b1", false),
        ))
        .await
        .unwrap();
    // With one actor, b1 runs during a1's backoff; a2 waits for a1's retry.
    assert!(b1.await.is_success());
    assert!(matches!(a1.await, Outcome::Succeeded { attempts: 2 }));
    assert!(a2.await.is_success());
    assert_eq!(*order.lock().unwrap(), ["a1#1", "b1#1", "a1#2", "a2#1"]);
    assert!(pool.shutdown(Duration::from_secs(1)).await.drained);
}
