//! NATS JetStream backend of the eventbus SDK.
//!
//! [`connect`] makes a [`NatsBus`]: the bus every backend is
//! ([`TransportBus`](eventbus_pool::TransportBus)) over [`NatsTransport`], on a NATS server
//! with JetStream, through `async-nats`, with the delivery contract of every backend: envelopes
//! at-least-once and in order per aggregate, plain messages at-most-once, many messages in
//! flight at once through the ordering engine (`eventbus-pool`).
//!
//! - **Streams**: a topic lives in a configured stream whose subjects cover it, in a stream
//!   already on the server that covers it, or in `{stream_prefix}{topic}` created on first use
//!   (file storage for envelope and dead-letter topics, memory for plain ones, unless
//!   [`TopicOptions`] say otherwise), with the [`StreamLimits`] of the configuration.
//! - **Consumers**: each subscription is a durable pull consumer `{client_id}_{topic}` (see
//!   [`NatsTransport::durable_name`]), created or updated with [`ConsumerSettings`]; neither
//!   `unsubscribe` nor `close` deletes it ([`NatsTransport::delete_consumer`] does).
//! - **Consuming** is a transport on the consume runtime every backend shares
//!   (`eventbus_pool::consume`): the pull loop hands each message over with a receipt (ack, nak,
//!   term, in-progress ack); decoding, retries, dead letters and the held registry are the
//!   runtime's. An in-progress ack goes out for every held message before `ack_wait` runs out; a
//!   redelivered copy of a held message is dropped; exhausted or undecodable envelopes are
//!   written to the dead-letter topic (retried until the server confirms, while the aggregate's
//!   lane waits), then `term`ed; plain messages are acked whatever the handler returned.
//! - **Scaling out**: a topic with [`TopicOptions::partitions`] is split into partition subjects
//!   ([`partition_of`] picks an aggregate's); the instances of a service share them, each read
//!   by one instance at a time through a pinned consumer, with membership and claims in a
//!   key-value bucket, moving when instances come, stop or die ([`ScaleOutSettings`],
//!   [`NatsTransport::partitions_reading`], [docs/nats.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/nats.md) "Scaling out").
//! - **Publish**: waits for the PubAck (`publish_timeout`); envelopes carry the `X-*` headers
//!   and `Nats-Msg-Id` = event ID (the server drops duplicates); a message key travels in the
//!   [`KEY_HEADER`] header. Ephemeral topics use core NATS (no stream, at-most-once).
//!
//! # Configuration
//!
//! [`connect`] takes the settings every backend shares ([`BusSettings`]: client ID,
//! engine, drain timeout, metric namespace) and a [`NatsConfig`] with what only NATS needs.
//! The configuration types are serde types: the facade reads [`NatsConfig`] as its `[nats]`
//! section as is.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventbus_core::{Envelope, HandlerContext, SubscribeOptions};
//! use eventbus_nats::{BusSettings, NatsConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), eventbus_core::Error> {
//! let bus = eventbus_nats::connect(
//!     BusSettings::new("nats", "billing"),
//!     NatsConfig {
//!         urls: vec!["nats://127.0.0.1:4222".into()],
//!         ..NatsConfig::default()
//!     },
//! )
//! .await?;
//! bus.subscribe_envelope(
//!     "orders.created",
//!     Arc::new(|_ctx: HandlerContext, envelope: Envelope| async move {
//!         tracing::info!(aggregate = %envelope.aggregate_id, "order created");
//!         Ok(())
//!     }),
//!     SubscribeOptions::new(),
//! )
//! .await?;
//! let envelope = Envelope::new("order-42", "OrderCreated", 1, &serde_json::json!({"total": 12}))?;
//! bus.publish_envelope("orders.created", &envelope).await?;
//! bus.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! Under `nats_eventbus_{client_id}_`: the engine's `actor_pool_*` series, plus `connected`,
//! `connection_events_total{event}`, `redeliveries_total`, `redeliveries_dropped_total`,
//! `progress_acks_total`, `fetch_errors_total`, `dead_letter_failures_total`,
//! `dead_letters_waiting`, `settle_failures_total`, `given_back_total` and `undeliverable_total`
//! (undecodable with dead-lettering disabled).

mod bus;
mod config;
mod connection;
mod consumer;
mod dead_letters;
mod fetch;
mod group;
mod names;
mod partition;
mod publish;
mod receipt;
mod stats;
mod streams;
mod take_over;

pub use bus::{NatsBus, NatsTransport, connect};
pub use config::{
    Auth, ConsumerSettings, NatsConfig, ScaleOutSettings, Storage, StreamDefinition, StreamLimits,
    TakeOverSettings, TlsConfig, TopicOptions,
};
pub use eventbus_pool::BusSettings;
pub use partition::{partition_of, partition_subject};
pub use publish::KEY_HEADER;
pub use stats::NatsStats;
