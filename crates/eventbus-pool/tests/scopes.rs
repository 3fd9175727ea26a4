//! Scopes: lanes keyed by (scope, key), closing one scope, and the guards that keep the engine
//! from deadlocking on itself or giving up order.

// Test code: a failed unwrap or index is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{AggregateId, DeliveryClass, Error, HandlerError, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};
use proptest::prelude::*;
use tokio::sync::Notify;

fn key(name: &str) -> Option<AggregateId> {
    Some(AggregateId::new(name).unwrap())
}

fn pool(pool_size: usize, inbox_size: usize, backoff: Duration) -> Pool {
    Pool::new(PoolConfig {
        pool_size,
        inbox_size,
        retry: RetryPolicy::new()
            .with_max_attempts(3)
            .with_backoff(backoff, backoff),
        ..PoolConfig::default()
    })
    .unwrap()
}

type Log = Arc<Mutex<Vec<String>>>;

/// A job that logs `name` when it runs and `finish name (outcome)` in its finishing step.
fn logged(scope: &eventbus_pool::Scope, k: &str, name: &str, log: &Log) -> Job {
    let (run_log, finish_log, name, finish_name) =
        (log.clone(), log.clone(), name.to_owned(), name.to_owned());
    Job::new(key(k), DeliveryClass::AtLeastOnce, move |_ctx| {
        run_log.lock().unwrap().push(name.clone());
        async { Ok(()) }
    })
    .in_scope(scope)
    .with_finish(move |outcome: &Outcome| {
        let what = if outcome.is_success() { "ok" } else { "back" };
        finish_log
            .lock()
            .unwrap()
            .push(format!("finish {finish_name} {what}"));
        async {}
    })
}

#[tokio::test(start_paused = true)]
async fn a_retrying_aggregate_does_not_block_the_same_aggregate_in_another_scope() {
    let pool = pool(4, 10, Duration::from_secs(60));
    let (a, b) = (pool.open_scope().unwrap(), pool.open_scope().unwrap());
    let failing = pool
        .submit(
            Job::new(key("order-1"), DeliveryClass::AtLeastOnce, |_| async {
                Err(HandlerError::transient("down"))
            })
            .in_scope(&a),
        )
        .await
        .unwrap();
    while pool.stats().retrying == 0 {
        tokio::task::yield_now().await;
    }
    let other = pool
        .submit(
            Job::new(key("order-1"), DeliveryClass::AtLeastOnce, |_| async {
                Ok(())
            })
            .in_scope(&b),
        )
        .await
        .unwrap();
    // Scope b's job runs while scope a's waits out a 60 s backoff; with one lane per key it
    // would wait two minutes.
    let outcome = tokio::time::timeout(Duration::from_secs(1), other)
        .await
        .expect("scope b's job waited for scope a's retry");
    assert!(outcome.is_success());
    assert_eq!(
        pool.stats().lanes,
        1,
        "scope b's lane is gone, scope a's stays"
    );
    drop(failing);
}

