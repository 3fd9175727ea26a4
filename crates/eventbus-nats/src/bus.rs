//! The NATS JetStream bus: subscriptions, health, close.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream;
use async_trait::async_trait;
use eventbus_core::{
    AggregateId, ConnectionWatch, EnsureMode, Error, HealthReport, HealthStatus, MessageSource,
    SubscribeOptions, Subscription, SubscriptionControl, TopicAdmin, TopicReport, TopicSpec,
    extract_aggregate_id, validate_topic,
};
use eventbus_pool::consume::{Runtime, SubscriptionSpec};
use eventbus_pool::transport::{AckFuture, Outgoing, SubscribeRequest, Transport};
use eventbus_pool::{BusSettings, ShutdownReport, TransportBus};
use tokio::task::JoinHandle;

use crate::config::NatsConfig;
use crate::connection::ConnectionState;
use crate::consumer::{DurableSpec, Resume, ensure_consumer, origin_of};
use crate::fetch::{self, Fetch};
use crate::group;
use crate::names::{durable_name, validate_durable_name};
use crate::publish::{Broker, envelope_message_id};
use crate::stats::{Counters, NatsStats};
use crate::streams::Streams;
use crate::streams::{Kind, StreamSpec, stream_spec};

/// An event bus on NATS JetStream: the [`TransportBus`] over [`NatsTransport`], made by
/// [`connect`](crate::connect).
///
/// Each topic lives in a stream (a configured one whose subjects cover it, one already on the
/// server, or `{stream_prefix}{topic}` created on first use: file storage for envelope and
/// dead-letter topics, memory for plain ones). Each subscription is a durable pull consumer
/// named `{client_id}_{topic}` (see [`NatsTransport::durable_name`] for the exact rule), created
/// or updated with the configured `ack_wait`, `max_deliver`, `max_ack_pending` and `backoff`,
/// and kept when the subscription or the bus closes: a restart resumes where the last run
/// acknowledged. See [docs/nats.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/nats.md).
pub type NatsBus = TransportBus<NatsTransport>;

/// The NATS backend's transport: the connection, the streams, the subscriptions' fetchers and
/// the groups of partitioned topics.
pub struct NatsTransport {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) broker: Arc<Broker>,
    connection: Arc<ConnectionState>,
    pub(crate) runtime: Arc<Runtime>,
    subscriptions: Mutex<Vec<Running>>,
    /// Durable slots per topic: in use, or closing (an unsubscribe still giving back).
    slots: Mutex<HashMap<String, BTreeMap<usize, Slot>>>,
    /// A closing slot was freed.
    slot_freed: tokio::sync::Notify,
    /// Durables this bus has read: only a durable a previous run left behind is replayed from
    /// its ack floor (a re-subscription here may still hold messages of its earlier self).
    read_durables: Mutex<HashSet<String>>,
    /// The groups of the partitioned topics this bus reads.
    groups: Mutex<Vec<Arc<group::Group>>>,
    closed: AtomicBool,
}

/// A running subscription: its fetcher and the task running it.
struct Running {
    fetch: Arc<Fetch>,
    task: JoinHandle<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent data.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state of a durable slot of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    InUse,
    /// Its subscription is unsubscribing: it may still give messages back to the durable, so a
    /// new subscription of the topic waits rather than read the durable ahead of them.
    Closing,
}

/// A claimed durable slot, given back when dropped unless kept (a cancelled or failed subscribe
/// frees its slot, so the next subscribe reuses the durable instead of starting a new one).
pub(crate) struct SlotClaim<'a> {
    inner: &'a Inner,
    topic: &'a str,
    pub(crate) slot: usize,
    pub(crate) kept: bool,
}

impl Drop for SlotClaim<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.inner.release_slot(self.topic, self.slot);
        }
    }
}

