//! Serving the metrics to Prometheus.

use std::net::SocketAddr;

use eventbus_core::Error;
use metrics_exporter_prometheus::PrometheusBuilder;

/// The upper bounds, in seconds, of the buckets of every histogram the bus records: a handler
/// attempt (`actor_pool_message_latency_seconds`) and a publish until the broker acknowledged it
/// (`publish_duration_seconds`). From 100 µs (an in-memory publish, a handler doing no I/O) to
/// 30 s (a publish retried through a broker outage, a handler near its timeout), three a decade
/// (1, 2.5, 5), so `histogram_quantile` interpolates within a factor of about 2.5; slower ones
/// land in `+Inf`. 17 bounds and `+Inf`: with `_sum` and `_count`, 20 series per histogram and
/// label set.
const LATENCY_BUCKETS: [f64; 17] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the process-wide Prometheus recorder and serves it over HTTP on `listen` (any path,
/// e.g. `/metrics`). Call it once, inside a tokio runtime, before connecting buses: metric handles
/// are registered when a bus is created.
///
/// Every histogram is served as a Prometheus **histogram** (`# TYPE … histogram`, with `_bucket`,
/// `_sum` and `_count` series), not as a summary: buckets can be summed over instances and topics
/// and read with `histogram_quantile`, as the example dashboard does, where a summary's
/// quantiles cannot be aggregated. The bucket bounds are the same for every histogram (all of
/// them are durations): 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
/// 0.25, 0.5, 1, 2.5, 5, 10 and 30 seconds, then `+Inf`, which covers latencies from about
/// 100 µs to 30 s.
///
/// This is the one place of the workspace that installs a Prometheus exporter: the `eventbus`
/// CLI (`--metrics-listen`, `metrics.listen`) and the tests serve metrics through it.
///
/// Fails with [`Error::Config`] (field `metrics.listen`) if a recorder is already installed or
/// the address cannot be bound.
pub fn serve_metrics(listen: SocketAddr) -> Result<(), Error> {
    PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)
        .map_err(|error| Error::config("metrics.listen", format!("histogram buckets: {error}")))?
        .with_http_listener(listen)
        .install()
        .map_err(|error| Error::config("metrics.listen", format!("{listen}: {error}")))?;
    tracing::info!(%listen, "serving Prometheus metrics");
    Ok(())
}
