//! The conformance suite: the delivery contract of `docs/semantics.md` as test functions over a
//! [`BusFactory`], run unchanged against every backend (`tests/memory.rs`, `tests/nats.rs`).
//!
//! Every check waits on recorded events with a deadline ([`Recorder::wait_for`]), never on a
//! fixed sleep.
// Test code: a failed unwrap, index or panic is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

/// The default settings of a NATS bus named `client_id`.
pub fn nats_settings(client_id: &str) -> eventbus_nats::BusSettings {
    eventbus_nats::BusSettings::new("nats", client_id)
}

/// A NATS bus configuration for tests on `url`: short pull requests (so `close` is quick) and
/// the default consumer settings otherwise.
pub fn nats_config(url: &str) -> eventbus_nats::NatsConfig {
    eventbus_nats::NatsConfig {
        urls: vec![url.to_owned()],
        consumer: eventbus_nats::ConsumerSettings {
            fetch_expires: Duration::from_millis(200),
            ..eventbus_nats::ConsumerSettings::default()
        },
        ..eventbus_nats::NatsConfig::default()
    }
}

/// A consumer process started by [`spawn_consumer`]: killed (and reaped) when dropped, so a test
/// that fails half-way leaves no process behind.
pub struct ConsumerProcess(std::process::Child);

impl std::ops::Deref for ConsumerProcess {
    type Target = std::process::Child;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ConsumerProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        // Already ended (killed and waited for by the test) is fine.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the test consumer process `program` (`env!("CARGO_BIN_EXE_consumer")`) with `args`;
/// the lines it prints are read on a thread and sent to `lines`.
pub fn spawn_consumer<'a>(
    program: &str,
    args: impl IntoIterator<Item = &'a str>,
    lines: tokio::sync::mpsc::UnboundedSender<String>,
) -> ConsumerProcess {
    use std::io::BufRead;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the consumer process starts");
    let stdout = child.stdout.take().expect("its stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    ConsumerProcess(child)
}

/// Reads `{aggregate} {version}` lines of a consumer process until `until` distinct envelopes
/// were handled (three [`DEADLINE`]s at most).
pub async fn read_handled(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    handled: &mut Vec<(String, i64)>,
    until: usize,
) {
    // Counted as they come: recounting everything per line is quadratic, and a reader that
    // falls behind its consumers times out with their lines still queued.
    let mut distinct: HashSet<(String, i64)> = handled.iter().cloned().collect();
    let read_all = async {
        while distinct.len() < until {
            let line = lines.recv().await.expect("consumer output");
            let (aggregate, version) = line.split_once(' ').expect("a handled line");
            let pair = (aggregate.to_owned(), version.parse().expect("a version"));
            distinct.insert(pair.clone());
            handled.push(pair);
        }
    };
    tokio::time::timeout(DEADLINE * 3, read_all)
        .await
        .unwrap_or_else(|_| panic!("fewer than {until} distinct envelopes handled"));
}

/// A Kafka bus configuration for tests on `bootstrap`: four partitions per topic, commits every
/// 100 ms, short group timeouts (the test broker allows them), the defaults otherwise.
pub fn kafka_config(bootstrap: &str) -> eventbus_kafka::KafkaConfig {
    let mut config = eventbus_kafka::KafkaConfig {
        bootstrap_servers: vec![bootstrap.to_owned()],
        commit_interval: Duration::from_millis(100),
        topic_defaults: eventbus_kafka::TopicOptions {
            partitions: Some(4),
            ..eventbus_kafka::TopicOptions::default()
        },
        ..eventbus_kafka::KafkaConfig::default()
    };
    for (name, value) in [
        ("session.timeout.ms", "6000"),
        ("heartbeat.interval.ms", "500"),
        ("topic.metadata.refresh.interval.ms", "1000"),
    ] {
        config
            .consumer_properties
            .0
            .insert(name.to_owned(), value.to_owned());
    }
    config
}

/// The offset consumer group `group` committed for `partition` of `topic` on `bootstrap`, read
/// by a client outside the group (`None`: none committed, or not readable now). Blocking.
pub fn kafka_committed(bootstrap: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    let offsets = reader
        .committed_offsets(list, Duration::from_secs(5))
        .ok()?;
    match offsets.elements().first()?.offset() {
        rdkafka::Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// Sets the topic-level config `name` of Kafka topic `topic` on `bootstrap` to `value` (an
/// `AlterConfigs` request, which replaces the topic's other dynamic settings).
pub async fn set_kafka_topic_config(bootstrap: &str, topic: &str, name: &str, value: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let results = admin
        .alter_configs(
            [&AlterConfig::new(ResourceSpecifier::Topic(topic)).set(name, value)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    for result in results {
        result.unwrap();
    }
}

/// [`kafka_config`] for consumer group `group`, with `topic` created with `partitions`
/// partitions.
pub fn kafka_group_config(
    bootstrap: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> eventbus_kafka::KafkaConfig {
    let mut config = kafka_config(bootstrap);
    config.group_id = Some(group.to_owned());
    config.topics.insert(
        topic.to_owned(),
        eventbus_kafka::TopicOptions {
            partitions: Some(partitions),
            ..eventbus_kafka::TopicOptions::default()
        },
    );
    config
}

/// Checks that the first handling of each aggregate's events followed their versions 1, 2, 3,
/// ... (later duplicates allowed) and that every aggregate reached `versions`; returns the
/// number of duplicate handlings.
pub fn assert_first_handlings_in_order(
    handled: &[(String, i64)],
    aggregates: usize,
    versions: i64,
) -> usize {
    assert_first_handlings_in_order_until(handled, aggregates, |_| versions)
}

/// [`assert_first_handlings_in_order`] where each aggregate reaches its own last version,
/// `last(aggregate)` (0 for an aggregate never handled).
pub fn assert_first_handlings_in_order_until(
    handled: &[(String, i64)],
    aggregates: usize,
    last: impl Fn(&str) -> i64,
) -> usize {
    let mut next: HashMap<&str, i64> = HashMap::new();
    let mut duplicates = 0;
    for (aggregate, version) in handled {
        let expected = next.entry(aggregate.as_str()).or_insert(1);
        if *version < *expected {
            duplicates += 1;
            continue;
        }
        assert_eq!(
            *version, *expected,
            "{aggregate}: version {version} handled first before version {expected}"
        );
        *expected += 1;
    }
    assert_eq!(next.len(), aggregates, "every aggregate was handled");
    for (aggregate, reached) in next {
        assert_eq!(
            reached,
            last(aggregate) + 1,
            "{aggregate} is missing versions"
        );
    }
    duplicates
}

/// The aggregates a failover test's handler refuses for good at one version, its subscription
/// parking an aggregate behind its dead letter: `agg-0` at version 2 (dead-lettered before the
/// fault, its later events parked across it) and `agg-1` five versions before the last
/// (dead-lettered after the fault began).
#[derive(Debug, Clone, Copy)]
pub struct Poisoned {
    versions: i64,
}

impl Poisoned {
    /// The poisoned aggregates of a test publishing `versions` versions of each aggregate.
    pub fn new(versions: i64) -> Self {
        Self { versions }
    }

    /// The version at which `aggregate`'s handler fails for good, if it does.
    pub fn at(&self, aggregate: &str) -> Option<i64> {
        match aggregate {
            "agg-0" => Some(2),
            "agg-1" => Some(self.versions - 5),
            _ => None,
        }
    }

    /// Whether the handler refuses `envelope` for good.
    pub fn refuses(&self, envelope: &Envelope) -> bool {
        self.at(&envelope.aggregate_id) == Some(envelope.event_version)
    }

    /// The last version of `aggregate` its handler completes.
    pub fn last_handled(&self, aggregate: &str) -> i64 {
        self.at(aggregate).map_or(self.versions, |at| at - 1)
    }

    /// How many envelopes are never handled: each poisoned one and those parked behind it.
    pub fn unhandled(&self) -> usize {
        ["agg-0", "agg-1"]
            .iter()
            .filter_map(|aggregate| self.at(aggregate))
            .map(|at| usize::try_from(self.versions - at + 1).unwrap_or(0))
            .sum()
    }

    /// Waits (a minute at most) until `bus`'s `dead_letter_topic` holds each poisoned version
    /// unparked and every later version of its aggregate parked.
    pub async fn wait_dead_lettered<B: DeadLetterStore + ?Sized>(
        &self,
        bus: &B,
        dead_letter_topic: &str,
    ) {
        eventually(
            "every poisoned event and those parked behind it dead-lettered",
            || async {
                let letters = bus.dead_letters(dead_letter_topic).await;
                letters.is_ok_and(|letters| self.missing_dead_letters(&letters).is_empty())
            },
        )
        .await;
    }

    /// The dead letters `letters` should hold and do not: each poisoned version unparked,
    /// every later version of its aggregate parked (duplicates allowed). Empty when all are
    /// there.
    fn missing_dead_letters(&self, letters: &[StoredDeadLetter]) -> Vec<(String, i64, bool)> {
        let stored: HashSet<(String, i64, bool)> = letters
            .iter()
            .filter_map(|letter| {
                let envelope = letter.envelope()?;
                Some((
                    envelope.aggregate_id.to_string(),
                    envelope.event_version,
                    letter.is_parked(),
                ))
            })
            .collect();
        let mut missing = Vec::new();
        for aggregate in ["agg-0", "agg-1"] {
            let Some(at) = self.at(aggregate) else {
                continue;
            };
            for version in at..=self.versions {
                let wanted = (aggregate.to_owned(), version, version > at);
                if !stored.contains(&wanted) {
                    missing.push(wanted);
                }
            }
        }
        missing
    }
}

/// Checks that each aggregate's handlings only ever go forward by one version or start a replay
/// (a version already handled), and that every replay runs on to the last version: a
/// redelivery replays a suffix in order, and no old event is handled alone after newer ones.
pub fn assert_replays_are_in_order_suffixes(handled: &[(String, i64)]) {
    let mut per_aggregate: HashMap<&str, Vec<i64>> = HashMap::new();
    for (aggregate, version) in handled {
        per_aggregate.entry(aggregate).or_default().push(*version);
    }
    for (aggregate, versions) in per_aggregate {
        for pair in versions.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            assert!(
                after == before + 1 || after <= before,
                "{aggregate}: version {after} handled right after {before}: {versions:?}"
            );
        }
        let last = versions.last().copied().unwrap_or_default();
        let highest = versions.iter().copied().max().unwrap_or_default();
        assert_eq!(
            last, highest,
            "{aggregate}: an old version was handled after the newest: {versions:?}"
        );
    }
}

pub mod go_peer;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    DeadLetterStore, Envelope, Error, EventBus, HandlerContext, HandlerError, Message,
    OutboundMessage, PendingPublish, Position, PublishResult, ResultsError, StoredDeadLetter,
    SubscribeOptions,
};
use tokio::sync::Notify;

/// The engine and retry settings a test needs; each backend maps them to its configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Actors.
    pub pool_size: usize,
    /// Queued jobs per lane.
    pub inbox_size: usize,
    /// Attempts per envelope, the first included.
    pub max_attempts: u32,
    /// Panics per message before it is poison.
    pub max_restarts: u32,
    /// First retry backoff (then doubled).
    pub backoff: Duration,
    /// How long `close` lets in-flight work finish.
    pub drain_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pool_size: 16,
            inbox_size: 100,
            max_attempts: 3,
            max_restarts: 3,
            backoff: Duration::from_millis(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// The shared settings of a `backend` bus named `conformance` with this engine and drain
    /// timeout.
    pub fn bus_settings(&self, backend: &str) -> eventbus_pool::BusSettings {
        eventbus_pool::BusSettings {
            pool: self.pool_config(),
            settlement: eventbus_core::Backoff::new(self.backoff, self.backoff * 8),
            drain_timeout: self.drain_timeout,
            ..eventbus_pool::BusSettings::new(backend, "conformance")
        }
    }

    /// The engine configuration these settings describe (backoff doubling up to 8× the first;
    /// settling backs off alike).
    pub fn pool_config(&self) -> eventbus_pool::PoolConfig {
        eventbus_pool::PoolConfig {
            pool_size: self.pool_size,
            inbox_size: self.inbox_size,
            max_restarts: self.max_restarts,
            retry: eventbus_core::RetryPolicy::new()
                .with_max_attempts(self.max_attempts)
                .with_backoff(self.backoff, self.backoff * 8),
        }
    }
}

/// Makes buses of one backend for the suite.
#[async_trait]
pub trait BusFactory: Send + Sync {
    /// A new bus with `settings`.
    async fn bus(&self, settings: Settings) -> Arc<dyn EventBus>;

    /// A topic name unique to this test run (brokers keep topics between tests).
    fn topic(&self, name: &str) -> String;

    /// Whether the backend delivers again what a subscription gave back (a broker does; memory
    /// drops it).
    fn redelivers(&self) -> bool {
        true
    }
}

/// Defines the whole conformance suite as tests of the calling test binary, one per property,
/// each on a bus factory made by `$factory` (evaluated in each test). Every backend's binary
/// calls it once, so a property added here runs on every backend.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@tests $factory;
            per_aggregate_order_with_many_aggregates,
            retry_then_success_keeps_order,
            a_subscriptions_retry_policy_decides_its_attempts_delays_and_giving_up,
            routing_by_event_type_keeps_each_aggregates_order_across_types,
            exhausted_retries_go_to_the_dead_letter_topic,
            undecodable_envelopes_are_dead_lettered_without_retries,
            panics_are_caught_for_both_classes,
            plain_messages_are_at_most_once,
            unsubscribe_stops_delivery,
            close_drains_in_flight_work,
            resubscribing_keeps_each_aggregates_order,
            a_multi_line_failure_reason_is_dead_lettered_and_the_aggregate_moves_on,
            two_subscriptions_dead_lettering_one_message_both_write_it,
            a_handler_publishing_on_its_own_bus_does_not_deadlock,
            a_dropped_publish_does_not_hang_close,
            close_after_unsubscribe_leaves_no_task_running,
            dead_lettering_disabled_keeps_an_exhausted_envelope_in_its_lane,
            a_handler_past_its_timeout_is_cancelled_then_dead_lettered_and_the_aggregate_moves_on,
            trace_context_flows_from_an_event_through_its_handler_to_the_follow_up,
            the_connection_state_is_connected_while_open_and_closed_after_close,
            pipelined_publishes_are_stored_in_order_and_each_reports_its_result,
            one_event_published_to_two_topics_reaches_both_topics_subscribers,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let factory = $factory;
                $crate::capture_logs();
                $crate::$name(&factory).await;
            }
        )*
    };
}