impl Inner {
    /// Claims the first free slot of `topic`, waiting while a subscription of the topic is
    /// unsubscribing.
    pub(crate) async fn claim_slot<'a>(&'a self, topic: &'a str) -> SlotClaim<'a> {
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut slots = lock(&self.slots);
                let used = slots.entry(topic.to_owned()).or_default();
                if !used.values().any(|state| *state == Slot::Closing) {
                    let slot = (1..).find(|slot| !used.contains_key(slot)).unwrap_or(1);
                    used.insert(slot, Slot::InUse);
                    return SlotClaim {
                        inner: self,
                        topic,
                        slot,
                        kept: false,
                    };
                }
            }
            freed.await;
        }
    }

    /// True when a group of this bus reads with `durable`.
    pub(crate) fn has_group(&self, durable: &str) -> bool {
        lock(&self.groups)
            .iter()
            .any(|group| group.durable() == durable)
    }

    pub(crate) fn add_group(&self, group: Arc<group::Group>) {
        lock(&self.groups).push(group);
    }

    pub(crate) fn remove_group(&self, group: &Arc<group::Group>) {
        lock(&self.groups).retain(|other| !Arc::ptr_eq(other, group));
    }

    pub(crate) fn mark_slot_closing(&self, topic: &str, slot: usize) {
        if let Some(state) = lock(&self.slots)
            .get_mut(topic)
            .and_then(|used| used.get_mut(&slot))
        {
            *state = Slot::Closing;
        }
    }

    pub(crate) fn release_slot(&self, topic: &str, slot: usize) {
        if let Some(used) = lock(&self.slots).get_mut(topic) {
            used.remove(&slot);
        }
        self.slot_freed.notify_waiters();
    }
}

/// Connects to the servers of `config` as `settings.client_id`, creates the configured streams
/// and starts the consume runtime (the engine of `settings`) on the current tokio runtime.
///
/// # Cancel safety
///
/// Cancel safe: a dropped call leaves nothing running (configured streams it created stay on
/// the server).
pub async fn connect(settings: BusSettings, config: NatsConfig) -> Result<NatsBus, Error> {
    settings.validate()?;
    config.validate()?;
    let (client, connection) = crate::connection::connect(&config, &settings).await?;
    // async-nats bounds the PubAcks it waits for too (5,000 by default): as many as the
    // runtime's window, so that `publish_max_in_flight` is the one bound.
    let js = jetstream::ContextBuilder::new()
        .timeout(config.request_timeout)
        .max_ack_inflight(settings.publish_max_in_flight)
        .build(client.clone());
    let streams = Streams::new(&config);
    streams.create_configured(&js).await?;
    let take_overs = crate::take_over::TakeOvers::start(&js, &config);
    let broker = Arc::new(Broker {
        client,
        js,
        config,
        streams,
        counters: Counters::new(&settings.metrics_namespace),
        take_overs,
    });
    let runtime = Arc::new(Runtime::new(settings, broker.clone())?);
    tracing::info!(client_id = %runtime.settings().client_id, servers = ?broker.config.urls, "NATS bus connected");
    let transport = NatsTransport {
        inner: Arc::new(Inner {
            broker,
            connection,
            runtime: runtime.clone(),
            subscriptions: Mutex::new(Vec::new()),
            slots: Mutex::new(HashMap::new()),
            slot_freed: tokio::sync::Notify::new(),
            read_durables: Mutex::new(HashSet::new()),
            groups: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        }),
    };
    Ok(TransportBus::new(runtime, transport))
}

impl NatsTransport {
    /// What the bus did besides handling: redeliveries, in-progress acks, dead letters.
    pub fn stats(&self) -> NatsStats {
        self.inner
            .broker
            .counters
            .snapshot(&self.inner.runtime.stats())
    }

    /// The subjects of the partitioned `topic` that this instance reads now: partition numbers,
    /// and the topic's partition count for the bare topic (where publishers that do not
    /// partition write). Empty when the bus does not subscribe to it.
    pub fn partitions_reading(&self, topic: &str) -> Vec<u16> {
        lock(&self.inner.groups)
            .iter()
            .filter(|group| group.topic() == topic)
            .flat_map(|group| group.reading())
            .collect()
    }

    /// The durable consumer name of this bus's `slot`-th subscription (from 1) to `topic`:
    /// `{client_id}_{topic}` with `.` as `_` when the client ID is made of letters, digits and
    /// `-`, the topic of those and `.`, and the slot is 1; otherwise the sanitized parts and the
    /// slot followed by a hash of the exact (client ID, topic, slot), so that different
    /// subscriptions never share a durable.
    pub fn durable_name(&self, topic: &str, slot: usize) -> String {
        durable_name(&self.inner.runtime.settings().client_id, topic, slot)
    }

