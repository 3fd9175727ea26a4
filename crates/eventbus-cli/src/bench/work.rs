//! `eventbus bench --scenario handler-delay`: handlers that spend 1 ms on I/O per event
//! (`tokio::time::sleep`), 10,000 aggregates by default.
//!
//! Three figures from one run over the same envelopes:
//!
//! - **engine only**: the ordering engine (`eventbus_pool::Pool`, the bus's pool settings) running
//!   one job per envelope, keyed by its aggregate: what the handlers allow with no broker;
//! - **ours**: the envelopes published to the broker first, then consumed by an ordered envelope
//!   subscription: the broker path must not throttle the engine's concurrency (target ≥ 0.8×);
//! - **Go design**: the Go SDK's consumer for the same work, one message at a time per Kafka
//!   partition (each partition's records handled in turn) or per NATS subscription, as the seeds
//!   describe. It is measured on at most [`GO_DESIGN_SAMPLE`] records: its rate does not change
//!   with the count, and a full run would take minutes. Its 1 ms is a thread sleep (about
//!   1.05 ms, as Go's `time.Sleep`), while ours and the engine's is tokio's timer, which rounds
//!   up to the next millisecond tick (1–2 ms): the comparison leans the Go design's way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbus::{Config, DeliveryClass, Envelope};
use eventbus_pool::{Job, Pool};
use futures::StreamExt;

use super::{
    BenchBackend, Figure, consume_ours, cpu_per_record, process_cpu, publish_ours, rate,
    subscribe_counting,
};
use crate::CliError;

/// The I/O each handler does per event.
pub(super) const WORK: Duration = Duration::from_millis(1);

/// The most records the Go design's figure is measured on.
const GO_DESIGN_SAMPLE: u64 = 5_000;

/// Runs the scenario on `backend`.
pub(super) async fn run(
    config: Config,
    backend: BenchBackend,
    envelopes: &[Envelope],
) -> Result<Vec<Figure>, CliError> {
    let count = envelopes.len() as u64;
    let (engine, engine_cpu) = engine_only(&config, envelopes).await?;

    let bus = eventbus::connect(config.clone()).await?;
    let topic = format!("bench{}.work", std::process::id());
    let (ours, our_cpu) = if backend == BenchBackend::Memory {
        // Memory keeps nothing for a later subscriber: subscribed first, it handles the
        // envelopes as they are published.
        let counting = subscribe_counting(&bus, &topic, count, WORK).await?;
        publish_ours(&bus, &topic, envelopes).await?;
        counting.wait().await?
    } else {
        // The topic is filled first: the figure is the consuming, not the publisher's pace.
        publish_ours(&bus, &topic, envelopes).await?;
        consume_ours(&bus, &topic, count, WORK).await?
    };
    bus.close().await?;

    let mut figures = vec![Figure {
        what: format!(
            "1 ms handlers, {} vs engine only",
            super::backend_name(backend)
        )
        .into(),
        raw: engine,
        ours,
        cpu: engine_cpu.zip(our_cpu),
        target: Some(0.8),
    }];
    let sample = count.min(GO_DESIGN_SAMPLE);
    let go = match backend {
        BenchBackend::Memory => None,
        BenchBackend::Nats => Some(go_design_nats(&config, &topic, sample).await?),
        BenchBackend::Kafka => Some(go_design_kafka(&config, &topic, sample).await?),
    };
    if let Some(go) = go {
        figures.push(Figure {
            what: "1 ms handlers, vs the Go design".into(),
            raw: go,
            ours,
            cpu: None,
            target: None,
        });
    }
    Ok(figures)
}

/// The engine alone: one job per envelope keyed by its aggregate, each waiting [`WORK`]; the
/// rate from the first submission to the last job done, and the CPU per job.
async fn engine_only(
    config: &Config,
    envelopes: &[Envelope],
) -> Result<(f64, Option<Duration>), CliError> {
    let pool = Pool::new(config.pool_config())?;
    let (started, cpu_from) = (Instant::now(), process_cpu());
    let mut handles = Vec::with_capacity(envelopes.len());
    for envelope in envelopes {
        let job = Job::new(
            Some(envelope.aggregate()?),
            DeliveryClass::AtLeastOnce,
            |_ctx| async {
                tokio::time::sleep(WORK).await;
                Ok(())
            },
        );
        handles.push(pool.submit(job).await?);
    }
    for handle in handles {
        if !handle.await.is_success() {
            return Err(CliError("an engine-only job did not succeed".into()));
        }
    }
    let count = envelopes.len() as u64;
    let engine = rate(count, started.elapsed());
    let cpu = cpu_per_record(cpu_from, process_cpu(), count);
    pool.shutdown(Duration::from_secs(10)).await;
    Ok((engine, cpu))
}