/// Sends the buses' `info` events and every warning to the test's captured output, which the
/// test harness prints when the test fails: a failure on a loaded CI machine then shows what the
/// bus did (rebalances, revokes, failed commits) without a rerun. Call it first in each test;
/// only the first call in a test binary installs the subscriber. `RUST_LOG` replaces the levels.
pub fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,eventbus_kafka=info,eventbus_nats=info")
            }),
        )
        .try_init();
}

/// The longest time without a handling ending, from `began` (a fault's start) to the last
/// handling: how long consuming stood still because of the fault. `times` in the order the
/// handlings ended.
pub fn longest_pause_after(times: &[std::time::Instant], began: std::time::Instant) -> Duration {
    let mut previous = began;
    let mut longest = Duration::ZERO;
    for &time in times.iter().filter(|time| **time >= began) {
        longest = longest.max(time.duration_since(previous));
        previous = time;
    }
    longest
}

/// How long a check waits for what it expects.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it holds, or panics with `what` after 60 s (broker restarts
/// and reconnects take a while on a loaded machine).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What handlers saw, with a way to wait for a condition on it.
pub struct Recorder<T> {
    events: Mutex<Vec<T>>,
    changed: Notify,
}

impl<T: Clone + std::fmt::Debug> Recorder<T> {
    /// An empty recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(Vec::new()),
            changed: Notify::new(),
        })
    }

    /// Records one event.
    pub fn push(&self, event: T) {
        self.events.lock().unwrap().push(event);
        self.changed.notify_waiters();
    }

    /// The events so far.
    pub fn events(&self) -> Vec<T> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `condition` holds on the events, or panics with `what` after [`DEADLINE`].
    pub async fn wait_for(&self, what: &str, condition: impl Fn(&[T]) -> bool) -> Vec<T> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let events = self.events.lock().unwrap();
                    if condition(&events) {
                        return events.clone();
                    }
                }
                notified.await;
            }
        };
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(events) => events,
            Err(_) => {
                let events = self.events.lock().unwrap();
                let last = &events[events.len().saturating_sub(20)..];
                panic!(
                    "timed out after {DEADLINE:?} waiting for {what} ({} events so far, the last \
                     {}: {last:?})",
                    events.len(),
                    last.len()
                )
            }
        }
    }
}