#[tokio::test]
async fn closing_a_scope_hands_back_queued_jobs_in_lane_order_after_the_running_one() {
    // One actor: v1 holds it, so everything else waits in the queues.
    let pool = pool(1, 10, Duration::from_millis(10));
    let scope = pool.open_scope().unwrap();
    let other = pool.open_scope().unwrap();
    let log: Log = Arc::default();
    let (started, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (s, r, l) = (started.clone(), release.clone(), log.clone());
    let running = Job::new(key("k"), DeliveryClass::AtLeastOnce, move |_| {
        let (s, r, l) = (s.clone(), r.clone(), l.clone());
        async move {
            s.notify_one();
            r.notified().await;
            l.lock().unwrap().push("v1".into());
            Ok(())
        }
    })
    .in_scope(&scope)
    .with_finish({
        let l = log.clone();
        move |_: &Outcome| {
            l.lock().unwrap().push("finish v1 ok".into());
            async {}
        }
    });
    let v1 = pool.submit(running).await.unwrap();
    started.notified().await;
    let queued: Vec<_> = futures_handles(&pool, &scope, &log, &["v2", "v3"], "k").await;
    let idle = futures_handles(&pool, &scope, &log, &["w1"], "idle-key").await;
    let elsewhere = futures_handles(&pool, &other, &log, &["x1"], "k").await;

    let closing = {
        let release = release.clone();
        async move {
            // Let the close hand back the idle lane first, then let v1 finish.
            tokio::task::yield_now().await;
            release.notify_one();
        }
    };
    let (report, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(pool.close_scope(&scope, Duration::from_secs(10)), closing)
    })
    .await
    .expect("the scope did not close");
    assert!(report.drained);
    assert_eq!(
        report.handed_back, 1,
        "only the idle lane's job was taken at once"
    );
    assert!(v1.await.is_success());
    for handle in queued.into_iter().chain(idle) {
        assert!(matches!(handle.await, Outcome::Cancelled { attempts: 0 }));
    }
    for handle in elsewhere {
        assert!(handle.await.is_success(), "another scope is not touched");
    }
    let log = log.lock().unwrap().clone();
    let of_k: Vec<&str> = log
        .iter()
        .map(String::as_str)
        .filter(|e| e.contains('v'))
        .collect();
    assert_eq!(
        of_k,
        ["v1", "finish v1 ok", "finish v2 back", "finish v3 back"],
        "{log:?}"
    );
    assert!(log.contains(&"finish w1 back".to_owned()), "{log:?}");
    assert_eq!(pool.scope_pending(&scope), 0);
    let refused = pool
        .submit(logged(&scope, "k", "v4", &Arc::default()))
        .await;
    assert!(matches!(refused, Err(Error::Closed)));
}

async fn futures_handles(
    pool: &Pool,
    scope: &eventbus_pool::Scope,
    log: &Log,
    names: &[&str],
    k: &str,
) -> Vec<eventbus_pool::JobHandle> {
    let mut handles = Vec::new();
    for name in names {
        handles.push(pool.submit(logged(scope, k, name, log)).await.unwrap());
    }
    handles
}

