//! Criterion benchmarks of the engine against its baselines (`cargo bench -p eventbus-pool`).
//! `cargo run --release -p eventbus-pool --example ratios` prints the full-size figures as ratios.
#![allow(missing_docs, clippy::unwrap_used)]

mod scenarios;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use scenarios::Work;

const JOBS: usize = 100_000;

fn no_op_handlers(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let keys = scenarios::keys(10_000);
    let mut group = c.benchmark_group("no-op handlers, 100k jobs over 10k keys");
    group.throughput(Throughput::Elements(JOBS as u64));
    group.sample_size(10);
    group.bench_function("raw mpsc hop", |b| {
        b.to_async(&runtime).iter(|| scenarios::raw_hop(JOBS));
    });
    group.bench_function("Go design", |b| {
        b.to_async(&runtime)
            .iter(|| scenarios::go_design_throughput(&keys, JOBS, Work::Nothing));
    });
    group.bench_function("our pool", |b| {
        b.to_async(&runtime)
            .iter(|| scenarios::pool_throughput(&keys, JOBS, Work::Nothing));
    });
    group.finish();
}

fn sleeping_handlers(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let keys = scenarios::keys(10_000);
    let jobs = 20_000;
    let sleep = Work::Sleep(Duration::from_millis(1));
    let mut group = c.benchmark_group("1 ms sleep handlers, 20k jobs");
    group.throughput(Throughput::Elements(jobs as u64));
    group.sample_size(10);
    group.bench_function("raw sleepers", |b| {
        b.to_async(&runtime)
            .iter(|| scenarios::raw_sleepers(jobs as usize, Duration::from_millis(1)));
    });
    group.bench_function("Go design", |b| {
        b.to_async(&runtime)
            .iter(|| scenarios::go_design_throughput(&keys, jobs as usize, sleep));
    });
    group.bench_function("our pool", |b| {
        b.to_async(&runtime)
            .iter(|| scenarios::pool_throughput(&keys, jobs as usize, sleep));
    });
    group.finish();
}

criterion_group!(benches, no_op_handlers, sleeping_handlers);
criterion_main!(benches);
