//! `eventbus bench --scenario engine`: the ordering engine against its baselines, in process,
//! from the scenarios of `cargo run --release -p eventbus-pool --example ratios` (the same
//! file): no-op handlers on the multi-threaded runtime against the Go SDK's design and a raw
//! tokio channel hop, then on a single-threaded runtime (no lock ever contended) at 10 to
//! 100,000 keys against the Go design.

#[path = "../../../eventbus-pool/benches/scenarios/mod.rs"]
mod scenarios;

use std::time::Duration;

use scenarios::Work;

use super::{Figure, rate};
use crate::CliError;

fn per_second(jobs: usize, elapsed: Duration) -> f64 {
    rate(jobs as u64, elapsed)
}

/// Runs `jobs` no-op jobs over 10,000 keys on this (multi-threaded) runtime, then a fifth as
/// many on a single-threaded runtime for each key count.
pub(super) async fn run(jobs: u64) -> Result<Vec<Figure>, CliError> {
    let jobs = usize::try_from(jobs).unwrap_or(usize::MAX);
    let keys = scenarios::keys(10_000);
    let raw = per_second(jobs, scenarios::raw_hop(jobs).await);
    let go = per_second(
        jobs,
        scenarios::go_design_throughput(&keys, jobs, Work::Nothing).await,
    );
    let ours = per_second(
        jobs,
        scenarios::pool_throughput(&keys, jobs, Work::Nothing).await,
    );
    let mut figures = vec![
        Figure {
            what: "engine no-op vs Go design".into(),
            raw: go,
            ours,
            cpu: None,
            target: Some(1.0),
        },
        Figure {
            what: "engine no-op vs raw mpsc hop".into(),
            raw,
            ours,
            cpu: None,
            target: Some(0.5),
        },
    ];
    let single_jobs = (jobs / 5).max(1);
    let single = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok::<_, std::io::Error>(runtime.block_on(async {
            let mut figures = Vec::new();
            for count in [10, 1_000, 10_000, 100_000] {
                let keys = scenarios::keys(count);
                let go = scenarios::go_design_throughput(&keys, single_jobs, Work::Nothing).await;
                let ours = scenarios::pool_throughput(&keys, single_jobs, Work::Nothing).await;
                figures.push(Figure {
                    what: format!("engine 1 thread, {count} keys, vs Go design").into(),
                    raw: per_second(single_jobs, go),
                    ours: per_second(single_jobs, ours),
                    cpu: None,
                    target: Some(1.0),
                });
            }
            figures
        }))
    })
    .await
    .map_err(|error| CliError(format!("the single-threaded runtime failed: {error}")))??;
    figures.extend(single);
    Ok(figures)
}
