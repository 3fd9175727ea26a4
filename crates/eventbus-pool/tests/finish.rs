//! The finishing step: run with the final outcome while the lane is still held.

// Test code: an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{AggregateId, DeliveryClass, HandlerError, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};
use tokio::sync::Notify;

fn pool() -> Pool {
    Pool::new(PoolConfig {
        pool_size: 4,
        retry: RetryPolicy::new()
            .with_max_attempts(2)
            .with_backoff(Duration::from_millis(10), Duration::from_millis(10)),
        ..PoolConfig::default()
    })
    .unwrap()
}

fn key() -> Option<AggregateId> {
    Some(AggregateId::new("order-1").unwrap())
}

#[tokio::test(start_paused = true)]
async fn the_next_job_of_a_key_waits_for_the_finishing_step() {
    let pool = pool();
    let log = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let finishing = started.clone();
    let (first_log, finish_log, second_log) = (log.clone(), log.clone(), log.clone());
    let gate = release.clone();
    let first = Job::new(key(), DeliveryClass::AtLeastOnce, move |ctx| {
        first_log
            .lock()
            .unwrap()
            .push(format!("run 1 attempt {}", ctx.attempt()));
        async move { Err(HandlerError::transient("down")) }
    })
    .with_finish(move |outcome: &Outcome| {
        let attempts = outcome.attempts();
        async move {
            finishing.notify_one();
            // A dead-letter write that takes a while: the lane stays held meanwhile.
            gate.notified().await;
            finish_log
                .lock()
                .unwrap()
                .push(format!("finish 1 after {attempts}"));
        }
    });
    let second = Job::new(key(), DeliveryClass::AtLeastOnce, move |_ctx| {
        second_log.lock().unwrap().push("run 2".to_owned());
        async { Ok(()) }
    });
    let first = pool.submit(first).await.unwrap();
    let second = pool.submit(second).await.unwrap();
    // The retries ran out and the finishing step waits on the gate.
    started.notified().await;
    assert_eq!(
        *log.lock().unwrap(),
        ["run 1 attempt 1", "run 1 attempt 2"],
        "job 2 must not start while job 1 is finishing"
    );
    release.notify_one();
    assert!(matches!(first.await, Outcome::Failed { attempts: 2, .. }));
    assert!(matches!(second.await, Outcome::Succeeded { attempts: 1 }));
    assert_eq!(
        *log.lock().unwrap(),
        [
            "run 1 attempt 1",
            "run 1 attempt 2",
            "finish 1 after 2",
            "run 2"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stuck_finishing_step_is_dropped_at_the_drain_deadline() {
    let pool = pool();
    let finished = Arc::new(Mutex::new(false));
    let flag = finished.clone();
    let job = Job::new(key(), DeliveryClass::AtMostOnce, |_ctx| async { Ok(()) }).with_finish(
        move |_outcome: &Outcome| async move {
            std::future::pending::<()>().await;
            *flag.lock().unwrap() = true;
        },
    );
    let handle = pool.submit(job).await.unwrap();
    let report = pool.shutdown(Duration::from_secs(1)).await;
    assert!(
        !report.drained,
        "the stuck step kept the pool from draining"
    );
    assert!(matches!(handle.await, Outcome::Succeeded { attempts: 1 }));
    assert!(!*finished.lock().unwrap());
    assert_eq!(pool.live_tasks(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_finishing_step_still_settles_the_job_and_frees_the_lane() {
    let pool = pool();
    let job = Job::new(key(), DeliveryClass::AtMostOnce, |_ctx| async { Ok(()) })
        .with_finish(|_outcome: &Outcome| async { panic!("ack bug") });
    let handle = pool.submit(job).await.unwrap();
    assert!(matches!(handle.await, Outcome::Succeeded { attempts: 1 }));
    let next = pool
        .submit(Job::new(key(), DeliveryClass::AtMostOnce, |_ctx| async {
            Ok(())
        }))
        .await
        .unwrap();
    assert!(matches!(next.await, Outcome::Succeeded { attempts: 1 }));
}

#[tokio::test]
async fn finishing_steps_added_twice_both_run_in_the_order_they_were_added() {
    let pool = pool();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (first, second) = (log.clone(), log.clone());
    let job = Job::new(key(), DeliveryClass::AtLeastOnce, |_ctx| async { Ok(()) })
        .with_finish(move |_outcome: &Outcome| async move {
            tokio::task::yield_now().await;
            first.lock().unwrap().push("first");
        })
        .with_finish(move |_outcome: &Outcome| async move {
            second.lock().unwrap().push("second");
        });
    assert!(pool.submit(job).await.unwrap().await.is_success());
    assert_eq!(*log.lock().unwrap(), ["first", "second"]);
}
