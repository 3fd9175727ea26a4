//! `eventbus bench`: the bus against the raw client of its broker, in one run, as ratios.
//!
//! - publish: the raw client with many publishes in flight vs this bus's pipelined
//!   `start_publish_envelope` with a window as large (both wait for every acknowledgement);
//! - consume: the raw client reading (and, on NATS, acking) the topic's records vs an ordered
//!   envelope subscription (decode, lanes, settlement, commits) over the same topic contents.
//!
//! On memory there is no broker: the baseline is a raw tokio channel carrying the same encoded
//! envelopes to a task that decodes them.
//!
//! Those are `--scenario ratios`. `--scenario handler-delay` measures handlers
//! doing 1 ms of I/O through the broker against the engine alone and the Go SDK's design
//! (`bench/work.rs`); `--scenario stalled` the resident memory while the handler is stalled and
//! a million envelopes are published (`bench/stalled.rs`); `--scenario engine` the ordering
//! engine alone against the Go SDK's design and a raw channel hop (`bench/engine.rs`).
//! `--scenario all` (the default) runs the four, each in a process of its own, and prints every
//! ratio with its target and whether it was met, then how many were.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use eventbus::{Backend, Config, Envelope, HandlerContext, OutboundMessage, SubscribeOptions};
use futures::StreamExt;
use tokio::sync::Notify;

use crate::CliError;

mod engine;
mod stalled;
mod work;

/// The backend `eventbus bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchBackend {
    /// In process.
    Memory,
    /// NATS JetStream (`[nats]` of the config; `EVENTBUS_NATS_URLS`).
    Nats,
    /// Apache Kafka (`[kafka]` of the config; `EVENTBUS_KAFKA_BOOTSTRAP_SERVERS`).
    Kafka,
}

/// What `eventbus bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Every scenario below, each in a process of its own (so that one's memory does not count
    /// in the next one's figures), then how many targets were met.
    All,
    /// Publish and consume, against the broker's raw client on the same topic contents.
    Ratios,
    /// Handlers doing 1 ms of I/O per event (10,000 aggregates unless `--aggregates` says
    /// otherwise): through the broker vs the engine alone, and the Go SDK's design beside it.
    HandlerDelay,
    /// Resident memory while the handler is stalled and `--messages` envelopes (1,000,000
    /// unless it says otherwise) are published.
    Stalled,
    /// The ordering engine alone, no broker (`--backend` is not used): `--messages` no-op jobs
    /// (1,000,000 unless it says otherwise) against the Go SDK's design and a raw channel hop,
    /// then on a single-threaded runtime by key count.
    Engine,
}

/// Options of `eventbus bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// The backend to measure.
    #[arg(long, value_enum, default_value = "memory")]
    backend: BenchBackend,
    /// What to measure.
    #[arg(long, value_enum, default_value = "all")]
    scenario: Scenario,
    /// Envelopes per measurement [default: 50000; 1000000 for stalled].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    messages: Option<u64>,
    /// Aggregates the envelopes belong to [default: 1000; 10000 for handler-delay].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    aggregates: Option<u64>,
    /// Publishes in flight at once, raw and ours.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    in_flight: u64,
    /// The broker's configuration (TOML or YAML); `EVENTBUS_*` variables apply either way.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NATS only: measure scaling out instead, with 1 up to this many instances of one service
    /// sharing a topic of 12 partitions, each handling an envelope in 1 ms of I/O; every count
    /// is printed as a ratio to one instance.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=12))]
    instances: Option<u64>,
}

fn envelopes(count: u64, aggregates: u64) -> Result<Vec<Envelope>, CliError> {
    (0..count).map(|i| envelope(i, aggregates)).collect()
}