    /// Deletes the durable consumer `durable` of the stream holding `topic`: its position is
    /// lost, and a later subscription starts from the beginning of the stream. Subscriptions
    /// and `close` never do this.
    pub async fn delete_consumer(&self, topic: &str, durable: &str) -> Result<(), Error> {
        validate_topic(topic)?;
        let broker = &self.inner.broker;
        let stream = broker
            .js
            .stream_by_subject(topic)
            .await
            .map_err(|error| Error::broker(format!("no stream holds {topic}"), error))?;
        broker
            .js
            .delete_consumer_from_stream(durable, &stream)
            .await
            .map_err(|error| Error::broker(format!("cannot delete consumer {durable}"), error))?;
        tracing::info!(stream, durable, "consumer deleted");
        Ok(())
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn topic_admin(&self) -> Option<&dyn TopicAdmin> {
        Some(self)
    }

    /// Writes the message to the connection and returns; its acknowledgement is the PubAck's
    /// stream sequence (`Position::Unknown` at once on an ephemeral topic). An envelope goes to
    /// its aggregate's partition on a partitioned topic, with `Nats-Msg-Id` unique per
    /// (subject, event).
    async fn send(&self, outgoing: Outgoing<'_>) -> Result<AckFuture, Error> {
        let destination = self.destination(&outgoing)?;
        self.inner
            .broker
            .start_publish_to(
                &destination.subject,
                outgoing.message,
                destination.message_id.as_deref(),
                destination.stream,
            )
            .await
    }

    /// As [`send`](Self::send), waiting for the PubAck; a stream deleted meanwhile is made
    /// anew and the message sent once more.
    async fn publish(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        let destination = self.destination(&outgoing)?;
        self.inner
            .broker
            .publish_to(
                &destination.subject,
                outgoing.message,
                destination.message_id.as_deref(),
                destination.stream,
            )
            .await
    }

    /// Opens the subscription. While an earlier subscription of the topic is unsubscribing
    /// (giving its queued messages back to the durable), this waits for it, so the new
    /// subscription reads them before anything newer. [`SubscribeOptions::durable`] names the
    /// durable to read with (to adopt another service's; one that filters another subject, or
    /// that another subscription of this bus reads, is refused); [`SubscribeOptions::start`]
    /// says where a durable made here starts. A partitioned topic is shared with the service's
    /// other instances (see [`crate::partition_of`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call frees its durable slot and starts nothing (a durable it
    /// created stays on the server and is reused by the next subscribe). For a partitioned
    /// topic, it joins no group: the membership is written only once the group runs (the
    /// group's bucket, if made, stays). With `nats.topics."T".take_over_from` the call waits
    /// until the other service stopped; dropped while it waits, it made no durable, and the
    /// watch that began at `connect` goes on (tested by the interop takeover tests).
    async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, Error> {
        let inner = &self.inner;
        let topic = request.topic().to_owned();
        let topic = topic.as_str();
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        if let Some((partitioned, _)) = inner.broker.config.partitioned(topic)
            && partitioned != topic
        {
            // Its durable is a pinned consumer of the group, read by one of its instances.
            return Err(Error::config(
                "nats.topics.partitions",
                format!("{topic} is a partition of {partitioned}: subscribe to {partitioned}"),
            ));
        }
        match inner
            .broker
            .config
            .topics
            .get(topic)
            .and_then(|o| o.partitions)
        {
            Some(partitions) => {
                group::subscribe(inner, topic, partitions, request.spec, request.options).await
            }
            None => {
                inner
                    .open(Target::Topic(topic), request.spec, request.options)
                    .await
            }
        }
    }

    fn health(&self, report: HealthReport) -> HealthReport {
        let connection = &self.inner.connection;
        let connected = connection.is_connected();
        let last_event = connection.last_event();
        // Reconnecting is expected to end by itself: degraded, not down.
        let status = if connected {
            HealthStatus::Healthy
        } else if last_event == "closed" {
            HealthStatus::Unhealthy
        } else {
            HealthStatus::Degraded
        };
        report.with_component(
            "connection",
            status,
            Some(format!(
                "{} (last event: {last_event}; {} disconnects)",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                },
                connection.disconnects()
            )),
        )
    }

