//! Domain events handled **in order per aggregate, concurrently across aggregates, without
//! losing any**: the one crate a service needs.
//!
//! [`connect`] builds a bus from a [`Config`] (defaults, a TOML or YAML file, `EVENTBUS_*`
//! environment overrides); every method of the [`Bus`] is called on it directly, with no trait
//! to import. Envelopes are delivered at-least-once, retried inside their aggregate's lane by
//! the subscription's [`RetryPolicy`] and dead-lettered to `{topic}.DLQ` when they keep
//! failing; a [`Router`] hands each event type to its own typed handler; plain messages are
//! at-most-once. The contract is in [docs/semantics.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/semantics.md).
//!
//! ```
//! use std::sync::Arc;
//! use eventbus::{Config, Envelope, HandlerContext, RetryPolicy, Router, SubscribeOptions};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { total_cents: u64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventbus::Error> {
//! let bus = eventbus::connect(Config::default()).await?;
//! let orders = Router::new().route("OrderPlaced", |_ctx: HandlerContext, envelope: Envelope, order: OrderPlaced| async move {
//!     println!("{} placed for {} cents", envelope.aggregate_id, order.total_cents);
//!     Ok(())
//! })?;
//! let options = SubscribeOptions::new().with_retry(RetryPolicy::new().with_max_attempts(5));
//! bus.subscribe_envelope("orders", Arc::new(orders), options).await?;
//! bus.publish_envelope("orders", &Envelope::new("order-42", "OrderPlaced", 1, &OrderPlaced { total_cents: 1250 })?)
//!     .await?;
//! bus.close().await?; // drains in-flight handlers first
//! # Ok(())
//! # }
//! ```
//!
//! Backends are cargo features, one per backend, each selected at run time by `type` in the
//! configuration:
//!
//! | feature | backend | configuration |
//! |---|---|---|
//! | `memory` (default) | in process (`eventbus-memory`): the demo, tests, in-process events | top-level settings only |
//! | `nats` | NATS JetStream (`eventbus-nats`, async-nats) | the `[nats]` section |
//! | `kafka` | Apache Kafka (`eventbus-kafka`, rdkafka with librdkafka built from source) | the `[kafka]` section |
//!
//! Two more features: `prometheus` (default), the exporter behind [`serve_metrics`] and
//! `metrics.listen`; `opentelemetry`, trace context through OpenTelemetry.
//!
//! Every backend runs the same consume runtime (`eventbus_pool::consume`), so the delivery
//! contract is the same on each. Metrics go through the `metrics` facade under
//! `{type}_eventbus_{client_id}`; [`serve_metrics`] (or `metrics.listen` in the config) serves
//! them for Prometheus (feature `prometheus`, on by default).

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod heartbeat;
#[cfg(feature = "prometheus")]
mod metrics;
#[cfg(feature = "opentelemetry")]
#[cfg_attr(docsrs, doc(cfg(feature = "opentelemetry")))]
pub mod opentelemetry;
mod typed;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

pub use config::{Backend, Config, MetricsSection, PoolSection, RetrySection};
pub use eventbus_core::*;
/// The Kafka backend (feature `kafka`): its configuration types are the `[kafka]` section.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use eventbus_kafka as kafka;
/// The NATS backend (feature `nats`): its configuration types are the `[nats]` section.
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub use eventbus_nats as nats;
pub use eventbus_pool::{BusSettings, PoolConfig};
pub use heartbeat::{HeartbeatOptions, HeartbeatStatus, Heartbeats, Severity};
#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub use metrics::serve_metrics;
pub use typed::EventBusExt;

/// Metric namespaces of the buses alive in this process.
static NAMESPACES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Holds a metric namespace for one bus (the bus keeps it: [`TransportBus::holding`](eventbus_pool::TransportBus::holding));
/// two live buses never share one, so their metrics never mix.
struct Namespace(String);

impl Namespace {
    fn claim(namespace: String) -> Result<Self, Error> {
        let mut taken = NAMESPACES.lock().unwrap_or_else(PoisonError::into_inner);
        if !taken
            .get_or_insert_with(HashSet::new)
            .insert(namespace.clone())
        {
            return Err(Error::config(
                "client_id",
                format!(
                    "another bus in this process already uses the metrics namespace {namespace}; give each bus its own client_id"
                ),
            ));
        }
        Ok(Self(namespace))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let mut taken = NAMESPACES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(taken) = taken.as_mut() {
            taken.remove(&self.0);
        }
    }
}

