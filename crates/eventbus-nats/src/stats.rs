//! Counters of what the bus did besides handling: the transport's own, kept as numbers for
//! [`NatsStats`] and recorded as metrics under the bus's namespace, with the runtime's.

use std::sync::atomic::{AtomicU64, Ordering};

use eventbus_pool::consume::ConsumeStats;

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
    /// Undecodable envelopes with dead-lettering disabled, left for the server to redeliver.
    pub undeliverable: u64,
    /// Messages given back (nak) unhandled: queued at unsubscribe, unfinished at the drain
    /// deadline.
    pub given_back: u64,
}

/// One counter of the transport.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
    Redeliveries,
    FetchErrors,
}

/// The transport's counters.
pub(crate) struct Counters {
    redeliveries: (AtomicU64, metrics::Counter),
    fetch_errors: (AtomicU64, metrics::Counter),
}

impl Counters {
    pub(crate) fn new(namespace: &str) -> Self {
        let count = |suffix: &str| {
            (
                AtomicU64::new(0),
                metrics::counter!(format!("{namespace}_{suffix}")),
            )
        };
        Self {
            redeliveries: count("redeliveries_total"),
            fetch_errors: count("fetch_errors_total"),
        }
    }

    /// Adds `n` to `stat` and to its metric.
    pub(crate) fn add(&self, stat: Stat, n: u64) {
        let (cell, metric) = match stat {
            Stat::Redeliveries => &self.redeliveries,
            Stat::FetchErrors => &self.fetch_errors,
        };
        cell.fetch_add(n, Ordering::Relaxed);
        metric.increment(n);
    }

    /// The transport's counters with the runtime's.
    pub(crate) fn snapshot(&self, runtime: &ConsumeStats) -> NatsStats {
        NatsStats {
            redeliveries: self.redeliveries.0.load(Ordering::Relaxed),
            redeliveries_dropped: runtime.redeliveries_dropped,
            progress_acks: runtime.progress_signals,
            fetch_errors: self.fetch_errors.0.load(Ordering::Relaxed),
            dead_lettered: runtime.dead_lettered,
            dead_letter_failures: runtime.dead_letter_failures,
            undeliverable: runtime.undeliverable,
            given_back: runtime.given_back,
        }
    }
}
