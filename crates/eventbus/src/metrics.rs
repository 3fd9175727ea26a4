//! Serving the metrics to Prometheus.

use std::net::SocketAddr;

use eventbus_core::Error;
use metrics_exporter_prometheus::PrometheusBuilder;

/// Installs the process-wide Prometheus recorder and serves it over HTTP on `listen` (any path,
/// e.g. `/metrics`). Call it once, inside a tokio runtime, before connecting buses: metric handles
/// are registered when a bus is created.
///
/// Fails with [`Error::Config`] (field `metrics.listen`) if a recorder is already installed or
/// the address cannot be bound.
pub fn serve_metrics(listen: SocketAddr) -> Result<(), Error> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .map_err(|error| Error::config("metrics.listen", format!("{listen}: {error}")))?;
    tracing::info!(%listen, "serving Prometheus metrics");
    Ok(())
}