/// The bus every backend is, its transport boxed: what [`Bus`] dereferences to.
pub type AnyBus = eventbus_pool::TransportBus<Box<dyn eventbus_pool::transport::Transport>>;

/// A connected bus: the configured backend's bus.
///
/// `Bus` dereferences to [`AnyBus`], so every method of the bus (publishing, subscribing,
/// health, close, the dead-letter store and topic administration) is called on it directly,
/// with no trait to import. [`as_event_bus`](Self::as_event_bus) gives the bus as an
/// [`EventBus`] trait object to share.
pub struct Bus {
    backend: Backend,
    /// Holds the claim of its metrics namespace.
    inner: Arc<AnyBus>,
}

impl Bus {
    /// The backend this bus runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The bus as a shareable trait object.
    pub fn as_event_bus(&self) -> Arc<dyn EventBus> {
        self.inner.clone()
    }
}

impl std::ops::Deref for Bus {
    type Target = AnyBus;

    fn deref(&self) -> &AnyBus {
        &self.inner
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("backend", &self.backend)
            .field(
                "metrics_namespace",
                &self.inner.runtime().settings().metrics_namespace,
            )
            .finish_non_exhaustive()
    }
}

/// Builds the bus `config` describes. Serves metrics first when `metrics.listen` is set, so the
/// bus's metrics are recorded from the start.
///
/// Fails with [`ErrorKind::Config`] for an invalid configuration, a backend not compiled in, or
/// a `client_id` whose metrics namespace another live bus of this process already uses.
pub async fn connect(config: Config) -> Result<Bus, Error> {
    config.validate()?;
    if let Some(listen) = config.metrics.listen {
        serve_configured_metrics(listen)?;
    }
    let settings = config.bus_settings();
    let namespace = Namespace::claim(settings.metrics_namespace.clone())?;
    let inner = match config.backend {
        Backend::Memory => memory(settings)?,
        Backend::Nats => nats(settings, &config).await?,
        Backend::Kafka => kafka(settings, &config).await?,
    };
    tracing::info!(backend = config.backend.name(), client_id = %config.client_id, "event bus connected");
    Ok(Bus {
        backend: config.backend,
        inner: Arc::new(inner.holding(namespace)),
    })
}

#[cfg(feature = "memory")]
fn memory(settings: BusSettings) -> Result<AnyBus, Error> {
    Ok(eventbus_memory::start(settings)?.into_dyn())
}

#[cfg(not(feature = "memory"))]
fn memory(_settings: BusSettings) -> Result<AnyBus, Error> {
    Err(not_compiled_in("memory", "memory"))
}

#[cfg(feature = "nats")]
async fn nats(settings: BusSettings, config: &Config) -> Result<AnyBus, Error> {
    Ok(eventbus_nats::connect(settings, config.nats.clone())
        .await?
        .into_dyn())
}

#[cfg(not(feature = "nats"))]
async fn nats(_settings: BusSettings, _config: &Config) -> Result<AnyBus, Error> {
    Err(not_compiled_in("NATS", "nats"))
}

#[cfg(feature = "kafka")]
async fn kafka(settings: BusSettings, config: &Config) -> Result<AnyBus, Error> {
    Ok(eventbus_kafka::connect(settings, config.kafka.clone())
        .await?
        .into_dyn())
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_settings: BusSettings, _config: &Config) -> Result<AnyBus, Error> {
    Err(not_compiled_in("Kafka", "kafka"))
}

#[cfg(feature = "prometheus")]
fn serve_configured_metrics(listen: std::net::SocketAddr) -> Result<(), Error> {
    serve_metrics(listen)
}

#[cfg(not(feature = "prometheus"))]
fn serve_configured_metrics(_listen: std::net::SocketAddr) -> Result<(), Error> {
    Err(Error::config(
        "metrics.listen",
        "the Prometheus exporter is not compiled in: enable the `prometheus` feature of the eventbus crate",
    ))
}

/// The error for a backend whose feature is off.
#[cfg(not(all(feature = "memory", feature = "nats", feature = "kafka")))]
fn not_compiled_in(backend: &str, feature: &str) -> Error {
    Error::config(
        "type",
        format!(
            "the {backend} backend is not compiled in: enable the `{feature}` feature of the eventbus crate"
        ),
    )
}

/// The README's example, compiled with the doctests so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeExample;