    fn connection_state(&self) -> ConnectionWatch {
        self.inner.connection.watch()
    }

    /// Stops fetching (each subscription first takes what its open pull request still brings
    /// and one more batch of what the consumer holds, so that what was published just before
    /// `close` is handled) and waits for the fetchers up to `deadline`; the bus then lets
    /// queued and running messages finish and acknowledges them, and gives back (nak) the rest
    /// in lane order.
    async fn stop_intake(&self, deadline: tokio::time::Instant) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        inner.connection.closed();
        inner.broker.take_overs.stop();
        // The groups stop following their members first: nothing new starts while closing.
        for group in lock(&inner.groups).iter() {
            group.begin_close();
        }
        let running: Vec<Running> = lock(&inner.subscriptions).drain(..).collect();
        for running in &running {
            running.fetch.stop(true);
            // What the fetchers still take joins its lanes at once instead of waiting for room.
            running.fetch.consumer.begin_stop();
        }
        for mut running in running {
            if tokio::time::timeout_at(deadline, &mut running.task)
                .await
                .is_err()
            {
                // What it had fetched and not delivered is redelivered after `ack_wait`.
                running.task.abort();
                let _ = running.task.await;
                tracing::warn!(topic = %running.fetch.topic, durable = %running.fetch.durable, "fetcher not done by the drain deadline: what it holds is redelivered after ack_wait");
            }
        }
    }

    /// Makes sure the acks are on the wire, and gives the partitions of partitioned topics to
    /// the other instances.
    async fn finish_close(&self, _report: &ShutdownReport) {
        let inner = &self.inner;
        // Acks are sent without waiting for an answer; make sure they are on the wire.
        let flushed = tokio::time::timeout(Duration::from_secs(5), inner.broker.client.flush())
            .await
            .is_ok_and(|result| result.is_ok());
        // Everything is settled or given back: the partitions go to the other instances now.
        let groups: Vec<Arc<group::Group>> = lock(&inner.groups).drain(..).collect();
        for group in &groups {
            group.release_after_close().await;
        }
        tracing::info!(flushed, "NATS bus closed");
    }
}

#[async_trait]
impl TopicAdmin for NatsTransport {
    async fn ensure_topic(&self, spec: &TopicSpec, mode: EnsureMode) -> Result<TopicReport, Error> {
        validate_topic(&spec.name)?;
        let broker = &self.inner.broker;
        let report = crate::streams::ensure_spec(&broker.js, &broker.config, spec, mode).await?;
        // The bus looks for the topic's stream again at its next use.
        broker.streams.forget(&spec.name).await;
        Ok(report)
    }
}

/// Where a message goes: its subject, its stream, and its `Nats-Msg-Id`.
struct Destination<'a> {
    subject: Cow<'a, str>,
    stream: StreamSpec,
    message_id: Option<String>,
}

impl NatsTransport {
    /// Where a message of `topic` goes: an envelope to its aggregate's partition, a plain
    /// message to its key's (when its key names an aggregate).
    fn destination<'a>(&self, outgoing: &Outgoing<'a>) -> Result<Destination<'a>, Error> {
        let (broker, topic, message) = (&self.inner.broker, outgoing.topic, &outgoing.message);
        Ok(match outgoing.envelope {
            Some(envelope) => {
                // The trimmed, validated ID: the one the subscribers' lanes use.
                let aggregate = envelope.aggregate()?;
                let subject = broker.subject(topic, Some(aggregate.as_str()));
                Destination {
                    message_id: Some(envelope_message_id(&subject, &envelope.event_id)),
                    stream: stream_spec(&broker.config, topic, Kind::Envelopes),
                    subject,
                }
            }
            None => {
                let key = extract_aggregate_id(
                    &MessageSource::new(&message.payload)
                        .with_headers(&message.headers)
                        .with_key(message.key.as_deref().unwrap_or_default()),
                );
                Destination {
                    subject: broker.subject(topic, key.as_ref().map(AggregateId::as_str)),
                    stream: stream_spec(&broker.config, topic, Kind::Plain),
                    message_id: None,
                }
            }
        })
    }
}

