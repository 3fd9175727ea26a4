//! `eventbus bench --scenario stalled`: resident memory while the handler is stalled and
//! envelopes keep coming (1,000,000 by default).
//!
//! One process holds both a subscription whose handler waits on a gate and a publisher
//! pipelining every envelope to the same topic. On NATS and Kafka the broker keeps the backlog:
//! the subscription takes only what the engine's bounds allow (NATS: `max_ack_pending`; Kafka:
//! partitions paused while their readers are full), so the process's memory stays flat however
//! much is published. On memory there is no broker: publishers wait once the engine is full,
//! and the publisher here stops when it has made no progress for a second. Resident memory
//! (`VmRSS`) is sampled every 100 ms; the peak (the process's `VmHWM`, so nothing between two
//! samples is missed) and the figure at each quarter of the publishing are printed, with the
//! target of 256 MB.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus::{Config, Envelope, HandlerContext, SubscribeOptions};
use tokio::sync::Semaphore;

use crate::CliError;

/// The peak resident memory the scenario aims under.
const TARGET: u64 = 256 * 1024 * 1024;

/// How long the memory publisher may make no progress before it counts as held back.
const HELD_BACK_AFTER: Duration = Duration::from_secs(1);

/// Resident memory of this process now (Linux `/proc/self/status`, `VmRSS`).
fn resident() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// The most resident memory this process has had (`VmHWM`): the peak between samples too.
fn resident_peak() -> Option<u64> {
    status_bytes("VmHWM:")
}

fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.0} MB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs the scenario and prints its lines.
pub(super) async fn run(config: Config, count: u64, aggregates: u64) -> Result<(), CliError> {
    // Only memory has no broker to keep the backlog: there a publisher that stops making
    // progress is held back by the engine; on a broker it is only slow for a moment.
    let keeps_backlog = config.backend != eventbus::Backend::Memory;
    let Some(before) = resident() else {
        return Err(CliError(
            "the stalled scenario reads /proc/self/status: Linux only".into(),
        ));
    };
    let bus = Arc::new(eventbus::connect(config).await?);
    let topic = format!("bench{}.stalled", std::process::id());
    let gate = Arc::new(Semaphore::new(0));
    let started_handlers = Arc::new(AtomicU64::new(0));
    let (g, s) = (gate.clone(), started_handlers.clone());
    let subscription = bus
        .subscribe_envelope(
            &topic,
            Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
                let (g, s) = (g.clone(), s.clone());
                async move {
                    s.fetch_add(1, Ordering::Relaxed);
                    // Stalled until the measurement ends; closed then, which lets it go.
                    let _ = g.acquire().await;
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;

    let published = Arc::new(AtomicU64::new(0));
    let mut publisher = {
        let (bus, topic, published) = (bus.clone(), topic.clone(), published.clone());
        tokio::spawn(async move {
            let mut pending = std::collections::VecDeque::new();
            for i in 0..count {
                let envelope = super::envelope(i, aggregates)?;
                pending.push_back(bus.start_publish_envelope(&topic, &envelope).await?);
                published.fetch_add(1, Ordering::Relaxed);
                // Settled results are let go as they come, so that the publisher itself holds
                // no more than the window.
                while let Some(front) = pending.front_mut() {
                    match futures::FutureExt::now_or_never(front) {
                        Some(result) => {
                            result?;
                            pending.pop_front();
                        }
                        None => break,
                    }
                }
            }
            for publish in pending {
                publish.await?;
            }
            Ok::<(), CliError>(())
        })
    };

    let started = Instant::now();
    let mut peak = before;
    let mut quarters = Vec::new();
    let mut last_progress = (0, Instant::now());
    let held_back = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = resident().unwrap_or(0);
        peak = peak.max(now);
        let done = published.load(Ordering::Relaxed);
        while quarters.len() < 4 && done >= count * (quarters.len() as u64 + 1) / 4 {
            quarters.push(now);
        }
        if publisher.is_finished() {
            break None;
        }
        if done != last_progress.0 {
            last_progress = (done, Instant::now());
        } else if !keeps_backlog && last_progress.1.elapsed() > HELD_BACK_AFTER {
            break Some(done);
        }
    };
    let elapsed = started.elapsed();
    peak = peak.max(resident_peak().unwrap_or(0));
    if held_back.is_none() {
        // Finished: its error, if any, is the bench's.
        (&mut publisher)
            .await
            .map_err(|error| CliError(format!("the publisher failed: {error}")))??;
    }
    let handlers = started_handlers.load(Ordering::Relaxed);
    let stats = bus.health().await;

    gate.close();
    subscription.unsubscribe().await?;
    publisher.abort();
    bus.close().await?;

    match held_back {
        None => println!(
            "  stalled handler: {} envelopes published in {:.1} s while {handlers} handlers waited",
            published.load(Ordering::Relaxed),
            elapsed.as_secs_f64()
        ),
        Some(done) => println!(
            "  stalled handler: the publisher was held back after {done} of {count} envelopes (no broker keeps a backlog), {handlers} handlers waiting"
        ),
    }
    let quarters: Vec<String> = quarters.into_iter().map(megabytes).collect();
    println!(
        "  resident memory: {} before, peak {} {}, at each quarter published: {}",
        megabytes(before),
        megabytes(peak),
        super::target_verdict(peak <= TARGET, &format!("<= {}", megabytes(TARGET))),
        if quarters.is_empty() {
            "-".to_owned()
        } else {
            quarters.join(", ")
        }
    );
    if let Some(engine) = stats.components.iter().find(|c| c.name == "engine") {
        println!(
            "  engine at the end: {}",
            engine.detail.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}
