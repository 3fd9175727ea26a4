//! The `EventBus` trait and what subscribing takes and gives.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::connection::ConnectionWatch;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::handler::{EnvelopeHandler, MessageHandler};
use crate::health::HealthReport;
use crate::message::{OutboundMessage, Position};
use crate::pipeline::{PendingPublish, PublishResults};
use crate::retry::RetryPolicy;
use crate::topic::{dead_letter_topic, validate_topic};

/// An event bus: publish and subscribe on one backend (memory, NATS JetStream, Kafka).
///
/// Object safe: hold it as `Arc<dyn EventBus>`. The delivery contract is the same on every
/// backend: envelopes at-least-once and in order per aggregate, plain messages at-most-once.
/// What not every backend offers is a trait of its own: [`DeadLetterStore`](crate::DeadLetterStore)
/// and [`TopicAdmin`](crate::TopicAdmin). Every backend's bus (`eventbus_pool::TransportBus`)
/// has all these methods as inherent methods too, so calling them needs no trait import.
#[async_trait]
pub trait EventBus: Send + Sync {
    /// Publishes a plain message to `topic`.
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error>;

    /// Publishes an envelope to `topic`, with the envelope headers (`X-Event-ID`, ...) and, on
    /// Kafka, the aggregate ID as the record key.
    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error>;

    /// Starts publishing a plain message without waiting for the broker's acknowledgement: as
    /// [`publish`](Self::publish), but returns once the message is handed to the client, with a
    /// [`PendingPublish`] of where the broker stored it. Waits while the bus's
    /// `publish_max_in_flight` publishes are unacknowledged. Messages started one after the
    /// other are stored in that order on NATS and, per partition, on Kafka ([docs/publishing.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/publishing.md)).
    ///
    /// # Cancel safety
    ///
    /// Dropped while waiting for room in the window, nothing was sent. Dropped while the
    /// message is being handed to the client (a first publish to a topic also makes sure the
    /// topic exists), the message may still be published, and no result reports it.
    async fn start_publish(
        &self,
        topic: &str,
        message: OutboundMessage,
    ) -> Result<PendingPublish, Error>;

    /// Starts publishing an envelope without waiting for the broker's acknowledgement: as
    /// [`publish_envelope`](Self::publish_envelope), pipelined as
    /// [`start_publish`](Self::start_publish) is. Its [`PublishResult`](crate::PublishResult)
    /// (event ID, tenant, topic, position or error) also goes to every
    /// [`publish_results`](Self::publish_results) stream.
    ///
    /// # Cancel safety
    ///
    /// As [`start_publish`](Self::start_publish).
    async fn start_publish_envelope(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<PendingPublish, Error>;

    /// Publishes `envelopes` to `topic` pipelined (all started, then all awaited) and returns
    /// each one's result, in order. An envelope that could not be started fails alone; the
    /// ones before it are still awaited.
    ///
    /// # Cancel safety
    ///
    /// Dropped part way, the envelopes started so far are published and report their results
    /// to the [`publish_results`](Self::publish_results) streams; the rest are not sent.
    async fn publish_envelope_batch(
        &self,
        topic: &str,
        envelopes: &[Envelope],
    ) -> Vec<Result<Position, Error>>;

    /// A stream of the results of the pipelined publishes started from now on, in the order
    /// they started. Every stream gets every result.
    fn publish_results(&self) -> PublishResults;

    /// Subscribes `handler` to the plain messages of `topic` (at-most-once).
    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error>;

    /// Subscribes `handler` to the envelopes of `topic` (at-least-once, in order per aggregate).
    async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error>;

    /// The bus's current health.
    async fn health(&self) -> HealthReport;

    /// A watch of the bus's connection to its broker: read it now, or wait for it to change
    /// (reconnecting, connected again, closed).
    fn connection_state(&self) -> ConnectionWatch;

    /// Stops intake, lets in-flight handlers finish up to the drain timeout, acknowledges what
    /// finished and leaves the rest for redelivery. Idempotent.
    async fn close(&self) -> Result<(), Error>;
}

/// Where exhausted or undecodable envelopes of a subscription go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetter {
    /// `{topic}.DLQ`.
    #[default]
    Default,
    /// A topic of your choice.
    Topic(String),
    /// No dead-letter destination: an exhausted envelope is left unacknowledged for the broker
    /// to redeliver, and an error is logged and counted.
    Disabled,
}

