//! Property tests of the engine's core promises: per-key order with no overlap (retries
//! included), at most `pool_size` handlers at once, and every job settling exactly once with the
//! outcome its behaviour calls for.

// The plan runner is test code outside `#[test]` functions: it indexes plans it built and
// panics on purpose (planned panics).
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::RetryPolicy;
use eventbus_core::{AggregateId, DeliveryClass, HandlerError, Outcome};
use eventbus_pool::{Job, Pool, PoolConfig};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Step {
    Ok,
    Fail,
    FailPermanently,
    Panic,
}

#[derive(Debug, Clone)]
struct Plan {
    key: Option<u8>,
    class: DeliveryClass,
    /// What attempt n does (the last step repeats).
    steps: Vec<Step>,
    millis: u8,
}

fn plan() -> impl Strategy<Value = Plan> {
    let step = prop_oneof![
        6 => Just(Step::Ok),
        2 => Just(Step::Fail),
        1 => Just(Step::FailPermanently),
        1 => Just(Step::Panic),
    ];
    (
        prop::option::weighted(0.85, 0u8..6),
        prop_oneof![3 => Just(DeliveryClass::AtLeastOnce), 1 => Just(DeliveryClass::AtMostOnce)],
        prop::collection::vec(step, 1..5),
        0u8..4,
    )
        .prop_map(|(key, class, steps, millis)| Plan {
            key,
            class,
            steps,
            millis,
        })
}

const MAX_ATTEMPTS: u32 = 4;
const MAX_RESTARTS: u32 = 2;

/// The outcome the contract calls for, as (variant, attempts).
fn expected(plan: &Plan) -> (&'static str, u32) {
    let mut panics = 0;
    for attempt in 1..=MAX_ATTEMPTS {
        let step = plan.steps[((attempt - 1) as usize).min(plan.steps.len() - 1)];
        let last = plan.class == DeliveryClass::AtMostOnce || attempt == MAX_ATTEMPTS;
        match step {
            Step::Ok => return ("succeeded", attempt),
            Step::FailPermanently => return ("failed", attempt),
            Step::Fail if last => return ("failed", attempt),
            Step::Fail => {}
            Step::Panic => {
                panics += 1;
                if last || panics >= MAX_RESTARTS {
                    return ("panicked", attempt);
                }
            }
        }
    }
    unreachable!("the last attempt always settles")
}

fn variant(outcome: &Outcome) -> (&'static str, u32) {
    let name = match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed { .. } => "failed",
        Outcome::Panicked { .. } => "panicked",
        Outcome::Cancelled { .. } => "cancelled",
        _ => "unknown",
    };
    (name, outcome.attempts())
}

#[derive(Default)]
struct Log {
    /// (key, job index) at each attempt start, in start order.
    starts: Mutex<Vec<(u8, usize)>>,
    active_per_key: Mutex<HashMap<u8, usize>>,
    active: AtomicUsize,
    max_active: AtomicUsize,
    overlaps: AtomicUsize,
}

/// Decrements the activity counters when an attempt ends, even by panic.
struct Running(Arc<Log>, Option<u8>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        if let Some(key) = self.1 {
            *self.0.active_per_key.lock().unwrap().get_mut(&key).unwrap() -= 1;
        }
    }
}

async fn run_plans(
    plans: Vec<Plan>,
    pool_size: usize,
    inbox_size: usize,
) -> Result<(), TestCaseError> {
    let pool = Pool::new(PoolConfig {
        pool_size,
        inbox_size,
        max_restarts: MAX_RESTARTS,
        retry: RetryPolicy::new()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_backoff(Duration::from_millis(1), Duration::from_millis(4)),
    })
    .unwrap();
    let log = Arc::new(Log::default());
    let mut handles = Vec::new();
    for (index, plan) in plans.iter().enumerate() {
        let key = plan
            .key
            .map(|k| AggregateId::new(format!("key-{k}")).unwrap());
        let (log, plan_for_job) = (log.clone(), plan.clone());
        let job = Job::new(key, plan.class, move |ctx| {
            let (log, plan) = (log.clone(), plan_for_job.clone());
            async move {
                let now = log.active.fetch_add(1, Ordering::SeqCst) + 1;
                log.max_active.fetch_max(now, Ordering::SeqCst);
                if let Some(key) = plan.key {
                    let mut per_key = log.active_per_key.lock().unwrap();
                    let active = per_key.entry(key).or_default();
                    if *active > 0 {
                        log.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    *active += 1;
                    log.starts.lock().unwrap().push((key, index));
                }
                let _running = Running(log.clone(), plan.key);
                tokio::time::sleep(Duration::from_millis(u64::from(plan.millis))).await;
                let step = plan.steps[((ctx.attempt() - 1) as usize).min(plan.steps.len() - 1)];
                match step {
                    Step::Ok => Ok(()),
                    Step::Fail => Err(HandlerError::transient("planned failure")),
                    Step::FailPermanently => {
                        Err(HandlerError::permanent("planned permanent failure"))
                    }
                    Step::Panic => panic!("planned panic"),
                }
            }
        });
        handles.push(pool.submit(job).await.unwrap());
        let stats = pool.stats();
        prop_assert!(stats.queued <= pool_size * inbox_size);
    }
    for (index, handle) in handles.into_iter().enumerate() {
        let outcome = handle.await;
        prop_assert_eq!(
            variant(&outcome),
            expected(&plans[index]),
            "job {}: {:?}",
            index,
            plans[index]
        );
    }
    prop_assert_eq!(
        log.overlaps.load(Ordering::SeqCst),
        0,
        "handlers of one key overlapped"
    );
    prop_assert!(log.max_active.load(Ordering::SeqCst) <= pool_size);
    // Per key, attempts start in submission order, and a job's retries come before the next job.
    let mut last_per_key: HashMap<u8, usize> = HashMap::new();
    for (key, index) in log.starts.lock().unwrap().iter() {
        if let Some(previous) = last_per_key.insert(*key, *index) {
            prop_assert!(
                previous <= *index,
                "key {} started job {} after job {}",
                key,
                index,
                previous
            );
        }
    }
    let stats = pool.stats();
    prop_assert_eq!(
        (stats.queued, stats.running, stats.retrying, stats.lanes),
        (0, 0, 0, 0)
    );
    let report = pool.shutdown(Duration::from_secs(1)).await;
    prop_assert!(report.drained);
    prop_assert_eq!(pool.live_tasks(), 0);
    Ok(())
}

fn quiet_panics() {
    // Planned panics would flood the output; the pool reports them through tracing.
    std::panic::set_hook(Box::new(|_| {}));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Paused clock, one thread: deterministic and fast, so thousands of cases.
    #[test]
    fn per_key_order_no_overlap_and_exactly_one_outcome_per_job(
        plans in prop::collection::vec(plan(), 1..40),
        pool_size in 1usize..5,
        inbox_size in 1usize..6,
    ) {
        quiet_panics();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_plans(plans, pool_size, inbox_size))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Real clock, several worker threads: the same promises under true parallelism.
    #[test]
    fn the_promises_hold_on_a_multi_threaded_runtime(
        plans in prop::collection::vec(plan(), 1..40),
        pool_size in 1usize..8,
        inbox_size in 1usize..6,
    ) {
        quiet_panics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run_plans(plans, pool_size, inbox_size))?;
    }
}
