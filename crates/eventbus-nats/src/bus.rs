//! The NATS JetStream bus: publishing, subscriptions, health, close.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use eventbus_core::{
    Envelope, EnvelopeHandler, Error, EventBus, HealthReport, HealthStatus, MessageHandler,
    OutboundMessage, SubscribeOptions, Subscription, SubscriptionControl, metric_namespace,
    validate_topic,
};
use eventbus_pool::{Pool, PoolConfig};
use tokio::task::JoinHandle;

use crate::config::{NatsConfig, Storage};
use crate::connection::{ConnectionState, connect};
use crate::consumer::ensure_consumer;
use crate::names::durable_name;
use crate::pull;
use crate::stats::{Counters, NatsStats};
use crate::streams::Streams;
use crate::subscription::{Handler, Sub};

/// The header that carries an [`OutboundMessage::key`] on NATS (which has no record key); the
/// consumer side turns it back into [`eventbus_core::Message::key`].
pub const KEY_HEADER: &str = "X-Message-Key";

/// An event bus on NATS JetStream.
///
/// Each topic lives in a stream (a configured one whose subjects cover it, one already on the
/// server, or `{stream_prefix}{topic}` created on first use: file storage for envelope and
/// dead-letter topics, memory for plain ones). Each subscription is a durable pull consumer
/// named `{client_id}_{topic}` (`_2`, `_3`, ... for further subscriptions of the same bus to the
/// same topic), created or updated with the configured `ack_wait`, `max_deliver`,
/// `max_ack_pending` and `backoff`, and kept when the subscription or the bus closes: a restart
/// resumes where the last run acknowledged. See `docs/nats.md`.
pub struct NatsBus {
    inner: Arc<Inner>,
}

/// What subscriptions and their jobs share with the bus.
pub(crate) struct Shared {
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) streams: Streams,
    pub(crate) counters: Counters,
}

struct Inner {
    shared: Arc<Shared>,
    connection: Arc<ConnectionState>,
    pool: Arc<Pool>,
    subscriptions: Mutex<Vec<Running>>,
    /// Durable slots in use per topic.
    slots: Arc<Mutex<HashMap<String, BTreeSet<usize>>>>,
    /// Durables this bus has read: only a durable a previous run left behind is replayed from
    /// its ack floor (a re-subscription here may still hold messages of its earlier self).
    read_durables: Mutex<std::collections::HashSet<String>>,
    closed: AtomicBool,
    closing: tokio::sync::Mutex<bool>,
}

/// A running subscription: its state and its tasks.
struct Running {
    sub: Arc<Sub>,
    tasks: Vec<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl NatsBus {
    /// Connects to the servers of `config`, creates the configured streams and starts the
    /// ordering engine on the current tokio runtime.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves nothing running (configured streams it created stay
    /// on the server).
    pub async fn connect(config: NatsConfig) -> Result<Self, Error> {
        config.validate()?;
        let namespace = metric_namespace("nats", &config.client_id);
        let (client, connection) = connect(&config, &namespace).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.request_timeout);
        let streams = Streams::new(&config);
        streams.create_configured(&js).await?;
        let pool = Pool::new(PoolConfig {
            metrics_namespace: namespace.clone(),
            ..config.pool.clone()
        })?;
        tracing::info!(client_id = %config.client_id, servers = ?config.urls, "NATS bus connected");
        Ok(Self {
            inner: Arc::new(Inner {
                shared: Arc::new(Shared {
                    client,
                    js,
                    config,
                    streams,
                    counters: Counters::new(&namespace),
                }),
                connection,
                pool: Arc::new(pool),
                subscriptions: Mutex::new(Vec::new()),
                slots: Arc::new(Mutex::new(HashMap::new())),
                read_durables: Mutex::new(std::collections::HashSet::new()),
                closed: AtomicBool::new(false),
                closing: tokio::sync::Mutex::new(false),
            }),
        })
    }

    /// What the bus did besides handling: redeliveries, in-progress acks, dead letters.
    pub fn stats(&self) -> NatsStats {
        self.inner.shared.counters.snapshot()
    }

    /// The ordering engine's counters.
    pub fn pool_stats(&self) -> eventbus_pool::PoolStats {
        self.inner.pool.stats()
    }

    /// The durable consumer name of this bus's `slot`-th subscription (from 1) to `topic`.
    pub fn durable_name(&self, topic: &str, slot: usize) -> String {
        durable_name(&self.inner.shared.config.client_id, topic, slot)
    }

