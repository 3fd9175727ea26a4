//! The bus written once: publishing, subscribing, health, close and the optional capabilities
//! over any [`Transport`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eventbus_core::{
    ConnectionWatch, DeadLetterStore, EnsureMode, Envelope, EnvelopeHandler, Error, EventBus,
    HealthReport, MessageHandler, OutboundMessage, PendingPublish, Position, PublishResults,
    StoredDeadLetter, SubscribeOptions, Subscription, TopicAdmin, TopicReport, TopicSpec,
    async_trait, validate_topic,
};

use crate::consume::{ConsumeStats, Runtime, SubscriptionSpec};
use crate::transport::{AckFuture, Handler, Outgoing, SubscribeRequest, Transport};
use crate::{PoolStats, ShutdownReport};

/// An event bus over a backend's [`Transport`]: what every backend's bus is
/// (`eventbus_memory::MemoryBus`, `eventbus_nats::NatsBus`, `eventbus_kafka::KafkaBus` are this
/// type over their transports).
///
/// Every method is inherent (no trait to import); the bus also implements [`EventBus`],
/// [`DeadLetterStore`] and [`TopicAdmin`] for code that holds a trait object. A capability the
/// transport lacks fails with [`Error::Unsupported`].
///
/// # Example
///
/// A transport that delivers nothing and acknowledges every send at once:
///
/// ```
/// use std::sync::Arc;
/// use eventbus_core::{async_trait, ConnectionState, ConnectionWatch, Envelope, Error, ErrorKind,
///     OutboundMessage, Position, Subscription};
/// use eventbus_pool::{BusSettings, TransportBus};
/// use eventbus_pool::consume::Runtime;
/// use eventbus_pool::transport::{AckFuture, DeadLetterWriter, Outgoing, SubscribeRequest, Transport};
///
/// struct Void(tokio::sync::watch::Sender<ConnectionState>);
///
/// #[async_trait]
/// impl Transport for Void {
///     fn name(&self) -> &'static str { "void" }
///     async fn send(&self, _: Outgoing<'_>) -> Result<AckFuture, Error> {
///         Ok(Box::pin(std::future::ready(Ok(Position::Unknown))))
///     }
///     async fn subscribe(&self, _: SubscribeRequest) -> Result<Subscription, Error> {
///         Err(Error::config("type", "void delivers nothing"))
///     }
///     fn connection_state(&self) -> ConnectionWatch { self.0.subscribe() }
/// }
///
/// struct NoDeadLetters;
///
/// #[async_trait]
/// impl DeadLetterWriter for NoDeadLetters {
///     async fn publish_dead_letter(&self, _: Outgoing<'_>) -> Result<(), Error> {
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Error> {
/// let runtime = Arc::new(Runtime::new(BusSettings::new("void", "svc"), Arc::new(NoDeadLetters))?);
/// let bus = TransportBus::new(runtime, Void(tokio::sync::watch::Sender::new(ConnectionState::Connected)));
/// bus.publish_envelope("orders", &Envelope::new("order-1", "OrderPlaced", 1, &1)?).await?;
/// assert_eq!(bus.dead_letters("orders.DLQ").await.unwrap_err().kind(), ErrorKind::Unsupported);
/// bus.close().await?;
/// assert_eq!(bus.publish("orders", OutboundMessage::new(&b"x"[..])).await.unwrap_err().kind(), ErrorKind::Closed);
/// # Ok(())
/// # }
/// ```
pub struct TransportBus<T> {
    runtime: Arc<Runtime>,
    transport: T,
    closed: AtomicBool,
    /// Serializes `close`, so that every caller returns once the bus is closed.
    closing: tokio::sync::Mutex<bool>,
    /// What lives as long as the bus (see [`TransportBus::holding`]).
    held: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

impl<T: Transport> TransportBus<T> {
    /// The bus of `transport`, whose subscriptions consume on `runtime` (the runtime the
    /// transport's consumers were, or will be, started on).
    pub fn new(runtime: Arc<Runtime>, transport: T) -> Self {
        Self {
            runtime,
            transport,
            closed: AtomicBool::new(false),
            closing: tokio::sync::Mutex::new(false),
            held: Vec::new(),
        }
    }

    /// The same bus, keeping `value` alive as long as it lives: a claim that must end with the
    /// bus, whoever drops it last (the `eventbus` facade's claim of a metrics namespace).
    pub fn holding(mut self, value: impl std::any::Any + Send + Sync) -> Self {
        self.held.push(Box::new(value));
        self
    }

    /// The backend's transport, for what only that backend offers (its own statistics, say).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The consume runtime.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The ordering engine's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.runtime.pool_stats()
    }

    /// What the consume runtime did besides handling: dead letters written and failed,
    /// messages given back, handlers dropped.
    pub fn consume_stats(&self) -> ConsumeStats {
        self.runtime.stats()
    }

    /// The same bus with its transport boxed: buses of different backends as one type (what
    /// the `eventbus` facade holds).
    pub fn into_dyn(self) -> TransportBus<Box<dyn Transport>> {
        TransportBus {
            runtime: self.runtime,
            transport: Box::new(self.transport),
            closed: self.closed,
            closing: self.closing,
            held: self.held,
        }
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Fails when `topic` is invalid or the bus closed.
    fn check_open(&self, topic: &str) -> Result<(), Error> {
        validate_topic(topic)?;
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Publishes a plain message to `topic` and waits for the broker's acknowledgement (see
    /// [`EventBus::publish`]).
    ///
    /// # Cancel safety
    ///
    /// Dropped before the acknowledgement, the message may or may not be published.
    pub async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        self.check_open(topic)?;
        let transport = &self.transport;
        self.runtime
            .publish(topic, message, |message| {
                transport.publish(Outgoing::new(topic, message))
            })
            .await
    }

    /// Publishes an envelope to `topic` and waits for the broker's acknowledgement (see
    /// [`EventBus::publish_envelope`]).
    ///
    /// # Cancel safety
    ///
    /// As [`publish`](Self::publish).
    pub async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error> {
        self.check_open(topic)?;
        let transport = &self.transport;
        self.runtime
            .publish_envelope(topic, envelope, |message| {
                transport.publish(Outgoing::new(topic, message).with_envelope(envelope))
            })
            .await
    }

    /// Starts publishing a plain message without waiting for the broker (see
    /// [`EventBus::start_publish`]).
    ///
    /// # Cancel safety
    ///
    /// Dropped while waiting for room in the window, nothing was sent. Dropped while the
    /// message is being handed to the client, it may still be published, and no result
    /// reports it.
    pub async fn start_publish(
        &self,
        topic: &str,
        message: OutboundMessage,
    ) -> Result<PendingPublish, Error> {
        self.check_open(topic)?;
        let transport = &self.transport;
        self.runtime
            .start_publish(topic, message, |message| {
                transport.send(Outgoing::new(topic, message))
            })
            .await
    }

    /// Starts publishing an envelope without waiting for the broker (see
    /// [`EventBus::start_publish_envelope`]).
    ///
    /// # Cancel safety
    ///
    /// As [`start_publish`](Self::start_publish).
    pub async fn start_publish_envelope(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<PendingPublish, Error> {
        self.check_open(topic)?;
        let transport = &self.transport;
        self.runtime
            .start_publish_envelope(topic, envelope, |message| {
                transport.send(Outgoing::new(topic, message).with_envelope(envelope))
            })
            .await
    }

    /// Publishes `envelopes` to `topic` pipelined (all started, then all awaited) and returns
    /// each one's result, in order (see [`EventBus::publish_envelope_batch`]).
    ///
    /// # Cancel safety
    ///
    /// Dropped part way, the envelopes started so far are published and report their results
    /// to the [`publish_results`](Self::publish_results) streams; the rest are not sent.
    pub async fn publish_envelope_batch(
        &self,
        topic: &str,
        envelopes: &[Envelope],
    ) -> Vec<Result<Position, Error>> {
        let mut started = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            started.push(self.start_publish_envelope(topic, envelope).await);
        }
        let mut results = Vec::with_capacity(started.len());
        for pending in started {
            results.push(match pending {
                Ok(pending) => pending.await,
                Err(error) => Err(error),
            });
        }
        results
    }

    /// A stream of the results of the pipelined publishes started from now on.
    pub fn publish_results(&self) -> PublishResults {
        self.runtime.publish_results()
    }

    /// Subscribes `handler` to the plain messages of `topic` (at-most-once).
    ///
    /// # Cancel safety
    ///
    /// As the transport's `subscribe` (each backend documents its own).
    pub async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.open(topic, Handler::Plain(handler), options).await
    }

    /// Subscribes `handler` to the envelopes of `topic` (at-least-once, in order per
    /// aggregate).
    ///
    /// # Cancel safety
    ///
    /// As the transport's `subscribe` (each backend documents its own).
    pub async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.open(topic, Handler::Envelope(handler), options).await
    }

    /// Validates what every backend checks alike, then lets the transport open it.
    async fn open(
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
        let handler_timeout = options.checked_handler_timeout()?;
        if let Some(policy) = &options.retry {
            policy.validate("retry")?;
        }
        if options.park_on_dead_letter {
            if self.runtime.dead_letter_store().is_none() {
                // A parked aggregate waits for a replay of dead letters nobody keeps.
                return Err(Error::config(
                    "park_on_dead_letter",
                    format!(
                        "the {} backend keeps no dead letters to replay: parking would hold an aggregate for ever",
                        self.transport.name()
                    ),
                ));
            }
            if dead_letter.is_none() {
                return Err(Error::config(
                    "park_on_dead_letter",
                    "parking needs an envelope subscription with a dead-letter topic",
                ));
            }
        }
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let spec = SubscriptionSpec::new(topic, String::new(), handler)
            .with_dead_letter(dead_letter)
            .with_subject_keys(options.subject_keys)
            .with_handler_timeout(handler_timeout)
            .with_park_on_dead_letter(options.park_on_dead_letter)
            .with_retry(options.retry.clone());
        self.transport
            .subscribe(SubscribeRequest::new(spec, options))
            .await
    }

    /// The bus's health: the transport's components (its broker connection), the bus's state
    /// (`bus`: open or closed, and its subscriptions) and the runtime's (`engine`, `lag`).
    pub async fn health(&self) -> HealthReport {
        let report = self
            .transport
            .health(HealthReport::new(self.transport.name()));
        let subscriptions = self
            .transport
            .subscription_count()
            .unwrap_or_else(|| self.runtime.subscriptions());
        self.runtime
            .add_health(report.with_bus_state(self.is_closed(), subscriptions))
    }

    /// A watch of the bus's connection to its broker.
    pub fn connection_state(&self) -> ConnectionWatch {
        self.transport.connection_state()
    }

    /// Stops intake, lets queued and running handlers finish up to the drain timeout,
    /// acknowledges what finished and leaves the rest for redelivery (see
    /// [`EventBus::close`]). Idempotent: every call returns once the bus is closed.
    ///
    /// # Cancel safety
    ///
    /// The bus refuses new publishes and subscriptions from the first poll. Dropped before it
    /// returns, the close stops where it was (intake may still be stopping, the engine goes on
    /// draining up to its deadline, the transport's client is not flushed yet) and the bus is
    /// not yet closed: a later call runs the close again, with a fresh drain deadline, and
    /// returns once the bus is closed. Call `close` again after dropping one.
    pub async fn close(&self) -> Result<(), Error> {
        let mut closed = self.closing.lock().await;
        if *closed {
            return Ok(());
        }
        self.closed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.runtime.settings().drain_timeout;
        self.transport.stop_intake(deadline).await;
        let report = self.runtime.close(deadline).await;
        self.transport.finish_close(&report).await;
        tracing::info!(
            backend = self.transport.name(),
            drained = report.drained,
            cancelled = report.cancelled,
            "event bus closed"
        );
        *closed = true;
        Ok(())
    }

    fn store(&self, operation: &'static str) -> Result<&dyn DeadLetterStore, Error> {
        self.runtime.dead_letter_store().ok_or(Error::Unsupported {
            operation,
            backend: self.transport.name(),
        })
    }

    /// The dead letters `dead_letter_topic` holds now, oldest first (see
    /// [`DeadLetterStore::dead_letters`]); [`Error::Unsupported`] on a backend that keeps none.
    pub async fn dead_letters(
        &self,
        dead_letter_topic: &str,
    ) -> Result<Vec<StoredDeadLetter>, Error> {
        validate_topic(dead_letter_topic)?;
        self.store("dead_letters")?
            .dead_letters(dead_letter_topic)
            .await
    }

    /// The dead letter at `position` of `dead_letter_topic` (see
    /// [`DeadLetterStore::dead_letter_at`]); [`Error::Unsupported`] on a backend that keeps
    /// none.
    pub async fn dead_letter_at(
        &self,
        dead_letter_topic: &str,
        position: Position,
    ) -> Result<Option<StoredDeadLetter>, Error> {
        validate_topic(dead_letter_topic)?;
        self.store("dead_letter_at")?
            .dead_letter_at(dead_letter_topic, position)
            .await
    }

    /// Removes a dead letter (see [`DeadLetterStore::remove_dead_letter`]);
    /// [`Error::Unsupported`] on a backend that keeps none.
    pub async fn remove_dead_letter(&self, letter: &StoredDeadLetter) -> Result<(), Error> {
        self.store("remove_dead_letter")?
            .remove_dead_letter(letter)
            .await
    }

    /// Makes `spec.name` what `spec` says, as far as `mode` allows (see
    /// [`TopicAdmin::ensure_topic`]); [`Error::Unsupported`] on a backend without topic
    /// administration.
    pub async fn ensure_topic(
        &self,
        spec: &TopicSpec,
        mode: EnsureMode,
    ) -> Result<TopicReport, Error> {
        validate_topic(&spec.name)?;
        let Some(admin) = self.transport.topic_admin() else {
            return Err(Error::Unsupported {
                operation: "ensure_topic",
                backend: self.transport.name(),
            });
        };
        admin.ensure_topic(spec, mode).await
    }
}

