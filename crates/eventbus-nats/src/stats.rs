//! Counters of what the bus did besides handling: kept as numbers for [`NatsStats`] and
//! recorded as metrics under the bus's namespace.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a [`NatsBus`](crate::NatsBus) did besides handling messages, since it connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NatsStats {
    /// Deliveries the server marked as redeliveries.
    pub redeliveries: u64,
    /// Redelivered copies of messages still held, dropped.
    pub redeliveries_dropped: u64,
    /// In-progress acks sent for held messages.
    pub progress_acks: u64,
    /// Pull requests that failed (the loop backs off and retries).
    pub fetch_errors: u64,
    /// Messages written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Dead-letter writes that failed and were retried.
    pub dead_letter_failures: u64,
    /// Exhausted envelopes with dead-lettering disabled, left for the server to redeliver.
    pub undeliverable: u64,
}

/// One counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
    Redeliveries,
    RedeliveriesDropped,
    ProgressAcks,
    FetchErrors,
    DeadLettered,
    DeadLetterFailures,
    Undeliverable,
}

impl Stat {
    /// The metric name after the namespace.
    fn metric(self) -> &'static str {
        match self {
            Stat::Redeliveries => "redeliveries_total",
            Stat::RedeliveriesDropped => "redeliveries_dropped_total",
            Stat::ProgressAcks => "progress_acks_total",
            Stat::FetchErrors => "fetch_errors_total",
            // Counted with the engine's series, as the memory backend does.
            Stat::DeadLettered => "actor_pool_dead_letters_total",
            Stat::DeadLetterFailures => "dead_letter_failures_total",
            Stat::Undeliverable => "undeliverable_total",
        }
    }
}

/// The bus's counters.
pub(crate) struct Counters {
    namespace: String,
    redeliveries: AtomicU64,
    redeliveries_dropped: AtomicU64,
    progress_acks: AtomicU64,
    fetch_errors: AtomicU64,
    dead_lettered: AtomicU64,
    dead_letter_failures: AtomicU64,
    undeliverable: AtomicU64,
}

impl Counters {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            redeliveries: AtomicU64::new(0),
            redeliveries_dropped: AtomicU64::new(0),
            progress_acks: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            dead_letter_failures: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
        }
    }

    fn cell(&self, stat: Stat) -> &AtomicU64 {
        match stat {
            Stat::Redeliveries => &self.redeliveries,
            Stat::RedeliveriesDropped => &self.redeliveries_dropped,
            Stat::ProgressAcks => &self.progress_acks,
            Stat::FetchErrors => &self.fetch_errors,
            Stat::DeadLettered => &self.dead_lettered,
            Stat::DeadLetterFailures => &self.dead_letter_failures,
            Stat::Undeliverable => &self.undeliverable,
        }
    }

    /// Adds `n` to `stat` and to its metric.
    pub(crate) fn add(&self, stat: Stat, n: u64) {
        self.cell(stat).fetch_add(n, Ordering::Relaxed);
        metrics::counter!(format!("{}_{}", self.namespace, stat.metric())).increment(n);
    }

    pub(crate) fn snapshot(&self) -> NatsStats {
        let get = |stat| self.cell(stat).load(Ordering::Relaxed);
        NatsStats {
            redeliveries: get(Stat::Redeliveries),
            redeliveries_dropped: get(Stat::RedeliveriesDropped),
            progress_acks: get(Stat::ProgressAcks),
            fetch_errors: get(Stat::FetchErrors),
            dead_lettered: get(Stat::DeadLettered),
            dead_letter_failures: get(Stat::DeadLetterFailures),
            undeliverable: get(Stat::Undeliverable),
        }
    }
}
