//! Retries, permanent errors and panics, per delivery class.

// Test helpers build their inputs from constants; an unwrap failing is a broken test.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{AggregateId, DeliveryClass, HandlerError, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};

fn pool(max_attempts: u32, max_restarts: u32) -> Pool {
    Pool::new(PoolConfig {
        pool_size: 2,
        max_restarts,
        retry: RetryPolicy::new()
            .with_max_attempts(max_attempts)
            .with_backoff(Duration::from_millis(100), Duration::from_secs(1)),
        ..PoolConfig::default()
    })
    .unwrap()
}

fn counting(
    class: DeliveryClass,
    calls: &Arc<AtomicU32>,
    behave: fn(u32) -> Result<(), HandlerError>,
) -> Job {
    let calls = calls.clone();
    Job::new(Some(AggregateId::new("a").unwrap()), class, move |ctx| {
        calls.fetch_add(1, Ordering::SeqCst);
        let result = behave(ctx.attempt());
        async move { result }
    })
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_until_max_attempts() {
    let pool = pool(4, 3);
    let calls = Arc::new(AtomicU32::new(0));
    let outcome = pool
        .submit(counting(DeliveryClass::AtLeastOnce, &calls, |_| {
            Err(HandlerError::transient("down"))
        }))
        .await
        .unwrap()
        .await;
    match outcome {
        Outcome::Failed { attempts: 4, error } => assert_eq!(error.to_string(), "down"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_skips_the_retries() {
    let pool = pool(4, 3);
    let calls = Arc::new(AtomicU32::new(0));
    let outcome = pool
        .submit(counting(DeliveryClass::AtLeastOnce, &calls, |_| {
            Err(HandlerError::permanent("bad data"))
        }))
        .await
        .unwrap()
        .await;
    assert!(matches!(outcome, Outcome::Failed { attempts: 1, .. }));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn at_most_once_jobs_run_once_whatever_happens() {
    let pool = pool(4, 3);
    let calls = Arc::new(AtomicU32::new(0));
    let failed = pool
        .submit(counting(DeliveryClass::AtMostOnce, &calls, |_| {
            Err(HandlerError::transient("down"))
        }))
        .await
        .unwrap()
        .await;
    assert!(matches!(failed, Outcome::Failed { attempts: 1, .. }));
    std::panic::set_hook(Box::new(|_| {}));
    let panicked = pool
        .submit(counting(DeliveryClass::AtMostOnce, &calls, |_| {
            panic!("boom")
        }))
        .await
        .unwrap()
        .await;
    match panicked {
        Outcome::Panicked {
            attempts: 1,
            panics: 1,
            message,
        } => assert_eq!(message, "boom"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_job_that_panics_max_restarts_times_is_not_run_again() {
    std::panic::set_hook(Box::new(|_| {}));
    let pool = pool(10, 3);
    let calls = Arc::new(AtomicU32::new(0));
    let outcome = pool
        .submit(counting(DeliveryClass::AtLeastOnce, &calls, |attempt| {
            panic!("panic {attempt}")
        }))
        .await
        .unwrap()
        .await;
    match outcome {
        Outcome::Panicked {
            attempts: 3,
            panics: 3,
            message,
        } => assert_eq!(message, "panic 3"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // The actors survived: the pool still runs jobs.
    let ok = pool
        .submit(counting(DeliveryClass::AtLeastOnce, &calls, |_| Ok(())))
        .await
        .unwrap()
        .await;
    assert!(ok.is_success());
}

#[tokio::test(start_paused = true)]
async fn a_panic_then_success_counts_as_a_retry() {
    std::panic::set_hook(Box::new(|_| {}));
    let pool = pool(3, 3);
    let calls = Arc::new(AtomicU32::new(0));
    let outcome = pool
        .submit(counting(DeliveryClass::AtLeastOnce, &calls, |attempt| {
            if attempt == 1 {
                panic!("first attempt panics")
            }
            Ok(())
        }))
        .await
        .unwrap()
        .await;
    assert!(matches!(outcome, Outcome::Succeeded { attempts: 2 }));
}

#[tokio::test(start_paused = true)]
async fn a_panic_inside_the_future_is_caught_like_one_before_it() {
    std::panic::set_hook(Box::new(|_| {}));
    let pool = pool(1, 3);
    let outcome = pool
        .submit(Job::new(None, DeliveryClass::AtLeastOnce, |_| async {
            tokio::task::yield_now().await;
            panic!("{}", String::from("owned message"));
        }))
        .await
        .unwrap()
        .await;
    match outcome {
        Outcome::Panicked { message, .. } => assert_eq!(message, "owned message"),
        other => panic!("{other:?}"),
    }
}