impl<T: Transport> std::fmt::Debug for TransportBus<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportBus")
            .field("backend", &self.transport.name())
            .field("closed", &self.is_closed())
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<T: Transport> EventBus for TransportBus<T> {
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        TransportBus::publish(self, topic, message).await
    }

    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error> {
        TransportBus::publish_envelope(self, topic, envelope).await
    }

    async fn start_publish(
        &self,
        topic: &str,
        message: OutboundMessage,
    ) -> Result<PendingPublish, Error> {
        TransportBus::start_publish(self, topic, message).await
    }

    async fn start_publish_envelope(
        &self,
        topic: &str,
        envelope: &Envelope,
    ) -> Result<PendingPublish, Error> {
        TransportBus::start_publish_envelope(self, topic, envelope).await
    }

    async fn publish_envelope_batch(
        &self,
        topic: &str,
        envelopes: &[Envelope],
    ) -> Vec<Result<Position, Error>> {
        TransportBus::publish_envelope_batch(self, topic, envelopes).await
    }

    fn publish_results(&self) -> PublishResults {
        TransportBus::publish_results(self)
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        TransportBus::subscribe(self, topic, handler, options).await
    }

    async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        TransportBus::subscribe_envelope(self, topic, handler, options).await
    }

    async fn health(&self) -> HealthReport {
        TransportBus::health(self).await
    }

    fn connection_state(&self) -> ConnectionWatch {
        TransportBus::connection_state(self)
    }

    async fn close(&self) -> Result<(), Error> {
        TransportBus::close(self).await
    }
}

