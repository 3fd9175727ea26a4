//! The in-process bus.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::{
    DeliveryClass, DeliveryMeta, Envelope, EnvelopeHandler, Error, EventBus, HandlerContext,
    HealthReport, HealthStatus, Message, MessageHandler, MessageSource, OffsetDateTime,
    OutboundMessage, Position, Settlement, SubscribeOptions, Subscription, SubscriptionControl,
    dead_letter_message, extract_aggregate_id, metric_namespace, validate_topic,
};
use eventbus_pool::{Job, JobContext, JobHandle, Pool, PoolConfig};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc};

use crate::config::MemoryConfig;

/// An in-process event bus with the full delivery contract and no broker.
///
/// Every subscription of a topic receives every message published to it after it subscribed;
/// messages are not retained. Envelopes are handled at-least-once within the process: retried in
/// their aggregate's lane, then written to the dead-letter topic (`{topic}.DLQ` unless the
/// subscription says otherwise), itself a memory topic that can be subscribed. There is no
/// broker to redeliver from, so what is left unfinished when [`close`](EventBus::close) gives up
/// at its drain deadline is dropped and counted (see [`MemoryStats`]).
///
/// Publishing waits while the engine is full (a slow subscription slows its publishers), so
/// memory stays bounded by the pool's capacity.
pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// Counters of what the bus did with messages that did not simply succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Messages written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Messages dropped: exhausted with dead-lettering disabled, or unfinished at the drain
    /// deadline of `close`.
    pub dropped: u64,
}

struct Inner {
    drain_timeout: Duration,
    pool: Pool,
    topics: Mutex<HashMap<String, TopicState>>,
    closed: AtomicBool,
    /// Serializes `close` so that every caller returns once the bus is closed.
    closing: tokio::sync::Mutex<bool>,
    next_subscription: AtomicU64,
    settle: mpsc::UnboundedSender<Delivery>,
    /// Deliveries submitted and not yet settled (dead letters written included).
    in_flight: AtomicUsize,
    idle: Notify,
    dead_lettered: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct TopicState {
    sequence: u64,
    subscriptions: Vec<Arc<Sub>>,
}

struct Sub {
    id: u64,
    topic: String,
    kind: Kind,
    subject_keys: bool,
    dead_letter: Option<String>,
    active: AtomicBool,
}

#[derive(Clone)]
enum Kind {
    Plain(Arc<dyn MessageHandler>),
    Envelope(Arc<dyn EnvelopeHandler>),
}

/// A delivery on its way to being settled.
struct Delivery {
    sub: Arc<Sub>,
    message: Message,
    state: DeliveryState,
}

enum DeliveryState {
    /// Submitted to the engine.
    Running(JobHandle, DeliveryClass),
    /// Not decodable as an envelope: dead-lettered without an attempt.
    Undecodable(String),
}

/// What the settler decides for a delivery.
enum Verdict {
    Done,
    DeadLetter { reason: String, attempts: u32 },
    Dropped(&'static str),
}

impl MemoryBus {
    /// A bus on the current tokio runtime.
    pub fn new(config: MemoryConfig) -> Result<Self, Error> {
        config.validate()?;
        let pool = Pool::new(PoolConfig {
            metrics_namespace: metric_namespace("memory", &config.client_id),
            ..config.pool.clone()
        })?;
        let (settle, settled) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            drain_timeout: config.drain_timeout,
            pool,
            topics: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closing: tokio::sync::Mutex::new(false),
            next_subscription: AtomicU64::new(1),
            settle,
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            dead_lettered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        tokio::spawn(settle_loop(Arc::downgrade(&inner), settled));
        Ok(Self { inner })
    }

    /// What happened to messages that did not simply succeed.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            dead_lettered: self.inner.dead_lettered.load(Ordering::SeqCst),
            dropped: self.inner.dropped.load(Ordering::SeqCst),
        }
    }

    /// The ordering engine's counters.
    pub fn pool_stats(&self) -> eventbus_pool::PoolStats {
        self.inner.pool.stats()
    }

