//! The consume runtime: the one consume path of every backend.
//!
//! A backend is a transport ([`crate::transport`]): it fetches messages, hands each to
//! [`Consumer::deliver`] with a [`Receipt`] (how to ack, give back, terminate or mark in
//! progress), and writes dead letters through its [`DeadLetterWriter`]. Everything in between
//! happens here, once:
//!
//! - envelope decode and aggregate-ID extraction (`eventbus_core::extract_aggregate_id`);
//! - observing: a `consume` span per message (topic, position, aggregate, event type and ID,
//!   trace ID, attempt, outcome), its W3C trace context made current while the handler runs
//!   ([`current_trace_context`]), and `consumed_total{topic,outcome}`;
//! - the attempts: the handler, retried in the aggregate's lane by the engine, under the
//!   subscription's handler timeout (a message's attempts and its settlement are one engine job
//!   object, one allocation per message);
//! - settlement inside the lane, before the aggregate's next message starts: ack; or the
//!   dead-letter write, retried with backoff while it fails (the lane waits), then terminate;
//!   a subscription without a dead-letter topic keeps retrying an exhausted envelope (the
//!   aggregate waits; the engine counts it as stalled) instead of giving up its order;
//! - the registry of held messages, for in-progress signals and for dropping a broker's
//!   redelivered copy of a message still held;
//! - unsubscribe ([`Consumer::close`]): the subscription's scope is closed, its queued messages
//!   are given back in lane order, its running ones finish up to the drain timeout;
//! - close ([`Runtime::close`]): everything drains up to a deadline, the rest is given back.
//!
//! Publishing goes through the runtime too ([`Runtime::publish_envelope`], [`Runtime::publish`]):
//! a `publish` span, the trace context written as `traceparent`, and `published_total` and
//! `publish_duration_seconds` per topic, around the backend's own send.
//!
//! # Example
//!
//! A transport that keeps what it is told, as a test double would:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use eventbus_core::{async_trait, Envelope, Error, HandlerContext, Message, OutboundMessage};
//! use eventbus_pool::BusSettings;
//! use eventbus_pool::consume::{Runtime, SubscriptionSpec};
//! use eventbus_pool::transport::{DeadLetterWriter, Delivery, Handler, Outgoing, Receipt};
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<String>>);
//!
//! #[async_trait]
//! impl DeadLetterWriter for Log {
//!     async fn publish_dead_letter(&self, letter: Outgoing<'_>) -> Result<(), Error> {
//!         self.0.lock().unwrap().push(format!("dead letter to {}", letter.topic));
//!         Ok(())
//!     }
//! }
//!
//! struct Acks(Arc<Log>);
//!
//! #[async_trait]
//! impl Receipt for Acks {
//!     async fn ack(&self) -> Result<(), Error> { self.0.0.lock().unwrap().push("ack".into()); Ok(()) }
//!     async fn give_back(&self) -> Result<(), Error> { Ok(()) }
//!     async fn terminate(&self) -> Result<(), Error> { Ok(()) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let log = Arc::new(Log::default());
//! let runtime = Runtime::new(BusSettings::new("example", "svc"), log.clone())?;
//! let handler = Handler::Envelope(Arc::new(|_ctx: HandlerContext, envelope: Envelope| async move {
//!     assert_eq!(envelope.aggregate_id, "order-1");
//!     Ok(())
//! }));
//! let consumer = runtime.subscribe(SubscriptionSpec::new("orders", "example", handler))?;
//! let envelope = Envelope::new("order-1", "OrderPlaced", 1, &1)?;
//! let message = Message::new("orders", envelope.to_bytes()?);
//! consumer.deliver(Delivery { message, receipt: Arc::new(Acks(log.clone())), held_id: None }).await?;
//! runtime.close(tokio::time::Instant::now() + Duration::from_secs(5)).await;
//! assert_eq!(*log.0.lock().unwrap(), ["ack"]);
//! # Ok(())
//! # }
//! ```
//!
//! [`Receipt`]: crate::transport::Receipt
//! [`DeadLetterWriter`]: crate::transport::DeadLetterWriter

mod consumer;
mod monitor;
mod park;
mod publish;
mod settle;
mod stats;
mod trace;

