//! The in-process bus: topics that hand each message to their subscriptions' consumers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use eventbus_core::{
    ConnectionState, ConnectionWatch, DeliveryMeta, Envelope, EnvelopeHandler, Error, EventBus,
    HealthReport, Message, MessageHandler, OffsetDateTime, OutboundMessage, PendingPublish,
    Position, PublishResults, SubscribeOptions, Subscription, SubscriptionControl, validate_topic,
};
use eventbus_pool::BusSettings;
use eventbus_pool::consume::{
    AckFuture, Consumer, Delivery, Handler, Receipt, Runtime, SubscriptionSpec, Transport,
};

/// An in-process event bus with the full delivery contract and no broker.
///
/// Every subscription of a topic receives every message published to it after it subscribed;
/// messages are not retained. Envelopes are handled at-least-once within the process: retried in
/// their aggregate's lane, then written to the dead-letter topic (`{topic}.DLQ` unless the
/// subscription says otherwise), itself a memory topic that can be subscribed. There is no
/// broker to redeliver from, so what a subscription gives back (queued when it unsubscribes, or
/// unfinished when [`close`](EventBus::close) reaches its drain deadline) is dropped and counted
/// (see [`MemoryStats`]).
///
/// Publishing waits while the engine is full (a slow subscription slows its publishers), so
/// memory stays bounded by the pool's capacity; a handler publishing on its own bus never waits
/// (the engine would wait for itself).
pub struct MemoryBus {
    inner: Arc<Inner>,
}

/// Counters of what the bus did with messages that did not simply succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Messages written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Messages dropped: given back unhandled (queued at unsubscribe, unfinished at the drain
    /// deadline of `close`), or undecodable with dead-lettering disabled.
    pub dropped: u64,
}

struct Inner {
    runtime: Runtime,
    topics: Arc<Topics>,
    closed: AtomicBool,
    /// Serializes `close` so that every caller returns once the bus is closed.
    closing: tokio::sync::Mutex<bool>,
    /// Connected until closed: there is no broker to lose.
    connection: tokio::sync::watch::Sender<ConnectionState>,
}

/// The topics and their subscriptions; also the transport that writes dead letters.
#[derive(Default)]
struct Topics {
    map: Mutex<HashMap<String, TopicState>>,
    next_subscription: AtomicU64,
    /// The receipt every delivery shares: memory has nothing to acknowledge.
    receipt: Arc<Drops>,
}

#[derive(Default)]
struct TopicState {
    sequence: u64,
    subscriptions: Vec<Arc<Consumer>>,
}

/// Settling in memory: nothing to acknowledge, and nothing to redeliver from, so what is given
/// back is dropped and counted.
#[derive(Default)]
struct Drops {
    dropped: AtomicU64,
}