    fn subscribe_kind(
        &self,
        topic: &str,
        kind: Kind,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        validate_topic(topic)?;
        let dead_letter = match kind {
            Kind::Envelope(_) => options.dead_letter_topic(topic)?,
            Kind::Plain(_) => None,
        };
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let sub = Arc::new(Sub {
            id: inner.next_subscription.fetch_add(1, Ordering::Relaxed),
            topic: topic.to_owned(),
            kind,
            subject_keys: options.subject_keys,
            dead_letter,
            active: AtomicBool::new(true),
        });
        inner
            .topics()
            .entry(topic.to_owned())
            .or_default()
            .subscriptions
            .push(sub.clone());
        tracing::debug!(topic, subscription = sub.id, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                inner: Arc::downgrade(inner),
                sub,
            },
        ))
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        validate_topic(topic)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        self.inner.publish_to(topic, message).await
    }

    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error> {
        let message = OutboundMessage {
            payload: envelope.to_bytes()?,
            key: Some(envelope.aggregate_id.clone().into()),
            headers: envelope.headers(),
        };
        self.publish(topic, message).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_kind(topic, Kind::Plain(handler), options)
    }

    async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_kind(topic, Kind::Envelope(handler), options)
    }

    async fn health(&self) -> HealthReport {
        let inner = &self.inner;
        let closed = inner.closed.load(Ordering::SeqCst);
        let pool = inner.pool.stats();
        let subscriptions: usize = inner
            .topics()
            .values()
            .map(|topic| topic.subscriptions.len())
            .sum();
        HealthReport::new("memory")
            .with_bus_state(closed, subscriptions)
            .with_component("engine", HealthStatus::Healthy, Some(pool.to_string()))
    }

    /// Stops intake, waits until every delivery (dead letters included) is settled or the drain
    /// timeout has passed, then stops the engine; what is left is dropped and counted.
    async fn close(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let mut closed = inner.closing.lock().await;
        if *closed {
            return Ok(());
        }
        inner.closed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + inner.drain_timeout;
        let drained = tokio::time::timeout_at(deadline, inner.wait_idle())
            .await
            .is_ok();
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let report = inner.pool.shutdown(remaining).await;
        // Cancelled jobs settle as dropped; wait for the settler to count them.
        inner.wait_idle().await;
        tracing::info!(
            drained,
            cancelled = report.cancelled,
            dropped = inner.dropped.load(Ordering::SeqCst),
            "memory bus closed"
        );
        *closed = true;
        Ok(())
    }
}

impl Inner {
    fn topics(&self) -> MutexGuard<'_, HashMap<String, TopicState>> {
        // No code panics while holding this lock; a poisoned map is still consistent.
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers to every subscription of `topic` (no closed check: dead letters use this too).
    async fn publish_to(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        let (sequence, subscriptions) = {
            let mut topics = self.topics();
            let state = topics.entry(topic.to_owned()).or_default();
            state.sequence += 1;
            (state.sequence, state.subscriptions.clone())
        };
        let message = Message {
            topic: topic.to_owned(),
            key: message.key,
            headers: message.headers,
            payload: message.payload,
            meta: DeliveryMeta {
                position: Position::Sequence(sequence),
                delivery_attempt: 1,
                timestamp: Some(OffsetDateTime::now_utc()),
            },
        };
        for sub in subscriptions {
            if sub.active.load(Ordering::SeqCst) {
                self.deliver(sub, message.clone()).await?;
            }
        }
        Ok(())
    }

    /// Hands one message to one subscription: an engine job, or straight to the dead letters
    /// when an envelope subscription gets something that is not an envelope.
    async fn deliver(&self, sub: Arc<Sub>, message: Message) -> Result<(), Error> {
        let (job, class) = match sub.kind.clone() {
            Kind::Plain(handler) => {
                let mut source = MessageSource::from_message(&message);
                if sub.subject_keys {
                    source = source.with_subject_keys(&message.topic);
                }
                let key = extract_aggregate_id(&source);
                let job = job(
                    key,
                    DeliveryClass::AtMostOnce,
                    &sub,
                    &message,
                    move |ctx, message| {
                        let handler = handler.clone();
                        Box::pin(async move { handler.handle(ctx, message).await })
                    },
                );
                (job, DeliveryClass::AtMostOnce)
            }
            Kind::Envelope(handler) => match Envelope::from_bytes(&message.payload) {
                Err(error) => {
                    self.track(Delivery {
                        sub,
                        message,
                        state: DeliveryState::Undecodable(error.to_string()),
                    });
                    return Ok(());
                }
                Ok(envelope) => {
                    let key = envelope.aggregate().ok();
                    let job = job(
                        key,
                        DeliveryClass::AtLeastOnce,
                        &sub,
                        &message,
                        move |ctx, _| {
                            let (handler, envelope) = (handler.clone(), envelope.clone());
                            Box::pin(async move { handler.handle(ctx, envelope).await })
                        },
                    );
                    (job, DeliveryClass::AtLeastOnce)
                }
            },
        };
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        match self.pool.submit(job).await {
            Ok(handle) => {
                self.send_to_settler(Delivery {
                    sub,
                    message,
                    state: DeliveryState::Running(handle, class),
                });
                Ok(())
            }
            Err(error) => {
                self.settled_one();
                Err(error)
            }
        }
    }

