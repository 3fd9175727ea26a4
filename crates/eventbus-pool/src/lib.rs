//! The eventbus ordering engine: an actor pool without head-of-line blocking.
//!
//! The Go SDK hashed every aggregate onto one of 256 actors with FIFO inboxes, so one slow
//! aggregate held up every other aggregate on its actor, and inboxes grew without bound. Here
//! each routing key has its own **lane**, and `pool_size` **actors** take whichever lane is ready:
//!
//! - jobs of one key never run concurrently and start in submission order, retries included;
//! - a stalled key holds one actor and its own lane, nothing else;
//! - unkeyed jobs spread over free actors;
//! - a lane holds at most `inbox_size` queued jobs and the pool `pool_size × inbox_size`:
//!   [`Pool::submit`] waits for room, [`Pool::try_submit`] fails with `Full`; idle lanes are
//!   dropped, so memory follows active keys;
//! - at-least-once jobs are retried in their lane with exponential backoff and jitter (the actor
//!   is free meanwhile, the lane is not); a permanent error skips the retries; at-most-once jobs
//!   run once;
//! - panics are caught and counted as actor restarts; a job that caused `max_restarts` panics is
//!   not run again;
//! - every job settles exactly once with an [`Outcome`](eventbus_core::Outcome);
//! - [`Pool::shutdown`] stops intake, drains until a deadline, cancels the rest and returns when
//!   no task of the pool is left.
//!
//! Over the engine, [`consume`] is the one consume path of every backend, [`transport`] is
//! what a backend implements, and [`TransportBus`] is the bus written once over a transport.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use eventbus_core::{AggregateId, DeliveryClass, HandlerError, Outcome, RetryPolicy};
//! use eventbus_pool::{Job, Pool, PoolConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventbus_core::Error> {
//! let pool = Pool::new(PoolConfig {
//!     pool_size: 4,
//!     retry: RetryPolicy::new()
//!         .with_max_attempts(3)
//!         .with_backoff(Duration::from_millis(10), Duration::from_millis(100)),
//!     ..PoolConfig::default()
//! })?;
//! let key = AggregateId::new("order-42")?;
//! let handle = pool
//!     .submit(Job::new(Some(key), DeliveryClass::AtLeastOnce, |ctx| async move {
//!         if ctx.attempt() < 2 {
//!             return Err(HandlerError::transient("database busy"));
//!         }
//!         Ok(())
//!     }))
//!     .await?;
//! assert!(matches!(handle.await, Outcome::Succeeded { attempts: 2 }));
//! let report = pool.shutdown(Duration::from_secs(5)).await;
//! assert!(report.drained);
//! assert_eq!(pool.live_tasks(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! Under `{metrics_namespace}_actor_pool_`: `messages_sent_total`,
//! `messages_processed_total{success}`, `message_latency_seconds` (per attempt),
//! `inbox_depth` (exact queued jobs), `inbox_utilization` (queued / capacity),
//! `actor_restarted_total` (panics), `dead_letters_total` (counted by the consume runtime),
//! `lanes_active`, `in_flight`, `retries_total`, `stalled` (jobs retrying past `max_attempts`
//! because their message has nowhere to go). No label carries an aggregate ID.

mod bus;
mod config;
pub mod consume;
mod job;
mod lane;
mod metrics;
mod pool;
mod scope;
pub mod transport;

pub use bus::TransportBus;
pub use config::{
    BusSettings, MAX_CAPACITY, MAX_INBOX_SIZE, MAX_POOL_SIZE, MAX_PUBLISH_IN_FLIGHT, PoolConfig,
};
pub use job::{Job, JobContext, JobHandle};
pub use pool::{LaneAges, Pool, PoolStats, ShutdownReport};
pub use scope::{Scope, ScopeReport};
