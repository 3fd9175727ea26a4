//! Prints the engine's benchmark figures as ratios to baselines measured in the same run.
//!
//! ```text
//! cargo run --release -p eventbus-pool --example ratios            # full size
//! cargo run --release -p eventbus-pool --example ratios -- --quick # a tenth of the jobs
//! ```
//!
//! Scenarios (see `benches/scenarios.rs`):
//! (a) no-op handlers, 1,000,000 jobs over 10,000 keys;
//! (b) one key stalled for 2 s among 10,000: completion latency of the other keys;
//! (c) a 1 ms async sleep per handler, against `pool_size / 1 ms`;
//! and, to tell lock contention from per-job work, (a) again on a single-threaded runtime
//! for several key counts.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::indexing_slicing)]

#[path = "../benches/scenarios/mod.rs"]
mod scenarios;

use std::time::Duration;

use scenarios::{POOL_SIZE, Work};

fn per_second(jobs: usize, elapsed: Duration) -> f64 {
    jobs as f64 / elapsed.as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let scale = if quick { 10 } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores; runtime: tokio multi-thread; pool_size {POOL_SIZE}, inbox_size {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        scenarios::INBOX_SIZE
    );
    runtime.block_on(async {
        // (a) no-op handlers
        let jobs = 1_000_000 / scale;
        let keys = scenarios::keys(10_000);
        let raw = per_second(jobs, scenarios::raw_hop(jobs).await);
        let go = per_second(jobs, scenarios::go_design_throughput(&keys, jobs, Work::Nothing).await);
        let ours = per_second(jobs, scenarios::pool_throughput(&keys, jobs, Work::Nothing).await);
        println!("\n(a) no-op handlers, {jobs} jobs over {} keys", keys.len());
        println!("    raw mpsc hop   {raw:>12.0} jobs/s");
        println!("    Go design      {go:>12.0} jobs/s");
        println!("    our pool       {ours:>12.0} jobs/s");
        println!("    ratio to Go design {:.2}x (target >= 1.0x)", ours / go);
        println!("    ratio to raw hop   {:.2}x (target >= 0.5x)", ours / raw);

        // (b) one key stalled for 2 s
        let stall = Duration::from_secs(2);
        let keys = scenarios::keys(10_001);
        let report = |name: &str, mut latencies: Vec<Duration>| {
            let p50 = scenarios::quantile(&mut latencies, 0.50);
            let p99 = scenarios::quantile(&mut latencies, 0.99);
            let p999 = scenarios::quantile(&mut latencies, 0.999);
            let max = scenarios::quantile(&mut latencies, 1.0);
            println!("    {name:<22} p50 {p50:>10.2?}  p99 {p99:>10.2?}  p99.9 {p999:>10.2?}  max {max:>10.2?}");
            p99
        };
        println!("\n(b) one job per key for 10,000 keys, with and without one key stalled for {stall:?}");
        let go_calm = report("Go design, no stall", scenarios::go_design_latencies(&keys, None).await);
        let go_stalled = report("Go design, stalled", scenarios::go_design_latencies(&keys, Some(stall)).await);
        let calm = report("our pool, no stall", scenarios::pool_latencies(&keys, None).await);
        let stalled = report("our pool, stalled", scenarios::pool_latencies(&keys, Some(stall)).await);
        println!(
            "    stalled p99 / unstalled p99: our pool {:.2}x (target <= 2x), Go design {:.2}x",
            stalled.as_secs_f64() / calm.as_secs_f64(),
            go_stalled.as_secs_f64() / go_calm.as_secs_f64()
        );

        // (c) 1 ms sleep handlers
        let sleep = Duration::from_millis(1);
        let jobs = 100_000 / scale;
        let keys = scenarios::keys(10_000);
        let ideal = POOL_SIZE as f64 / sleep.as_secs_f64();
        let sleepers = per_second(jobs, scenarios::raw_sleepers(jobs, sleep).await);
        let go = per_second(jobs, scenarios::go_design_throughput(&keys, jobs, Work::Sleep(sleep)).await);
        let ours = per_second(jobs, scenarios::pool_throughput(&keys, jobs, Work::Sleep(sleep)).await);
        println!("\n(c) 1 ms sleep handlers, {jobs} jobs over {} keys", keys.len());
        println!("    pool_size / 1 ms       {ideal:>10.0} jobs/s");
        println!("    {POOL_SIZE} raw sleeper tasks {sleepers:>10.0} jobs/s");
        println!("    Go design              {go:>10.0} jobs/s");
        println!("    our pool               {ours:>10.0} jobs/s");
        println!("    ratio to pool_size / 1 ms  {:.2}x (target >= 0.8x)", ours / ideal);
        println!("    ratio to raw sleepers      {:.2}x", ours / sleepers);
        println!("    ratio to Go design         {:.2}x", ours / go);
    });
    drop(runtime);

    // (a) without contention: one thread, so no lock is ever contended.
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let jobs = 200_000 / scale;
    println!(
        "\n(a) on a single-threaded runtime, {jobs} no-op jobs: our pool / Go design by key count"
    );
    single.block_on(async {
        for count in [10, 1_000, 10_000, 100_000] {
            let keys = scenarios::keys(count);
            let go = per_second(jobs, scenarios::go_design_throughput(&keys, jobs, Work::Nothing).await);
            let ours = per_second(jobs, scenarios::pool_throughput(&keys, jobs, Work::Nothing).await);
            println!("    {count:>7} keys: Go design {go:>10.0} jobs/s, our pool {ours:>10.0} jobs/s, ratio {:.2}x", ours / go);
        }
    });
}