    /// Deletes the durable consumer `durable` of the stream holding `topic`: its position is
    /// lost, and a later subscription starts from the beginning of the stream. Subscriptions
    /// and `close` never do this.
    pub async fn delete_consumer(&self, topic: &str, durable: &str) -> Result<(), Error> {
        validate_topic(topic)?;
        let shared = &self.inner.shared;
        let stream = shared
            .js
            .stream_by_subject(topic)
            .await
            .map_err(|error| Error::broker(format!("no stream holds {topic}"), error))?;
        shared
            .js
            .delete_consumer_from_stream(durable, &stream)
            .await
            .map_err(|error| Error::broker(format!("cannot delete consumer {durable}"), error))?;
        tracing::info!(stream, durable, "consumer deleted");
        Ok(())
    }

    async fn subscribe_handler(
        &self,
        topic: &str,
        handler: Handler,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        validate_topic(topic)?;
        let dead_letter = match handler {
            Handler::Envelope(_) => options.dead_letter_topic(topic)?,
            Handler::Plain(_) => None,
        };
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let shared = &inner.shared;
        let slot = {
            let mut slots = lock(&inner.slots);
            let used = slots.entry(topic.to_owned()).or_default();
            let slot = (1..).find(|slot| !used.contains(slot)).unwrap_or(1);
            used.insert(slot);
            slot
        };
        let release_slot = || {
            if let Some(used) = lock(&inner.slots).get_mut(topic) {
                used.remove(&slot);
            }
        };
        let durable = durable_name(&shared.config.client_id, topic, slot);
        let sub = Arc::new(Sub::new(
            topic,
            durable.clone(),
            handler,
            options.subject_keys,
            dead_letter,
        ));
        let tasks = if shared.config.topic(topic).ephemeral {
            let subscriber = match shared.client.subscribe(topic.to_owned()).await {
                Ok(subscriber) => subscriber,
                Err(error) => {
                    release_slot();
                    return Err(Error::broker(format!("cannot subscribe to {topic}"), error));
                }
            };
            vec![tokio::spawn(pull::core_loop(
                shared.clone(),
                inner.pool.clone(),
                sub.clone(),
                subscriber,
            ))]
        } else {
            let first_read = lock(&inner.read_durables).insert(durable.clone());
            let consumer = match ensure_consumer(shared, &sub, first_read).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    release_slot();
                    return Err(error);
                }
            };
            vec![
                tokio::spawn(pull::pull_loop(
                    shared.clone(),
                    inner.pool.clone(),
                    sub.clone(),
                    consumer,
                )),
                tokio::spawn(pull::progress_loop(shared.clone(), sub.clone())),
            ]
        };
        lock(&inner.subscriptions).push(Running {
            sub: sub.clone(),
            tasks,
        });
        tracing::info!(topic, durable = %sub.durable, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                inner: Arc::downgrade(inner),
                sub,
                slot,
            },
        ))
    }
}

/// The default storage of a topic's stream: file for envelope and dead-letter topics, memory
/// for plain topics, unless the topic's options say otherwise.
pub(crate) fn storage_for(config: &NatsConfig, topic: &str, envelopes: bool) -> Storage {
    config.topic(topic).storage.unwrap_or(
        if envelopes || topic.ends_with(eventbus_core::DEAD_LETTER_SUFFIX) {
            Storage::File
        } else {
            Storage::Memory
        },
    )
}

/// NATS headers from ours, plus the key header; a header NATS cannot carry is a typed error.
fn nats_headers(message: &OutboundMessage) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    let invalid = |name: &str, why: String| Error::Broker {
        message: format!("header {name:?} cannot be sent on NATS: {why}"),
        source: None,
    };
    for (name, value) in message.headers.iter() {
        let header =
            HeaderName::try_from(name).map_err(|error| invalid(name, error.to_string()))?;
        let text = std::str::from_utf8(value)
            .map_err(|_| invalid(name, "the value is not UTF-8".to_owned()))?;
        let value: HeaderValue =
            text.parse()
                .map_err(|error: async_nats::header::ParseHeaderValueError| {
                    invalid(name, error.to_string())
                })?;
        headers.append(header, value);
    }
    if let Some(key) = &message.key {
        let text = std::str::from_utf8(key)
            .map_err(|_| invalid(KEY_HEADER, "the key is not UTF-8".to_owned()))?;
        let value: HeaderValue =
            text.parse()
                .map_err(|error: async_nats::header::ParseHeaderValueError| {
                    invalid(KEY_HEADER, error.to_string())
                })?;
        headers.insert(KEY_HEADER, value);
    }
    Ok(headers)
}