/// The Go SDK's NATS consumer: one subscription handling one message at a time (wait, ack,
/// next), over the stream `topic` was published to; the rate over `sample` messages from the
/// first.
async fn go_design_nats(config: &Config, topic: &str, sample: u64) -> Result<f64, CliError> {
    use async_nats::jetstream::{self, consumer::pull};

    let broker = |error: &dyn std::fmt::Display| CliError(format!("NATS: {error}"));
    let url = config.nats.urls.first().cloned().unwrap_or_default();
    let client = async_nats::connect(&url).await.map_err(|e| broker(&e))?;
    let js = jetstream::new(client);
    let stream_name = js.stream_by_subject(topic).await.map_err(|e| broker(&e))?;
    let stream = js.get_stream(&stream_name).await.map_err(|e| broker(&e))?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("go-design".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..pull::Config::default()
        })
        .await
        .map_err(|e| broker(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| broker(&e))?;
    let mut handled = 0;
    let mut started = None;
    while handled < sample {
        let Some(message) = messages.next().await else {
            return Err(CliError("the Go design's consumer stopped".into()));
        };
        let message = message.map_err(|e| broker(&e))?;
        started.get_or_insert_with(Instant::now);
        tokio::task::spawn_blocking(|| std::thread::sleep(WORK))
            .await
            .map_err(|error| CliError(format!("the Go design's handler failed: {error}")))?;
        message.ack().await.map_err(|e| broker(&e))?;
        handled += 1;
    }
    let go = rate(sample, started.map_or(Duration::ZERO, |s| s.elapsed()));
    drop(messages);
    let _ = js.delete_stream(stream_name).await;
    Ok(go)
}

/// The Go SDK's Kafka consumer: each partition's records handled one at a time, the partitions
/// side by side (a reader per partition, no group), `sample` records in all. The rate is the
/// sum of each reader's own, from its first record to its last: the readers start one after
/// the other, and a clock shared from the first record would count that start-up.
async fn go_design_kafka(config: &Config, topic: &str, sample: u64) -> Result<f64, CliError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let broker = |error: &dyn std::fmt::Display| CliError(format!("Kafka: {error}"));
    let bootstrap = config.kafka.bootstrap_servers.join(",");
    let client = |bootstrap: &str| {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "go-design")
            .set("enable.auto.commit", "false")
            .create::<BaseConsumer>()
    };
    let metadata = client(&bootstrap)
        .map_err(|e| broker(&e))?
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| broker(&e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let handled = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for partition in partitions {
        let consumer = client(&bootstrap).map_err(|e| broker(&e))?;
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|e| broker(&e))?;
        consumer.assign(&assignment).map_err(|e| broker(&e))?;
        let handled = handled.clone();
        readers.push(tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut mine = (0u64, None::<Instant>, None::<Instant>);
            while handled.load(Ordering::SeqCst) < sample && Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(100)) {
                    Some(Ok(_record)) => {
                        mine.1.get_or_insert_with(Instant::now);
                        // One record at a time: the next is read once this one is handled.
                        std::thread::sleep(WORK);
                        handled.fetch_add(1, Ordering::SeqCst);
                        mine.0 += 1;
                        mine.2 = Some(Instant::now());
                    }
                    Some(Err(error)) => return Err(error.to_string()),
                    None => {}
                }
            }
            Ok(mine)
        }));
    }
    let mut total = 0.0;
    for reader in readers {
        let (count, first, last) = reader
            .await
            .map_err(|error| CliError(format!("a Go design reader failed: {error}")))?
            .map_err(|e| broker(&e))?;
        // From its first record's arrival to the end of its last: all of its records.
        if let (Some(first), Some(last)) = (first, last) {
            total += rate(count, last - first);
        }
    }
    if handled.load(Ordering::SeqCst) < sample || total == 0.0 {
        return Err(CliError(format!(
            "the Go design handled only {} of {sample} records",
            handled.load(Ordering::SeqCst)
        )));
    }
    Ok(total)
}