/// Where a subscription whose durable broker state is new starts reading. A durable that
/// exists keeps its own position; this never moves it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartPosition {
    /// Everything the stream still holds.
    #[default]
    All,
    /// Only messages published after the durable was made.
    New,
    /// Messages stored at or after this time.
    FromTime(OffsetDateTime),
    /// Messages from this stream sequence on.
    FromSequence(u64),
}

/// Options of one subscription.
///
/// ```
/// use eventbus_core::{DeadLetter, SubscribeOptions};
///
/// let options = SubscribeOptions::new()
///     .with_dead_letter(DeadLetter::Topic("orders.failed".into()))
///     .with_subject_keys(true);
/// assert_eq!(options.dead_letter_topic("orders")?, Some("orders.failed".to_owned()));
/// assert_eq!(SubscribeOptions::new().dead_letter_topic("orders")?, Some("orders.DLQ".to_owned()));
/// # Ok::<(), eventbus_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Where exhausted or undecodable envelopes go.
    pub dead_letter: DeadLetter,
    /// Take the aggregate ID from the subject's tokens when no other source holds one (NATS).
    pub subject_keys: bool,
    /// NATS: the durable consumer to read with, instead of the bus's own name
    /// (`{client_id}_{topic}`): to adopt the durable of a service this one replaces, such as a
    /// Go service's `{DurableName}-unified_{suffix}`. A durable of that name that filters another
    /// subject is refused. Kafka: a bus has one consumer group (`kafka.group_id`); any other
    /// name is a configuration error. The memory backend keeps no broker state and ignores it.
    pub durable: Option<String>,
    /// NATS: where a durable made by this subscription starts (an existing durable keeps its
    /// position). Kafka: where a group without committed offsets starts is
    /// `kafka.auto_offset_reset`, so anything but [`StartPosition::All`] is a configuration
    /// error there. The memory backend keeps no history: every subscription starts with the
    /// messages published after it, whatever this says.
    pub start: StartPosition,
    /// How long one attempt of the handler may run. When it passes, the handler's
    /// [cancellation token](crate::HandlerContext::cancellation) fires and the attempt counts as
    /// a transient failure: retried in the aggregate's lane, then dead-lettered as usual (a plain
    /// message is not retried), whatever the handler returns once its token fired. A handler
    /// that has not returned when as long again has passed (at most 5 s more) is dropped and
    /// reported; work it spawned is not stopped. `None` (the default) takes the bus's
    /// `handler_timeout`, and without one a handler may run for as long as it takes.
    pub handler_timeout: Option<Duration>,
    /// Park an aggregate behind its dead letter (envelopes): once one of its envelopes is
    /// dead-lettered, its later envelopes are dead-lettered too, marked `X-Parked`, instead of
    /// being handled out of order, until `eventbus dlq replay` puts the failed one and its
    /// parked successors back, in their order. Off by default (the aggregate moves on, as the
    /// Go SDK does). The set of parked aggregates is kept by the running subscription.
    pub park_on_dead_letter: bool,
    /// How the handler is retried (envelopes): attempts, backoff, a decision per error, and a
    /// handler's own delay ([`HandlerError::with_retry_after`](crate::HandlerError::with_retry_after)).
    /// `None` (the default) takes the bus's policy (`[retry]`). Settling (acks, dead-letter
    /// writes) is retried with the bus's settlement backoff whatever this says.
    pub retry: Option<RetryPolicy>,
}

impl SubscribeOptions {
    /// The defaults: dead letters to `{topic}.DLQ`, no subject keys.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the dead-letter destination.
    pub fn with_dead_letter(mut self, dead_letter: DeadLetter) -> Self {
        self.dead_letter = dead_letter;
        self
    }

    /// Opts into (or out of) aggregate IDs from subject tokens.
    pub fn with_subject_keys(mut self, subject_keys: bool) -> Self {
        self.subject_keys = subject_keys;
        self
    }

    /// Reads with the durable consumer `name` (see [`SubscribeOptions::durable`]).
    pub fn with_durable(mut self, name: impl Into<String>) -> Self {
        self.durable = Some(name.into());
        self
    }