/// The `i`th envelope of a run over `aggregates` aggregates (round-robin, versions rising).
fn envelope(i: u64, aggregates: u64) -> Result<Envelope, CliError> {
    Envelope::new(
        format!("order-{}", i % aggregates),
        "OrderUpdated",
        (i / aggregates + 1) as i64,
        &serde_json::json!({"line": i, "total": 12.5}),
    )
    .map_err(CliError::from)
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// The backend's name as `--backend` spells it.
fn backend_name(backend: BenchBackend) -> String {
    backend
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_default()
}

/// One measured pair.
struct Figure {
    what: std::borrow::Cow<'static, str>,
    raw: f64,
    ours: f64,
    /// CPU time of this process per record, raw and ours, where measured (Linux).
    cpu: Option<(Duration, Duration)>,
    /// The ratio the throughput issue aims at, if any.
    target: Option<f64>,
}

/// CPU time used so far by every thread of this process (Linux: `/proc/self/task/*/schedstat`,
/// nanoseconds on the CPU), or `None` where that is not readable. A steadier figure than the
/// rate on a shared machine, where the broker and other processes take the cores in turns.
fn process_cpu() -> Option<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended meanwhile is skipped.
        if let Ok(stat) = std::fs::read_to_string(path) {
            total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(Duration::from_nanos(total))
}

/// CPU per record between two readings of [`process_cpu`].
fn cpu_per_record(from: Option<Duration>, to: Option<Duration>, count: u64) -> Option<Duration> {
    let used = to?.checked_sub(from?)?;
    Some(used / u32::try_from(count.max(1)).unwrap_or(u32::MAX))
}

/// `eventbus bench`.
pub(crate) async fn run(mut args: BenchArgs) -> Result<std::process::ExitCode, CliError> {
    if args.scenario == Scenario::All {
        if args.instances.is_none() {
            return run_all(&args).await;
        }
        // Scaling out is a measurement of its own.
        args.scenario = Scenario::Ratios;
    }
    let base = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let mut config = base.with_overrides(std::env::vars())?;
    config.backend = match args.backend {
        BenchBackend::Memory => Backend::Memory,
        BenchBackend::Nats => Backend::Nats,
        BenchBackend::Kafka => Backend::Kafka,
    };
    config.client_id = format!("bench-{}", std::process::id());
    config.publish_max_in_flight = usize::try_from(args.in_flight).unwrap_or(usize::MAX);
    config.validate()?;
    let aggregates = args.aggregates.unwrap_or(match args.scenario {
        Scenario::All | Scenario::Ratios | Scenario::Stalled => 1000,
        Scenario::HandlerDelay | Scenario::Engine => 10_000,
    });
    let messages = args.messages.unwrap_or(match args.scenario {
        Scenario::All | Scenario::Ratios | Scenario::HandlerDelay => 50_000,
        Scenario::Stalled | Scenario::Engine => 1_000_000,
    });
    if args.scenario == Scenario::Engine {
        println!(
            "eventbus bench, the engine alone: {messages} no-op jobs over {aggregates} keys (then a fifth as many on one thread)"
        );
        print_figures(engine::run(messages).await?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    if args.scenario == Scenario::Stalled {
        println!(
            "eventbus bench on {}: {messages} envelopes, {aggregates} aggregates, {} publishes in flight",
            backend_name(args.backend),
            args.in_flight
        );
        // Made one by one as they are published: the process holds no more than it must.
        stalled::run(config, messages, aggregates).await?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let envelopes = envelopes(messages, aggregates)?;
    if args.instances.is_some()
        && (args.backend != BenchBackend::Nats || args.scenario != Scenario::Ratios)
    {
        return Err(CliError(
            "--instances measures NATS scale-out: use it with --backend nats alone".into(),
        ));
    }
    let backend = backend_name(args.backend);
    let figures = match (args.scenario, args.backend) {
        (Scenario::All | Scenario::Stalled | Scenario::Engine, _) => Vec::new(),
        (Scenario::HandlerDelay, backend) => work::run(config, backend, &envelopes).await?,
        (Scenario::Ratios, BenchBackend::Memory) => memory(config, &envelopes).await?,
        (Scenario::Ratios, BenchBackend::Nats) => match args.instances {
            Some(instances) => scale_out(config, &envelopes, args.in_flight, instances).await?,
            None => nats(config, &envelopes, args.in_flight).await?,
        },
        (Scenario::Ratios, BenchBackend::Kafka) => {
            kafka(config, &envelopes, args.in_flight).await?
        }
    };
    println!(
        "eventbus bench on {backend}: {messages} envelopes, {aggregates} aggregates, {} publishes in flight",
        args.in_flight
    );
    if args.instances.is_some() {
        println!("  scale-out: \"raw\" is one instance of the same run, \"ours\" this many");
    }
    print_figures(figures);
    Ok(std::process::ExitCode::SUCCESS)
}

/// One line per figure: raw, ours, the ratio, its target and whether it was met, and the CPU
/// per record where measured.
fn print_figures(figures: Vec<Figure>) {
    for figure in figures {
        let ratio = figure.ours / figure.raw;
        let target = figure.target.map_or(String::new(), |target| {
            format!(
                "   {}",
                target_verdict(ratio >= target, &format!(">= {target:.2}x"))
            )
        });
        let cpu = figure.cpu.map_or(String::new(), |(raw, ours)| {
            format!(
                "   cpu/record raw {:.2} µs ours {:.2} µs",
                raw.as_secs_f64() * 1e6,
                ours.as_secs_f64() * 1e6
            )
        });
        println!(
            "  {:<42} raw {:>10.0}/s   ours {:>10.0}/s   ratio {ratio:.2}x{target}{cpu}",
            figure.what, figure.raw, figure.ours,
        );
    }
}

/// `(target >= 0.80x: met)`: the words [`run_all`] counts.
fn target_verdict(met: bool, target: &str) -> String {
    let verdict = if met { TARGET_MET } else { TARGET_MISSED };
    format!("(target {target}: {verdict})")
}

const TARGET_MET: &str = "met";
const TARGET_MISSED: &str = "not met";

/// The scenarios of `--scenario all`, in order.
const EVERY_SCENARIO: [Scenario; 4] = [
    Scenario::Engine,
    Scenario::Ratios,
    Scenario::HandlerDelay,
    Scenario::Stalled,
];

/// `--scenario all`: runs this binary once per scenario with the same options, prints each
/// one's lines as they are, then how many of the targets they printed were met.
async fn run_all(args: &BenchArgs) -> Result<std::process::ExitCode, CliError> {
    let program = std::env::current_exe()?;
    let (mut met, mut missed) = (0, 0);
    for scenario in EVERY_SCENARIO {
        let mut command = std::process::Command::new(&program);
        command
            .arg("bench")
            .arg("--scenario")
            .arg(scenario_name(scenario));
        command.arg("--backend").arg(backend_name(args.backend));
        command.arg("--in-flight").arg(args.in_flight.to_string());
        if let Some(messages) = args.messages {
            command.arg("--messages").arg(messages.to_string());
        }
        if let Some(aggregates) = args.aggregates {
            command.arg("--aggregates").arg(aggregates.to_string());
        }
        if let Some(config) = &args.config {
            command.arg("--config").arg(config);
        }
        command.stderr(std::process::Stdio::inherit());
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|error| CliError(format!("the scenario's process failed: {error}")))??;
        let stdout = String::from_utf8_lossy(&output.stdout);
        print!("{stdout}");
        if !output.status.success() {
            return Err(CliError(format!(
                "eventbus bench --scenario {} failed ({})",
                scenario_name(scenario),
                output.status
            )));
        }
        met += stdout.matches(&format!(": {TARGET_MET})")).count();
        missed += stdout.matches(&format!(": {TARGET_MISSED})")).count();
    }
    println!("targets: {met} met, {missed} not met");
    Ok(std::process::ExitCode::SUCCESS)
}

/// The scenario's name as `--scenario` spells it.
fn scenario_name(scenario: Scenario) -> String {
    scenario
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_default()
}

/// Publishes every envelope through the bus pipelined (`start_publish_envelope` in a loop,
/// the bus's window of `publish_max_in_flight`, which `run` sets to `--in-flight`), then waits
/// for every acknowledgement; returns the rate and the CPU per envelope.
async fn publish_ours(
    bus: &eventbus::Bus,
    topic: &str,
    envelopes: &[Envelope],
) -> Result<(f64, Option<Duration>), CliError> {
    let (started, cpu_from) = (Instant::now(), process_cpu());
    let mut pending = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        pending.push(bus.start_publish_envelope(topic, envelope).await?);
    }
    for publish in pending {
        publish.await?;
    }
    let count = envelopes.len() as u64;
    Ok((
        rate(count, started.elapsed()),
        cpu_per_record(cpu_from, process_cpu(), count),
    ))
}

/// Subscribes an ordered envelope handler that waits `work` (none when zero: `tokio::time::sleep`,
/// standing for I/O) and counts, and returns the rate at which it handled `count` envelopes,
/// timed from the first one (as the raw consumers are: joining a group or creating a consumer is
/// not consuming speed).
async fn consume_ours(
    bus: &eventbus::Bus,
    topic: &str,
    count: u64,
    work: Duration,
) -> Result<(f64, Option<Duration>), CliError> {
    subscribe_counting(bus, topic, count, work)
        .await?
        .wait()
        .await
}

/// An ordered envelope subscription counting what it handled: [`consume_ours`] in two steps,
/// for a backend (memory) that must be subscribed to before it is published to.
struct Counting {
    subscription: eventbus::Subscription,
    handled: Arc<AtomicU64>,
    all_handled: Arc<Notify>,
    first: Arc<std::sync::OnceLock<(Instant, Option<Duration>)>>,
    count: u64,
}

/// Subscribes the handler of [`consume_ours`].
async fn subscribe_counting(
    bus: &eventbus::Bus,
    topic: &str,
    count: u64,
    work: Duration,
) -> Result<Counting, CliError> {
    let handled = Arc::new(AtomicU64::new(0));
    let all_handled = Arc::new(Notify::new());
    let first = Arc::new(std::sync::OnceLock::new());
    let (h, done, f) = (handled.clone(), all_handled.clone(), first.clone());
    let subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
                f.get_or_init(|| (Instant::now(), process_cpu()));
                let (h, done) = (h.clone(), done.clone());
                async move {
                    if !work.is_zero() {
                        tokio::time::sleep(work).await;
                    }
                    if h.fetch_add(1, Ordering::Relaxed) + 1 == count {
                        done.notify_one();
                    }
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;
    Ok(Counting {
        subscription,
        handled,
        all_handled,
        first,
        count,
    })
}

impl Counting {
    /// Waits until every envelope is handled; the rate and CPU per envelope from the first.
    async fn wait(self) -> Result<(f64, Option<Duration>), CliError> {
        all_handled_in_time(&self.all_handled, &self.handled, self.count).await?;
        let cpu = process_cpu();
        let (elapsed, cpu) = self
            .first
            .get()
            .map_or((Duration::ZERO, None), |(started, from)| {
                (started.elapsed(), cpu_per_record(*from, cpu, self.count))
            });
        self.subscription.unsubscribe().await?;
        Ok((rate(self.count, elapsed), cpu))
    }
}

/// Waits (ten minutes at most) until a counting handler signals `all_handled` after `count`.
async fn all_handled_in_time(
    all_handled: &Notify,
    handled: &AtomicU64,
    count: u64,
) -> Result<(), CliError> {
    tokio::time::timeout(Duration::from_secs(600), all_handled.notified())
        .await
        .map_err(|_| {
            CliError(format!(
                "only {} of {count} envelopes handled",
                handled.load(Ordering::Relaxed)
            ))
        })
}

async fn memory(config: Config, envelopes: &[Envelope]) -> Result<Vec<Figure>, CliError> {
    let count = envelopes.len() as u64;
    // Raw: encoded envelopes through a channel to a task that decodes them.
    let payloads: Vec<bytes::Bytes> = envelopes
        .iter()
        .map(Envelope::to_bytes)
        .collect::<Result<_, _>>()?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<bytes::Bytes>(1024);
    let (started, cpu_from) = (Instant::now(), process_cpu());
    let reader = tokio::spawn(async move {
        let mut decoded = 0u64;
        while let Some(payload) = receiver.recv().await {
            if Envelope::from_bytes(&payload).is_ok() {
                decoded += 1;
            }
        }
        decoded
    });
    for payload in payloads {
        sender
            .send(payload)
            .await
            .map_err(|_| CliError("the raw reader stopped".into()))?;
    }
    drop(sender);
    let decoded = reader
        .await
        .map_err(|error| CliError(format!("the raw reader failed: {error}")))?;
    let raw = rate(decoded, started.elapsed());
    let raw_cpu = cpu_per_record(cpu_from, process_cpu(), count);

    // Ours: publish into a subscribed topic and wait until every envelope was handled.
    let bus = eventbus::connect(config).await?;
    let topic = "bench.memory";
    let handled = Arc::new(AtomicU64::new(0));
    let all_handled = Arc::new(Notify::new());
    let (h, done) = (handled.clone(), all_handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
            if h.fetch_add(1, Ordering::Relaxed) + 1 == count {
                done.notify_one();
            }
            async { Ok(()) }
        }),
        SubscribeOptions::new(),
    )
    .await?;
    let (started, cpu_from) = (Instant::now(), process_cpu());
    for envelope in envelopes {
        bus.publish_envelope(topic, envelope).await?;
    }
    all_handled.notified().await;
    let ours = rate(count, started.elapsed());
    let our_cpu = cpu_per_record(cpu_from, process_cpu(), count);
    bus.close().await?;
    Ok(vec![Figure {
        what: "end to end".into(),
        raw,
        ours,
        cpu: raw_cpu.zip(our_cpu),
        target: None,
    }])
}

async fn nats(
    config: Config,
    envelopes: &[Envelope],
    in_flight: u64,
) -> Result<Vec<Figure>, CliError> {
    use async_nats::jetstream::{self, consumer::pull, stream};

    let count = envelopes.len() as u64;
    let url = config.nats.urls.first().cloned().unwrap_or_default();
    let client = async_nats::connect(&url)
        .await
        .map_err(|error| CliError(format!("cannot connect to {url}: {error}")))?;
    let js = jetstream::new(client);
    let run = std::process::id();
    let broker = |error: &dyn std::fmt::Display| CliError(format!("NATS: {error}"));

    // Raw publish: many PubAck futures in flight, into a stream of its own, replicated as the
    // configuration makes ours.
    let raw_topic = format!("bench{run}.raw");
    js.create_stream(stream::Config {
        name: format!("BENCH_RAW_{run}"),
        subjects: vec![raw_topic.clone()],
        storage: stream::StorageType::File,
        num_replicas: usize::from(config.nats.replicas),
        ..stream::Config::default()
    })
    .await
    .map_err(|e| broker(&e))?;
    let (started, cpu_from) = (Instant::now(), process_cpu());
    let mut acks = futures::stream::FuturesOrdered::new();
    for envelope in envelopes {
        // The same message as ours, encoded in the timed loop: JSON, the `X-*` headers and the
        // event ID as `Nats-Msg-Id` (the server's duplicate window).
        let message = OutboundMessage::from_envelope(envelope)?;
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in message.headers.iter() {
            headers.append(name, String::from_utf8_lossy(value).as_ref());
        }
        headers.insert("Nats-Msg-Id", envelope.event_id.as_str());
        let payload = message.payload;
        if acks.len() >= in_flight as usize
            && let Some(ack) = acks.next().await
        {
            let result: Result<_, async_nats::jetstream::context::PublishError> = ack;
            result.map_err(|e| broker(&e))?;
        }
        let ack = js
            .publish_with_headers(raw_topic.clone(), headers, payload)
            .await
            .map_err(|e| broker(&e))?;
        acks.push_back(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = acks.next().await {
        ack.map_err(|e| broker(&e))?;
    }
    let raw_publish = rate(count, started.elapsed());
    let raw_publish_cpu = cpu_per_record(cpu_from, process_cpu(), count);

    // Ours makes its stream on the first publish: a warm-up envelope before the clock starts
    // (the raw stream was made before its clock started too). Both consumes read it.
    let bus = eventbus::connect(config).await?;
    let topic = format!("bench{run}.ours");
    let warm_up = Envelope::new("bench-warm-up", "WarmedUp", 1, &serde_json::json!({}))?;
    bus.publish_envelope(&topic, &warm_up).await?;
    let (our_publish, our_publish_cpu) = publish_ours(&bus, &topic, envelopes).await?;
    let count = count + 1;

    // Raw consume: a durable pull consumer acking each message of the stream ours filled.
    let stream_name = js.stream_by_subject(&topic).await.map_err(|e| broker(&e))?;
    let raw_stream = js.get_stream(&stream_name).await.map_err(|e| broker(&e))?;
    let consumer = raw_stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..pull::Config::default()
        })
        .await
        .map_err(|e| broker(&e))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|e| broker(&e))?;
    let mut received = 0;
    let mut started = None;
    while received < count {
        let Some(message) = messages.next().await else {
            return Err(CliError("the raw consumer stopped".into()));
        };
        started.get_or_insert_with(|| (Instant::now(), process_cpu()));
        let message = message.map_err(|e| broker(&e))?;
        message.ack().await.map_err(|e| broker(&e))?;
        received += 1;
    }
    let raw_consume = rate(count, started.map_or(Duration::ZERO, |(s, _)| s.elapsed()));
    let raw_cpu = cpu_per_record(started.and_then(|(_, cpu)| cpu), process_cpu(), count);
    drop(messages);

    let (our_consume, our_cpu) = consume_ours(&bus, &topic, count, Duration::ZERO).await?;
    bus.close().await?;
    for name in [format!("BENCH_RAW_{run}"), stream_name] {
        let _ = js.delete_stream(name).await;
    }
    Ok(vec![
        Figure {
            what: "publish".into(),
            raw: raw_publish,
            ours: our_publish,
            cpu: raw_publish_cpu.zip(our_publish_cpu),
            target: Some(0.8),
        },
        Figure {
            what: "consume".into(),
            raw: raw_consume,
            ours: our_consume,
            cpu: raw_cpu.zip(our_cpu),
            target: Some(0.9),
        },
    ])
}

