//! Apache Kafka backend of the eventbus SDK.
//!
//! [`connect`] makes a [`KafkaBus`]: the bus every backend is
//! ([`TransportBus`](eventbus_pool::TransportBus)) over [`KafkaTransport`], on Kafka through `rdkafka`
//! (librdkafka, built from source), with the delivery contract of every backend: envelopes
//! at-least-once and in order per aggregate, plain messages at-most-once, many records of one
//! partition in flight at once through the ordering engine (`eventbus-pool`).
//!
//! - **Consumer group**: one per bus (`group_id`, default the client ID) over every subscribed
//!   topic, polled on a thread of its own; a topic subscribed later joins the group's
//!   subscription at once (a rebalance follows). Each assigned partition gets a reader per
//!   subscription: a scope of the shared consume runtime, keyed by (subscription, partition,
//!   assignment generation).
//! - **Commits**: a record is finished when every reader has acknowledged it or written its dead
//!   letter (acknowledged by the broker); the committed offset is one past the contiguous
//!   finished prefix, committed every `commit_interval`, on revoke (through the consumer the
//!   rebalance callback gets, skipped when the assignment was lost) and on close.
//! - **Backpressure**: a partition with `max_in_flight_per_partition` unfinished records is
//!   paused, and resumed at half; polling never stops, so the group session stays alive.
//! - **Rebalance**: revoked partitions stop taking records, their queued records are given back
//!   (not committed: the next owner reads them), their running ones finish up to the drain
//!   timeout, then their finished offsets are committed. Both the classic protocol
//!   (`cooperative-sticky` by default) and KIP-848's `consumer` protocol are supported.
//! - **Publish**: idempotent, `acks=all`, key = aggregate ID for envelopes, the `X-*` headers;
//!   waits for the broker's acknowledgement (`publish_timeout`). The partitioner is librdkafka's
//!   default, Java's `murmur2_random`, or sarama's (FNV-1a) to co-publish with the Go services.
//! - **Topics** are created on first use with their [`TopicOptions`].
//!
//! # Configuration
//!
//! [`connect`] takes the settings every backend shares ([`BusSettings`]) and a
//! [`KafkaConfig`] with what only Kafka needs; any librdkafka property passes through
//! [`KafkaConfig::properties`] (SASL, SSL), secrets redacted from `Debug` output.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventbus_core::{Envelope, HandlerContext, SubscribeOptions};
//! use eventbus_kafka::{BusSettings, KafkaConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), eventbus_core::Error> {
//! let bus = eventbus_kafka::connect(
//!     BusSettings::new("kafka", "billing"),
//!     KafkaConfig {
//!         bootstrap_servers: vec!["127.0.0.1:9092".into()],
//!         ..KafkaConfig::default()
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
//! Under `kafka_eventbus_{client_id}_`: the engine's `actor_pool_*` series and the runtime's
//! (`dead_letter_failures_total`, `dead_letters_waiting`, ...), plus `rebalances_total`,
//! `commit_failures_total` and `partitions_paused`.

mod bus;
mod config;
mod dead_letters;
mod group;
mod partition;
mod probe;
mod producer;
mod topics;
mod tracker;

pub use bus::{KafkaBus, KafkaTransport, connect};
pub use config::{
    AssignmentStrategy, CONSUMER_DEFAULTS, GroupProtocol, KafkaConfig, OffsetReset, Partitioner,
    Properties, TopicOptions,
};
pub use dead_letters::REPLAYED_SUFFIX;
pub use eventbus_pool::BusSettings;
