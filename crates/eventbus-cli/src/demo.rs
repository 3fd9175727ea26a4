//! `eventbus demo`: the SDK's main job, end to end, with a verdict.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::CliError;
use crate::counter::Counter;
use clap::Args;
use eventbus::{
    Config, Envelope, HandlerContext, HandlerError, Message, OffsetDateTime, SubscribeOptions,
};
use indicatif::{ProgressBar, ProgressStyle};

/// The payload of the demo's injected panics (kept out of the terminal by the panic hook).
const INJECTED_PANIC: &str = "eventbus demo: injected panic";

/// Options of `eventbus demo`.
#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    /// Aggregates to publish for.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    aggregates: u32,
    /// Versions (events) per aggregate.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    versions: u32,
    /// Chance that one handler attempt fails (0 to 1).
    #[arg(long, default_value_t = 0.05, value_parser = rate)]
    failure_rate: f64,
    /// Chance that one handler attempt panics (0 to 1).
    #[arg(long, default_value_t = 0.005, value_parser = rate)]
    panic_rate: f64,
    /// How long each handler attempt sleeps, in microseconds.
    #[arg(long, default_value_t = 500)]
    handler_delay_us: u64,
    /// The topic to publish to.
    #[arg(long, default_value = "demo.orders")]
    topic: String,
    /// Serve Prometheus metrics on this address while the demo runs (e.g. 127.0.0.1:9898).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Run on the bus this configuration file describes (TOML or YAML). Without it: the memory
    /// backend with retries after 10 ms, doubling up to 200 ms. `EVENTBUS_*` variables apply
    /// either way.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Give up waiting for the last events after this many seconds.
    #[arg(long, default_value_t = 600)]
    deadline_secs: u64,
}

fn rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not between 0 and 1"))
    }
}

/// What became of each event of one aggregate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pending,
    Handled,
    DeadLettered,
}

struct AggregateState {
    /// Indexed by version (index 0 unused).
    fates: Vec<Fate>,
    highest_handled: i64,
}

/// Everything the demo counts.
struct Tally {
    aggregates: Mutex<HashMap<String, AggregateState>>,
    versions: usize,
    accounted: Counter,
    handled: AtomicU64,
    dead_lettered: AtomicU64,
    retries: AtomicU64,
    duplicates: AtomicU64,
    order_violations: AtomicU64,
    unknown: AtomicU64,
    /// Events of earlier demo runs a broker kept on the topic: acknowledged, not counted.
    earlier_runs: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    bar: ProgressBar,
}

impl Tally {
    fn new(versions: usize, bar: ProgressBar) -> Self {
        Self {
            aggregates: Mutex::new(HashMap::new()),
            versions,
            accounted: Counter::default(),
            handled: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            earlier_runs: AtomicU64::new(0),
            latencies_us: Mutex::new(Vec::new()),
            bar,
        }
    }

    /// Records the fate of one event (an event the demo never published counts as unknown).
    fn settle(&self, aggregate: &str, version: i64, fate: Fate) {
        let mut aggregates = self.aggregates.lock().unwrap_or_else(|e| e.into_inner());
        let state = aggregates
            .entry(aggregate.to_owned())
            .or_insert_with(|| AggregateState {
                fates: vec![Fate::Pending; self.versions + 1],
                highest_handled: 0,
            });
        let Some(slot) = usize::try_from(version)
            .ok()
            .and_then(|v| state.fates.get_mut(v))
        else {
            self.unknown.fetch_add(1, Ordering::SeqCst);
            return;
        };
        if *slot != Fate::Pending {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
            return;
        }
        *slot = fate;
        if fate == Fate::Handled {
            if version < state.highest_handled {
                self.order_violations.fetch_add(1, Ordering::SeqCst);
            }
            state.highest_handled = state.highest_handled.max(version);
            self.handled.fetch_add(1, Ordering::SeqCst);
        } else {
            self.dead_lettered.fetch_add(1, Ordering::SeqCst);
        }
        drop(aggregates);
        self.accounted.add_one();
        self.bar.inc(1);
    }
}

/// Keeps the demo's own injected panics off the terminal; real panics still print.
fn quiet_injected_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info.payload().downcast_ref::<&str>() == Some(&INJECTED_PANIC);
        if !injected {
            default(info);
        }
    }));
}

pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    let base = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => {
            let mut config = Config::default();
            config.retry.initial_backoff = Duration::from_millis(10);
            config.retry.max_backoff = Duration::from_millis(200);
            config
        }
    };
    let mut config = base.with_overrides(std::env::vars())?;
    if args.metrics_listen.is_some() {
        config.metrics.listen = args.metrics_listen;
    }
    config.validate()?;
    let backend = config.backend.name();
    let bus = eventbus::connect(config).await?;
    if let Some(listen) = args.metrics_listen {
        eprintln!("serving metrics on http://{listen}/metrics");
    }
    quiet_injected_panics();

    let total = u64::from(args.aggregates) * u64::from(args.versions);
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events settled ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let tally = Arc::new(Tally::new(args.versions as usize, bar.clone()));

    let (t, delay, failure_rate, panic_rate) = (
        tally.clone(),
        Duration::from_micros(args.handler_delay_us),
        args.failure_rate,
        args.panic_rate,
    );
    // Each event carries this run's ID as its correlation ID: a broker keeps earlier runs'
    // events on the topic, and a new durable reads them first.
    let run = format!("demo-run-{:016x}", fastrand::u64(..));
    let this_run = Arc::new(run.clone());
    let r = this_run.clone();
    bus.subscribe_envelope(
        &args.topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let (t, r) = (t.clone(), r.clone());
            async move {
                if envelope.correlation_id != *r {
                    t.earlier_runs.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                if ctx.attempt() > 1 {
                    t.retries.fetch_add(1, Ordering::SeqCst);
                }
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let roll = fastrand::f64();
                if roll < panic_rate {
                    // The demo shows that a panicking handler is survived: this panic is the point.
                    #[allow(clippy::panic)]
                    std::panic::panic_any(INJECTED_PANIC);
                }
                if roll < panic_rate + failure_rate {
                    return Err(HandlerError::transient("injected failure"));
                }
                let latency = OffsetDateTime::now_utc() - envelope.timestamp;
                let micros = u64::try_from(latency.whole_microseconds()).unwrap_or(0);
                t.latencies_us
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(micros);
                t.settle(
                    &envelope.aggregate_id,
                    envelope.event_version,
                    Fate::Handled,
                );
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await?;
    let t = tally.clone();
    bus.subscribe(
        &format!("{}.DLQ", args.topic),
        Arc::new(move |_ctx: HandlerContext, message: Message| {
            let (t, r) = (t.clone(), this_run.clone());
            async move {
                match Envelope::from_bytes(&message.payload) {
                    Ok(envelope) if envelope.correlation_id != *r => {
                        t.earlier_runs.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(envelope) => t.settle(
                        &envelope.aggregate_id,
                        envelope.event_version,
                        Fate::DeadLettered,
                    ),
                    Err(_) => {
                        t.unknown.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await?;

    eprintln!(
        "publishing {total} events: {} aggregates × {} versions on the {backend} backend",
        args.aggregates, args.versions
    );
    let started = Instant::now();
    // One version of every aggregate at a time, those publishes concurrently: an aggregate's
    // versions still reach the bus in order, and a broker's round trips overlap.
    for version in 1..=i64::from(args.versions) {
        let envelopes = (0..args.aggregates)
            .map(|aggregate| {
                Envelope::new(
                    format!("order-{aggregate}"),
                    "OrderUpdated",
                    version,
                    &[("aggregate", aggregate), ("version", version as u32)],
                )
                .map(|envelope| envelope.with_correlation_id(run.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        futures::future::try_join_all(
            envelopes
                .iter()
                .map(|envelope| bus.publish_envelope(&args.topic, envelope)),
        )
        .await?;
    }
    let complete = tokio::time::timeout(
        Duration::from_secs(args.deadline_secs),
        tally.accounted.wait_for(total),
    )
    .await
    .is_ok();
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    bus.close().await?;

    let handled = tally.handled.load(Ordering::SeqCst);
    let dead_lettered = tally.dead_lettered.load(Ordering::SeqCst);
    let lost = total - tally.accounted.get();
    let violations = tally.order_violations.load(Ordering::SeqCst);
    let duplicates = tally.duplicates.load(Ordering::SeqCst);
    let mut latencies =
        std::mem::take(&mut *tally.latencies_us.lock().unwrap_or_else(|e| e.into_inner()));
    latencies.sort_unstable();
    let quantile = |q: f64| {
        let index = ((latencies.len().saturating_sub(1)) as f64 * q).round() as usize;
        latencies.get(index).copied().unwrap_or(0) as f64 / 1000.0
    };

    println!("eventbus demo on the {backend} backend");
    println!("  published         {total:>12}");
    println!("  handled           {handled:>12}");
    println!(
        "  retries           {:>12}",
        tally.retries.load(Ordering::SeqCst)
    );
    println!("  dead-lettered     {dead_lettered:>12}");
    println!("  order violations  {violations:>12}");
    println!("  duplicates        {duplicates:>12}");
    println!("  lost              {lost:>12}");
    println!(
        "  throughput        {:>12.0} events/s",
        (handled + dead_lettered) as f64 / elapsed.as_secs_f64()
    );
    println!("  latency p50       {:>12.2} ms", quantile(0.50));
    println!("  latency p99       {:>12.2} ms", quantile(0.99));
    let earlier = tally.earlier_runs.load(Ordering::SeqCst);
    if earlier > 0 {
        println!(
            "  from earlier runs {earlier:>12} (kept by the broker; acknowledged, not counted)"
        );
    }

    if !complete {
        eprintln!("not every event settled within {} s", args.deadline_secs);
    }
    if lost == 0 && violations == 0 && tally.unknown.load(Ordering::SeqCst) == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("FAILED: {lost} lost, {violations} order violations");
        Ok(ExitCode::FAILURE)
    }
}
