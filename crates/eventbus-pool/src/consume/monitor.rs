//! The runtime's monitor: samples what is not counted as it happens (lane ages, consumer lag)
//! into gauges, once per [`MONITOR_INTERVAL`].

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::{Gauge, gauge};

use super::Shared;

/// How often the monitor samples.
pub const MONITOR_INTERVAL: Duration = Duration::from_secs(1);

/// Starts the monitor of `shared`; it ends when the runtime closes or is dropped.
pub(crate) fn start(shared: &Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let stop = shared.monitor.clone();
    let weak = Arc::downgrade(shared);
    let namespace = shared.settings.metrics_namespace.clone();
    tokio::spawn(async move {
        let mut gauges = Gauges::new(&namespace);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(MONITOR_INTERVAL) => {}
            }
            if !gauges.sample(&weak) {
                break;
            }
        }
        gauges.clear();
    })
}

struct Gauges {
    namespace: String,
    oldest: Gauge,
    blocked: Gauge,
    lag: HashMap<String, Gauge>,
}

impl Gauges {
    fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            oldest: gauge!(format!("{namespace}_oldest_job_age_seconds")),
            blocked: gauge!(format!("{namespace}_lanes_blocked")),
            lag: HashMap::new(),
        }
    }

    /// Sets every gauge to 0: the runtime closed, and a frozen last value would read as a
    /// blocked lane or a lag that no longer exists.
    fn clear(&self) {
        self.oldest.set(0.0);
        self.blocked.set(0.0);
        for gauge in self.lag.values() {
            gauge.set(0.0);
        }
    }

    /// Samples the runtime; `false` once it is gone.
    fn sample(&mut self, runtime: &Weak<Shared>) -> bool {
        let Some(runtime) = runtime.upgrade() else {
            return false;
        };
        let ages = runtime.lane_ages();
        self.oldest
            .set(ages.oldest.unwrap_or_default().as_secs_f64());
        self.blocked.set(ages.blocked as f64);
        let lag = runtime.lag();
        // A topic no longer consumed reads 0 rather than its last lag.
        for (topic, gauge) in &self.lag {
            if !lag.contains_key(topic) {
                gauge.set(0.0);
            }
        }
        for (topic, value) in lag {
            let namespace = &self.namespace;
            self.lag
                .entry(topic)
                .or_insert_with_key(
                    |topic| gauge!(format!("{namespace}_consumer_lag"), "topic" => topic.clone()),
                )
                .set(value as f64);
        }
        true
    }
}