    fn track(&self, delivery: Delivery) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.send_to_settler(delivery);
    }

    fn send_to_settler(&self, delivery: Delivery) {
        // The settler lives as long as any `Inner`; if it is gone, nothing is left to settle.
        if self.settle.send(delivery).is_err() {
            self.settled_one();
        }
    }

    fn settled_one(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Writes a dead letter. Publishing in memory waits for room and fails only once the engine
    /// is shut down; then the message is dropped and counted.
    async fn dead_letter(&self, sub: &Sub, message: &Message, reason: &str, attempts: u32) {
        let Some(topic) = &sub.dead_letter else {
            tracing::error!(
                topic = %sub.topic,
                reason,
                "message failed with dead-lettering disabled; memory cannot redeliver it: dropped"
            );
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        };
        let dead = dead_letter_message(message, reason, attempts);
        match self.publish_to(topic, dead).await {
            Ok(()) => {
                self.dead_lettered.fetch_add(1, Ordering::SeqCst);
                self.pool.record_dead_letter();
                tracing::warn!(topic = %sub.topic, dead_letter_topic = %topic, reason, attempts, "dead-lettered");
            }
            Err(error) => {
                tracing::error!(topic = %sub.topic, reason, %error, "dead letter not written: dropped");
                self.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

type Attempt = Pin<Box<dyn Future<Output = Result<(), eventbus_core::HandlerError>> + Send>>;

/// An engine job that calls `call` with a handler context and the message for each attempt,
/// unless the subscription was cancelled meanwhile.
fn job(
    key: Option<eventbus_core::AggregateId>,
    class: DeliveryClass,
    sub: &Arc<Sub>,
    message: &Message,
    call: impl Fn(HandlerContext, Message) -> Attempt + Send + 'static,
) -> Job {
    let (sub, message) = (sub.clone(), message.clone());
    Job::new(key, class, move |ctx: JobContext| {
        let context = HandlerContext::new(
            message.topic.clone(),
            message.meta.clone(),
            ctx.attempt(),
            ctx.cancellation().clone(),
        );
        let attempt = (sub.active.load(Ordering::SeqCst)).then(|| call(context, message.clone()));
        async move {
            match attempt {
                Some(attempt) => attempt.await,
                // Unsubscribed before it ran: no longer delivered.
                None => Ok(()),
            }
        }
    })
}

/// Settles deliveries as their outcomes arrive: nothing to do for an ack, a dead letter to write,
/// or a drop to count. Ends when the bus is gone.
async fn settle_loop(inner: Weak<Inner>, mut deliveries: mpsc::UnboundedReceiver<Delivery>) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            delivery = deliveries.recv() => match delivery {
                Some(delivery) => pending.push(verdict(delivery)),
                None => break,
            },
            Some((sub, message, verdict)) = pending.next(), if !pending.is_empty() => {
                let Some(inner) = inner.upgrade() else { break };
                inner.apply(&sub, &message, verdict).await;
            }
        }
    }
}

/// Waits for a delivery's outcome and decides what it calls for.
async fn verdict(delivery: Delivery) -> (Arc<Sub>, Message, Verdict) {
    let Delivery {
        sub,
        message,
        state,
    } = delivery;
    let verdict = match state {
        DeliveryState::Undecodable(reason) => Verdict::DeadLetter {
            reason,
            attempts: 0,
        },
        DeliveryState::Running(handle, class) => {
            let outcome = handle.await;
            match outcome.settlement(class) {
                Settlement::Ack => Verdict::Done,
                Settlement::Redeliver => Verdict::Dropped("unfinished at the drain deadline"),
                Settlement::DeadLetter => Verdict::DeadLetter {
                    reason: outcome.failure_reason(),
                    attempts: outcome.attempts(),
                },
            }
        }
    };
    (sub, message, verdict)
}

impl Inner {
    async fn apply(&self, sub: &Sub, message: &Message, verdict: Verdict) {
        match verdict {
            Verdict::Done => {}
            Verdict::Dropped(why) => {
                tracing::warn!(topic = %sub.topic, why, "message dropped");
                self.dropped.fetch_add(1, Ordering::SeqCst);
            }
            Verdict::DeadLetter { reason, attempts } => {
                self.dead_letter(sub, message, &reason, attempts).await;
            }
        }
        self.settled_one();
    }
}

/// Stops one subscription.
struct Control {
    inner: Weak<Inner>,
    sub: Arc<Sub>,
}

#[async_trait]
impl SubscriptionControl for Control {
    async fn unsubscribe(&self) -> Result<(), Error> {
        self.sub.active.store(false, Ordering::SeqCst);
        if let Some(inner) = self.inner.upgrade()
            && let Some(topic) = inner.topics().get_mut(&self.sub.topic)
        {
            topic.subscriptions.retain(|sub| sub.id != self.sub.id);
        }
        tracing::debug!(topic = %self.sub.topic, subscription = self.sub.id, "unsubscribed");
        Ok(())
    }
}