#[async_trait]
impl Receipt for Drops {
    async fn ack(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn give_back(&self) -> Result<(), Error> {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn terminate(&self) -> Result<(), Error> {
        Ok(())
    }

    fn abandon(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Dead letters are published to the memory topic like any message.
struct DeadLetters(Weak<Topics>);

#[async_trait]
impl Transport for DeadLetters {
    async fn publish_dead_letter(
        &self,
        topic: &str,
        letter: OutboundMessage,
        _dedup_id: Option<&str>,
    ) -> Result<(), Error> {
        match self.0.upgrade() {
            Some(topics) => topics.publish(topic, letter).await.map(|_| ()),
            None => Err(Error::Closed),
        }
    }
}

impl MemoryBus {
    /// A bus on the current tokio runtime, its engine, metric namespace and drain timeout
    /// from `settings` (`BusSettings::new("memory", client_id)` for the defaults).
    pub fn new(settings: BusSettings) -> Result<Self, Error> {
        let topics = Arc::new(Topics::default());
        let runtime = Runtime::new(settings, Arc::new(DeadLetters(Arc::downgrade(&topics))))?;
        Ok(Self {
            inner: Arc::new(Inner {
                runtime,
                topics,
                closed: AtomicBool::new(false),
                closing: tokio::sync::Mutex::new(false),
                connection: tokio::sync::watch::Sender::new(ConnectionState::Connected),
            }),
        })
    }

    /// What happened to messages that did not simply succeed.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            dead_lettered: self.inner.runtime.stats().dead_lettered,
            dropped: self.inner.topics.receipt.dropped.load(Ordering::Relaxed),
        }
    }

    /// The ordering engine's counters.
    pub fn pool_stats(&self) -> eventbus_pool::PoolStats {
        self.inner.runtime.pool_stats()
    }

    /// The topics to publish `topic` into: fails when the name is invalid or the bus closed.
    fn open_topic(&self, topic: &str) -> Result<&Topics, Error> {
        validate_topic(topic)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        Ok(&self.inner.topics)
    }

    fn subscribe_handler(
        &self,
        topic: &str,
        handler: Handler,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        validate_topic(topic)?;
        let dead_letter = if handler.is_envelope() {
            options.dead_letter_topic(topic)?
        } else {
            None
        };
        if options.park_on_dead_letter {
            // A parked aggregate waits for a replay, and memory keeps no dead letters to replay.
            return Err(Error::config(
                "park_on_dead_letter",
                "the memory backend keeps no dead letters to replay: parking would hold an aggregate for ever",
            ));
        }
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let id = inner
            .topics
            .next_subscription
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let name = format!("memory-{id}");
        let consumer = inner.runtime.subscribe(
            SubscriptionSpec::new(topic, name, handler)
                .with_dead_letter(dead_letter)
                .with_subject_keys(options.subject_keys)
                .with_handler_timeout(options.checked_handler_timeout()?)
                .with_park_on_dead_letter(options.park_on_dead_letter),
        )?;
        inner
            .topics
            .lock()
            .entry(topic.to_owned())
            .or_default()
            .subscriptions
            .push(consumer.clone());
        tracing::debug!(topic, subscription = id, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                inner: Arc::downgrade(inner),
                consumer,
            },
        ))
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        let topics = self.open_topic(topic)?;
        self.inner
            .runtime
            .publish(topic, message, |message| async move {
                topics.publish(topic, message).await.map(|_| ())
            })
            .await
    }

    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error> {
        let topics = self.open_topic(topic)?;
        self.inner
            .runtime
            .publish_envelope(topic, envelope, |message| async move {
                topics.publish(topic, message).await.map(|_| ())
            })
            .await
    }

    /// Delivers the message to the topic's subscriptions (waiting for room, as
    /// [`publish`](Self::publish) does); the pending publish resolves at once to its sequence.
    async fn start_publish(
        &self,
        topic: &str,
        message: OutboundMessage,
    ) -> Result<PendingPublish, Error> {
        let topics = self.open_topic(topic)?;
        self.inner
            .runtime
            .start_publish(topic, message, |message| topics.hand_over(topic, message))
            .await
    }

    /// As [`start_publish`](Self::start_publish).
    async fn start_publish_envelope(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<PendingPublish, Error> {
        let topics = self.open_topic(topic)?;
        self.inner
            .runtime
            .start_publish_envelope(topic, envelope, |message| topics.hand_over(topic, message))
            .await
    }

    fn publish_results(&self) -> PublishResults {
        self.inner.runtime.publish_results()
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_handler(topic, Handler::Plain(handler), options)
    }

    async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_handler(topic, Handler::Envelope(handler), options)
    }

    async fn health(&self) -> HealthReport {
        let inner = &self.inner;
        let closed = inner.closed.load(Ordering::SeqCst);
        let report =
            HealthReport::new("memory").with_bus_state(closed, inner.runtime.subscriptions());
        inner.runtime.add_health(report)
    }

    /// Memory topics exist as soon as they are named and have nothing to configure: every
    /// valid topic matches its spec.
    async fn ensure_topic(
        &self,
        spec: &eventbus_core::TopicSpec,
        _mode: eventbus_core::EnsureMode,
    ) -> Result<eventbus_core::TopicReport, Error> {
        validate_topic(&spec.name)?;
        Ok(eventbus_core::TopicReport::default())
    }