#[async_trait]
impl<T: Transport> DeadLetterStore for TransportBus<T> {
    async fn dead_letters(&self, dead_letter_topic: &str) -> Result<Vec<StoredDeadLetter>, Error> {
        TransportBus::dead_letters(self, dead_letter_topic).await
    }

    async fn dead_letter_at(
        &self,
        dead_letter_topic: &str,
        position: Position,
    ) -> Result<Option<StoredDeadLetter>, Error> {
        TransportBus::dead_letter_at(self, dead_letter_topic, position).await
    }

    async fn remove_dead_letter(&self, letter: &StoredDeadLetter) -> Result<(), Error> {
        TransportBus::remove_dead_letter(self, letter).await
    }
}

#[async_trait]
impl<T: Transport> TopicAdmin for TransportBus<T> {
    async fn ensure_topic(&self, spec: &TopicSpec, mode: EnsureMode) -> Result<TopicReport, Error> {
        TransportBus::ensure_topic(self, spec, mode).await
    }
}

/// A boxed transport is a transport: what [`TransportBus::into_dyn`] makes.
#[async_trait]
impl Transport for Box<dyn Transport> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn send(&self, outgoing: Outgoing<'_>) -> Result<AckFuture, Error> {
        (**self).send(outgoing).await
    }

    async fn publish(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        (**self).publish(outgoing).await
    }

    async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, Error> {
        (**self).subscribe(request).await
    }

    fn health(&self, report: HealthReport) -> HealthReport {
        (**self).health(report)
    }

    fn subscription_count(&self) -> Option<usize> {
        (**self).subscription_count()
    }

    fn connection_state(&self) -> ConnectionWatch {
        (**self).connection_state()
    }

    fn topic_admin(&self) -> Option<&dyn TopicAdmin> {
        (**self).topic_admin()
    }

    async fn stop_intake(&self, deadline: tokio::time::Instant) {
        (**self).stop_intake(deadline).await;
    }

    async fn finish_close(&self, report: &ShutdownReport) {
        (**self).finish_close(report).await;
    }
}
