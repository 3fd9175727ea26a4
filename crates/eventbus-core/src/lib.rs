//! Core types of the eventbus SDK. No runtime, no I/O.
//!
//! The SDK handles domain events **in order per aggregate, concurrently across aggregates,
//! without losing any**, on Kafka, NATS JetStream or in memory. This crate holds the vocabulary
//! every other crate shares:
//!
//! - [`Envelope`]: the JSON event wrapper, byte-compatible with the Go services;
//! - [`AggregateId`], [`validate_aggregate_id`] and [`extract_aggregate_id`]: the routing key
//!   that keeps one aggregate's events in order, and where a consumed message carries it;
//! - [`Message`], [`OutboundMessage`], [`Headers`]: what is consumed and published;
//! - [`PendingPublish`], [`PublishResults`]: pipelined publishing, and the results an outbox
//!   reads;
//! - [`validate_topic`]: topic names valid on both brokers;
//! - [`EventBus`], [`MessageHandler`], [`EnvelopeHandler`], [`SubscribeOptions`],
//!   [`Subscription`]: the API every backend implements;
//! - [`HandlerError`], [`Outcome`], [`Settlement`]: how handling ends and what the backend does
//!   about it (acknowledge, dead-letter, redeliver);
//! - [`HealthReport`], [`metric_namespace`]: observability shared by the backends;
//! - [`Error`]: the one error type, with [`Error::kind`].
//!
//! # A short tour
//!
//! Wrap an event, encode it as the Go services do, and read it back:
//!
//! ```
//! use eventbus_core::{Envelope, ErrorKind};
//!
//! let envelope = Envelope::new("order-42", "OrderPlaced", 1, &serde_json::json!({"total": 12.5}))?
//!     .with_correlation_id("checkout-7");
//! let bytes = envelope.to_bytes()?;
//! assert!(bytes.starts_with(br#"{"event_id":""#));
//!
//! let decoded = Envelope::from_bytes(&bytes)?;
//! assert_eq!(decoded, envelope);
//!
//! // Bad input is a typed error that names the field, never a panic.
//! let error = Envelope::from_bytes(br#"{"event_id":"e1","aggregate_id":"a","event_type":"T","event_version":0,"payload":{}}"#)
//!     .unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::InvalidEnvelope);
//! assert_eq!(error.to_string(), "invalid envelope: event_version must be positive");
//! # Ok::<(), eventbus_core::Error>(())
//! ```
//!
//! Find the aggregate a consumed message belongs to: an envelope payload first, then the
//! `X-Aggregate-ID` family of headers, then the Kafka key, then (only when asked) the subject:
//!
//! ```
//! use eventbus_core::{extract_aggregate_id, Message, MessageSource};
//!
//! let mut message = Message::new("orders", &b"plain text"[..]);
//! message.key = Some("order-42".into());
//! let id = extract_aggregate_id(&MessageSource::from_message(&message));
//! assert_eq!(id.unwrap().as_str(), "order-42");
//! ```
//!
//! Decide what happens to a handled message:
//!
//! ```
//! use eventbus_core::{DeliveryClass, HandlerError, Outcome, Settlement};
//!
//! let failed = Outcome::Failed { attempts: 3, error: HandlerError::transient("db down") };
//! assert_eq!(failed.settlement(DeliveryClass::AtLeastOnce), Settlement::DeadLetter);
//! assert_eq!(failed.settlement(DeliveryClass::AtMostOnce), Settlement::Ack);
//! ```

mod aggregate_id;
mod bus;
mod connection;
mod dead_letter;
mod envelope;
mod error;
mod handler;
mod headers;
mod health;
mod heartbeat;
mod json;
mod message;
mod metrics;
mod outcome;
mod pipeline;
mod retry;
mod route;
mod secret;
mod timestamp;
mod topic;
mod topic_spec;
mod trace_context;

pub use aggregate_id::{
    AGGREGATE_ID_HEADERS, AggregateId, AggregateIdError, MAX_AGGREGATE_ID_LEN, MessageSource,
    extract_aggregate_id, validate_aggregate_id,
};
pub use bus::{
    DeadLetter, EventBus, StartPosition, SubscribeOptions, Subscription, SubscriptionControl,
};
pub use connection::{ConnectionState, ConnectionWatch};
pub use dead_letter::{
    DEAD_LETTER_HEADERS, DeadLetterStore, HEADER_DEAD_LETTERED_AT, HEADER_DEAD_LETTERED_BY,
    HEADER_ERROR_MESSAGE, HEADER_FAILED_ATTEMPTS, HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_PARTITION, HEADER_ORIGINAL_STREAM_SEQUENCE, HEADER_ORIGINAL_TOPIC,
    HEADER_PARKED, HEADER_REPLAY_HEAD, HEADER_REPLAY_LAST, HEADER_REPLAY_OF, HEADER_REPLAYED,
    StoredDeadLetter, dead_letter_message, replayed_dead_letter,
};
pub use envelope::{
    Envelope, EnvelopeError, HEADER_AGGREGATE_ID, HEADER_CORRELATION_ID, HEADER_EVENT_ID,
    HEADER_EVENT_TYPE, HEADER_EVENT_VERSION, HEADER_TENANT_ID, HEADER_TRACE_ID,
};
pub use error::{BoxError, Error, ErrorKind, Report};
pub use handler::{
    EnvelopeHandler, HandlerContext, HandlerError, HandlerErrorKind, MessageHandler,
};
pub use headers::{HEADER_MESSAGE_KEY, Headers, MAX_HEADER_VALUE, header_value};
pub use health::{ComponentHealth, HealthReport, HealthStatus};
pub use heartbeat::{HEARTBEAT_MAX_AGE, HEARTBEAT_TOPIC, Heartbeat, HeartbeatError};
pub use message::{DeliveryMeta, Message, OutboundMessage, Position};
pub use metrics::metric_namespace;
pub use outcome::{DeliveryClass, Outcome, Settlement};
pub use pipeline::{PendingPublish, PublishFailure, PublishResult, PublishResults, ResultsError};
pub use retry::{Backoff, MAX_ATTEMPTS, MAX_BACKOFF, RetryDecision, RetryPolicy};
pub use route::{Router, TypedHandler, Unclaimed, UnclaimedCount};
pub use secret::Secret;
pub use topic::{DEAD_LETTER_SUFFIX, MAX_TOPIC_LEN, TopicError, dead_letter_topic, validate_topic};
pub use topic_spec::{EnsureMode, TopicAdmin, TopicMismatch, TopicReport, TopicSpec, TopicStorage};
pub use trace_context::{
    TRACEPARENT, TRACESTATE, TraceContext, TraceContextError, TraceContextErrorKind,
};

/// Re-exported so that handlers can be written against this crate alone.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use time::OffsetDateTime;
pub use tokio_util::sync::CancellationToken;
