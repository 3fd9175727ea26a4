//! The backend interface: what a backend implements, and nothing else.
//!
//! A backend is a transport. It supplies:
//!
//! - a [`Transport`] for the whole bus: send a message, open a subscription, report its
//!   broker's health and connection, stop its intake at close, and (optionally) administer
//!   topics;
//! - a [`DeadLetterWriter`] for the consume runtime: write a dead letter, and (optionally) the
//!   [`DeadLetterStore`] that reads them back;
//! - per delivered message, a [`Receipt`]: how to settle it with the broker, handed to
//!   [`Consumer::deliver`](crate::consume::Consumer::deliver) in a [`Delivery`].
//!
//! [`TransportBus`](crate::TransportBus) is the bus written once over a transport: publishing
//! through the runtime's spans, metrics and window, subscribing with validated options, health,
//! close, and the optional capabilities with [`Error::Unsupported`] where a transport has none.
//! Decoding, key extraction, retries, settlement and dead letters live in
//! [`consume`](crate::consume), never in a transport.
//!
//! # Adding a backend
//!
//! Write a [`Transport`] (and a [`DeadLetterWriter`]), start a [`Runtime`](crate::consume::Runtime)
//! with the writer, and wrap both in a [`TransportBus`](crate::TransportBus): the bus then
//! implements [`EventBus`](eventbus_core::EventBus), [`DeadLetterStore`] and
//! [`TopicAdmin`]. The memory backend (`eventbus-memory`, ~300 lines) is the smallest
//! complete example; [docs/architecture.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/architecture.md) walks through it.

use std::pin::Pin;
use std::sync::Arc;

use eventbus_core::{
    ConnectionWatch, DeadLetterStore, Envelope, EnvelopeHandler, Error, HealthReport, Message,
    MessageHandler, OutboundMessage, Position, SubscribeOptions, Subscription, TopicAdmin,
    async_trait,
};

use crate::ShutdownReport;
use crate::consume::SubscriptionSpec;

/// The future of a broker's acknowledgement of one publish: where it stored the message. What
/// a transport's [`send`](Transport::send) resolves to when it has handed a message to its
/// client.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<Position, Error>> + Send>>;

/// A message on its way to the broker: what a transport puts on the wire, and what it may
/// route or deduplicate by.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Outgoing<'a> {
    /// The topic it goes to.
    pub topic: &'a str,
    /// The message as it goes on the wire (an envelope's headers and trace context are in it).
    pub message: OutboundMessage,
    /// The envelope the message carries, for a transport that routes or deduplicates by its
    /// aggregate or event ID.
    pub envelope: Option<&'a Envelope>,
    /// An idempotency key (a dead letter's: the same for every retry of one write, different
    /// for two subscriptions dead-lettering one message), for a broker with duplicate
    /// detection, so that a retried write is stored once.
    pub dedup_id: Option<&'a str>,
}

impl<'a> Outgoing<'a> {
    /// `message` to `topic`, with no envelope and no idempotency key.
    pub fn new(topic: &'a str, message: OutboundMessage) -> Self {
        Self {
            topic,
            message,
            envelope: None,
            dedup_id: None,
        }
    }

    /// The envelope the message carries.
    pub fn with_envelope(mut self, envelope: &'a Envelope) -> Self {
        self.envelope = Some(envelope);
        self
    }

    /// An idempotency key (see [`dedup_id`](Self::dedup_id)).
    pub fn with_dedup_id(mut self, dedup_id: Option<&'a str>) -> Self {
        self.dedup_id = dedup_id;
        self
    }
}

/// A backend's side of a bus: everything [`TransportBus`](crate::TransportBus) cannot do for it.
///
/// The bus validates the topic and refuses calls once closed before it calls the transport;
/// it wraps every send in the runtime's publish span, trace context and metrics.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The backend's name, as health reports and [`Error::Unsupported`] show it (`memory`,
    /// `nats`, `kafka`).
    fn name(&self) -> &'static str;

    /// Hands the message to the broker's client, and returns the future of the broker's
    /// acknowledgement.
    ///
    /// # Cancel safety
    ///
    /// Dropped before it returns, the message may or may not have been handed over; the bus
    /// reports no result for it.
    async fn send(&self, outgoing: Outgoing<'_>) -> Result<AckFuture, Error>;

    /// Publishes `message` and waits for the broker's acknowledgement. The default awaits
    /// [`send`](Self::send)'s future; a transport overrides it where an awaited publish can do
    /// more (try again once a deleted stream is made anew).
    async fn publish(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        self.send(outgoing).await?.await.map(|_| ())
    }

    /// Opens the subscription `request` describes: the transport names it
    /// ([`SubscriptionSpec::name`]), starts its consumer in the runtime and delivers to it.
    /// What the transport does with [`SubscribeOptions::durable`] and
    /// [`SubscribeOptions::start`] (or refuses) is its own.
    async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, Error>;

    /// Adds the broker's components (its connection, say) to `report`; the bus adds its own
    /// state and the runtime's after them.
    fn health(&self, report: HealthReport) -> HealthReport {
        report
    }

    /// How many subscriptions the bus state of a health report shows; `None` (the default)
    /// counts the runtime's consumers.
    fn subscription_count(&self) -> Option<usize> {
        None
    }

    /// A watch of the connection to the broker.
    fn connection_state(&self) -> ConnectionWatch;

    /// Topic administration, when the backend offers it. `None` (the default) makes
    /// [`TopicAdmin::ensure_topic`] on the bus fail with [`Error::Unsupported`].
    fn topic_admin(&self) -> Option<&dyn TopicAdmin> {
        None
    }

    /// The first half of `close`: stop taking messages from the broker (and let what is in
    /// flight reach the runtime) by `deadline`. The bus then drains the runtime up to the same
    /// deadline and calls [`finish_close`](Self::finish_close).
    async fn stop_intake(&self, deadline: tokio::time::Instant) {
        let _ = deadline;
    }

    /// The second half of `close`, once the runtime has drained (`report`): flush what the
    /// client still holds, leave groups.
    async fn finish_close(&self, report: &ShutdownReport) {
        let _ = report;
    }
}

