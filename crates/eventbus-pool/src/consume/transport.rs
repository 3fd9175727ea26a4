//! What a backend implements: a way to write dead letters, and a receipt per delivery.

use std::sync::Arc;

use eventbus_core::{
    EnvelopeHandler, Error, Message, MessageHandler, OutboundMessage, Position, StoredDeadLetter,
    async_trait,
};

/// The backend side of the runtime, for the whole bus.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes a dead letter to `topic` and returns once the broker has accepted it.
    ///
    /// `dedup_id` is an idempotency key of this dead letter (the same for every retry of the
    /// same write, different for two subscriptions dead-lettering one message): a broker with
    /// duplicate detection uses it, so a retried write is stored once.
    async fn publish_dead_letter(
        &self,
        topic: &str,
        letter: OutboundMessage,
        dedup_id: Option<&str>,
    ) -> Result<(), Error>;

    /// The dead letters `topic` holds now (`EventBus::dead_letters`): a parking subscription
    /// reads them when it starts, to park again the aggregates whose dead letters still wait
    /// for a replay. The default holds none (a transport that keeps no dead letters).
    async fn dead_letters(&self, topic: &str) -> Result<Vec<StoredDeadLetter>, Error> {
        let _ = topic;
        Ok(Vec::new())
    }

    /// The dead letter at `position` of `topic`, or `None` when there is none there (removed
    /// already, or another message of a shared stream sits at that position). The runtime
    /// reads it before removing it. The default holds none.
    async fn dead_letter_at(
        &self,
        topic: &str,
        position: Position,
    ) -> Result<Option<StoredDeadLetter>, Error> {
        let _ = (topic, position);
        Ok(None)
    }

    /// Removes the dead letter at `position` of `topic`: a replayed copy of it was handled (or
    /// dead-lettered again). Idempotent: a dead letter removed already is no error. A position
    /// this transport cannot have is a `Config` error. The default does nothing (a transport
    /// that keeps no dead letters).
    async fn remove_dead_letter(&self, topic: &str, position: Position) -> Result<(), Error> {
        let _ = (topic, position);
        Ok(())
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
