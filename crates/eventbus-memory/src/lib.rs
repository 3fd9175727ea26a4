//! The in-process eventbus backend: the whole delivery contract without a broker.
//!
//! For the demo, examples and tests, and for services that want ordered, retried, dead-lettered
//! in-process events. Topics live for the life of the process and do not retain messages: a
//! subscription receives what is published after it subscribed. Each subscription of a topic
//! receives every message.
//!
//! ```
//! use std::sync::Arc;
//! use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
//! use eventbus_memory::BusSettings;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventbus_core::Error> {
//! let bus = eventbus_memory::start(BusSettings::new("memory", "demo"))?;
//! let (seen, receiver) = tokio::sync::mpsc::unbounded_channel();
//! bus.subscribe_envelope(
//!     "orders",
//!     Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
//!         let seen = seen.clone();
//!         async move {
//!             seen.send(envelope.event_version).map_err(HandlerError::permanent)?;
//!             Ok(())
//!         }
//!     }),
//!     SubscribeOptions::new(),
//! )
//! .await?;
//! for version in 1..=3 {
//!     bus.publish_envelope("orders", &Envelope::new("order-1", "OrderUpdated", version, &version)?)
//!         .await?;
//! }
//! bus.close().await?;
//! let mut receiver = receiver;
//! let mut versions = Vec::new();
//! while let Ok(version) = receiver.try_recv() {
//!     versions.push(version);
//! }
//! assert_eq!(versions, [1, 2, 3]);
//! # Ok(())
//! # }
//! ```
//!
//! The bus is the [`TransportBus`](eventbus_pool::TransportBus) every backend is, over
//! [`MemoryTransport`]: the consume runtime every backend shares (`eventbus_pool::consume`)
//! handles each message the same way as on a broker:
//!
//! - envelope subscriptions: decoded once; an undecodable payload goes to the dead-letter topic
//!   at once (`X-Failed-Attempts: 0`); otherwise the handler runs in the aggregate's lane, is
//!   retried with backoff, and after `max_attempts` failures, a permanent error or `max_restarts`
//!   panics the message goes to the dead-letter topic with the headers of
//!   `eventbus_core::dead_letter_message`; with dead-lettering disabled it stays in its lane,
//!   retried, until `close`;
//! - plain subscriptions: run once in the lane of the aggregate ID found by
//!   `eventbus_core::extract_aggregate_id`, whatever the handler returns;
//! - what a subscription gives back (queued at `unsubscribe`, unfinished when `close` reaches
//!   its drain deadline): there is no broker to redeliver from, so it is dropped, logged and
//!   counted in [`MemoryTransport::stats`] (`bus.transport().stats()`).

mod bus;

pub use bus::{MemoryBus, MemoryStats, MemoryTransport, start};
pub use eventbus_pool::BusSettings;