impl Recorder<(String, i64)> {
    /// An envelope handler that records each envelope's aggregate ID and version, and succeeds.
    pub fn envelope_handler(self: &Arc<Self>) -> Arc<dyn eventbus_core::EnvelopeHandler> {
        let recorder = self.clone();
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let recorder = recorder.clone();
            async move {
                recorder.push((envelope.aggregate_id, envelope.event_version));
                Ok(())
            }
        })
    }
}

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(aggregate, "Changed", version, &payload(aggregate, version)).unwrap()
}

/// A small JSON payload naming the aggregate and version.
fn payload(aggregate: &str, version: i64) -> HashMap<&str, String> {
    HashMap::from([
        ("aggregate", aggregate.to_owned()),
        ("version", version.to_string()),
    ])
}

/// Tracks handlers running per aggregate; records an overlap if two run at once.
#[derive(Default)]
struct Overlap {
    running: Mutex<HashMap<String, usize>>,
    overlaps: AtomicUsize,
}

impl Overlap {
    fn enter(&self, aggregate: &str) {
        let mut running = self.running.lock().unwrap();
        let count = running.entry(aggregate.to_owned()).or_default();
        if *count > 0 {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        *count += 1;
    }

    fn exit(&self, aggregate: &str) {
        *self.running.lock().unwrap().get_mut(aggregate).unwrap() -= 1;
    }
}

/// Many aggregates published interleaved: each aggregate's events are handled one at a time, in
/// publish order.
pub async fn per_aggregate_order_with_many_aggregates(factory: &dyn BusFactory) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("order");
    let (aggregates, versions) = (40, 25);
    let handled = Recorder::<(String, i64)>::new();
    let overlap = Arc::new(Overlap::default());
    let (h, o) = (handled.clone(), overlap.clone());
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (h, o) = (h.clone(), o.clone());
            async move {
                o.enter(&envelope.aggregate_id);
                // Vary handler time so that aggregates interleave across actors.
                if envelope.event_version % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                o.exit(&envelope.aggregate_id);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            bus.publish_envelope(&topic, &envelope(&format!("agg-{aggregate}"), version))
                .await
                .unwrap();
        }
    }
    let events = handled
        .wait_for("every event handled", |e| {
            e.len() == (aggregates * versions) as usize
        })
        .await;
    let mut per_aggregate: HashMap<String, Vec<i64>> = HashMap::new();
    for (aggregate, version) in events {
        per_aggregate.entry(aggregate).or_default().push(version);
    }
    for (aggregate, seen) in per_aggregate {
        assert_eq!(seen, (1..=versions).collect::<Vec<_>>(), "{aggregate}");
    }
    assert_eq!(overlap.overlaps.load(Ordering::SeqCst), 0);
    bus.close().await.unwrap();
}

/// Envelopes published pipelined (all started, then awaited) and as a batch: each resolves to
/// where the broker stored it, one aggregate's positions rise in publish order (the broker kept
/// the order with many in flight), the results stream reports every one in start order with
/// its identity, and the subscriber handles each aggregate in order.
pub async fn pipelined_publishes_are_stored_in_order_and_each_reports_its_result(
    factory: &dyn BusFactory,
) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("pipelined");
    let plain_topic = factory.topic("pipelined-plain");
    let (aggregates, versions) = (10, 20);
    let handled = record_versions(&*bus, &topic, SubscribeOptions::new()).await;
    let mut results = bus.publish_results();
    let mut started = Vec::new();
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            let envelope = envelope(&format!("agg-{aggregate}"), version);
            let pending = bus.start_publish_envelope(&topic, &envelope).await.unwrap();
            started.push((envelope, pending));
        }
    }
    let batch: Vec<Envelope> = (0..aggregates)
        .map(|aggregate| envelope(&format!("agg-{aggregate}"), versions + 1))
        .collect();
    let mut stored = Vec::new();
    for (envelope, pending) in started {
        stored.push((envelope, pending.await.unwrap()));
    }
    for (envelope, result) in batch
        .iter()
        .zip(bus.publish_envelope_batch(&topic, &batch).await)
    {
        stored.push((envelope.clone(), result.unwrap()));
    }
    let mut last: HashMap<&str, Position> = HashMap::new();
    for (envelope, position) in &stored {
        assert!(
            position_rises(last.get(envelope.aggregate_id.as_str()), position),
            "{} v{} stored at {position:?} after {:?}",
            envelope.aggregate_id,
            envelope.event_version,
            last.get(envelope.aggregate_id.as_str())
        );
        last.insert(&envelope.aggregate_id, *position);
    }
    for (envelope, position) in &stored {
        let result = results.recv().await.unwrap();
        assert_eq!(result.event_id.as_ref(), Some(&envelope.event_id));
        assert_eq!(result.aggregate_id.as_ref(), Some(&envelope.aggregate_id));
        assert_eq!(result.topic, topic);
        assert_eq!(result.outcome, Ok(*position));
    }
    let plain = bus
        .start_publish(&plain_topic, OutboundMessage::new(&b"not an envelope"[..]))
        .await
        .unwrap()
        .await
        .unwrap();
    let result = results.recv().await.unwrap();
    assert_eq!(
        (result.topic, result.event_id, result.outcome),
        (plain_topic, None, Ok(plain))
    );
    let expected = (aggregates * (versions + 1)) as usize;
    let events = handled
        .wait_for("every envelope handled", |e| e.len() >= expected)
        .await;
    let mut per_aggregate: HashMap<String, Vec<i64>> = HashMap::new();
    for (aggregate, version) in events {
        per_aggregate.entry(aggregate).or_default().push(version);
    }
    for (aggregate, seen) in per_aggregate {
        assert_eq!(seen, (1..=versions + 1).collect::<Vec<_>>(), "{aggregate}");
    }
    bus.close().await.unwrap();
    assert!(matches!(
        bus.start_publish_envelope(&topic, &envelope("agg-0", 99))
            .await,
        Err(Error::Closed)
    ));
}

/// One envelope published to two topics (on NATS, two topics of one stream: the factory
/// declares a stream over `shared.>`) is stored on both and reaches both topics' subscribers,
/// through `publish_envelope` and through `start_publish_envelope`: broker-side deduplication
/// drops a retry of one publish, never the same event on another topic.
pub async fn one_event_published_to_two_topics_reaches_both_topics_subscribers(
    factory: &dyn BusFactory,
) {
    let bus = factory.bus(Settings::default()).await;
    let topics = [factory.topic("shared.a"), factory.topic("shared.b")];
    let mut handled = Vec::new();
    for topic in &topics {
        handled.push(record_versions(&*bus, topic, SubscribeOptions::new()).await);
    }
    let awaited = envelope("agg-awaited", 1);
    for topic in &topics {
        bus.publish_envelope(topic, &awaited).await.unwrap();
    }
    let pipelined = envelope("agg-pipelined", 1);
    let mut pending = Vec::new();
    for topic in &topics {
        pending.push(bus.start_publish_envelope(topic, &pipelined).await.unwrap());
    }
    for pending in pending {
        pending.await.unwrap();
    }
    for (topic, handled) in topics.iter().zip(&handled) {
        let seen = handled
            .wait_for(&format!("both events handled on {topic}"), |events| {
                events.len() >= 2
            })
            .await;
        let mut seen: Vec<&str> = seen
            .iter()
            .map(|(aggregate, _)| aggregate.as_str())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, ["agg-awaited", "agg-pipelined"], "{topic}");
    }
    bus.close().await.unwrap();
}

/// A failing event is retried in its lane: later events of its aggregate wait, so the order of
/// successful handling is the publish order.
pub async fn retry_then_success_keeps_order(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            max_attempts: 5,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("retry");
    let succeeded = Recorder::<i64>::new();
    let attempts = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
    let (s, a) = (succeeded.clone(), attempts.clone());
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let (s, a) = (s.clone(), a.clone());
            async move {
                *a.lock().unwrap().entry(envelope.event_version).or_default() += 1;
                // Version 2 fails on its first two attempts.
                if envelope.event_version == 2 && ctx.attempt() <= 2 {
                    return Err(HandlerError::transient("not yet"));
                }
                s.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=5 {
        bus.publish_envelope(&topic, &envelope("agg-retry", version))
            .await
            .unwrap();
    }
    let order = succeeded.wait_for("five successes", |e| e.len() == 5).await;
    assert_eq!(order, [1, 2, 3, 4, 5]);
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts[&2], 3);
    assert_eq!(
        attempts[&3], 1,
        "version 3 must not have started before version 2 succeeded"
    );
    bus.close().await.unwrap();
}

