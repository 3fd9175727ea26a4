//! Counters of what the runtime did besides handling, kept as numbers and recorded as metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge, counter, gauge};

/// What a [`Runtime`](super::Runtime) did besides handling messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ConsumeStats {
    /// Messages written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Dead-letter writes that failed and were retried.
    pub dead_letter_failures: u64,
    /// Messages whose dead-letter write is failing now (their aggregates wait).
    pub dead_letters_waiting: u64,
    /// Acks, terminates and in-progress signals that failed (acks and terminates are retried).
    pub settle_failures: u64,
    /// Messages given back to the broker unhandled (unsubscribed, or past the drain deadline).
    pub given_back: u64,
    /// Undecodable envelopes of subscriptions without a dead-letter topic, left to the broker.
    pub undeliverable: u64,
    /// Redelivered copies of messages still held, dropped.
    pub redeliveries_dropped: u64,
    /// In-progress signals sent for held messages.
    pub progress_signals: u64,
    /// Handler attempts that outlived their handler timeout (their cancellation token fired).
    pub handler_timeouts: u64,
    /// Handlers past their timeout that did not return within the grace period after their
    /// token fired, and were dropped.
    pub handlers_dropped: u64,
}

/// How a consumed message ended, the `outcome` label of `consumed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Consumption {
    /// Handled and acknowledged.
    Handled,
    /// A plain message whose handler failed or panicked, acknowledged (at-most-once).
    Failed,
    /// Written to its dead-letter topic, then terminated.
    DeadLettered,
    /// Given back to the broker unhandled.
    GivenBack,
    /// Undecodable with nowhere to send it: left to the broker.
    Abandoned,
}

impl Consumption {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Consumption::Handled => "handled",
            Consumption::Failed => "failed",
            Consumption::DeadLettered => "dead_lettered",
            Consumption::GivenBack => "given_back",
            Consumption::Abandoned => "abandoned",
        }
    }
}

/// `{namespace}_consumed_total{topic, outcome}` of one subscription's topic.
pub(crate) struct Consumed([Counter; 5]);

impl Consumed {
    pub(crate) fn new(namespace: &str, topic: &str) -> Self {
        let name = format!("{namespace}_consumed_total");
        Self(
            [
                Consumption::Handled,
                Consumption::Failed,
                Consumption::DeadLettered,
                Consumption::GivenBack,
                Consumption::Abandoned,
            ]
            .map(|outcome| {
                counter!(name.clone(), "topic" => topic.to_owned(), "outcome" => outcome.label())
            }),
        )
    }

    pub(crate) fn count(&self, outcome: Consumption) {
        let [handled, failed, dead_lettered, given_back, abandoned] = &self.0;
        match outcome {
            Consumption::Handled => handled,
            Consumption::Failed => failed,
            Consumption::DeadLettered => dead_lettered,
            Consumption::GivenBack => given_back,
            Consumption::Abandoned => abandoned,
        }
        .increment(1);
    }
}

/// The counters and their metrics, under `{namespace}_`.
pub(crate) struct Counters {
    dead_lettered: (AtomicU64, Counter),
    dead_letter_failures: (AtomicU64, Counter),
    dead_letters_waiting: (AtomicU64, Gauge),
    settle_failures: (AtomicU64, Counter),
    given_back: (AtomicU64, Counter),
    undeliverable: (AtomicU64, Counter),
    redeliveries_dropped: (AtomicU64, Counter),
    progress_signals: (AtomicU64, Counter),
    handler_timeouts: (AtomicU64, Counter),
    handlers_dropped: (AtomicU64, Counter),
}

/// One counter of [`Counters`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stat {
    DeadLettered,
    DeadLetterFailures,
    SettleFailures,
    GivenBack,
    Undeliverable,
    RedeliveriesDropped,
    ProgressSignals,
    HandlerTimeouts,
    HandlersDropped,
}

impl Counters {
    pub(crate) fn new(namespace: &str) -> Self {
        let name = |suffix: &str| format!("{namespace}_{suffix}");
        let count = |suffix: &str| (AtomicU64::new(0), counter!(name(suffix)));
        Self {
            // Counted with the engine's series, under the Go SDK's name.
            dead_lettered: count("actor_pool_dead_letters_total"),
            dead_letter_failures: count("dead_letter_failures_total"),
            dead_letters_waiting: (AtomicU64::new(0), gauge!(name("dead_letters_waiting"))),
            settle_failures: count("settle_failures_total"),
            given_back: count("given_back_total"),
            undeliverable: count("undeliverable_total"),
            redeliveries_dropped: count("redeliveries_dropped_total"),
            progress_signals: count("progress_acks_total"),
            handler_timeouts: count("handler_timeouts_total"),
            handlers_dropped: count("handlers_dropped_total"),
        }
    }

    fn cell(&self, stat: Stat) -> &(AtomicU64, Counter) {
        match stat {
            Stat::DeadLettered => &self.dead_lettered,
            Stat::DeadLetterFailures => &self.dead_letter_failures,
            Stat::SettleFailures => &self.settle_failures,
            Stat::GivenBack => &self.given_back,
            Stat::Undeliverable => &self.undeliverable,
            Stat::RedeliveriesDropped => &self.redeliveries_dropped,
            Stat::ProgressSignals => &self.progress_signals,
            Stat::HandlerTimeouts => &self.handler_timeouts,
            Stat::HandlersDropped => &self.handlers_dropped,
        }
    }

    /// Adds `n` to `stat` and its metric.
    pub(crate) fn add(&self, stat: Stat, n: u64) {
        let (cell, metric) = self.cell(stat);
        cell.fetch_add(n, Ordering::Relaxed);
        metric.increment(n);
    }

    /// A message's dead-letter write started failing (`true`) or ended after failing.
    pub(crate) fn dead_letter_waiting(&self, waiting: bool) {
        let (cell, gauge) = &self.dead_letters_waiting;
        let now = if waiting {
            cell.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            cell.fetch_sub(1, Ordering::SeqCst) - 1
        };
        gauge.set(now as f64);
    }

    pub(crate) fn dead_letters_waiting(&self) -> u64 {
        self.dead_letters_waiting.0.load(Ordering::SeqCst)
    }

    pub(crate) fn snapshot(&self) -> ConsumeStats {
        let get = |stat| self.cell(stat).0.load(Ordering::Relaxed);
        ConsumeStats {
            dead_lettered: get(Stat::DeadLettered),
            dead_letter_failures: get(Stat::DeadLetterFailures),
            dead_letters_waiting: self.dead_letters_waiting(),
            settle_failures: get(Stat::SettleFailures),
            given_back: get(Stat::GivenBack),
            undeliverable: get(Stat::Undeliverable),
            redeliveries_dropped: get(Stat::RedeliveriesDropped),
            progress_signals: get(Stat::ProgressSignals),
            handler_timeouts: get(Stat::HandlerTimeouts),
            handlers_dropped: get(Stat::HandlersDropped),
        }
    }
}
