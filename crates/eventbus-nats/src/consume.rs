//! Consuming: pull loops, in-progress acks, and settling each message from its outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use bytes::Bytes;
use eventbus_core::{
    CancellationToken, DeliveryClass, DeliveryMeta, Envelope, EnvelopeHandler, Error,
    HandlerContext, HandlerError, Headers, Message, MessageHandler, MessageSource, Outcome,
    Position, Settlement, dead_letter_message, extract_aggregate_id,
};
use eventbus_pool::{Job, JobContext, Pool};
use futures::StreamExt;

use crate::bus::{KEY_HEADER, Shared, storage_for};
use crate::config::Storage;
use crate::stats::Stat;

/// The handler of a subscription.
#[derive(Clone)]
pub(crate) enum Handler {
    Plain(Arc<dyn MessageHandler>),
    Envelope(Arc<dyn EnvelopeHandler>),
}

/// A message the bus holds: delivered and not yet settled.
struct Held {
    acker: Arc<Acker>,
    since: Instant,
}

/// One subscription's state, shared by its tasks and its jobs.
pub(crate) struct Sub {
    pub(crate) topic: String,
    /// The topic for handler contexts, shared rather than copied per attempt.
    topic_name: Arc<str>,
    pub(crate) durable: String,
    handler: Handler,
    subject_keys: bool,
    dead_letter: Option<String>,
    /// Stop fetching.
    stop: CancellationToken,
    /// Stop because the bus closes: take what the open pull request still brings first.
    draining: AtomicBool,
    /// Still delivering to the handler (false after unsubscribe).
    active: AtomicBool,
    /// Nothing is held any more (the engine has shut down): in-progress acks end.
    finished: CancellationToken,
    held: Mutex<HashMap<u64, Held>>,
}

impl Sub {
    pub(crate) fn new(
        topic: &str,
        durable: String,
        handler: Handler,
        subject_keys: bool,
        dead_letter: Option<String>,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            topic_name: Arc::from(topic),
            durable,
            handler,
            subject_keys,
            dead_letter,
            stop: CancellationToken::new(),
            draining: AtomicBool::new(false),
            active: AtomicBool::new(true),
            finished: CancellationToken::new(),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Stops fetching; `drain` (close) first takes what the open pull request brings, otherwise
    /// (unsubscribe) the handler gets nothing more and queued messages are given back.
    pub(crate) fn stop(&self, drain: bool) {
        if drain {
            self.draining.store(true, Ordering::SeqCst);
        } else {
            self.active.store(false, Ordering::SeqCst);
        }
        self.stop.cancel();
    }

    /// The engine is done with this subscription's messages.
    pub(crate) fn finish(&self) {
        self.finished.cancel();
    }

    fn held(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        // Nothing panics while holding this lock.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn class(&self) -> DeliveryClass {
        match self.handler {
            Handler::Plain(_) => DeliveryClass::AtMostOnce,
            Handler::Envelope(_) => DeliveryClass::AtLeastOnce,
        }
    }
}

/// The durable consumer of `sub`, created, or updated when its configuration changed.
///
/// With `resume` (the first subscribe of this bus to the durable), a durable left with
/// unacknowledged messages by a previous run that is gone (no pull request of another client
/// waiting) is re-created from its ack floor,
/// so that the messages the dead run held come back first and in stream order: a crash replays
/// a suffix in order instead of redelivering the held messages after newer ones once their
/// `ack_wait` runs out.
pub(crate) async fn ensure_consumer(
    shared: &Shared,
    sub: &Sub,
    resume: bool,
) -> Result<PullConsumer, Error> {
    let settings = &shared.config.consumer;
    let envelopes = matches!(sub.handler, Handler::Envelope(_));
    let storage = storage_for(&shared.config, &sub.topic, envelopes);
    let stream_name = shared
        .streams
        .ensure(&shared.js, &sub.topic, storage)
        .await?;
    let stream = shared
        .js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|error| Error::broker(format!("cannot open stream {stream_name}"), error))?;
    let mut wanted = pull::Config {
        durable_name: Some(sub.durable.clone()),
        filter_subject: sub.topic.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        backoff: settings.backoff.clone(),
        ..pull::Config::default()
    };
    if let Ok(mut existing) = stream.get_consumer::<pull::Config>(&sub.durable).await
        && let Ok(info) = existing.info().await
    {
        let current = &info.config;
        if resume && info.num_ack_pending > 0 && info.num_waiting == 0 {
            let start = info.ack_floor.stream_sequence + 1;
            tracing::info!(
                durable = %sub.durable,
                unacknowledged = info.num_ack_pending,
                start,
                "a previous run left messages unacknowledged; replaying from the ack floor in order"
            );
            stream
                .delete_consumer(&sub.durable)
                .await
                .map_err(|error| {
                    Error::broker(format!("cannot reset consumer {}", sub.durable), error)
                })?;
            wanted.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
        } else {
            if resume && info.num_ack_pending > 0 {
                tracing::warn!(
                    durable = %sub.durable,
                    unacknowledged = info.num_ack_pending,
                    "another client is pulling from this durable consumer; messages it holds keep their place"
                );
            }
            // The start position cannot change on an existing consumer.
            wanted.deliver_policy = current.deliver_policy;
            if current.ack_wait != wanted.ack_wait
                || current.max_deliver != wanted.max_deliver
                || current.max_ack_pending != wanted.max_ack_pending
                || current.backoff != wanted.backoff
                || current.filter_subject != wanted.filter_subject
            {
                tracing::info!(
                    durable = %sub.durable,
                    ack_wait = ?wanted.ack_wait,
                    max_deliver = wanted.max_deliver,
                    max_ack_pending = wanted.max_ack_pending,
                    backoff = ?wanted.backoff,
                    "consumer configuration changed; updating the durable consumer"
                );
            }
        }
    }
    stream
        .create_consumer(wanted)
        .await
        .map_err(|error| Error::broker(format!("cannot create consumer {}", sub.durable), error))
}

