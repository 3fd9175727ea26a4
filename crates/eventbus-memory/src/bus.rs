//! The in-process bus: topics that hand each message to their subscriptions' consumers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use async_trait::async_trait;
use eventbus_core::{
    ConnectionState, ConnectionWatch, DeliveryMeta, EnsureMode, Error, Message, OffsetDateTime,
    OutboundMessage, Position, Subscription, SubscriptionControl, TopicAdmin, TopicReport,
    TopicSpec, validate_topic,
};
use eventbus_pool::consume::{Consumer, Runtime};
use eventbus_pool::transport::{
    AckFuture, DeadLetterWriter, Delivery, Outgoing, Receipt, SubscribeRequest, Transport,
};
use eventbus_pool::{BusSettings, ShutdownReport, TransportBus};

/// An in-process event bus with the full delivery contract and no broker: the
/// [`TransportBus`] over [`MemoryTransport`], made by [`start`](crate::start).
///
/// Every subscription of a topic receives every message published to it after it subscribed;
/// messages are not retained. Envelopes are handled at-least-once within the process: retried in
/// their aggregate's lane, then written to the dead-letter topic (`{topic}.DLQ` unless the
/// subscription says otherwise), itself a memory topic that can be subscribed. There is no
/// broker to redeliver from, so what a subscription gives back (queued when it unsubscribes, or
/// unfinished when `close` reaches its drain deadline) is dropped and counted (see
/// [`MemoryStats`]). No dead letter is kept: the dead-letter store calls fail with
/// [`ErrorKind::Unsupported`](eventbus_core::ErrorKind::Unsupported), and parking is refused.
///
/// Publishing waits while the engine is full (a slow subscription slows its publishers), so
/// memory stays bounded by the pool's capacity; a handler publishing on its own bus never waits
/// (the engine would wait for itself).
pub type MemoryBus = TransportBus<MemoryTransport>;

/// The memory backend's transport: topics that hand each message to their subscriptions'
/// consumers.
pub struct MemoryTransport {
    runtime: Arc<Runtime>,
    topics: Arc<Topics>,
    /// Connected until closed: there is no broker to lose.
    connection: tokio::sync::watch::Sender<ConnectionState>,
}

/// Counters of what the bus did with messages that did not simply succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MemoryStats {
    /// Messages written to a dead-letter topic.
    pub dead_lettered: u64,
    /// Messages dropped: given back unhandled (queued at unsubscribe, unfinished at the drain
    /// deadline of `close`), or undecodable with dead-lettering disabled.
    pub dropped: u64,
}

/// The topics and their subscriptions; also the writer of dead letters.
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

/// Dead letters are published to the memory topic like any message, and not kept.
struct DeadLetters(Weak<Topics>);

#[async_trait]
impl DeadLetterWriter for DeadLetters {
    async fn publish_dead_letter(&self, letter: Outgoing<'_>) -> Result<(), Error> {
        match self.0.upgrade() {
            Some(topics) => topics
                .publish(letter.topic, letter.message)
                .await
                .map(|_| ()),
            None => Err(Error::Closed),
        }
    }
}

/// A memory bus on the current tokio runtime, its engine, metric namespace and drain timeout
/// from `settings` (`BusSettings::new("memory", client_id)` for the defaults).
pub fn start(settings: BusSettings) -> Result<MemoryBus, Error> {
    let topics = Arc::new(Topics::default());
    let runtime = Arc::new(Runtime::new(
        settings,
        Arc::new(DeadLetters(Arc::downgrade(&topics))),
    )?);
    let transport = MemoryTransport {
        runtime: runtime.clone(),
        topics,
        connection: tokio::sync::watch::Sender::new(ConnectionState::Connected),
    };
    Ok(TransportBus::new(runtime, transport))
}

impl MemoryTransport {
    /// What happened to messages that did not simply succeed.
    pub fn stats(&self) -> MemoryStats {
        MemoryStats {
            dead_lettered: self.runtime.stats().dead_lettered,
            dropped: self.topics.receipt.dropped.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    /// Delivers the message to the topic's subscriptions (waiting for room in their lanes);
    /// the acknowledgement is its sequence, known at once.
    async fn send(&self, outgoing: Outgoing<'_>) -> Result<AckFuture, Error> {
        let position = self
            .topics
            .publish(outgoing.topic, outgoing.message)
            .await?;
        Ok(Box::pin(std::future::ready(Ok(position))))
    }

    /// # Cancel safety
    ///
    /// Cancel safe: nothing is awaited.
    async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, Error> {
        let topic = request.topic().to_owned();
        let id = self
            .topics
            .next_subscription
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let consumer = self
            .runtime
            .subscribe(request.spec.with_name(format!("memory-{id}")))?;
        self.topics
            .lock()
            .entry(topic.clone())
            .or_default()
            .subscriptions
            .push(consumer.clone());
        tracing::debug!(topic, subscription = id, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                topics: Arc::downgrade(&self.topics),
                drain_timeout: self.runtime.settings().drain_timeout,
                consumer,
            },
        ))
    }

    fn connection_state(&self) -> ConnectionWatch {
        self.connection.subscribe()
    }

    fn topic_admin(&self) -> Option<&dyn TopicAdmin> {
        Some(self)
    }

    async fn stop_intake(&self, _deadline: tokio::time::Instant) {
        self.connection.send_replace(ConnectionState::Closed);
    }

    async fn finish_close(&self, _report: &ShutdownReport) {
        tracing::info!(
            dropped = self.topics.receipt.dropped.load(Ordering::Relaxed),
            "memory bus closed"
        );
    }
}

#[async_trait]
impl TopicAdmin for MemoryTransport {
    /// Memory topics exist as soon as they are named and have nothing to configure: every
    /// valid topic matches its spec.
    async fn ensure_topic(
        &self,
        spec: &TopicSpec,
        _mode: EnsureMode,
    ) -> Result<TopicReport, Error> {
        validate_topic(&spec.name)?;
        Ok(TopicReport::default())
    }
}

impl Topics {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TopicState>> {
        // No code panics while holding this lock; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
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
    topics: Weak<Topics>,
    drain_timeout: std::time::Duration,
    consumer: Arc<Consumer>,
}

#[async_trait]
impl SubscriptionControl for Control {
    /// Stops delivery: messages queued for the subscription are dropped (counted), running ones
    /// finish up to the drain timeout.
    async fn unsubscribe(&self) -> Result<(), Error> {
        let topic = &self.consumer.spec().topic;
        if let Some(topics) = self.topics.upgrade()
            && let Some(state) = topics.lock().get_mut(topic)
        {
            state
                .subscriptions
                .retain(|consumer| !Arc::ptr_eq(consumer, &self.consumer));
        }
        let report = self.consumer.close(self.drain_timeout).await;
        tracing::debug!(topic, subscription = %self.consumer.spec().name, handed_back = report.handed_back, "unsubscribed");
        Ok(())
    }
}