    /// The memory backend keeps no dead letters (they go to the dead-letter topic's
    /// subscribers, if any): fails with `Config` (field `type`).
    async fn dead_letters(
        &self,
        _dead_letter_topic: &str,
    ) -> Result<Vec<eventbus_core::StoredDeadLetter>, Error> {
        Err(no_dead_letter_store())
    }

    /// See [`dead_letters`](Self::dead_letters).
    async fn remove_dead_letter(
        &self,
        _letter: &eventbus_core::StoredDeadLetter,
    ) -> Result<(), Error> {
        Err(no_dead_letter_store())
    }

    fn connection_state(&self) -> ConnectionWatch {
        self.inner.connection.subscribe()
    }

    /// Stops intake, lets queued and running messages (dead letters included) finish until the
    /// drain timeout, then stops the engine; what is left is dropped and counted.
    async fn close(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let mut closed = inner.closing.lock().await;
        if *closed {
            return Ok(());
        }
        inner.closed.store(true, Ordering::SeqCst);
        inner.connection.send_replace(ConnectionState::Closed);
        let deadline = tokio::time::Instant::now() + inner.runtime.settings().drain_timeout;
        let report = inner.runtime.close(deadline).await;
        tracing::info!(
            drained = report.drained,
            cancelled = report.cancelled,
            dropped = inner.topics.receipt.dropped.load(Ordering::Relaxed),
            "memory bus closed"
        );
        *closed = true;
        Ok(())
    }
}

/// The memory backend's answer to the dead-letter store calls.
fn no_dead_letter_store() -> Error {
    Error::config(
        "type",
        "the memory backend keeps no dead letters: subscribe to the dead-letter topic instead",
    )
}

impl Topics {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TopicState>> {
        // No code panics while holding this lock; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers as [`publish`](Self::publish) does; the acknowledgement is the position, known
    /// at once.
    async fn hand_over(&self, topic: &str, message: OutboundMessage) -> Result<AckFuture, Error> {
        let position = self.publish(topic, message).await?;
        Ok(Box::pin(std::future::ready(Ok(position))))
    }

    /// Delivers to every subscription of `topic` (no closed check: dead letters use this too).
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<Position, Error> {
        let (sequence, subscriptions) = {
            let mut topics = self.lock();
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
        // The last subscription takes the message itself; the others a copy each.
        if let Some((last, others)) = subscriptions.split_last() {
            for consumer in others {
                self.deliver(consumer, message.clone()).await?;
            }
            self.deliver(last, message).await?;
        }
        Ok(Position::Sequence(sequence))
    }

    /// Delivers `message` to one subscription (one unsubscribed meanwhile is skipped).
    async fn deliver(&self, consumer: &Consumer, message: Message) -> Result<(), Error> {
        let delivery = Delivery {
            message,
            receipt: self.receipt.clone(),
            held_id: None,
        };
        match consumer.deliver(delivery).await {
            Ok(_) => Ok(()),
            // Unsubscribed meanwhile: no longer delivered to.
            Err(Error::Closed) if consumer.is_closed() => Ok(()),
            Err(error) => Err(error),
        }
    }
}

/// Stops one subscription.
struct Control {
    inner: Weak<Inner>,
    consumer: Arc<Consumer>,
}

#[async_trait]
impl SubscriptionControl for Control {
    /// Stops delivery: messages queued for the subscription are dropped (counted), running ones
    /// finish up to the drain timeout.
    async fn unsubscribe(&self) -> Result<(), Error> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let topic = &self.consumer.spec().topic;
        if let Some(state) = inner.topics.lock().get_mut(topic) {
            state
                .subscriptions
                .retain(|consumer| !Arc::ptr_eq(consumer, &self.consumer));
        }
        let report = self
            .consumer
            .close(inner.runtime.settings().drain_timeout)
            .await;
        tracing::debug!(topic, subscription = %self.consumer.spec().name, handed_back = report.handed_back, "unsubscribed");
        Ok(())
    }
}