impl Shared {
    /// Publishes to `topic`: core NATS for an ephemeral topic, otherwise JetStream into the
    /// topic's stream (created with `storage` if needed), waiting for the PubAck.
    pub(crate) async fn publish_to(
        &self,
        topic: &str,
        message: OutboundMessage,
        message_id: Option<&str>,
        storage: Storage,
    ) -> Result<(), Error> {
        let headers = nats_headers(&message)?;
        if self.config.topic(topic).ephemeral {
            return self
                .client
                .publish_with_headers(topic.to_owned(), headers, message.payload)
                .await
                .map_err(|error| Error::broker(format!("cannot publish to {topic}"), error));
        }
        self.streams.ensure(&self.js, topic, storage).await?;
        match self
            .send(topic, &message, headers.clone(), message_id)
            .await
        {
            Err(PublishFailure::StreamNotFound) => {
                // The stream went away (a memory stream after a server restart): find or make
                // it again, once.
                self.streams.forget(topic).await;
                self.streams.ensure(&self.js, topic, storage).await?;
                self.send(topic, &message, headers, message_id)
                    .await
                    .map_err(|failure| failure.into_error(topic))
            }
            result => result.map_err(|failure| failure.into_error(topic)),
        }
    }

    /// One JetStream publish, waiting for the PubAck up to `publish_timeout`.
    async fn send(
        &self,
        topic: &str,
        message: &OutboundMessage,
        headers: HeaderMap,
        message_id: Option<&str>,
    ) -> Result<(), PublishFailure> {
        let mut publish = PublishMessage::build()
            .payload(message.payload.clone())
            .headers(headers);
        if let Some(id) = message_id {
            publish = publish.message_id(id);
        }
        let timeout = self.config.publish_timeout;
        let attempt = async {
            let ack = self.js.send_publish(topic.to_owned(), publish).await?;
            ack.await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Err(_) => Err(PublishFailure::Timeout(timeout)),
            Ok(Ok(_ack)) => Ok(()),
            Ok(Err(error)) if error.kind() == PublishErrorKind::StreamNotFound => {
                Err(PublishFailure::StreamNotFound)
            }
            Ok(Err(error)) => Err(PublishFailure::Broker(error)),
        }
    }
}

/// Why one JetStream publish failed.
enum PublishFailure {
    StreamNotFound,
    Timeout(Duration),
    Broker(jetstream::context::PublishError),
}

impl PublishFailure {
    fn into_error(self, topic: &str) -> Error {
        match self {
            PublishFailure::StreamNotFound => Error::Broker {
                message: format!("no stream holds {topic}"),
                source: None,
            },
            PublishFailure::Timeout(after) => Error::Timeout {
                operation: "publish (waiting for the PubAck)",
                after,
            },
            PublishFailure::Broker(error) => {
                Error::broker(format!("cannot publish to {topic}"), error)
            }
        }
    }
}

#[async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, topic: &str, message: OutboundMessage) -> Result<(), Error> {
        validate_topic(topic)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let shared = &self.inner.shared;
        let storage = storage_for(&shared.config, topic, false);
        shared.publish_to(topic, message, None, storage).await
    }

    async fn publish_envelope(&self, topic: &str, envelope: &Envelope) -> Result<(), Error> {
        validate_topic(topic)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let message = OutboundMessage {
            payload: envelope.to_bytes()?,
            key: Some(envelope.aggregate_id.clone().into()),
            headers: envelope.headers(),
        };
        let shared = &self.inner.shared;
        let storage = storage_for(&shared.config, topic, true);
        shared
            .publish_to(topic, message, Some(&envelope.event_id), storage)
            .await
    }

    async fn subscribe(
        &self,
        topic: &str,
        handler: Arc<dyn MessageHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_handler(topic, Handler::Plain(handler), options)
            .await
    }

    async fn subscribe_envelope(
        &self,
        topic: &str,
        handler: Arc<dyn EnvelopeHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        self.subscribe_handler(topic, Handler::Envelope(handler), options)
            .await
    }

    async fn health(&self) -> HealthReport {
        let inner = &self.inner;
        let closed = inner.closed.load(Ordering::SeqCst);
        let connected = inner.connection.is_connected();
        let pool = inner.pool.stats();
        let subscriptions = lock(&inner.subscriptions).len();
        HealthReport::new("nats")
            .with_component(
                "connection",
                if connected {
                    HealthStatus::Healthy
                } else {
                    HealthStatus::Unhealthy
                },
                Some(format!(
                    "{} (last event: {}; {} disconnects)",
                    if connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    inner.connection.last_event(),
                    inner.connection.disconnects()
                )),
            )
            .with_bus_state(closed, subscriptions)
            .with_component("engine", HealthStatus::Healthy, Some(pool.to_string()))
    }

    /// Stops fetching (each subscription first takes what its open pull request still brings
    /// and one more batch of what the consumer holds, so that what was published just before
    /// `close` is handled), lets in-flight handlers finish and acknowledges them, up to the drain
    /// timeout; what is left unfinished is not acknowledged and the server redelivers it.
    async fn close(&self) -> Result<(), Error> {
        let inner = &self.inner;
        let mut closed = inner.closing.lock().await;
        if *closed {
            return Ok(());
        }
        inner.closed.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + inner.shared.config.drain_timeout;
        let running: Vec<Running> = lock(&inner.subscriptions).drain(..).collect();
        for running in &running {
            running.sub.stop(true);
        }
        let mut fetchers_done = true;
        let mut trackers = Vec::new();
        for running in running {
            let mut tasks = running.tasks.into_iter();
            if let Some(mut fetcher) = tasks.next()
                && tokio::time::timeout_at(deadline, &mut fetcher)
                    .await
                    .is_err()
            {
                // What it had fetched and not dispatched is redelivered after `ack_wait`.
                fetcher.abort();
                fetchers_done = false;
            }
            trackers.extend(tasks.map(|task| (running.sub.clone(), task)));
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let report = inner.pool.shutdown(remaining).await;
        for (sub, task) in trackers {
            sub.finish();
            let _ = task.await;
        }
        // Acks are sent without waiting for an answer; make sure they are on the wire.
        let flushed = tokio::time::timeout(Duration::from_secs(5), inner.shared.client.flush())
            .await
            .is_ok_and(|result| result.is_ok());
        tracing::info!(
            fetchers_done,
            drained = report.drained,
            cancelled = report.cancelled,
            flushed,
            "NATS bus closed"
        );
        *closed = true;
        Ok(())
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        for running in lock(&self.inner.subscriptions).drain(..) {
            running.sub.stop(false);
            running.sub.finish();
        }
    }
}