#[tokio::test(start_paused = true)]
async fn the_scope_deadline_cancels_its_running_jobs_only() {
    let pool = pool(4, 10, Duration::from_millis(10));
    let (scope, other) = (pool.open_scope().unwrap(), pool.open_scope().unwrap());
    let started = Arc::new(Notify::new());
    let stuck = |scope: &eventbus_pool::Scope| {
        let s = started.clone();
        Job::new(key("k"), DeliveryClass::AtLeastOnce, move |ctx| {
            let s = s.clone();
            async move {
                s.notify_one();
                ctx.cancellation().cancelled().await;
                Err(HandlerError::transient("cancelled"))
            }
        })
        .in_scope(scope)
    };
    let mine = pool.submit(stuck(&scope)).await.unwrap();
    started.notified().await;
    let theirs = pool.submit(stuck(&other)).await.unwrap();
    started.notified().await;
    let report = pool.close_scope(&scope, Duration::from_secs(2)).await;
    assert!(!report.drained);
    assert!(matches!(mine.await, Outcome::Cancelled { attempts: 1 }));
    assert!(!other.cancellation().is_cancelled());
    assert_eq!(pool.stats().running, 1, "the other scope's job still runs");
    pool.shutdown(Duration::from_millis(10)).await;
    assert!(matches!(theirs.await, Outcome::Cancelled { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_submits_to_its_own_full_pool_does_not_deadlock() {
    let pool = Arc::new(pool(1, 1, Duration::from_millis(10)));
    let done = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for n in 0..5 {
        let (inner_pool, done) = (pool.clone(), done.clone());
        let job = Job::new(key("chain-a"), DeliveryClass::AtLeastOnce, move |_| {
            let (inner_pool, done) = (inner_pool.clone(), done.clone());
            async move {
                // The pool holds one queued job; this submit would wait for the actor that runs
                // it.
                let follow_up = Job::new(key("chain-b"), DeliveryClass::AtLeastOnce, move |_| {
                    let done = done.clone();
                    async move {
                        done.lock().unwrap().push(n);
                        Ok(())
                    }
                });
                inner_pool
                    .submit(follow_up)
                    .await
                    .map_err(HandlerError::permanent)?;
                Ok(())
            }
        });
        handles.push(pool.submit(job).await.unwrap());
    }
    let all = async {
        for handle in handles {
            assert!(handle.await.is_success());
        }
        while done.lock().unwrap().len() < 5 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("the engine deadlocked on its own submit");
    assert_eq!(*done.lock().unwrap(), [0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn a_job_with_unlimited_attempts_keeps_its_lane_and_shows_as_stalled() {
    let pool = pool(2, 10, Duration::from_secs(1));
    let attempts = Arc::new(Mutex::new(0u32));
    let a = attempts.clone();
    let stuck = pool
        .submit(
            Job::new(key("k"), DeliveryClass::AtLeastOnce, move |_| {
                *a.lock().unwrap() += 1;
                async { Err(HandlerError::permanent("nowhere to go")) }
            })
            .with_unlimited_attempts(),
        )
        .await
        .unwrap();
    let next = pool
        .submit(Job::new(key("k"), DeliveryClass::AtLeastOnce, |_| async {
            Ok(())
        }))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while *attempts.lock().unwrap() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "retries stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pool.stats().stalled, 1);
    assert!(
        pool.stats().to_string().contains("1 stalled"),
        "{}",
        pool.stats()
    );
    let report = pool.shutdown(Duration::from_millis(10)).await;
    assert_eq!(report.cancelled, 2);
    assert!(matches!(stuck.await, Outcome::Cancelled { attempts } if attempts >= 10));
    assert!(
        matches!(next.await, Outcome::Cancelled { attempts: 0 }),
        "the next job of the aggregate never ran"
    );
    assert_eq!(pool.stats().stalled, 0);
}

/// One job of the property test: its scope and key, and whether it fails once first.
#[derive(Debug, Clone)]
struct Planned {
    scope: usize,
    key: u8,
    fails_once: bool,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Jobs over three scopes and a few keys, one scope closed midway: per (scope, key) the jobs
    /// start in order and never overlap, every job settles exactly once, the closed scope's
    /// jobs that did not run are handed back after those that did, and other scopes finish.
    #[test]
    fn scoped_lanes_keep_order_and_closing_a_scope_hands_back_a_suffix(
        plan in prop::collection::vec(
            (0usize..3, 0u8..4, prop::bool::weighted(0.2)).prop_map(|(scope, key, fails_once)| Planned { scope, key, fails_once }),
            1..60,
        ),
        close_after in 0usize..60,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), run_plan(plan, close_after))
                .await
                .expect("the plan did not finish: a lane or a scope got stuck");
        });
    }
}

async fn run_plan(plan: Vec<Planned>, close_after: usize) {
    let pool = Arc::new(pool(3, 100, Duration::from_millis(1)));
    let scopes: Vec<_> = (0..3).map(|_| pool.open_scope().unwrap()).collect();
    // Per job: starts (run calls), finishes (outcome names) in the order they happened.
    let events: Arc<Mutex<Vec<(usize, &'static str)>>> = Arc::default();
    let running: Arc<Mutex<HashMap<(usize, u8), usize>>> = Arc::default();
    let mut handles = Vec::new();
    let mut close = None;
    for (index, planned) in plan.iter().enumerate() {
        if index == close_after {
            let (pool, scope) = (pool.clone(), scopes[0].clone());
            close = Some(tokio::spawn(async move {
                pool.close_scope(&scope, Duration::from_secs(30)).await
            }));
        }
        let (events_run, events_finish, running) =
            (events.clone(), events.clone(), running.clone());
        let lane = (planned.scope, planned.key);
        let fails_once = planned.fails_once;
        let job = Job::new(
            key(&format!("k{}", planned.key)),
            DeliveryClass::AtLeastOnce,
            move |ctx| {
                let (events, running) = (events_run.clone(), running.clone());
                async move {
                    {
                        let mut running = running.lock().unwrap();
                        let count = running.entry(lane).or_default();
                        assert_eq!(*count, 0, "two jobs of lane {lane:?} overlapped");
                        *count += 1;
                    }
                    events.lock().unwrap().push((index, "start"));
                    tokio::task::yield_now().await;
                    *running.lock().unwrap().get_mut(&lane).unwrap() -= 1;
                    if fails_once && ctx.attempt() == 1 {
                        return Err(HandlerError::transient("once"));
                    }
                    Ok(())
                }
            },
        )
        .in_scope(&scopes[planned.scope])
        .with_finish(move |outcome: &Outcome| {
            let name = if outcome.is_success() { "ok" } else { "back" };
            events_finish.lock().unwrap().push((index, name));
            async {}
        });
        match pool.submit(job).await {
            Ok(handle) => handles.push((index, Some(handle))),
            Err(Error::Closed) => {
                assert_eq!(planned.scope, 0, "only scope 0 closes");
                assert!(close.is_some());
                handles.push((index, None));
            }
            Err(error) => panic!("{error}"),
        }
    }
    let mut outcomes = HashMap::new();
    for (index, handle) in handles {
        if let Some(handle) = handle {
            outcomes.insert(index, handle.await);
        }
    }
    if let Some(close) = close {
        assert!(close.await.unwrap().drained);
    }
    let events = events.lock().unwrap().clone();
    // Every submitted job finished exactly once, with its outcome.
    for (index, outcome) in &outcomes {
        let finishes: Vec<_> = events
            .iter()
            .filter(|(i, what)| i == index && *what != "start")
            .collect();
        assert_eq!(finishes.len(), 1, "job {index}: {events:?}");
        let planned = &plan[*index];
        if planned.scope != 0 {
            assert!(
                outcome.is_success(),
                "job {index} of an open scope: {outcome:?}"
            );
        }
    }
    // Per lane: the order of starts follows submission, and handed-back jobs come after every
    // job that ran.
    let mut lanes: HashMap<(usize, u8), Vec<usize>> = HashMap::new();
    for (index, _) in outcomes.iter() {
        let planned = &plan[*index];
        lanes
            .entry((planned.scope, planned.key))
            .or_default()
            .push(*index);
    }
    for (lane, mut jobs) in lanes {
        jobs.sort_unstable();
        let first_start: Vec<usize> = {
            let mut seen = Vec::new();
            for (index, what) in &events {
                if *what == "start" && jobs.contains(index) && !seen.contains(index) {
                    seen.push(*index);
                }
            }
            seen
        };
        let ran: Vec<usize> = jobs
            .iter()
            .copied()
            .filter(|index| outcomes[index].is_success())
            .collect();
        assert_eq!(first_start, ran, "lane {lane:?}: started out of order");
        let back: Vec<usize> = jobs
            .iter()
            .copied()
            .filter(|index| !outcomes[index].is_success())
            .collect();
        assert!(
            back.iter().all(|b| ran.iter().all(|r| r < b)),
            "lane {lane:?}: handed back {back:?} is not a suffix after {ran:?}"
        );
        let finish_order: Vec<usize> = events
            .iter()
            .filter(|(index, what)| *what != "start" && jobs.contains(index))
            .map(|(index, _)| *index)
            .collect();
        assert_eq!(finish_order, jobs, "lane {lane:?}: finished out of order");
    }
    pool.shutdown(Duration::from_secs(5)).await;
    assert_eq!(pool.live_tasks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_waiting_for_room_joins_its_lane_over_the_bounds_once_told_to() {
    let pool = Arc::new(pool(1, 1, Duration::from_millis(10)));
    let log: Log = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let scope = pool.open_scope().unwrap();
    let job = |name: &'static str| {
        let (log, gate) = (log.clone(), gate.clone());
        Job::new(key("k"), DeliveryClass::AtLeastOnce, move |_| {
            let (log, gate) = (log.clone(), gate.clone());
            async move {
                if name == "v1" {
                    gate.acquire().await.unwrap().forget();
                }
                log.lock().unwrap().push(name.to_owned());
                Ok(())
            }
        })
        .in_scope(&scope)
    };
    let v1 = pool.submit(job("v1")).await.unwrap();
    while pool.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let v2 = pool.submit(job("v2")).await.unwrap();
    // The lane is full: v3 waits for room, until the overflow signal.
    let overflow = Arc::new(Notify::new());
    let waiting = {
        let (pool, overflow, v3) = (pool.clone(), overflow.clone(), job("v3"));
        tokio::spawn(async move { pool.submit_until(v3, overflow.notified()).await })
    };
    while pool.stats().queued < 1 || waiting.is_finished() {
        tokio::task::yield_now().await;
    }
    assert!(!waiting.is_finished(), "v3 waited for room");
    overflow.notify_one();
    let v3 = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("v3 joined its lane once told to")
        .unwrap()
        .unwrap();
    assert_eq!(pool.stats().queued, 2, "over the lane's bound of 1");
    gate.add_permits(1);
    for handle in [v1, v2, v3] {
        assert!(handle.await.is_success());
    }
    assert_eq!(*log.lock().unwrap(), ["v1", "v2", "v3"]);
}
