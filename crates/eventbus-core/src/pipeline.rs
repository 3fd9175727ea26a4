//! Pipelined publishing: the future of one publish in flight, and the stream of publish results
//! an outbox reads.
//!
//! [`EventBus::start_publish_envelope`](crate::EventBus::start_publish_envelope) hands a message
//! to the broker's client and returns without waiting for the broker's acknowledgement: the
//! returned [`PendingPublish`] resolves to where the broker stored it. Every publish started this
//! way also reports a [`PublishResult`] to the bus's [`PublishResults`] streams, in the order the
//! publishes started, whether or not anyone awaits its `PendingPublish`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{broadcast, oneshot};

use crate::{Envelope, Error, ErrorKind, Position};

/// One publish in flight: resolves to where the broker stored the message (a NATS stream
/// sequence, a Kafka partition and offset, a memory topic's sequence; [`Position::Unknown`] for
/// a core NATS topic, which has no acknowledgement), or to why it was not stored.
///
/// Dropping it does not stop the publish; its result still goes to the [`PublishResults`]
/// streams.
#[derive(Debug)]
#[must_use = "the publish goes on when this is dropped; await it to learn its result"]
pub struct PendingPublish {
    result: oneshot::Receiver<Result<Position, Error>>,
}

impl PendingPublish {
    /// A pending publish that the sender settles (for backends: the consume runtime makes
    /// these).
    pub fn new(result: oneshot::Receiver<Result<Position, Error>>) -> Self {
        Self { result }
    }
}

impl Future for PendingPublish {
    type Output = Result<Position, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // The sender goes away unsettled only when the bus's runtime is torn down.
        Pin::new(&mut self.result)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(Error::Closed)))
    }
}

/// Why a publish failed, as a [`PublishResult`] carries it (a copy of the [`Error`] its
/// [`PendingPublish`] resolved to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishFailure {
    /// The error's kind.
    pub kind: ErrorKind,
    /// The error's message, with its sources.
    pub message: String,
}

impl From<&Error> for PublishFailure {
    fn from(error: &Error) -> Self {
        let mut message = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self {
            kind: error.kind(),
            message,
        }
    }
}

impl std::fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The result of one pipelined publish, as a [`PublishResults`] stream reports it: the Go SDK's
/// `PublishResult`. An outbox marks its row sent (by event ID, per tenant) on success and
/// retries it on failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    /// The topic published to.
    pub topic: String,
    /// The envelope's event ID; `None` for a plain message.
    pub event_id: Option<String>,
    /// The envelope's aggregate ID; `None` for a plain message.
    pub aggregate_id: Option<String>,
    /// The envelope's event type; `None` for a plain message.
    pub event_type: Option<String>,
    /// The envelope's tenant (0: none, as in the Go SDK); 0 for a plain message.
    pub tenant_id: i64,
    /// Where the broker stored the message, or why it did not.
    pub outcome: Result<Position, PublishFailure>,
}

impl PublishResult {
    /// The result of publishing `envelope` to `topic`.
    pub fn for_envelope(
        topic: &str,
        envelope: &Envelope,
        outcome: Result<Position, PublishFailure>,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            event_id: Some(envelope.event_id.clone()),
            aggregate_id: Some(envelope.aggregate_id.clone()),
            event_type: Some(envelope.event_type.clone()),
            tenant_id: envelope.tenant_id,
            outcome,
        }
    }

    /// The result of publishing a plain message to `topic`.
    pub fn for_message(topic: &str, outcome: Result<Position, PublishFailure>) -> Self {
        Self {
            topic: topic.to_owned(),
            event_id: None,
            aggregate_id: None,
            event_type: None,
            tenant_id: 0,
            outcome,
        }
    }

    /// True when the broker stored the message.
    pub fn is_success(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Why [`PublishResults::recv`] returned no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResultsError {
    /// This reader fell behind by more than the stream holds: that many results are gone for
    /// it (not for other readers). An outbox re-sends the rows it has no result for.
    #[error("{0} publish results were missed: the reader fell behind")]
    Lagged(u64),
    /// The bus closed and every result was read.
    #[error("the event bus is closed")]
    Closed,
}

impl ResultsError {
    /// What kind of error this is (`Lagged` is a [`ErrorKind::Full`], `Closed` a
    /// [`ErrorKind::Closed`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResultsError::Lagged(_) => ErrorKind::Full,
            ResultsError::Closed => ErrorKind::Closed,
        }
    }
}