/// Fetches from the durable consumer until the subscription stops, submitting every message
/// to the engine without waiting for the ones before it.
pub(crate) async fn pull_loop(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    sub: Arc<Sub>,
    mut consumer: PullConsumer,
) {
    let settings = shared.config.consumer.clone();
    let mut failures = 0u32;
    // The next pull request, sent when the current one is half read, so that messages keep
    // flowing while the rest of the current batch is dispatched.
    let mut prefetched = None;
    // Closing takes one last batch without waiting, after the open requests: what was
    // published just before `close` is handled, and a long backlog is left for the next run.
    let mut last_batch_taken = false;
    'pulls: loop {
        let stopping = sub.stop.is_cancelled();
        let draining = stopping && sub.draining.load(Ordering::SeqCst);
        // Unsubscribed: nothing new is asked for (open requests were read to their end).
        if stopping && !draining && prefetched.is_none() {
            break;
        }
        if draining && prefetched.is_none() && last_batch_taken {
            break;
        }
        let batch = if let Some(batch) = prefetched.take() {
            Ok(batch)
        } else if draining {
            last_batch_taken = true;
            consumer
                .fetch()
                .max_messages(settings.fetch_batch)
                .messages()
                .await
        } else {
            // Not raced against `stop`: a pull request dropped half-sent could still be
            // answered, and what it brought would wait for `ack_wait`.
            consumer
                .batch()
                .max_messages(settings.fetch_batch)
                .expires(settings.fetch_expires)
                .messages()
                .await
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                failures += 1;
                tracing::warn!(durable = %sub.durable, %error, failures, "pull request failed");
                shared.counters.add(Stat::FetchErrors, 1);
                if backoff(&sub, failures).await {
                    break;
                }
                // The stream or consumer may be gone (a memory stream after a server restart).
                shared.streams.forget(&sub.topic).await;
                match ensure_consumer(&shared, &sub, false).await {
                    Ok(fresh) => consumer = fresh,
                    Err(error) => {
                        tracing::warn!(durable = %sub.durable, %error, "consumer not ready")
                    }
                }
                continue;
            }
        };
        let mut received = 0usize;
        loop {
            // An open request is read to its end even when the subscription stops: what the
            // server sends to it would otherwise wait for `ack_wait`.
            let next = if sub.stop.is_cancelled() {
                batch.next().await
            } else {
                tokio::select! {
                    next = batch.next() => next,
                    () = sub.stop.cancelled() => continue,
                }
            };
            let Some(next) = next else { break };
            match next {
                Ok(message) if sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst) => {
                    // Unsubscribed: give it back at once for the durable's next reader.
                    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::debug!(durable = %sub.durable, %error, "nak not sent");
                    }
                }
                Ok(message) => {
                    failures = 0;
                    received += 1;
                    if received == settings.fetch_batch.div_ceil(2)
                        && prefetched.is_none()
                        && !sub.stop.is_cancelled()
                    {
                        // A failure here shows again, and is handled, at the next request.
                        prefetched = consumer
                            .batch()
                            .max_messages(settings.fetch_batch)
                            .expires(settings.fetch_expires)
                            .messages()
                            .await
                            .ok();
                    }
                    match dispatch(&shared, &pool, &sub, message).await {
                        Ok(()) => {}
                        // The engine has shut down (close gave up waiting): stop fetching.
                        Err(Error::Closed) => break 'pulls,
                        Err(error) => {
                            tracing::warn!(durable = %sub.durable, %error, "message not dispatched; the server redelivers it");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(durable = %sub.durable, %error, "pull request ended with an error");
                    break;
                }
            }
        }
    }
    tracing::debug!(durable = %sub.durable, "stopped fetching");
}

