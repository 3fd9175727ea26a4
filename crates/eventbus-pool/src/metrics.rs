//! The pool's metrics, under the caller's namespace.

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Handles to every metric of one pool, registered once at creation.
///
/// Names keep the Go SDK's (`{ns}_actor_pool_*`) and add lanes, in-flight and retries. No label
/// carries an aggregate ID.
pub(crate) struct PoolMetrics {
    pub(crate) sent: Counter,
    pub(crate) succeeded: Counter,
    pub(crate) failed: Counter,
    pub(crate) latency: Histogram,
    pub(crate) depth: Gauge,
    pub(crate) utilization: Gauge,
    pub(crate) restarted: Counter,
    pub(crate) lanes: Gauge,
    pub(crate) in_flight: Gauge,
    pub(crate) retries: Counter,
    pub(crate) stalled: Gauge,
}

impl PoolMetrics {
    pub(crate) fn new(namespace: &str) -> Self {
        let name = |suffix: &str| format!("{namespace}_actor_pool_{suffix}");
        Self {
            sent: counter!(name("messages_sent_total")),
            succeeded: counter!(name("messages_processed_total"), "success" => "true"),
            failed: counter!(name("messages_processed_total"), "success" => "false"),
            latency: histogram!(name("message_latency_seconds")),
            depth: gauge!(name("inbox_depth")),
            utilization: gauge!(name("inbox_utilization")),
            restarted: counter!(name("actor_restarted_total")),
            lanes: gauge!(name("lanes_active")),
            in_flight: gauge!(name("in_flight")),
            retries: counter!(name("retries_total")),
            stalled: gauge!(name("stalled")),
        }
    }
}