/// Stops one subscription.
struct Control {
    inner: std::sync::Weak<Inner>,
    sub: Arc<Sub>,
    slot: usize,
}

#[async_trait]
impl SubscriptionControl for Control {
    async fn unsubscribe(&self) -> Result<(), Error> {
        self.sub.stop(false);
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let running = {
            let mut subscriptions = lock(&inner.subscriptions);
            let position = subscriptions
                .iter()
                .position(|running| Arc::ptr_eq(&running.sub, &self.sub));
            position.map(|position| subscriptions.remove(position))
        };
        if let Some(running) = running {
            let mut tasks = running.tasks.into_iter();
            if let Some(fetcher) = tasks.next() {
                let _ = fetcher.await;
            }
            // The progress task keeps held messages alive until they settle, then ends.
            drop(tasks);
        }
        if let Some(used) = lock(&inner.slots).get_mut(self.sub.topic.as_str()) {
            used.remove(&self.slot);
        }
        tracing::info!(topic = %self.sub.topic, durable = %self.sub.durable, "unsubscribed; durable consumer kept");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::ErrorKind;

    #[test]
    fn headers_and_the_key_go_to_nats_headers() {
        let message = OutboundMessage::new(&b"x"[..])
            .with_key("order-7")
            .with_header("X-Trace", "a")
            .with_header("X-Trace", "b");
        let headers = nats_headers(&message).unwrap();
        assert_eq!(headers.get(KEY_HEADER).unwrap().as_str(), "order-7");
        let traces: Vec<&str> = headers
            .get_all("X-Trace")
            .map(HeaderValue::as_str)
            .collect();
        assert_eq!(traces, ["a", "b"]);
    }

    #[test]
    fn headers_nats_cannot_carry_are_typed_errors_not_panics() {
        let cases = [
            OutboundMessage::new(&b"x"[..]).with_header("Bad:Name", "v"),
            OutboundMessage::new(&b"x"[..]).with_header("With Space", "v"),
            OutboundMessage::new(&b"x"[..]).with_header("X-Line", "a\r\nInjected: 1"),
            OutboundMessage::new(&b"x"[..]).with_header("X-Bytes", &b"\xff\xfe"[..]),
            OutboundMessage::new(&b"x"[..]).with_key(&b"\xff"[..]),
            OutboundMessage::new(&b"x"[..]).with_key("two\nlines"),
        ];
        for message in cases {
            let error = nats_headers(&message).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Broker, "{error}");
        }
    }

    #[test]
    fn dead_letter_topics_and_envelopes_default_to_file_storage() {
        let config = NatsConfig::default();
        assert_eq!(storage_for(&config, "orders", true), Storage::File);
        assert_eq!(storage_for(&config, "orders", false), Storage::Memory);
        assert_eq!(storage_for(&config, "orders.DLQ", false), Storage::File);
    }
}