/// Waits before the next pull after `failures` failures in a row; true when the subscription
/// stopped meanwhile.
async fn backoff(sub: &Sub, failures: u32) -> bool {
    let delay = Duration::from_millis(50)
        .saturating_mul(2u32.saturating_pow(failures.min(6)))
        .min(Duration::from_secs(2));
    tokio::select! {
        () = tokio::time::sleep(delay) => sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst),
        () = sub.stop.cancelled() => !sub.draining.load(Ordering::SeqCst),
    }
}

/// Takes core NATS messages of an ephemeral topic until the subscription stops (at-most-once:
/// there is nothing to acknowledge).
pub(crate) async fn core_loop(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    sub: Arc<Sub>,
    mut subscriber: async_nats::Subscriber,
) {
    loop {
        let message = tokio::select! {
            message = subscriber.next() => message,
            () = sub.stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let meta = DeliveryMeta {
            position: Position::Unknown,
            delivery_attempt: 1,
            timestamp: None,
        };
        let delivery = Delivery::new(
            message,
            matches!(sub.handler, Handler::Plain(_)),
            meta,
            None,
        );
        if let Err(error) = submit(&shared, &pool, &sub, delivery).await {
            tracing::warn!(topic = %sub.topic, %error, "message not dispatched");
        }
    }
    let _ = subscriber.unsubscribe().await;
}

/// Sends an in-progress ack for every message held longer than the progress interval, so that
/// the server does not redeliver what is still queued, running or retrying here.
pub(crate) async fn progress_loop(shared: Arc<Shared>, sub: Arc<Sub>) {
    let interval = shared.config.consumer.progress_interval();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = sub.finished.cancelled() => break,
        }
        let due: Vec<Arc<Acker>> = sub
            .held()
            .values()
            .filter(|held| held.since.elapsed() >= interval)
            .map(|held| held.acker.clone())
            .collect();
        if sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst) && sub.held().is_empty()
        {
            break;
        }
        for acker in &due {
            if let Err(error) = acker.ack_with(AckKind::Progress).await {
                tracing::debug!(durable = %sub.durable, %error, "in-progress ack not sent");
            }
        }
        if !due.is_empty() {
            shared.counters.add(Stat::ProgressAcks, due.len() as u64);
        }
    }
}

/// A consumed message: what the handler sees and what settling needs.
struct Delivery {
    /// The message; for an envelope subscription without its headers and key (the handler
    /// sees only the envelope), which [`Delivery::message`] adds when a dead letter needs them.
    message: Message,
    /// NATS headers not converted yet.
    headers: Option<HeaderMap>,
    ackable: Ackable,
}

impl Delivery {
    /// Takes a NATS message apart; headers are converted now only if the handler sees them.
    fn new(
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
async fn dispatch(
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
async fn submit(
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