/// A subscription's own retry policy replaces the bus's (2 attempts here): `agg-busy` v1
/// succeeds at its 5th attempt; the policy's decision gives `agg-conflict` v1 up at its first
/// (dead-lettered, `X-Failed-Attempts: 1`); `agg-later` v1 asks for 400 ms before its next
/// attempt and gets them (the policy's own backoff is 1 to 5 ms). Each aggregate's v2 runs after
/// its v1 is done.
pub async fn a_subscriptions_retry_policy_decides_its_attempts_delays_and_giving_up(
    factory: &dyn BusFactory,
) {
    let bus = factory
        .bus(Settings {
            max_attempts: 2,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("policy");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let done = Recorder::<(String, i64, u32)>::new();
    let later_attempts = Arc::new(Mutex::new(Vec::<std::time::Instant>::new()));
    let (d, l) = (done.clone(), later_attempts.clone());
    let policy = eventbus_core::RetryPolicy::new()
        .with_max_attempts(5)
        .with_backoff(Duration::from_millis(1), Duration::from_millis(5))
        .with_decision(|error, _attempt| {
            if error.to_string() == "conflict" {
                eventbus_core::RetryDecision::GiveUp
            } else {
                eventbus_core::RetryDecision::Retry
            }
        });
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let (d, l) = (d.clone(), l.clone());
            async move {
                let (aggregate, version) = (envelope.aggregate_id.clone(), envelope.event_version);
                if version == 1 {
                    match aggregate.as_str() {
                        "agg-busy" if ctx.attempt() < 5 => {
                            return Err(HandlerError::transient("busy"));
                        }
                        "agg-conflict" => return Err(HandlerError::transient("conflict")),
                        "agg-later" => {
                            l.lock().unwrap().push(std::time::Instant::now());
                            if ctx.attempt() == 1 {
                                return Err(HandlerError::transient("rate limited")
                                    .with_retry_after(Duration::from_millis(400)));
                            }
                        }
                        _ => {}
                    }
                }
                d.push((aggregate, version, ctx.attempt()));
                Ok(())
            }
        }),
        SubscribeOptions::new().with_retry(policy),
    )
    .await
    .unwrap();
    for aggregate in ["agg-busy", "agg-conflict", "agg-later"] {
        for version in 1..=2 {
            bus.publish_envelope(&topic, &envelope(aggregate, version))
                .await
                .unwrap();
        }
    }
    let handled = done.wait_for("five handlings", |e| e.len() == 5).await;
    let of = |aggregate: &str| -> Vec<(i64, u32)> {
        handled
            .iter()
            .filter(|(a, ..)| a == aggregate)
            .map(|(_, version, attempt)| (*version, *attempt))
            .collect()
    };
    assert_eq!(
        of("agg-busy"),
        [(1, 5), (2, 1)],
        "five attempts, not the bus's two"
    );
    assert_eq!(
        of("agg-conflict"),
        [(2, 1)],
        "v1 given up, v2 handled after it"
    );
    assert_eq!(of("agg-later"), [(1, 2), (2, 1)]);
    let letters = dead.wait_for("one dead letter", |e| !e.is_empty()).await;
    assert_eq!(letters.len(), 1, "only the conflict is dead-lettered");
    let letter = Envelope::from_bytes(&letters[0].payload).unwrap();
    assert_eq!(
        (letter.aggregate_id.as_str(), letter.event_version),
        ("agg-conflict", 1)
    );
    assert_eq!(letters[0].headers.get_str("X-Failed-Attempts"), Some("1"));
    let attempts = later_attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2);
    let waited = attempts[1].duration_since(attempts[0]);
    assert!(
        waited >= Duration::from_millis(400),
        "the handler's retry-after is waited: {waited:?}"
    );
    bus.close().await.unwrap();
}

/// Routing by event type: one subscription whose router hands `Placed` and `Shipped` to their
/// typed handlers, payloads decoded. Per aggregate: `Placed` v1, `Shipped` v2, an unclaimed
/// `Refunded` v3 and a `Placed` v4 whose payload does not decode (both dead-lettered at once,
/// with their reasons), `Shipped` v5. Each aggregate's handled events come in order across the
/// types, and nothing is lost.
pub async fn routing_by_event_type_keeps_each_aggregates_order_across_types(
    factory: &dyn BusFactory,
) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("routed");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let done = Recorder::<(String, i64, String)>::new();
    let (placed, shipped) = (done.clone(), done.clone());
    let router = eventbus_core::Router::new()
        .route(
            "Placed",
            move |_ctx: HandlerContext, envelope: Envelope, order: HashMap<String, u64>| {
                let placed = placed.clone();
                async move {
                    placed.push((
                        envelope.aggregate_id,
                        envelope.event_version,
                        format!("placed {}", order["total"]),
                    ));
                    Ok(())
                }
            },
        )
        .unwrap()
        .route(
            "Shipped",
            move |_ctx: HandlerContext, envelope: Envelope, shipment: HashMap<String, String>| {
                let shipped = shipped.clone();
                async move {
                    shipped.push((
                        envelope.aggregate_id,
                        envelope.event_version,
                        format!("shipped by {}", shipment["carrier"]),
                    ));
                    Ok(())
                }
            },
        )
        .unwrap();
    bus.subscribe_envelope(&topic, Arc::new(router), SubscribeOptions::new())
        .await
        .unwrap();
    let events = |aggregate: &str| {
        [
            ("Placed", 1, serde_json::json!({"total": 10})),
            ("Shipped", 2, serde_json::json!({"carrier": "DHL"})),
            ("Refunded", 3, serde_json::json!({"amount": 10})),
            ("Placed", 4, serde_json::json!({"total": "ten"})),
            ("Shipped", 5, serde_json::json!({"carrier": "UPS"})),
        ]
        .map(|(event_type, version, payload)| {
            Envelope::new(aggregate, event_type, version, &payload).unwrap()
        })
    };
    for aggregate in ["agg-route-a", "agg-route-b"] {
        for event in events(aggregate) {
            bus.publish_envelope(&topic, &event).await.unwrap();
        }
    }
    let handled = done.wait_for("six handlings", |e| e.len() == 6).await;
    for aggregate in ["agg-route-a", "agg-route-b"] {
        let of: Vec<(i64, &str)> = handled
            .iter()
            .filter(|(a, ..)| a == aggregate)
            .map(|(_, version, what)| (*version, what.as_str()))
            .collect();
        assert_eq!(
            of,
            [
                (1, "placed 10"),
                (2, "shipped by DHL"),
                (5, "shipped by UPS")
            ],
            "{aggregate}"
        );
    }
    let letters = dead.wait_for("four dead letters", |e| e.len() == 4).await;
    let mut reasons: Vec<(String, i64, String)> = letters
        .iter()
        .map(|letter| {
            let envelope = Envelope::from_bytes(&letter.payload).unwrap();
            let reason = letter
                .headers
                .get_str("X-Error-Message")
                .unwrap_or_default();
            (
                envelope.aggregate_id,
                envelope.event_version,
                reason.to_owned(),
            )
        })
        .collect();
    reasons.sort();
    for (index, aggregate) in ["agg-route-a", "agg-route-b"].iter().enumerate() {
        let (unclaimed, undecodable) = (&reasons[index * 2], &reasons[index * 2 + 1]);
        assert_eq!(
            (unclaimed.0.as_str(), unclaimed.1, unclaimed.2.as_str()),
            (*aggregate, 3, "no handler for event type \"Refunded\"")
        );
        assert_eq!((undecodable.0.as_str(), undecodable.1), (*aggregate, 4));
        assert!(undecodable.2.contains("invalid type"), "{}", undecodable.2);
        assert_eq!(letters[0].headers.get_str("X-Failed-Attempts"), Some("1"));
    }
    bus.close().await.unwrap();
}