/// What one subscription of [`Inner::open`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target<'a> {
    /// A topic, whole.
    Topic(&'a str),
    /// One subject of a partitioned topic (a partition, or the bare topic), read through its
    /// pinned consumer by one instance of the service at a time.
    Partition {
        /// The partitioned topic.
        topic: &'a str,
        /// The subject its durable filters.
        subject: &'a str,
        /// The group's durable (its bare topic's): the subjects of one group share their
        /// parked aggregates.
        group: &'a str,
        /// How long the group's pins live (its bucket's `max_age`): a partition durable made
        /// anew gets it as its `priority_timeout`, whatever this instance's `pinned_ttl`.
        pin_lifetime: Duration,
    },
}

impl Inner {
    /// Opens one subscription: its durable (or core NATS subscription), its consumer in the
    /// runtime and its fetcher.
    ///
    /// # Cancel safety
    ///
    /// As [`NatsTransport::subscribe`].
    pub(crate) async fn open(
        self: &Arc<Self>,
        target: Target<'_>,
        spec: SubscriptionSpec,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error> {
        let (topic, subject, group, pin_lifetime) = match target {
            Target::Topic(topic) => (topic, topic, None, None),
            Target::Partition {
                topic,
                subject,
                group,
                pin_lifetime,
            } => (topic, subject, Some(group), Some(pin_lifetime)),
        };
        let partition = matches!(target, Target::Partition { .. });
        let envelopes = spec.handler.is_envelope();
        let inner = self;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let broker = &inner.broker;
        // A subscription naming its durable takes no numbered slot of the topic (the bus's own
        // names of later subscriptions stay as they were). Every durable, named or not, is also
        // claimed under its name, so no two live subscriptions of this bus read one durable (a
        // work queue between them would run an aggregate's events at once), and a subscription
        // of a durable still unsubscribing waits for it.
        let (mut topic_claim, durable) = match &options.durable {
            Some(name) => {
                validate_durable_name(name)?;
                (None, name.clone())
            }
            None => {
                let claim = inner.claim_slot(topic).await;
                let name = durable_name(&inner.runtime.settings().client_id, topic, claim.slot);
                (Some(claim), name)
            }
        };
        let name_key = durable_key(&durable);
        let mut name_claim = inner.claim_slot(&name_key).await;
        if name_claim.slot > 1 {
            return Err(Error::config(
                "durable",
                format!("durable {durable:?} is read by another subscription of this bus"),
            ));
        }
        let durable_spec = DurableSpec {
            name: &durable,
            explicit: options.durable.is_some(),
            start: options.start,
            pin_lifetime,
        };
        let ephemeral = broker.config.topic(subject).ephemeral;
        let mut origin = None;
        let source = if ephemeral {
            let subscriber = broker
                .client
                .subscribe(subject.to_owned())
                .await
                .map_err(|error| Error::broker(format!("cannot subscribe to {topic}"), error))?;
            Source::Core(subscriber)
        } else {
            // A partition may have been read by another instance since this bus last read it:
            // what that one left unacknowledged is replayed in order.
            let resume = if !partition && lock(&inner.read_durables).contains(&durable) {
                Resume::No
            } else {
                Resume::IfAbandoned
            };
            let mut consumer =
                ensure_consumer(broker, subject, durable_spec, envelopes, resume).await?;
            origin = origin_of(broker, &mut consumer).await;
            lock(&inner.read_durables).insert(durable.clone());
            Source::Pull(Box::new(consumer))
        };
        let mut subscription = spec.with_name(durable.clone()).with_progress_interval(
            (!ephemeral).then(|| broker.config.consumer.progress_interval()),
        );
        if let Some(group) = group {
            // The group's subjects own each other's dead letters: a copy of one written on the
            // bare subject is handled on the aggregate's partition.
            subscription = subscription.with_park_group(group).with_owner(group);
        }
        let consumer = inner.runtime.subscribe(subscription)?;
        let mut fetch = Fetch::new(
            subject,
            durable_spec,
            consumer,
            inner.connection.clone(),
            origin,
        );
        if partition {
            fetch = fetch.reading_a_partition_of(topic);
        }
        let fetch = Arc::new(fetch);
        let task = match source {
            Source::Core(subscriber) => tokio::spawn(fetch::core_loop(fetch.clone(), subscriber)),
            Source::Pull(consumer) => {
                tokio::spawn(fetch::pull_loop(broker.clone(), fetch.clone(), *consumer))
            }
        };
        {
            let mut subscriptions = lock(&inner.subscriptions);
            // Checked under the lock `close` takes its subscriptions with: a subscription made
            // while the bus closes is either closed with the others or stopped here.
            if inner.closed.load(Ordering::SeqCst) {
                fetch.stop(false);
                task.abort();
                return Err(Error::Closed);
            }
            subscriptions.push(Running {
                fetch: fetch.clone(),
                task,
            });
        }
        name_claim.kept = true;
        if let Some(claim) = &mut topic_claim {
            claim.kept = true;
        }
        tracing::info!(topic, subject, durable = %fetch.durable, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                inner: Arc::downgrade(self),
                fetch,
                topic_slot: topic_claim.as_ref().map(|claim| claim.slot),
                durable_slot: name_claim.slot,
            },
        ))
    }
}