/// The partitions of the scale-out measurement's topic.
const SCALE_OUT_PARTITIONS: u16 = 12;

/// Scaling out on NATS: for 1 to `instances` instances of one service (buses of one client ID in
/// this process, each its own connection and engine) sharing a topic of 12 partitions, the rate
/// at which they handle the envelopes with 1 ms of I/O each, from the first handled to the last.
/// The instances join the group first and the envelopes are published once it is balanced
/// (every subject read, each instance within one of the others): the figure is the steady
/// state, not the joining. The baseline is the one-instance figure of the same run.
async fn scale_out(
    config: Config,
    envelopes: &[Envelope],
    in_flight: u64,
    instances: u64,
) -> Result<Vec<Figure>, CliError> {
    use eventbus::nats::TopicOptions;

    let count = envelopes.len() as u64;
    let run = std::process::id();
    let mut figures = Vec::new();
    let mut baseline = None;
    for members in 1..=instances {
        let topic = format!("bench{run}.scale{members}");
        let mut nats = config.nats.clone();
        nats.topics.insert(
            topic.clone(),
            TopicOptions {
                partitions: Some(SCALE_OUT_PARTITIONS),
                ..TopicOptions::default()
            },
        );
        let mut settings = config.bus_settings();
        settings.client_id = format!("{}-scale{members}", config.client_id);
        let handled = Arc::new(AtomicU64::new(0));
        let all_handled = Arc::new(Notify::new());
        let span = Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
        let mut buses = Vec::new();
        for _ in 0..members {
            let bus = eventbus::nats::connect(settings.clone(), nats.clone()).await?;
            let (h, done, span) = (handled.clone(), all_handled.clone(), span.clone());
            bus.subscribe_envelope(
                &topic,
                Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
                    let (h, done, span) = (h.clone(), done.clone(), span.clone());
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let now = Instant::now();
                        if let Ok(mut span) = span.lock() {
                            let (first, _) = span.get_or_insert((now, now));
                            *span = Some((*first, now));
                        }
                        if h.fetch_add(1, Ordering::Relaxed) + 1 == count {
                            done.notify_one();
                        }
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await?;
            buses.push(bus);
        }
        wait_balanced(&buses, &topic, members).await?;
        // The backlog is published while the subjects' consumers are paused, then they resume
        // at once: the figure is the instances' handling, not the publisher's pace.
        let paused = pause_subjects(&config, &buses, &topic).await?;
        let publisher = eventbus::nats::connect(
            eventbus::BusSettings::new("nats", &format!("{}-publisher", config.client_id)),
            nats.clone(),
        )
        .await?;
        let started = Instant::now();
        let mut results = futures::stream::iter(envelopes)
            .map(|envelope| publisher.publish_envelope(&topic, envelope))
            .buffered(in_flight as usize);
        while let Some(result) = results.next().await {
            result?;
        }
        let published = rate(count, started.elapsed());
        for (stream, durable) in &paused {
            stream
                .resume_consumer(durable)
                .await
                .map_err(|error| CliError(format!("cannot resume {durable}: {error}")))?;
        }
        all_handled_in_time(&all_handled, &handled, count).await?;
        let handled_rate = span
            .lock()
            .ok()
            .and_then(|span| *span)
            .map_or(0.0, |(first, last)| rate(count, last - first));
        let per_instance: Vec<String> = buses
            .iter()
            .map(|bus| bus.transport().partitions_reading(&topic).len().to_string())
            .collect();
        eprintln!(
            "  {members} instance(s): subjects read {}, published at {published:.0}/s",
            per_instance.join("/")
        );
        for bus in &buses {
            bus.close().await?;
        }
        publisher.close().await?;
        let baseline = *baseline.get_or_insert(handled_rate);
        figures.push(Figure {
            what: match members {
                1 => "1 instance, 1 ms".into(),
                _ => format!("{members} instances, 1 ms").into(),
            },
            raw: baseline,
            ours: handled_rate,
            cpu: None,
            target: None,
        });
    }
    Ok(figures)
}

/// Pauses the consumers of every subject of the partitioned `topic` (ten minutes at most);
/// returns them, to resume.
async fn pause_subjects(
    config: &Config,
    buses: &[eventbus::nats::NatsBus],
    topic: &str,
) -> Result<Vec<(async_nats::jetstream::stream::Stream<()>, String)>, CliError> {
    let url = config.nats.urls.first().cloned().unwrap_or_default();
    let client = async_nats::connect(&url)
        .await
        .map_err(|error| CliError(format!("cannot connect to {url}: {error}")))?;
    let js = async_nats::jetstream::new(client);
    let name = js
        .stream_by_subject(topic)
        .await
        .map_err(|error| CliError(format!("no stream holds {topic}: {error}")))?;
    let stream = js
        .get_stream_no_info(&name)
        .await
        .map_err(|error| CliError(format!("cannot open stream {name}: {error}")))?;
    let bus = buses
        .first()
        .ok_or_else(|| CliError("no instance".into()))?;
    let until = eventbus::OffsetDateTime::now_utc() + Duration::from_secs(600);
    let mut paused = Vec::new();
    let subjects = std::iter::once(topic.to_owned()).chain(
        (0..SCALE_OUT_PARTITIONS).map(|index| eventbus::nats::partition_subject(topic, index)),
    );
    for subject in subjects {
        let durable = bus.transport().durable_name(&subject, 1);
        stream
            .pause_consumer(&durable, until)
            .await
            .map_err(|error| CliError(format!("cannot pause {durable}: {error}")))?;
        paused.push((stream.clone(), durable));
    }
    Ok(paused)
}

/// Waits (60 s at most) until `buses` read every subject of `topic` between them, each within
/// one subject of the others.
async fn wait_balanced(
    buses: &[eventbus::nats::NatsBus],
    topic: &str,
    members: u64,
) -> Result<(), CliError> {
    let subjects = usize::from(SCALE_OUT_PARTITIONS) + 1;
    let members = members as usize;
    let (low, high) = (subjects / members, subjects.div_ceil(members));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let counts: Vec<usize> = buses
            .iter()
            .map(|bus| bus.transport().partitions_reading(topic).len())
            .collect();
        if counts.iter().sum::<usize>() == subjects
            && counts.iter().all(|n| (low..=high).contains(n))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(CliError(format!(
                "the instances did not share the partitions in time: {counts:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kafka(
    config: Config,
    envelopes: &[Envelope],
    in_flight: u64,
) -> Result<Vec<Figure>, CliError> {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::util::Timeout;

    let count = envelopes.len() as u64;
    let bootstrap = config.kafka.bootstrap_servers.join(",");
    let run = std::process::id();
    let broker = |error: &dyn std::fmt::Display| CliError(format!("Kafka: {error}"));

    // Both sides write to a topic of their own with the configured partitions, made and
    // written to once (a warm-up record) before the clock starts: creating a topic, learning its
    // leaders and opening connections are start-up costs, not publishing speed. The warm-up
    // record is read by both consumes too.
    let topic = format!("bench{run}.ours");
    let raw_topic = format!("bench{run}.raw");
    let warm_up = Envelope::new("bench-warm-up", "WarmedUp", 1, &serde_json::json!({}))?;
    let count = count + 1;

    let bus = eventbus::connect(config.clone()).await?;
    bus.publish_envelope(&topic, &warm_up).await?;
    let (our_publish, our_publish_cpu) = publish_ours(&bus, &topic, envelopes).await?;

    // Raw publish: an idempotent FutureProducer, keys and payloads as ours, many in flight.
    let options = config.kafka.topic(&topic);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .map_err(|e| broker(&e))?;
    let replication = TopicReplication::Fixed(options.replication_factor.map_or(-1, i32::from));
    admin
        .create_topics(
            [&NewTopic::new(
                &raw_topic,
                options.partitions.unwrap_or(-1),
                replication,
            )],
            &AdminOptions::new(),
        )
        .await
        .map_err(|e| broker(&e))?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|(name, code)| broker(&format!("cannot create {name}: {code}")))?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(|e| broker(&e))?;
    let warm_up = OutboundMessage::from_envelope(&warm_up)?;
    producer
        .send(
            FutureRecord::to(&raw_topic)
                .key(&warm_up.key.unwrap_or_default()[..])
                .payload(&warm_up.payload[..]),
            Timeout::After(Duration::from_secs(30)),
        )
        .await
        .map_err(|(e, _)| broker(&e))?;
    let (started, cpu_from) = (Instant::now(), process_cpu());
    let mut sent = futures::stream::iter(envelopes)
        .map(|envelope| {
            let (producer, raw_topic) = (&producer, &raw_topic);
            async move {
                // The same record as ours, encoded in the timed loop: JSON, the aggregate ID as
                // the key, the `X-*` headers.
                let message =
                    OutboundMessage::from_envelope(envelope).map_err(|e| e.to_string())?;
                let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
                for (name, value) in message.headers.iter() {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
                let key = message.key.unwrap_or_default();
                producer
                    .send(
                        FutureRecord::to(raw_topic)
                            .key(&key[..])
                            .payload(&message.payload[..])
                            .headers(headers),
                        Timeout::After(Duration::from_secs(30)),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e.to_string())
            }
        })
        .buffered(in_flight as usize);
    while let Some(result) = sent.next().await {
        result.map_err(|e| broker(&e))?;
    }
    let raw_publish = rate(envelopes.len() as u64, started.elapsed());
    let raw_publish_cpu = cpu_per_record(cpu_from, process_cpu(), envelopes.len() as u64);

    // Raw consume, twice: a bare poll loop, and one that decodes each envelope as the memory
    // baseline does (the work any consumer of these records must do). The ratio is taken to the
    // decoding one; the bare figure is printed beside it.
    let bare_consume = raw_kafka_consume(
        &config.kafka,
        &topic,
        &format!("bench-raw-{run}"),
        count,
        false,
    )
    .await?;
    let raw_consume = raw_kafka_consume(
        &config.kafka,
        &topic,
        &format!("bench-raw-decode-{run}"),
        count,
        true,
    )
    .await?;

    let (our_consume, our_cpu) = consume_ours(&bus, &topic, count, Duration::ZERO).await?;
    bus.close().await?;
    Ok(vec![
        Figure {
            what: "publish".into(),
            raw: raw_publish,
            ours: our_publish,
            cpu: raw_publish_cpu.zip(our_publish_cpu),
            target: Some(0.8),
        },
        Figure {
            what: "consume".into(),
            raw: raw_consume.0,
            ours: our_consume,
            cpu: raw_consume.1.zip(our_cpu),
            target: Some(0.8),
        },
        Figure {
            what: "consume vs bare poll".into(),
            raw: bare_consume.0,
            ours: our_consume,
            cpu: bare_consume.1.zip(our_cpu),
            target: None,
        },
    ])
}

/// A group member reading every record of `topic` (on a blocking thread: librdkafka's poll
/// blocks), decoding each envelope when `decode`, committing once at the end; the rate is timed
/// from the first record (the group join is not the client's speed). It fetches as the bus's
/// consumer does ([`KafkaConfig::consumer_tuning`](eventbus::kafka::KafkaConfig::consumer_tuning)).
async fn raw_kafka_consume(
    kafka: &eventbus::kafka::KafkaConfig,
    topic: &str,
    group: &str,
    count: u64,
    decode: bool,
) -> Result<(f64, Option<Duration>), CliError> {
    use rdkafka::ClientConfig;
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let broker = |error: &dyn std::fmt::Display| CliError(format!("Kafka: {error}"));
    let mut client = ClientConfig::new();
    for (name, value) in kafka.consumer_tuning() {
        client.set(name, value);
    }
    let consumer: BaseConsumer = client
        .set("bootstrap.servers", kafka.bootstrap_servers.join(","))
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| broker(&e))?;
    consumer.subscribe(&[topic]).map_err(|e| broker(&e))?;
    tokio::task::spawn_blocking(move || {
        let mut received = 0u64;
        let mut started = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        while received < count && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(record)) => {
                    started.get_or_insert_with(|| (Instant::now(), process_cpu()));
                    if decode && Envelope::from_bytes(record.payload().unwrap_or_default()).is_err()
                    {
                        return Err(format!("record {} is not an envelope", record.offset()));
                    }
                    received += 1;
                }
                Some(Err(error)) => return Err(error.to_string()),
                None => {}
            }
        }
        let (elapsed, cpu) = (started.map(|(started, _)| started.elapsed()), process_cpu());
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
        match (started, elapsed) {
            (Some((_, from)), Some(elapsed)) if received == count => {
                Ok((rate(count, elapsed), cpu_per_record(from, cpu, count)))
            }
            _ => Err(format!("only {received} of {count} records read")),
        }
    })
    .await
    .map_err(|error| CliError(format!("the raw consumer failed: {error}")))?
    .map_err(|e| broker(&e))
}