/// Subscribes a plain handler to `topic` that records every message it gets.
pub async fn collect(bus: &dyn EventBus, topic: &str) -> Arc<Recorder<Message>> {
    let recorder = Recorder::<Message>::new();
    let r = recorder.clone();
    bus.subscribe(
        topic,
        Arc::new(move |_ctx: HandlerContext, message: Message| {
            let r = r.clone();
            async move {
                r.push(message);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    recorder
}

/// Subscribes an envelope handler to `topic` with `options` that records the aggregate and
/// version of every envelope it handles.
pub async fn record_versions(
    bus: &dyn EventBus,
    topic: &str,
    options: SubscribeOptions,
) -> Arc<Recorder<(String, i64)>> {
    let recorder = Recorder::<(String, i64)>::new();
    let r = recorder.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let r = r.clone();
            async move {
                r.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok(())
            }
        }),
        options,
    )
    .await
    .unwrap();
    recorder
}

/// After `max_attempts` failures an envelope goes to `{topic}.DLQ` with its bytes and the
/// dead-letter headers; the aggregate's later events are then handled.
pub async fn exhausted_retries_go_to_the_dead_letter_topic(factory: &dyn BusFactory) {
    let settings = Settings {
        max_attempts: 3,
        ..Settings::default()
    };
    let bus = factory.bus(settings).await;
    let topic = factory.topic("exhaust");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.event_version == 2 {
                    return Err(HandlerError::transient("database down"));
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let poisoned = envelope("agg-dlq", 2);
    bus.publish_envelope(&topic, &envelope("agg-dlq", 1))
        .await
        .unwrap();
    bus.publish_envelope(&topic, &poisoned).await.unwrap();
    bus.publish_envelope(&topic, &envelope("agg-dlq", 3))
        .await
        .unwrap();

    let letters = dead.wait_for("one dead letter", |e| !e.is_empty()).await;
    let letter = &letters[0];
    assert_eq!(letter.payload, poisoned.to_bytes().unwrap());
    assert_eq!(letter.key.as_deref(), Some(&b"agg-dlq"[..]));
    let header = |name: &str| letter.headers.get_str(name).map(str::to_owned);
    assert_eq!(header("X-Original-Topic"), Some(topic.clone()));
    assert_eq!(header("X-Error-Message").as_deref(), Some("database down"));
    assert_eq!(header("X-Failed-Attempts").as_deref(), Some("3"));
    assert_eq!(header("X-Event-ID"), Some(poisoned.event_id.clone()));
    let at = header("X-Dead-Lettered-At").expect("X-Dead-Lettered-At");
    assert!(at.ends_with('Z') && at.len() >= 20, "{at}");
    assert!(
        letter.headers.contains("X-Original-Stream-Sequence")
            || letter.headers.contains("X-Original-Offset"),
        "the original position is recorded"
    );
    assert_eq!(
        handled.wait_for("versions 1 and 3", |e| e.len() == 2).await,
        [1, 3]
    );
    bus.close().await.unwrap();
}

/// A payload that is not an envelope is dead-lettered at once: the handler never runs.
pub async fn undecodable_envelopes_are_dead_lettered_without_retries(factory: &dyn BusFactory) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("poison");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish(&topic, OutboundMessage::new(&b"not an envelope"[..]))
        .await
        .unwrap();
    let letters = dead.wait_for("the poison message", |e| !e.is_empty()).await;
    assert_eq!(letters[0].payload, &b"not an envelope"[..]);
    assert_eq!(letters[0].headers.get_str("X-Failed-Attempts"), Some("0"));
    assert!(
        letters[0]
            .headers
            .get_str("X-Error-Message")
            .unwrap()
            .contains("invalid envelope")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    bus.close().await.unwrap();
}

/// An envelope handler that always panics: retried until `max_restarts` panics, then
/// dead-lettered; a plain handler that panics runs once and the next message is handled.
pub async fn panics_are_caught_for_both_classes(factory: &dyn BusFactory) {
    let settings = Settings {
        max_attempts: 10,
        max_restarts: 2,
        ..Settings::default()
    };
    let bus = factory.bus(settings).await;
    let topic = factory.topic("panic");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let envelope_calls = Arc::new(AtomicUsize::new(0));
    let c = envelope_calls.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, _envelope: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async { panic!("envelope handler bug") }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(&topic, &envelope("agg-panic", 1))
        .await
        .unwrap();
    let letters = dead
        .wait_for("the poisoned envelope", |e| !e.is_empty())
        .await;
    assert_eq!(letters[0].headers.get_str("X-Failed-Attempts"), Some("2"));
    assert!(
        letters[0]
            .headers
            .get_str("X-Error-Message")
            .unwrap()
            .contains("envelope handler bug")
    );
    assert_eq!(envelope_calls.load(Ordering::SeqCst), 2);

    let plain_topic = factory.topic("panic-plain");
    let handled = Recorder::<Vec<u8>>::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let (h, c) = (handled.clone(), calls.clone());
    bus.subscribe(
        &plain_topic,
        Arc::new(move |_ctx: HandlerContext, message: Message| {
            let h = h.clone();
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if message.payload.as_ref() == b"boom" {
                    panic!("plain handler bug");
                }
                h.push(message.payload.to_vec());
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish(
        &plain_topic,
        OutboundMessage::new(&b"boom"[..]).with_key("k"),
    )
    .await
    .unwrap();
    bus.publish(
        &plain_topic,
        OutboundMessage::new(&b"after"[..]).with_key("k"),
    )
    .await
    .unwrap();
    handled
        .wait_for("the message after the panic", |e| e.len() == 1)
        .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the panicking plain message ran once"
    );
    bus.close().await.unwrap();
}

/// A plain handler's error is not retried.
pub async fn plain_messages_are_at_most_once(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            max_attempts: 5,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("plain");
    let seen = Recorder::<Vec<u8>>::new();
    let s = seen.clone();
    bus.subscribe(
        &topic,
        Arc::new(move |_ctx: HandlerContext, message: Message| {
            let s = s.clone();
            async move {
                s.push(message.payload.to_vec());
                if message.payload.as_ref() == b"fails" {
                    return Err(HandlerError::transient("plain failure"));
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish(&topic, OutboundMessage::new(&b"fails"[..]).with_key("k"))
        .await
        .unwrap();
    bus.publish(&topic, OutboundMessage::new(&b"next"[..]).with_key("k"))
        .await
        .unwrap();
    let events = seen.wait_for("both messages", |e| e.len() >= 2).await;
    assert_eq!(events, [b"fails".to_vec(), b"next".to_vec()]);
    bus.close().await.unwrap();
}

/// After `unsubscribe`, the handler gets nothing more, while another subscription of the same
/// topic keeps receiving (every subscription receives every message).
pub async fn unsubscribe_stops_delivery(factory: &dyn BusFactory) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("unsub");
    let first = collect(bus.as_ref(), &topic).await;
    let second = Recorder::<Message>::new();
    let s = second.clone();
    let subscription = bus
        .subscribe(
            &topic,
            Arc::new(move |_ctx: HandlerContext, message: Message| {
                let s = s.clone();
                async move {
                    s.push(message);
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    bus.publish(&topic, OutboundMessage::new(&b"one"[..]))
        .await
        .unwrap();
    second.wait_for("the first message", |e| e.len() == 1).await;
    subscription.unsubscribe().await.unwrap();
    bus.publish(&topic, OutboundMessage::new(&b"two"[..]))
        .await
        .unwrap();
    first
        .wait_for("both messages on the other subscription", |e| e.len() == 2)
        .await;
    assert_eq!(second.events().len(), 1, "no delivery after unsubscribe");
    bus.close().await.unwrap();
}

/// `close` lets in-flight handlers finish before it returns, and refuses new work after.
pub async fn close_drains_in_flight_work(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            pool_size: 4,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("drain");
    let done = Recorder::<i64>::new();
    let d = done.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let d = d.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                d.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=40 {
        bus.publish_envelope(&topic, &envelope(&format!("agg-{}", version % 8), version))
            .await
            .unwrap();
    }
    bus.close().await.unwrap();
    assert_eq!(
        done.events().len(),
        40,
        "close returned before in-flight work finished"
    );
    let error = bus
        .publish(&topic, OutboundMessage::new(&b"late"[..]))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), eventbus_core::ErrorKind::Closed);
    bus.close().await.unwrap();
}

/// Handled versions per aggregate in the order their first handling happened.
fn first_handlings(handled: &[i64]) -> Vec<i64> {
    let mut first = Vec::new();
    for version in handled {
        if !first.contains(version) {
            first.push(*version);
        }
    }
    first
}

/// v1 of an aggregate is running and v2 queued when the subscription is stopped; the topic is
/// subscribed again (while the old subscription still finishes v1) and v3 published: the
/// aggregate's events are still handled in order, and on a broker v2 is not lost.
pub async fn resubscribing_keeps_each_aggregates_order(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            pool_size: 2,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("resubscribe");
    let handled = Recorder::<i64>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (h, g) = (handled.clone(), gate.clone());
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (h, g) = (h.clone(), g.clone());
            async move {
                h.push(envelope.event_version);
                // Only v1's first run waits for the gate: a broker may deliver v1 again (an
                // offset commit lost in a rebalance is at-least-once, not a fault), and that run
                // must not wait for a permit nobody gives.
                let first_run = h.events().iter().filter(|version| **version == 1).count() == 1;
                if envelope.event_version == 1 && first_run {
                    g.acquire().await.unwrap().forget();
                }
                Ok(())
            }
        })
    };
    let first = bus
        .subscribe_envelope(&topic, handler.clone(), SubscribeOptions::new())
        .await
        .unwrap();
    for version in 1..=2 {
        bus.publish_envelope(&topic, &envelope("agg-re", version))
            .await
            .unwrap();
    }
    handled.wait_for("v1 running", |e| e == [1]).await;
    // Started before the topic is subscribed again: its first poll stops intake.
    let mut unsubscribing = Box::pin(first.unsubscribe());
    let first_poll =
        std::future::poll_fn(|cx| std::task::Poll::Ready(unsubscribing.as_mut().poll(cx))).await;
    assert!(first_poll.is_pending(), "unsubscribe waits for v1");
    let resubscribing = {
        let (bus, topic, handler) = (bus.clone(), topic.clone(), handler.clone());
        tokio::spawn(async move {
            bus.subscribe_envelope(&topic, handler, SubscribeOptions::new())
                .await
        })
    };
    gate.add_permits(1);
    unsubscribing.await.unwrap();
    let _second = resubscribing.await.unwrap().unwrap();
    bus.publish_envelope(&topic, &envelope("agg-re", 3))
        .await
        .unwrap();
    let expected: &[i64] = if factory.redelivers() {
        &[1, 2, 3]
    } else {
        &[1, 3]
    };
    let events = handled
        .wait_for("the aggregate's events after re-subscribing", |e| {
            expected.iter().all(|version| e.contains(version))
        })
        .await;
    assert_eq!(first_handlings(&events), expected, "handled {events:?}");
    bus.close().await.unwrap();
}

/// A failure whose text spans lines (any `assert_eq!` panic) is dead-lettered with that text as
/// one escaped header line, and the aggregate moves on; envelope fields with control characters
/// travel too.
pub async fn a_multi_line_failure_reason_is_dead_lettered_and_the_aggregate_moves_on(
    factory: &dyn BusFactory,
) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("multiline");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.event_version == 1 {
                    return Err(HandlerError::permanent(
                        "assertion failed\n  left: 1\n right: 2",
                    ));
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let mut first = envelope("agg-lines", 1);
    first.trace_id = "trace\r\nX-Injected: 1\u{1}".into();
    first.event_type = "Changed\tTwice".into();
    bus.publish_envelope(&topic, &first).await.unwrap();
    bus.publish_envelope(&topic, &envelope("agg-lines", 2))
        .await
        .unwrap();
    let letters = dead.wait_for("the dead letter", |e| !e.is_empty()).await;
    assert_eq!(
        letters[0].headers.get_str("X-Error-Message"),
        Some("assertion failed\\n  left: 1\\n right: 2")
    );
    assert_eq!(letters[0].payload, first.to_bytes().unwrap());
    assert!(!letters[0].headers.contains("X-Injected"));
    assert_eq!(handled.wait_for("v2", |e| e.len() == 1).await, [2]);
    bus.close().await.unwrap();
}

/// Two subscriptions of one topic that both fail the same envelope both write their dead
/// letter: neither is taken for a duplicate of the other.
pub async fn two_subscriptions_dead_lettering_one_message_both_write_it(factory: &dyn BusFactory) {
    let bus = factory.bus(Settings::default()).await;
    let topic = factory.topic("twice");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    for _ in 0..2 {
        bus.subscribe_envelope(
            &topic,
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Err(HandlerError::permanent("refused"))
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    }
    let event = envelope("agg-twice", 1);
    bus.publish_envelope(&topic, &event).await.unwrap();
    let letters = dead.wait_for("two dead letters", |e| e.len() >= 2).await;
    for letter in &letters {
        assert_eq!(
            letter.headers.get_str("X-Event-ID"),
            Some(event.event_id.as_str())
        );
    }
    bus.close().await.unwrap();
}

/// With one actor and room for one queued job, a handler that publishes on its own bus while
/// the engine is full keeps the bus moving: every follow-up is handled.
pub async fn a_handler_publishing_on_its_own_bus_does_not_deadlock(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            pool_size: 1,
            inbox_size: 1,
            ..Settings::default()
        })
        .await;
    let (first, second) = (factory.topic("chain.a"), factory.topic("chain.b"));
    let followed = collect(bus.as_ref(), &second).await;
    let started = Recorder::<i64>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (publisher, next, s, g) = (bus.clone(), second.clone(), started.clone(), gate.clone());
    bus.subscribe_envelope(
        &first,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (publisher, next, s, g) = (publisher.clone(), next.clone(), s.clone(), g.clone());
            async move {
                s.push(envelope.event_version);
                if envelope.event_version == 1 {
                    // Publish only once the engine is full behind this handler.
                    g.acquire().await.unwrap().forget();
                }
                let message = OutboundMessage::new(envelope.event_version.to_string().into_bytes())
                    .with_key(envelope.aggregate_id.clone());
                publisher
                    .publish(&next, message)
                    .await
                    .map_err(HandlerError::transient)
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(&first, &envelope("agg-chain", 1))
        .await
        .unwrap();
    started.wait_for("v1 running", |e| e.len() == 1).await;
    bus.publish_envelope(&first, &envelope("agg-chain", 2))
        .await
        .unwrap();
    gate.add_permits(1);
    let rest = {
        let (bus, first) = (bus.clone(), first.clone());
        tokio::spawn(async move {
            for version in 3..=5 {
                bus.publish_envelope(&first, &envelope("agg-chain", version))
                    .await
                    .unwrap();
            }
        })
    };
    let events = followed.wait_for("five follow-ups", |e| e.len() >= 5).await;
    let payloads: Vec<&[u8]> = events.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, [&b"1"[..], b"2", b"3", b"4", b"5"]);
    rest.await.unwrap();
    bus.close().await.unwrap();
}

/// A publish future dropped while it waits (for room in a full engine, or for the broker) does
/// not keep `close` from finishing.
pub async fn a_dropped_publish_does_not_hang_close(factory: &dyn BusFactory) {
    let bus = factory
        .bus(Settings {
            pool_size: 1,
            inbox_size: 1,
            drain_timeout: Duration::from_secs(5),
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("dropped");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Recorder::<i64>::new();
    let (g, s) = (gate.clone(), started.clone());
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, s) = (g.clone(), s.clone());
            async move {
                s.push(envelope.event_version);
                g.acquire().await.unwrap().forget();
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(&topic, &envelope("agg-drop", 1))
        .await
        .unwrap();
    started.wait_for("v1 running", |e| e.len() == 1).await;
    bus.publish_envelope(&topic, &envelope("agg-drop", 2))
        .await
        .unwrap();
    // The engine is full (one running, one queued): this publish may wait, and is dropped.
    let _ = tokio::time::timeout(
        Duration::from_millis(200),
        bus.publish_envelope(&topic, &envelope("agg-drop", 3)),
    )
    .await;
    gate.add_permits(10);
    tokio::time::timeout(Duration::from_secs(15), bus.close())
        .await
        .expect("close hung after a dropped publish")
        .unwrap();
}

/// After a subscription is stopped while a handler runs past the drain deadline, and the bus is
/// closed and dropped, no task of the bus is left running (no in-progress signals for a message
/// nobody holds any more).
pub async fn close_after_unsubscribe_leaves_no_task_running(factory: &dyn BusFactory) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let bus = factory
        .bus(Settings {
            drain_timeout: Duration::from_millis(300),
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("tasks");
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    let subscription = bus
        .subscribe_envelope(
            &topic,
            Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
                let h = h.clone();
                async move {
                    h.push(envelope.event_version);
                    if envelope.event_version == 3 {
                        // Still running at the drain deadline: cancelled, given back.
                        ctx.cancellation().cancelled().await;
                    }
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    for version in 1..=4 {
        bus.publish_envelope(&topic, &envelope("agg-tasks", version))
            .await
            .unwrap();
    }
    handled.wait_for("v3 running", |e| e.contains(&3)).await;
    subscription.unsubscribe().await.unwrap();
    bus.close().await.unwrap();
    drop(bus);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metrics.num_alive_tasks() > before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks still alive after close (before the bus: {before})",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// With dead-lettering disabled, an envelope that fails for good stays in its lane, retried: the
/// aggregate's next event never overtakes it, and the health report says the bus is degraded.
pub async fn dead_lettering_disabled_keeps_an_exhausted_envelope_in_its_lane(
    factory: &dyn BusFactory,
) {
    let bus = factory
        .bus(Settings {
            max_attempts: 2,
            backoff: Duration::from_millis(5),
            drain_timeout: Duration::from_millis(300),
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("nodlq");
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_version);
                if envelope.event_version == 1 {
                    return Err(HandlerError::permanent("nowhere to go"));
                }
                Ok(())
            }
        }),
        SubscribeOptions::new().with_dead_letter(eventbus_core::DeadLetter::Disabled),
    )
    .await
    .unwrap();
    for version in 1..=2 {
        bus.publish_envelope(&topic, &envelope("agg-nodlq", version))
            .await
            .unwrap();
    }
    // Past max_attempts (2): it keeps being retried.
    handled
        .wait_for("v1 retried past its attempts", |e| e.len() >= 4)
        .await;
    let degraded = async {
        loop {
            if bus.health().await.status() == eventbus_core::HealthStatus::Degraded {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(DEADLINE, degraded)
        .await
        .expect("the health report shows the stalled aggregate");
    assert!(
        handled.events().iter().all(|version| *version == 1),
        "v2 ran while v1 was unsettled: {:?}",
        handled.events()
    );
    bus.close().await.unwrap();
}

/// A handler that outlives its subscription's handler timeout sees its cancellation token fire;
/// each timed-out attempt fails, the envelope is dead-lettered with the timeout as its reason,
/// and only then does the aggregate's next event run.
pub async fn a_handler_past_its_timeout_is_cancelled_then_dead_lettered_and_the_aggregate_moves_on(
    factory: &dyn BusFactory,
) {
    let bus = factory
        .bus(Settings {
            max_attempts: 2,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("timeout");
    let dead = collect(bus.as_ref(), &format!("{topic}.DLQ")).await;
    let handled = Recorder::<String>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                let version = envelope.event_version;
                h.push(format!("run v{version}"));
                if version == 1 {
                    ctx.cancellation().cancelled().await;
                    h.push("v1 cancelled".to_owned());
                    return Err(HandlerError::transient("stopped"));
                }
                Ok(())
            }
        }),
        SubscribeOptions::new().with_handler_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    for version in 1..=2 {
        bus.publish_envelope(&topic, &envelope("agg-timeout", version))
            .await
            .unwrap();
    }
    let letters = dead.wait_for("one dead letter", |e| !e.is_empty()).await;
    assert_eq!(
        letters[0].headers.get_str("X-Error-Message"),
        Some("handler timed out after 200ms")
    );
    assert_eq!(letters[0].headers.get_str("X-Failed-Attempts"), Some("2"));
    let runs = handled
        .wait_for("v2 handled", |e| e.contains(&"run v2".to_owned()))
        .await;
    assert_eq!(
        runs,
        ["run v1", "v1 cancelled", "run v1", "v1 cancelled", "run v2"]
    );
    bus.close().await.unwrap();
}

/// One trace runs from a published envelope through its handler to the event the handler
/// publishes: the handler sees the trace its envelope's W3C `trace_id` names, and the follow-up
/// carries it in `traceparent` (with a parent span of its own) and in its envelope's `trace_id`.
/// A plain message's own `traceparent` reaches its handler as it was sent.
pub async fn trace_context_flows_from_an_event_through_its_handler_to_the_follow_up(
    factory: &dyn BusFactory,
) {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let bus = factory.bus(Settings::default()).await;
    let (first, second) = (factory.topic("trace"), factory.topic("traced"));
    let follow_ups = collect(bus.as_ref(), &second).await;
    let originals = collect(bus.as_ref(), &first).await;
    let seen = Recorder::<Option<String>>::new();
    let (s, publisher, to) = (seen.clone(), bus.clone(), second.clone());
    bus.subscribe_envelope(
        &first,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let (s, publisher, to) = (s.clone(), publisher.clone(), to.clone());
            async move {
                s.push(
                    ctx.trace_context()
                        .map(eventbus_core::TraceContext::traceparent),
                );
                let follow_up = Envelope::new(&envelope.aggregate_id, "FollowedUp", 1, &1)?;
                publisher
                    .publish_envelope(&to, &follow_up)
                    .await
                    .map_err(HandlerError::transient)
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let traced = envelope("agg-trace", 1).with_trace_id(TRACE);
    bus.publish_envelope(&first, &traced).await.unwrap();

    let handled = seen.wait_for("the handler ran", |e| !e.is_empty()).await;
    let incoming = eventbus_core::TraceContext::parse(handled[0].as_deref().unwrap()).unwrap();
    assert_eq!(incoming.trace_id(), TRACE);
    // The handler got the context the broker carried in `traceparent`, parent span included
    // (not one made up again from the envelope's trace ID).
    let sent = originals.wait_for("the original", |e| !e.is_empty()).await;
    let carried = eventbus_core::TraceContext::from_headers(&sent[0].headers)
        .expect("the original carries a traceparent")
        .unwrap();
    assert_eq!(carried, incoming);
    let out = follow_ups
        .wait_for("the follow-up", |e| !e.is_empty())
        .await;
    let outgoing = eventbus_core::TraceContext::from_headers(&out[0].headers)
        .expect("the follow-up carries a traceparent")
        .unwrap();
    assert_eq!(outgoing.trace_id(), TRACE);
    assert_ne!(
        outgoing.parent_id_bytes(),
        incoming.parent_id_bytes(),
        "the follow-up's parent is the span that published it"
    );
    assert_eq!(
        Envelope::from_bytes(&out[0].payload).unwrap().trace_id,
        TRACE
    );

    // A plain message's own context reaches its handler unchanged.
    let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let plain_seen = Recorder::<Option<String>>::new();
    let p = plain_seen.clone();
    let plain_topic = factory.topic("traceplain");
    bus.subscribe(
        &plain_topic,
        Arc::new(move |ctx: HandlerContext, _message: Message| {
            let p = p.clone();
            async move {
                p.push(
                    ctx.trace_context()
                        .map(eventbus_core::TraceContext::traceparent),
                );
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish(
        &plain_topic,
        OutboundMessage::new(&b"ping"[..])
            .with_key(&b"k"[..])
            .with_header(eventbus_core::TRACEPARENT, sent),
    )
    .await
    .unwrap();
    let got = plain_seen
        .wait_for("the plain handler ran", |e| !e.is_empty())
        .await;
    assert_eq!(got[0].as_deref(), Some(sent));
    bus.close().await.unwrap();
}

/// The `lag` line of a health report for `topic`, if it has one.
pub fn reported_lag(report: &eventbus_core::HealthReport, topic: &str) -> Option<u64> {
    let detail = report
        .components
        .iter()
        .find(|component| component.name == "lag")?
        .detail
        .as_deref()?;
    detail
        .split(", ")
        .find_map(|entry| entry.strip_prefix(&format!("{topic}: ")))
        .and_then(|lag| lag.parse().ok())
}

/// With the handler held on an aggregate's first event and more published than the engine
/// takes in, the health report's `lag` shows the backlog the broker holds for the subscription;
/// once the handler is released and the backlog handled, it falls to 0. (Backends with a
/// broker; the memory backend keeps no backlog outside the engine.)
pub async fn consumer_lag_shows_the_backlog_and_falls_to_zero_once_handled(
    factory: &dyn BusFactory,
) {
    let bus = factory
        .bus(Settings {
            pool_size: 2,
            inbox_size: 5,
            ..Settings::default()
        })
        .await;
    let topic = factory.topic("lag");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Recorder::<i64>::new();
    let (g, h) = (gate.clone(), handled.clone());
    bus.subscribe_envelope(
        &topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, h) = (g.clone(), h.clone());
            async move {
                if envelope.event_version == 1 {
                    g.acquire().await.map_err(HandlerError::transient)?.forget();
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let total = 200;
    for version in 1..=total {
        bus.publish_envelope(&topic, &envelope("agg-lag", version))
            .await
            .unwrap();
    }
    let backlog = |at_least: u64| {
        let bus = bus.clone();
        let topic = topic.clone();
        async move { reported_lag(&bus.health().await, &topic).is_some_and(|lag| lag >= at_least) }
    };
    eventually("a lag of at least 100 reported", || backlog(100)).await;
    gate.add_permits(1);
    handled
        .wait_for("every event handled", |e| e.len() == total as usize)
        .await;
    let caught_up = || {
        let bus = bus.clone();
        let topic = topic.clone();
        async move { reported_lag(&bus.health().await, &topic) == Some(0) }
    };
    eventually("the lag back to 0", caught_up).await;
    bus.close().await.unwrap();
}

/// Records every state `watch` moves to (its current one first), until the bus drops it.
pub fn record_connection_states(
    mut watch: eventbus_core::ConnectionWatch,
) -> Arc<Recorder<eventbus_core::ConnectionState>> {
    let states = Recorder::new();
    states.push(*watch.borrow_and_update());
    let recorded = states.clone();
    tokio::spawn(async move {
        while watch.changed().await.is_ok() {
            recorded.push(*watch.borrow_and_update());
        }
    });
    states
}

/// The connection state reads connected while the bus is open and closed once it is closed.
pub async fn the_connection_state_is_connected_while_open_and_closed_after_close(
    factory: &dyn BusFactory,
) {
    use eventbus_core::ConnectionState;
    let bus = factory.bus(Settings::default()).await;
    let states = record_connection_states(bus.connection_state());
    states
        .wait_for("connected", |e| {
            e.last() == Some(&ConnectionState::Connected)
        })
        .await;
    bus.close().await.unwrap();
    states
        .wait_for("closed", |e| e.last() == Some(&ConnectionState::Closed))
        .await;
    assert_eq!(*bus.connection_state().borrow(), ConnectionState::Closed);
}

/// What a fault test asks of its broker: [`pipelined_publishes_across_a_broker_restart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerAction {
    /// SIGKILL it.
    Kill,
    /// Start it again on the same store and port.
    StartAgain,
}

/// Is `position` after `before` in one aggregate's order: a higher stream sequence, or a higher
/// offset in the same partition.
fn position_rises(before: Option<&Position>, position: &Position) -> bool {
    match (before, position) {
        (None, Position::Sequence(_) | Position::Partition { .. }) => true,
        (Some(Position::Sequence(before)), Position::Sequence(now)) => now > before,
        (
            Some(Position::Partition {
                partition: before_partition,
                offset: before,
            }),
            Position::Partition { partition, offset },
        ) => partition == before_partition && offset > before,
        _ => false,
    }
}

/// Pipelined publishes across a broker killed and started again (`broker` does it): 20
/// aggregates' envelopes are started back to back, the broker is killed with them in flight,
/// more are started while it is down (it stays down until one has failed), and more once the
/// bus is healthy again. Every publish
/// handed over settles exactly once within the deadline, with the same outcome in its
/// `PendingPublish` and on the results stream, in start order (none lost to lag); what was
/// confirmed has positions rising in start order per aggregate, and is all consumed; and no
/// aggregate's stored events go backwards (a failure leaves a gap, never a reordering).
/// Returns how many were confirmed, how many failed, and how many were not handed over.
pub async fn pipelined_publishes_across_a_broker_restart(
    bus: Arc<dyn EventBus>,
    topic: &str,
    broker: &mut (dyn FnMut(BrokerAction) + Send),
) -> (usize, usize, usize) {
    let aggregates = 20;
    let results = Recorder::<PublishResult>::new();
    let mut stream = bus.publish_results();
    let reader = {
        let results = results.clone();
        tokio::spawn(async move {
            loop {
                match stream.recv().await {
                    Ok(result) => results.push(result),
                    Err(ResultsError::Closed) => return,
                    Err(lagged) => panic!("the results stream lost results: {lagged}"),
                }
            }
        })
    };
    let mut started: Vec<(Envelope, PendingPublish)> = Vec::new();
    let mut refused = 0;
    let mut start = async |versions: std::ops::RangeInclusive<i64>,
                           started: &mut Vec<(Envelope, PendingPublish)>| {
        for version in versions {
            for aggregate in 0..aggregates {
                let envelope = envelope(&format!("agg-{aggregate}"), version);
                match bus.start_publish_envelope(topic, &envelope).await {
                    Ok(pending) => started.push((envelope, pending)),
                    // Not handed over: no result is reported for it.
                    Err(_) => refused += 1,
                }
            }
        }
    };
    start(1..=10, &mut started).await;
    tokio::task::block_in_place(|| broker(BrokerAction::Kill));
    eventually("the bus to notice the broker is gone", || {
        let bus = bus.clone();
        async move { !bus.health().await.is_healthy() }
    })
    .await;
    start(11..=15, &mut started).await;
    // Down for longer than the publish timeout: some publishes fail for certain.
    results
        .wait_for("a publish to fail while the broker is down", |r| {
            r.iter().any(|result| result.outcome.is_err())
        })
        .await;
    tokio::task::block_in_place(|| broker(BrokerAction::StartAgain));
    eventually("the bus to recover by itself", || {
        let bus = bus.clone();
        async move { bus.health().await.is_healthy() }
    })
    .await;
    start(16..=25, &mut started).await;

    let mut outcomes = Vec::new();
    for (envelope, pending) in started {
        let outcome = tokio::time::timeout(DEADLINE, pending)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} v{} never settled",
                    envelope.aggregate_id, envelope.event_version
                )
            });
        outcomes.push((envelope, outcome));
    }
    let reported = results
        .wait_for("a result for every publish handed over", |r| {
            r.len() >= outcomes.len()
        })
        .await;
    assert_eq!(reported.len(), outcomes.len(), "a publish reported twice");
    let mut last: HashMap<String, Position> = HashMap::new();
    let mut confirmed = HashSet::new();
    for ((envelope, outcome), result) in outcomes.iter().zip(&reported) {
        assert_eq!(result.event_id.as_ref(), Some(&envelope.event_id));
        match (outcome, &result.outcome) {
            (Ok(position), Ok(reported)) => {
                assert_eq!(position, reported);
                assert!(
                    position_rises(last.get(&envelope.aggregate_id), position),
                    "{} v{} confirmed at {position:?} after {:?}",
                    envelope.aggregate_id,
                    envelope.event_version,
                    last.get(&envelope.aggregate_id)
                );
                last.insert(envelope.aggregate_id.clone(), *position);
                confirmed.insert((envelope.aggregate_id.clone(), envelope.event_version));
            }
            (Err(error), Err(failure)) => assert_eq!(error.kind(), failure.kind),
            (outcome, reported) => {
                panic!("the publish settled as {outcome:?}, its result as {reported:?}")
            }
        }
    }
    let failed = outcomes.len() - confirmed.len();

    let handled = record_versions(&*bus, topic, SubscribeOptions::new()).await;
    let events = handled
        .wait_for("every confirmed envelope consumed", |e| {
            let seen: HashSet<&(String, i64)> = e.iter().collect();
            confirmed.iter().all(|event| seen.contains(event))
        })
        .await;
    let mut newest: HashMap<&str, i64> = HashMap::new();
    let mut seen = HashSet::new();
    for (aggregate, version) in &events {
        if !seen.insert((aggregate, version)) {
            // A redelivery of an event already handled.
            continue;
        }
        let before = newest.insert(aggregate, *version).unwrap_or(0);
        assert!(
            *version > before,
            "{aggregate} v{version} stored after v{before}: {events:?}"
        );
    }
    bus.close().await.unwrap();
    reader.await.unwrap();
    (confirmed.len(), failed, refused)
}