/// A subscription the bus asks its transport to open: validated, and ready for the runtime.
#[derive(Debug)]
#[non_exhaustive]
pub struct SubscribeRequest {
    /// What the runtime consumes: the topic (valid), the handler, the dead-letter topic (valid,
    /// `None` for plain messages and when disabled), subject keys, the handler timeout,
    /// parking (checked: an envelope subscription with a dead-letter topic, on a transport
    /// that stores dead letters). Its `name` is empty: the transport names it.
    pub spec: SubscriptionSpec,
    /// The options as the caller gave them, for what only the transport interprets
    /// ([`SubscribeOptions::durable`], [`SubscribeOptions::start`]).
    pub options: SubscribeOptions,
}

impl SubscribeRequest {
    /// A request for `spec`, with the caller's `options`.
    pub fn new(spec: SubscriptionSpec, options: SubscribeOptions) -> Self {
        Self { spec, options }
    }

    /// The subscribed topic.
    pub fn topic(&self) -> &str {
        &self.spec.topic
    }
}

/// Writes a bus's dead letters: the consume runtime's one call into the backend outside a
/// delivery's [`Receipt`].
#[async_trait]
pub trait DeadLetterWriter: Send + Sync + 'static {
    /// Publishes a dead letter to its dead-letter topic, with its idempotency key
    /// ([`Outgoing::dedup_id`]), and returns once the broker has accepted it.
    async fn publish_dead_letter(&self, letter: Outgoing<'_>) -> Result<(), Error>;

    /// Where the written dead letters can be read back and removed, when the broker keeps
    /// them. A parking subscription reads it when it starts (to park again the aggregates
    /// whose dead letters still wait for a replay), and a handled replayed copy removes its
    /// dead letter through it. `None` (the default): dead letters are not kept, parking is
    /// refused, and the bus's [`DeadLetterStore`] calls fail with [`Error::Unsupported`].
    fn store(&self) -> Option<&dyn DeadLetterStore> {
        None
    }
}

/// The backend's receipt of one delivery: how to settle it with the broker.
///
/// The runtime calls exactly one of [`ack`](Self::ack), [`give_back`](Self::give_back),
/// [`terminate`](Self::terminate) (after the dead letter is written) or
/// [`abandon`](Self::abandon) per delivery, retrying `ack` and `terminate` with backoff while they
/// fail, always before the aggregate's next message starts. It calls
/// [`in_progress`](Self::in_progress) while the message is held (queued, running, retrying)
/// when the subscription asked for progress signals.
#[async_trait]
pub trait Receipt: Send + Sync + 'static {
    /// The message was handled (or, plain, ran): the broker may forget it.
    async fn ack(&self) -> Result<(), Error>;

    /// The message was not handled here (its subscription closed before it ran, or the drain
    /// deadline passed): the broker should deliver it again, now.
    async fn give_back(&self) -> Result<(), Error>;

    /// The message was written to its dead-letter topic: the broker must not deliver it again.
    async fn terminate(&self) -> Result<(), Error>;

    /// The message is still being worked on: the broker should not redeliver it yet.
    async fn in_progress(&self) -> Result<(), Error> {
        Ok(())
    }

    /// The runtime stops tracking the message without settling it (an undecodable envelope with
    /// dead-lettering disabled): a broker redelivers it after its timeout; a backend without
    /// redelivery counts it as dropped.
    fn abandon(&self) {}

    /// The message with everything a dead letter keeps: a backend that hands envelope handlers a
    /// message without its headers (they see only the envelope) adds them back here.
    fn full_message(&self, delivered: &Message) -> Message {
        delivered.clone()
    }
}

/// The handler of a subscription.
#[derive(Clone)]
pub enum Handler {
    /// Plain messages, at-most-once.
    Plain(Arc<dyn MessageHandler>),
    /// Envelopes, at-least-once, in order per aggregate.
    Envelope(Arc<dyn EnvelopeHandler>),
}

impl Handler {
    /// True for an envelope handler.
    pub fn is_envelope(&self) -> bool {
        matches!(self, Handler::Envelope(_))
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handler::Plain(_) => "Handler::Plain",
            Handler::Envelope(_) => "Handler::Envelope",
        })
    }
}

/// One message handed to the runtime by a backend.
pub struct Delivery {
    /// The message the handler sees (see [`Receipt::full_message`]).
    pub message: Message,
    /// How to settle it.
    pub receipt: Arc<dyn Receipt>,
    /// The broker's identity of the message within the subscription (a stream sequence, an
    /// offset), when it may deliver the same message again while it is held here: a second
    /// delivery of a held message is dropped.
    pub held_id: Option<u64>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("topic", &self.message.topic)
            .field("position", &self.message.meta.position)
            .field("held_id", &self.held_id)
            .finish_non_exhaustive()
    }
}