use eventbus_core::{CancellationToken, DeadLetterStore, Error, HealthReport, HealthStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

pub use consumer::{CANCEL_GRACE_MAX, Consumer, Delivered, SubscriptionSpec};
pub use monitor::MONITOR_INTERVAL;
pub use stats::ConsumeStats;
pub use trace::{TracePropagation, current_trace_context, set_trace_propagation};

use crate::transport::DeadLetterWriter;
use crate::{BusSettings, LaneAges, Pool, PoolStats, ShutdownReport};
use publish::{Pipeline, PublishMetrics};
use stats::Counters;

/// The consume runtime of one bus: the engine, the backend's dead-letter writer, and the
/// subscriptions.
pub struct Runtime {
    shared: Arc<Shared>,
}

/// What the runtime's consumers share.
pub(crate) struct Shared {
    settings: BusSettings,
    pub(crate) pool: Pool,
    pub(crate) dead_letters: Arc<dyn DeadLetterWriter>,
    /// How settling is retried (`BusSettings::settlement`).
    pub(crate) settlement: eventbus_core::Backoff,
    pub(crate) counters: Counters,
    published: PublishMetrics,
    pipeline: Pipeline,
    /// The tokio runtime the bus started on: where a consumer made on a backend's own thread
    /// (Kafka's poll thread) spawns its tasks.
    pub(crate) handle: tokio::runtime::Handle,
    /// Ends the monitor task.
    monitor: CancellationToken,
    monitor_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    consumers: Mutex<Vec<Arc<Consumer>>>,
    /// The parked aggregates of each park group, while a subscription of it lives.
    parking_groups: Mutex<HashMap<String, Weak<park::Parking>>>,
}

impl Shared {
    /// The parked aggregates of a new parking subscription: its group's (made if none of the
    /// group lives), or its own.
    pub(crate) fn parking_of(&self, group: Option<&str>) -> Arc<park::Parking> {
        let Some(group) = group else {
            return Arc::default();
        };
        // Nothing panics while holding this lock.
        let mut groups = self
            .parking_groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        groups.retain(|_, parking| parking.strong_count() > 0);
        if let Some(parking) = groups.get(group).and_then(Weak::upgrade) {
            return parking;
        }
        let parking = Arc::new(park::Parking::default());
        groups.insert(group.to_owned(), Arc::downgrade(&parking));
        parking
    }

    fn lag(&self) -> BTreeMap<String, u64> {
        let mut lag = BTreeMap::new();
        for consumer in self.consumers().iter() {
            if let Some(reported) = consumer.lag() {
                *lag.entry(consumer.spec().topic.clone()).or_default() += reported;
            }
        }
        lag
    }

    fn lane_ages(&self) -> LaneAges {
        self.pool.lane_ages(self.settings.lane_blocked_after)
    }

    fn consumers(&self) -> MutexGuard<'_, Vec<Arc<Consumer>>> {
        // Nothing panics while holding this lock.
        self.consumers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Runtime {
    /// Starts the engine of `settings.pool` on the current tokio runtime, with metrics under
    /// `settings.metrics_namespace`; dead letters go out through `dead_letters`. Fails with a
    /// `Config` error naming the first bad setting.
    pub fn new(
        settings: BusSettings,
        dead_letters: Arc<dyn DeadLetterWriter>,
    ) -> Result<Self, Error> {
        settings.validate()?;
        let settlement = settings.settlement;
        let pool =
            Pool::with_metrics_namespace(settings.pool.clone(), &settings.metrics_namespace)?;
        let counters = Counters::new(&settings.metrics_namespace);
        let published = PublishMetrics::new(&settings.metrics_namespace);
        let handle = tokio::runtime::Handle::current();
        let pipeline = Pipeline::start(settings.publish_max_in_flight, &handle);
        let runtime = Self {
            shared: Arc::new(Shared {
                settings,
                pool,
                dead_letters,
                settlement,
                counters,
                published,
                pipeline,
                handle,
                monitor: CancellationToken::new(),
                monitor_task: Mutex::new(None),
                consumers: Mutex::new(Vec::new()),
                parking_groups: Mutex::new(HashMap::new()),
            }),
        };
        let task = monitor::start(&runtime.shared);
        *runtime
            .shared
            .monitor_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task);
        Ok(runtime)
    }

    /// The settings the runtime was started with (client ID, drain timeout, ...).
    pub fn settings(&self) -> &BusSettings {
        &self.shared.settings
    }

    /// Where the bus's dead letters are read back and removed, when its backend keeps them
    /// ([`DeadLetterWriter::store`]).
    pub fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        self.shared.dead_letters.store()
    }

    /// Starts consuming for one subscription: a scope of the engine, a registry of held
    /// messages and, when `spec` asks, a task sending in-progress signals. Fails with `Closed`
    /// once the runtime is closing.
    pub fn subscribe(&self, spec: SubscriptionSpec) -> Result<Arc<Consumer>, Error> {
        let consumer = Consumer::start(&self.shared, spec)?;
        self.shared.consumers().push(consumer.clone());
        Ok(consumer)
    }

    /// The engine's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.shared.pool.stats()
    }

    /// What the runtime did besides handling.
    pub fn stats(&self) -> ConsumeStats {
        self.shared.counters.snapshot()
    }

    /// Subscriptions consuming now.
    pub fn subscriptions(&self) -> usize {
        self.shared.consumers().len()
    }

    /// Consumer lag per topic: the sum of what its subscriptions reported
    /// ([`Consumer::report_lag`]); topics whose consumers reported nothing yet are left out.
    pub fn lag(&self) -> BTreeMap<String, u64> {
        self.shared.lag()
    }

    /// How long the aggregates' current jobs have been going, with lanes blocked past the
    /// settings' `lane_blocked_after`.
    pub fn lane_ages(&self) -> LaneAges {
        self.shared.lane_ages()
    }

    /// Adds what every backend's health report says about the runtime:
    ///
    /// - `engine`: `Degraded` while an aggregate waits on a message that has nowhere to go
    ///   (retried past its attempts, or a dead letter the broker does not accept), or a lane is
    ///   blocked longer than `lane_blocked_after`; the detail has the counts and the oldest
    ///   job's age;
    /// - `lag`: the consumer lag per topic (always `Healthy`: lag alone is no fault).
    pub fn add_health(&self, report: HealthReport) -> HealthReport {
        let pool = self.shared.pool.stats();
        let waiting = self.shared.counters.dead_letters_waiting();
        let ages = self.lane_ages();
        let status = if pool.stalled > 0 || waiting > 0 || ages.blocked > 0 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        let oldest = ages.oldest.map_or_else(
            || "none".to_owned(),
            |age| format!("{:.1} s", age.as_secs_f64()),
        );
        // A park group's subscriptions share their parked aggregates: counted once.
        let mut counted = std::collections::HashSet::new();
        let parked: usize = self
            .shared
            .consumers()
            .iter()
            .filter_map(|consumer| consumer.parking())
            .filter(|parking| counted.insert(Arc::as_ptr(parking)))
            .map(|parking| parking.len())
            .sum();
        let engine = format!(
            "{pool}, {waiting} waiting on a dead-letter write, {} lanes blocked longer than {:?}, oldest job {oldest}, {parked} aggregates parked",
            ages.blocked, self.shared.settings.lane_blocked_after
        );
        let lag = self.lag();
        let lag = if lag.is_empty() {
            "not reported yet".to_owned()
        } else {
            lag.iter()
                .map(|(topic, lag)| format!("{topic}: {lag}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        report
            .with_component("engine", status, Some(engine))
            .with_component("lag", HealthStatus::Healthy, Some(lag))
    }

    /// Closes the runtime: no new delivery is accepted, queued and running messages are
    /// handled until `deadline`, then the rest is cancelled and given back in lane order;
    /// returns when every task of the runtime has ended (progress tasks and the monitor
    /// included).
    ///
    /// # Cancel safety
    ///
    /// Intake stops at the first poll. If the future is dropped during the drain, the engine
    /// keeps draining; dropping the `Runtime` then cancels what is left.
    pub async fn close(&self, deadline: tokio::time::Instant) -> ShutdownReport {
        self.shared.monitor.cancel();
        self.shared.pipeline.close(deadline).await;
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let report = self.shared.pool.shutdown(remaining).await;
        let consumers: Vec<Arc<Consumer>> = self.shared.consumers().drain(..).collect();
        for consumer in consumers {
            consumer.stop_progress().await;
        }
        let monitor = self
            .shared
            .monitor_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(monitor) = monitor {
            let _ = monitor.await;
        }
        report
    }
}

impl Drop for Runtime {
    /// A runtime dropped without [`close`](Runtime::close) ends its progress tasks; dropping
    /// the engine cancels what it still holds.
    fn drop(&mut self) {
        self.shared.monitor.cancel();
        for consumer in self.shared.consumers().drain(..) {
            consumer.abort_progress();
        }
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("pool", &self.shared.pool.stats())
            .field("subscriptions", &self.subscriptions())
            .finish_non_exhaustive()
    }
}