    /// Sets where a durable this subscription makes starts (see [`SubscribeOptions::start`]).
    pub fn with_start(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Limits each attempt of the handler to `timeout` (see
    /// [`SubscribeOptions::handler_timeout`]).
    pub fn with_handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// Retries the handler by `policy` instead of the bus's (see [`SubscribeOptions::retry`]).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Parks an aggregate behind its dead letter (see [`SubscribeOptions::park_on_dead_letter`]).
    pub fn with_park_on_dead_letter(mut self, park: bool) -> Self {
        self.park_on_dead_letter = park;
        self
    }

    /// The handler timeout, validated: a zero timeout is refused.
    pub fn checked_handler_timeout(&self) -> Result<Option<Duration>, Error> {
        match self.handler_timeout {
            Some(timeout) if timeout.is_zero() => {
                Err(Error::config("handler_timeout", "must be longer than 0"))
            }
            timeout => Ok(timeout),
        }
    }

    /// The dead-letter topic for a subscription to `topic`, validated; `None` when disabled. A
    /// dead-letter topic equal to `topic` is refused (a failure would be consumed again by the
    /// subscription that failed it, for ever).
    pub fn dead_letter_topic(&self, topic: &str) -> Result<Option<String>, Error> {
        match &self.dead_letter {
            DeadLetter::Default => dead_letter_topic(topic).map(Some),
            DeadLetter::Topic(custom) if custom == topic => Err(Error::config(
                "dead_letter",
                format!("the dead-letter topic of {topic:?} cannot be {topic:?} itself"),
            )),
            DeadLetter::Topic(custom) => {
                validate_topic(custom)?;
                Ok(Some(custom.clone()))
            }
            DeadLetter::Disabled => Ok(None),
        }
    }
}

/// The backend side of a [`Subscription`]: how to stop it.
#[async_trait]
pub trait SubscriptionControl: Send + Sync {
    /// Stops delivery to the subscription's handler. In-flight messages finish; nothing new
    /// starts. Durable broker state (a NATS consumer, a Kafka group's offsets) is kept.
    async fn unsubscribe(&self) -> Result<(), Error>;
}

/// A running subscription.
///
/// Dropping the handle does **not** stop the subscription: it runs until
/// [`unsubscribe`](Self::unsubscribe) or until the bus closes.
pub struct Subscription {
    topic: String,
    control: Box<dyn SubscriptionControl>,
}

impl Subscription {
    /// A handle for a subscription to `topic`; backends call this.
    pub fn new(topic: impl Into<String>, control: impl SubscriptionControl + 'static) -> Self {
        Self {
            topic: topic.into(),
            control: Box::new(control),
        }
    }

    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Stops delivery to this subscription's handler (see [`SubscriptionControl::unsubscribe`]).
    pub async fn unsubscribe(self) -> Result<(), Error> {
        self.control.unsubscribe().await
    }
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_topics_are_validated() {
        assert_eq!(
            SubscribeOptions::new()
                .with_dead_letter(DeadLetter::Disabled)
                .dead_letter_topic("orders")
                .unwrap(),
            None
        );
        let bad = SubscribeOptions::new().with_dead_letter(DeadLetter::Topic("a b".into()));
        assert!(bad.dead_letter_topic("orders").is_err());
        let itself = SubscribeOptions::new().with_dead_letter(DeadLetter::Topic("orders".into()));
        assert_eq!(
            itself.dead_letter_topic("orders").unwrap_err().kind(),
            crate::ErrorKind::Config
        );
        let long = "t".repeat(246);
        assert!(SubscribeOptions::new().dead_letter_topic(&long).is_err());
        assert!(
            SubscribeOptions::new()
                .dead_letter_topic(&long[..245])
                .is_ok()
        );
    }

    struct Flag(Arc<std::sync::atomic::AtomicBool>);

    #[async_trait]
    impl SubscriptionControl for Flag {
        async fn unsubscribe(&self) -> Result<(), Error> {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn unsubscribe_reaches_the_backend_control() {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subscription = Subscription::new("orders", Flag(flag.clone()));
        assert_eq!(subscription.topic(), "orders");
        assert!(format!("{subscription:?}").contains("orders"));
        block_on_ready(subscription.unsubscribe()).unwrap();
        assert!(flag.load(std::sync::atomic::Ordering::SeqCst));
    }

    /// Polls a future that is ready at once (the control above) without a runtime.
    fn block_on_ready<F: std::future::Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
        }
    }
}
