//! One consumed message: converted, submitted to the engine, and settled from its outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::AckKind, message::Acker};
use bytes::Bytes;
use eventbus_core::{
    DeliveryMeta, Envelope, Error, HandlerContext, HandlerError, Headers, Message, MessageSource,
    Outcome, Position, Settlement, dead_letter_message, extract_aggregate_id,
};
use eventbus_pool::{Job, JobContext, Pool};

use crate::bus::{KEY_HEADER, Shared};
use crate::config::Storage;
use crate::stats::Stat;
use crate::subscription::{Handler, Held, Sub};

/// A consumed message: what the handler sees and what settling needs.
pub(crate) struct Delivery {
    /// The message; for an envelope subscription without its headers and key (the handler
    /// sees only the envelope), which [`Delivery::message`] adds when a dead letter needs them.
    message: Message,
    /// NATS headers not converted yet.
    headers: Option<HeaderMap>,
    ackable: Ackable,
}

impl Delivery {
    /// Takes a NATS message apart; headers are converted now only if the handler sees them.
    pub(crate) fn new(
        message: async_nats::Message,
        convert_headers: bool,
        meta: DeliveryMeta,
        ackable: Ackable,
    ) -> Self {
        let mut delivery = Self {
            message: Message {
                topic: message.subject.to_string(),
                key: None,
                headers: Headers::new(),
                payload: message.payload,
                meta,
            },
            headers: message.headers,
            ackable,
        };
        if convert_headers {
            delivery.message = delivery.message();
            delivery.headers = None;
        }
        delivery
    }

    /// The full message: headers converted, the key header as the key.
    fn message(&self) -> Message {
        let mut message = self.message.clone();
        if let Some(map) = &self.headers {
            for (name, values) in map.iter() {
                let name: &str = name.as_ref();
                for value in values {
                    if name == KEY_HEADER {
                        message.key = Some(Bytes::copy_from_slice(value.as_str().as_bytes()));
                    } else {
                        message.headers.append(name, value.as_str().to_owned());
                    }
                }
            }
        }
        message
    }
}

/// Hands one JetStream message to the engine, unless a copy of it is already held.
pub(crate) async fn dispatch(
    shared: &Arc<Shared>,
    pool: &Pool,
    sub: &Arc<Sub>,
    message: jetstream::Message,
) -> Result<(), Error> {
    let (sequence, delivered, published) = match message.info() {
        Ok(info) => (
            info.stream_sequence,
            u32::try_from(info.delivered).unwrap_or(u32::MAX),
            Some(info.published),
        ),
        Err(error) => {
            return Err(Error::Broker {
                message: format!("message without JetStream metadata: {error}"),
                source: None,
            });
        }
    };
    if delivered > 1 {
        shared.counters.add(Stat::Redeliveries, 1);
    }
    let (message, acker) = message.split();
    let acker = Arc::new(acker);
    {
        let mut held = sub.held();
        if held.contains_key(&sequence) {
            // The server redelivered a message we still hold (its in-progress ack came late):
            // the held copy settles it.
            shared.counters.add(Stat::RedeliveriesDropped, 1);
            tracing::debug!(durable = %sub.durable, sequence, "redelivered copy of a held message dropped");
            return Ok(());
        }
        held.insert(
            sequence,
            Held {
                acker: acker.clone(),
                since: Instant::now(),
            },
        );
    }
    let meta = DeliveryMeta {
        position: Position::Sequence(sequence),
        delivery_attempt: delivered,
        timestamp: published,
    };
    let delivery = Delivery::new(
        message,
        matches!(sub.handler, Handler::Plain(_)),
        meta,
        Some((sequence, acker.clone())),
    );
    let result = submit(shared, pool, sub, delivery).await;
    if result.is_err() {
        sub.held().remove(&sequence);
        let _ = acker.ack_with(AckKind::Nak(None)).await;
    }
    result
}

/// What settling needs of a JetStream message: its sequence and its acker.
type Ackable = Option<(u64, Arc<Acker>)>;

/// Submits one message as an engine job whose finishing step settles it.
pub(crate) async fn submit(
    shared: &Arc<Shared>,
    pool: &Pool,
    sub: &Arc<Sub>,
    delivery: Delivery,
) -> Result<(), Error> {
    let skipped = Arc::new(AtomicBool::new(false));
    let (key, undecodable, first) = match &sub.handler {
        Handler::Plain(_) => {
            let mut source = MessageSource::from_message(&delivery.message);
            if sub.subject_keys {
                source = source.with_subject_keys(&delivery.message.topic);
            }
            (extract_aggregate_id(&source), None, None)
        }
        Handler::Envelope(_) => match Envelope::from_bytes(&delivery.message.payload) {
            Ok(envelope) => (envelope.aggregate().ok(), None, Some(envelope)),
            Err(error) => (None, Some(error.to_string()), None),
        },
    };
    let delivery = Arc::new(delivery);
    let job = attempts(sub, &delivery, &skipped, first, undecodable.is_some());
    let class = sub.class();
    let (shared, sub) = (shared.clone(), sub.clone());
    let job = Job::new(key, class, job).with_finish(move |outcome: &Outcome| {
        let verdict = if skipped.load(Ordering::SeqCst) {
            Verdict::GiveBack
        } else if let Some(reason) = undecodable {
            Verdict::DeadLetter {
                reason,
                attempts: 0,
            }
        } else {
            match outcome.settlement(class) {
                Settlement::Ack => Verdict::Ack,
                Settlement::DeadLetter => Verdict::DeadLetter {
                    reason: outcome.failure_reason(),
                    attempts: outcome.attempts(),
                },
                Settlement::Redeliver => Verdict::GiveBack,
            }
        };
        settle(shared, sub, delivery, verdict)
    });
    pool.submit(job).await.map(drop)
}

type AttemptFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// The function that starts each attempt of a delivery: the handler, unless the subscription
/// was stopped before the message ran (then it is given back). An undecodable envelope never
/// reaches the handler. The first attempt takes the envelope decoded for its key; a retry
/// decodes the payload again.
fn attempts(
    sub: &Arc<Sub>,
    delivery: &Arc<Delivery>,
    skipped: &Arc<AtomicBool>,
    mut first: Option<Envelope>,
    undecodable: bool,
) -> impl FnMut(JobContext) -> AttemptFuture + Send + 'static {
    let (sub, delivery, skipped) = (sub.clone(), delivery.clone(), skipped.clone());
    move |ctx: JobContext| {
        if undecodable {
            return Box::pin(async { Err(HandlerError::permanent("undecodable envelope")) });
        }
        let run = sub.active.load(Ordering::SeqCst);
        skipped.store(!run, Ordering::SeqCst);
        if !run {
            return Box::pin(async { Ok(()) });
        }
        let context = HandlerContext::new(
            sub.topic_name.clone(),
            delivery.message.meta.clone(),
            ctx.attempt(),
            ctx.cancellation().clone(),
        );
        match &sub.handler {
            Handler::Plain(handler) => {
                let (handler, message) = (handler.clone(), delivery.message.clone());
                Box::pin(async move { handler.handle(context, message).await })
            }
            Handler::Envelope(handler) => {
                let envelope = match first.take() {
                    Some(envelope) => envelope,
                    None => match Envelope::from_bytes(&delivery.message.payload) {
                        Ok(envelope) => envelope,
                        Err(error) => {
                            return Box::pin(async { Err(HandlerError::permanent(error)) });
                        }
                    },
                };
                let handler = handler.clone();
                Box::pin(async move { handler.handle(context, envelope).await })
            }
        }
    }
}

/// What settling does with a message.
enum Verdict {
    Ack,
    DeadLetter {
        reason: String,
        attempts: u32,
    },
    /// Not handled here (unsubscribed before it ran): back to the server at once.
    GiveBack,
}

/// Settles one message while its lane is still held: ack, or dead-letter (retried with backoff
/// until written, so the aggregate's later messages keep waiting) then `term`.
async fn settle(shared: Arc<Shared>, sub: Arc<Sub>, delivery: Arc<Delivery>, verdict: Verdict) {
    let acker = delivery.ackable.as_ref().map(|(_, acker)| acker.clone());
    let ack = |kind: AckKind| {
        let acker = acker.clone();
        async move {
            if let Some(acker) = acker
                && let Err(error) = acker.ack_with(kind).await
            {
                tracing::warn!(%error, "ack not sent; the server will redeliver");
            }
        }
    };
    match verdict {
        Verdict::Ack => ack(AckKind::Ack).await,
        Verdict::GiveBack => ack(AckKind::Nak(None)).await,
        Verdict::DeadLetter { reason, attempts } => match &sub.dead_letter {
            Some(topic) => {
                let message = delivery.message();
                write_dead_letter(&shared, &sub, topic, &message, &reason, attempts).await;
                ack(AckKind::Term).await;
            }
            None => {
                tracing::error!(
                    topic = %sub.topic,
                    reason,
                    "message failed with dead-lettering disabled; left for the server to redeliver"
                );
                shared.counters.add(Stat::Undeliverable, 1);
            }
        },
    }
    if let Some((sequence, _)) = &delivery.ackable {
        sub.held().remove(sequence);
    }
}

/// Writes a dead letter, retrying with the engine's backoff until the server confirms it.
async fn write_dead_letter(
    shared: &Shared,
    sub: &Sub,
    topic: &str,
    message: &Message,
    reason: &str,
    attempts: u32,
) {
    let letter = dead_letter_message(message, reason, attempts);
    let retry = &shared.config.pool.retry;
    let mut failures = 0u32;
    loop {
        match shared
            .publish_to(topic, letter.clone(), None, Storage::File)
            .await
        {
            Ok(()) => {
                shared.counters.add(Stat::DeadLettered, 1);
                tracing::warn!(topic = %sub.topic, dead_letter_topic = topic, reason, attempts, "dead-lettered");
                return;
            }
            Err(error) => {
                failures += 1;
                shared.counters.add(Stat::DeadLetterFailures, 1);
                tracing::error!(
                    topic = %sub.topic,
                    dead_letter_topic = topic,
                    %error,
                    failures,
                    "dead letter not written; retrying (the aggregate's later messages wait)"
                );
                tokio::time::sleep(retry.backoff(failures)).await;
            }
        }
    }
}