/// Where a subscription's messages come from.
enum Source {
    Core(async_nats::Subscriber),
    Pull(Box<jetstream::consumer::PullConsumer>),
}

impl Drop for NatsTransport {
    /// A bus dropped without `close` stops its fetchers; the runtime, dropped with it, cancels
    /// what it holds (the server redelivers it).
    fn drop(&mut self) {
        for group in lock(&self.inner.groups).drain(..) {
            group.abandon();
        }
        for running in lock(&self.inner.subscriptions).drain(..) {
            running.fetch.stop(false);
            running.task.abort();
        }
    }
}

/// Stops one subscription.
struct Control {
    inner: Weak<Inner>,
    fetch: Arc<Fetch>,
    /// Its numbered slot of the topic (none when it named its durable).
    topic_slot: Option<usize>,
    /// Its slot under the durable's name (always 1 while it runs).
    durable_slot: usize,
}

/// The key under which a durable's name is claimed (not a valid topic, so never a topic's key).
fn durable_key(durable: &str) -> String {
    format!("durable {durable}")
}

#[async_trait]
impl SubscriptionControl for Control {
    /// Stops fetching (open pull requests are read to their end and what they bring is queued),
    /// then closes the subscription in the runtime: queued messages are given back (nak) in
    /// lane order, running ones finish up to the drain timeout. The durable is kept; a new
    /// subscription of the topic waits until this has returned.
    ///
    /// # Cancel safety
    ///
    /// Fetching stops at the first poll, and the rest runs on a task of its own: a dropped call
    /// still gives the queue back, and a new subscription of the topic still waits for that.
    async fn unsubscribe(&self) -> Result<(), Error> {
        self.fetch.stop(false);
        self.fetch.consumer.begin_stop();
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let name_key = durable_key(&self.fetch.durable);
        if let Some(slot) = self.topic_slot {
            inner.mark_slot_closing(&self.fetch.topic, slot);
        }
        inner.mark_slot_closing(&name_key, self.durable_slot);
        let running = {
            let mut subscriptions = lock(&inner.subscriptions);
            let position = subscriptions
                .iter()
                .position(|running| Arc::ptr_eq(&running.fetch, &self.fetch));
            position.map(|position| subscriptions.remove(position))
        };
        let (fetch, topic_slot, durable_slot) =
            (self.fetch.clone(), self.topic_slot, self.durable_slot);
        // The rest runs on a task of its own: a dropped call does not cut it short, and the
        // slot stays closing (a new subscription of the topic waits) until the queue is back.
        let closing = tokio::spawn(async move {
            if let Some(running) = running {
                let _ = running.task.await;
            }
            let report = fetch
                .consumer
                .close(inner.runtime.settings().drain_timeout)
                .await;
            if let Some(slot) = topic_slot {
                inner.release_slot(&fetch.topic, slot);
            }
            inner.release_slot(&name_key, durable_slot);
            tracing::info!(topic = %fetch.topic, durable = %fetch.durable, drained = report.drained, given_back = report.handed_back, "unsubscribed; durable consumer kept");
        });
        let _ = closing.await;
        Ok(())
    }
}
