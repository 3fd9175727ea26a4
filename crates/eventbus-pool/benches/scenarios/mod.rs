//! The benchmark scenarios, shared by `benches/pool.rs` (criterion) and `examples/ratios.rs`
//! (full-size figures printed as ratios). Each scenario runs three engines on the same input:
//!
//! - a raw tokio mpsc hop: the physical reference (one bounded channel, one consumer);
//! - the Go SDK's design rendered in Rust: 256 tasks with bounded inboxes, FNV-1a routing of the
//!   key, a boxed job and a oneshot per job; the baseline to beat;
//! - our pool.

// Benchmark code: inputs are built here, so indexing and unwrapping cannot fail.
#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::indexing_slicing,
    clippy::unwrap_used
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus_core::{AggregateId, DeliveryClass};
use eventbus_pool::{Job, Pool, PoolConfig};
use tokio::sync::{mpsc, oneshot};

pub const POOL_SIZE: usize = 256;
pub const INBOX_SIZE: usize = 1000;

/// What each handler does.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Returns at once.
    Nothing,
    /// `tokio::time::sleep` for this long.
    Sleep(Duration),
}

impl Work {
    async fn run(self) {
        match self {
            Work::Nothing => {}
            Work::Sleep(duration) => tokio::time::sleep(duration).await,
        }
    }
}

/// `count` distinct keys.
pub fn keys(count: usize) -> Vec<AggregateId> {
    (0..count)
        .map(|i| AggregateId::new(format!("aggregate-{i}")).unwrap())
        .collect()
}

/// The jobs' keys, round-robin over `keys`.
fn key_of(keys: &[AggregateId], job: usize) -> &AggregateId {
    &keys[job % keys.len()]
}

/// One bounded channel, one consumer, no work per item.
pub async fn raw_hop(jobs: usize) -> Duration {
    let (tx, mut rx) = mpsc::channel::<usize>(INBOX_SIZE);
    let consumer = tokio::spawn(async move {
        let mut sum = 0usize;
        while let Some(item) = rx.recv().await {
            sum = sum.wrapping_add(item);
        }
        sum
    });
    let started = Instant::now();
    for job in 0..jobs {
        tx.send(job).await.unwrap();
    }
    drop(tx);
    consumer.await.unwrap();
    started.elapsed()
}

type BoxedJob = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The Go SDK's actor pool: `POOL_SIZE` actors with bounded FIFO inboxes, FNV-1a routing.
pub struct GoDesign {
    inboxes: Vec<mpsc::Sender<(BoxedJob, oneshot::Sender<()>)>>,
}

fn fnv1a(key: &str) -> u32 {
    key.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

impl GoDesign {
    pub fn new() -> Self {
        let inboxes = (0..POOL_SIZE)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<(BoxedJob, oneshot::Sender<()>)>(INBOX_SIZE);
                tokio::spawn(async move {
                    while let Some((job, done)) = rx.recv().await {
                        job().await;
                        let _ = done.send(());
                    }
                });
                tx
            })
            .collect();
        Self { inboxes }
    }

    pub async fn submit(&self, key: &AggregateId, work: Work) -> oneshot::Receiver<()> {
        let (done, receiver) = oneshot::channel();
        let actor = fnv1a(key.as_str()) as usize % POOL_SIZE;
        let job: BoxedJob = Box::new(move || Box::pin(work.run()));
        self.inboxes[actor].send((job, done)).await.unwrap();
        receiver
    }
}

fn our_pool() -> Pool {
    Pool::new(PoolConfig {
        pool_size: POOL_SIZE,
        inbox_size: INBOX_SIZE,
        ..PoolConfig::default()
    })
    .unwrap()
}

fn our_job(key: &AggregateId, work: Work) -> Job {
    Job::new(
        Some(key.clone()),
        DeliveryClass::AtLeastOnce,
        move |_| async move {
            work.run().await;
            Ok(())
        },
    )
}

/// Throughput run: `jobs` jobs over `keys`, each doing `work`; completions are awaited by a
/// collector task so that the submitter is never blocked on them.
pub async fn go_design_throughput(keys: &[AggregateId], jobs: usize, work: Work) -> Duration {
    let pool = GoDesign::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        while let Some(done) = rx.recv().await {
            let done: oneshot::Receiver<()> = done;
            done.await.unwrap();
        }
    });
    let started = Instant::now();
    for job in 0..jobs {
        tx.send(pool.submit(key_of(keys, job), work).await).unwrap();
    }
    drop(tx);
    collector.await.unwrap();
    started.elapsed()
}

/// See [`go_design_throughput`].
pub async fn pool_throughput(keys: &[AggregateId], jobs: usize, work: Work) -> Duration {
    let pool = our_pool();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        while let Some(handle) = rx.recv().await {
            let handle: eventbus_pool::JobHandle = handle;
            assert!(handle.await.is_success());
        }
    });
    let started = Instant::now();
    for job in 0..jobs {
        tx.send(pool.submit(our_job(key_of(keys, job), work)).await.unwrap())
            .unwrap();
    }
    drop(tx);
    collector.await.unwrap();
    let elapsed = started.elapsed();
    pool.shutdown(Duration::from_secs(10)).await;
    elapsed
}

/// `POOL_SIZE` tasks that each sleep `work` in a loop until `jobs` sleeps are done: the most
/// `POOL_SIZE` concurrent sleepers can do on this runtime's timer.
pub async fn raw_sleepers(jobs: usize, sleep: Duration) -> Duration {
    let per_task = jobs.div_ceil(POOL_SIZE);
    let started = Instant::now();
    let tasks: Vec<_> = (0..POOL_SIZE)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..per_task {
                    tokio::time::sleep(sleep).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    started.elapsed()
}

/// Completion latencies (submit → settled) of one job per key in `keys`, optionally with the
/// first key's handler stalled for `stall`; the stalled key's own latency is left out.
pub async fn go_design_latencies(keys: &[AggregateId], stall: Option<Duration>) -> Vec<Duration> {
    let pool = GoDesign::new();
    if let Some(stall) = stall {
        // The stalled job is in flight before the others arrive.
        drop(pool.submit(&keys[0], Work::Sleep(stall)).await);
        tokio::task::yield_now().await;
    }
    let mut pending = Vec::with_capacity(keys.len());
    for key in &keys[1..] {
        pending.push((Instant::now(), pool.submit(key, Work::Nothing).await));
    }
    let waits = pending.into_iter().map(|(submitted, done)| async move {
        done.await.unwrap();
        submitted.elapsed()
    });
    futures::future::join_all(waits).await
}

/// See [`go_design_latencies`].
pub async fn pool_latencies(keys: &[AggregateId], stall: Option<Duration>) -> Vec<Duration> {
    let pool = Arc::new(our_pool());
    if let Some(stall) = stall {
        drop(
            pool.submit(our_job(&keys[0], Work::Sleep(stall)))
                .await
                .unwrap(),
        );
        tokio::task::yield_now().await;
    }
    let mut pending = Vec::with_capacity(keys.len());
    for key in &keys[1..] {
        pending.push((
            Instant::now(),
            pool.submit(our_job(key, Work::Nothing)).await.unwrap(),
        ));
    }
    let waits = pending.into_iter().map(|(submitted, handle)| async move {
        assert!(handle.await.is_success());
        submitted.elapsed()
    });
    let latencies = futures::future::join_all(waits).await;
    pool.shutdown(Duration::from_secs(10)).await;
    latencies
}

/// The `q`-quantile (0..=1) of `samples`.
pub fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index]
}
