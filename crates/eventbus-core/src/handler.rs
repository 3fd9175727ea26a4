//! Handlers: what a subscription calls for each message.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
use crate::error::BoxError;
use crate::message::{DeliveryMeta, Message};
use crate::trace_context::TraceContext;

/// What a handler learns about the delivery it handles.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    topic: Arc<str>,
    meta: DeliveryMeta,
    attempt: u32,
    /// Shared: cloning a `CancellationToken` itself takes a lock, and a context is made per call.
    cancellation: Arc<CancellationToken>,
    trace: Option<Arc<TraceContext>>,
}

impl HandlerContext {
    /// A context; backends build one per handler call. `cancellation` is a token or an
    /// `Arc` of one (shared without cloning the token).
    pub fn new(
        topic: impl Into<Arc<str>>,
        meta: DeliveryMeta,
        attempt: u32,
        cancellation: impl Into<Arc<CancellationToken>>,
    ) -> Self {
        Self {
            topic: topic.into(),
            meta,
            attempt,
            cancellation: cancellation.into(),
            trace: None,
        }
    }

    /// Adds the trace context the message arrived with.
    pub fn with_trace_context(mut self, trace: Option<Arc<TraceContext>>) -> Self {
        self.trace = trace;
        self
    }

    /// The W3C trace context the message carried (its `traceparent` header), or for an envelope
    /// without one, a context in the trace its `trace_id` names; `None` when it carried neither.
    /// Events published from the handler continue this trace.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace.as_deref()
    }

    /// The topic the message was consumed from.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The broker's delivery metadata.
    pub fn meta(&self) -> &DeliveryMeta {
        &self.meta
    }

    /// Which attempt of this process at this message this call is (1 = first; retries count up).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Cancelled when the bus shuts down and the drain deadline has passed: a long handler
    /// should stop and return an error, and the message will be redelivered.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }
}

/// Whether a failed message may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HandlerErrorKind {
    /// May succeed later: retried with backoff (at-least-once messages).
    Transient,
    /// Will never succeed: dead-lettered at once, no retries.
    Permanent,
}

/// The error a handler returns: a cause, marked transient (retry) or permanent (dead-letter).
///
/// Any `std::error::Error` converts into a transient `HandlerError`, so `?` works in handlers;
/// use [`permanent`](Self::permanent) for errors that retrying cannot fix.
///
/// ```
/// use eventbus_core::{HandlerError, HandlerErrorKind};
///
/// fn parse(input: &str) -> Result<u32, HandlerError> {
///     let value: u32 = input.parse()?; // transient by default
///     if value == 0 {
///         return Err(HandlerError::permanent("zero is never valid"));
///     }
///     Ok(value)
/// }
/// assert_eq!(parse("x").unwrap_err().kind(), HandlerErrorKind::Transient);
/// assert!(parse("0").unwrap_err().is_permanent());
/// ```
pub struct HandlerError {
    kind: HandlerErrorKind,
    source: BoxError,
    retry_after: Option<Duration>,
}

impl HandlerError {
    /// An error worth retrying.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            kind: HandlerErrorKind::Transient,
            source: source.into(),
            retry_after: None,
        }
    }

    /// An error no retry can fix: the message goes to the dead-letter destination at once.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            kind: HandlerErrorKind::Permanent,
            source: source.into(),
            retry_after: None,
        }
    }

    /// Asks for the next attempt after `delay` rather than the retry policy's backoff (a
    /// rate limit's `Retry-After`, a lock held for a known time). The attempt still counts
    /// toward `max_attempts`; a policy's decision may still give up or pick its own delay
    /// ([`RetryPolicy`](crate::RetryPolicy)); a delay longer than an hour is cut to an hour.
    /// Ignored on a permanent error.
    pub fn with_retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// The delay the handler asked for before the next attempt
    /// ([`with_retry_after`](Self::with_retry_after)).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Transient or permanent.
    pub fn kind(&self) -> HandlerErrorKind {
        self.kind
    }

    /// True for a permanent error.
    pub fn is_permanent(&self) -> bool {
        self.kind == HandlerErrorKind::Permanent
    }

    /// The cause.
    pub fn cause(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes the cause out.
    pub fn into_cause(self) -> BoxError {
        self.source
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("source", &self.source)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::transient(error)
    }
}

/// Handles plain messages (subscriptions made with [`EventBus::subscribe`](crate::EventBus::subscribe)).
///
/// Implemented for closures returning a future:
///
/// ```
/// use std::sync::Arc;
/// use eventbus_core::{HandlerContext, HandlerError, Message, MessageHandler};
///
/// let handler: Arc<dyn MessageHandler> = Arc::new(|_ctx: HandlerContext, message: Message| async move {
///     println!("{} bytes", message.payload.len());
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = handler;
/// ```
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles one message. An error (or a panic) is counted and logged; plain messages are
    /// acknowledged whatever the handler returns (at-most-once).
    async fn handle(&self, ctx: HandlerContext, message: Message) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> MessageHandler for F
where
    F: Fn(HandlerContext, Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, ctx: HandlerContext, message: Message) -> Result<(), HandlerError> {
        self(ctx, message).await
    }
}

/// Handles envelopes (subscriptions made with
/// [`EventBus::subscribe_envelope`](crate::EventBus::subscribe_envelope)).
///
/// Implemented for closures returning a future:
///
/// ```
/// use std::sync::Arc;
/// use eventbus_core::{Envelope, EnvelopeHandler, HandlerContext, HandlerError};
///
/// let handler: Arc<dyn EnvelopeHandler> = Arc::new(|ctx: HandlerContext, envelope: Envelope| async move {
///     println!("{} v{} (attempt {})", envelope.aggregate_id, envelope.event_version, ctx.attempt());
///     Ok::<(), HandlerError>(())
/// });
/// # let _ = handler;
/// ```
#[async_trait]
pub trait EnvelopeHandler: Send + Sync + 'static {
    /// Handles one envelope. Success acknowledges it; a transient error is retried in the
    /// aggregate's lane; a permanent error or exhausted retries dead-letter it.
    async fn handle(&self, ctx: HandlerContext, envelope: Envelope) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> EnvelopeHandler for F
where
    F: Fn(HandlerContext, Envelope) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, ctx: HandlerContext, envelope: Envelope) -> Result<(), HandlerError> {
        self(ctx, envelope).await
    }
}