/// A stream of the results of every publish started with
/// [`EventBus::start_publish`](crate::EventBus::start_publish) or
/// [`start_publish_envelope`](crate::EventBus::start_publish_envelope) after it was made, in the
/// order those publishes started. Each reader gets every result; one that falls behind by more
/// than the bus's `publish_max_in_flight` is told how many it missed.
///
/// ```
/// use eventbus_core::{Position, PublishResult, PublishResults, ResultsError};
///
/// # tokio_test_block_on(async {
/// let (sender, _) = tokio::sync::broadcast::channel(16);
/// let mut results = PublishResults::new(sender.subscribe());
/// sender.send(PublishResult::for_message("orders", Ok(Position::Sequence(7)))).unwrap();
/// drop(sender);
/// assert_eq!(results.recv().await.unwrap().outcome, Ok(Position::Sequence(7)));
/// assert_eq!(results.recv().await, Err(ResultsError::Closed));
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(future: F) -> F::Output {
/// #     let waker = std::task::Waker::noop();
/// #     let mut context = std::task::Context::from_waker(&waker);
/// #     let mut future = std::pin::pin!(future);
/// #     loop {
/// #         if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
/// #             return output;
/// #         }
/// #     }
/// # }
/// ```
#[derive(Debug)]
pub struct PublishResults {
    receiver: broadcast::Receiver<PublishResult>,
}

impl PublishResults {
    /// A stream reading `receiver` (for backends: the consume runtime makes these).
    pub fn new(receiver: broadcast::Receiver<PublishResult>) -> Self {
        Self { receiver }
    }

    /// The next result.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a result is taken from the stream only when this future returns it.
    pub async fn recv(&mut self) -> Result<PublishResult, ResultsError> {
        match self.receiver.recv().await {
            Ok(result) => Ok(result),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(ResultsError::Lagged(missed)),
            Err(broadcast::error::RecvError::Closed) => Err(ResultsError::Closed),
        }
    }

    /// The next result if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<PublishResult, ResultsError>> {
        match self.receiver.try_recv() {
            Ok(result) => Some(Ok(result)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                Some(Err(ResultsError::Lagged(missed)))
            }
            Err(broadcast::error::TryRecvError::Closed) => Some(Err(ResultsError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_kind_and_the_whole_chain_of_its_error() {
        let error = Error::broker(
            "cannot publish to orders",
            std::io::Error::other("connection reset"),
        );
        let failure = PublishFailure::from(&error);
        assert_eq!(failure.kind, ErrorKind::Broker);
        assert_eq!(
            failure.message,
            "broker error: cannot publish to orders: connection reset"
        );
    }

    #[test]
    fn an_envelope_result_carries_its_identity_and_tenant() {
        let envelope = crate::Envelope::new("order-1", "OrderPlaced", 3, &serde_json::json!({}))
            .unwrap()
            .with_tenant_id(42);
        let result = PublishResult::for_envelope("orders", &envelope, Ok(Position::Sequence(9)));
        assert_eq!(result.event_id.as_deref(), Some(envelope.event_id.as_str()));
        assert_eq!(result.aggregate_id.as_deref(), Some("order-1"));
        assert_eq!(result.event_type.as_deref(), Some("OrderPlaced"));
        assert_eq!(result.tenant_id, 42);
        assert!(result.is_success());
    }

    #[test]
    fn a_pending_publish_whose_sender_is_gone_resolves_to_closed() {
        let (sender, receiver) = oneshot::channel();
        drop(sender);
        let waker = std::task::Waker::noop();
        let mut context = Context::from_waker(waker);
        let mut pending = PendingPublish::new(receiver);
        match Pin::new(&mut pending).poll(&mut context) {
            Poll::Ready(Err(Error::Closed)) => {}
            other => panic!("expected Closed, got {other:?}"),
        }
    }
}
