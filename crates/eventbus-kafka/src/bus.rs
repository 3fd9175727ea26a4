//! The Kafka bus: the producer, the consumer group, and the subscriptions on the shared consume
//! runtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use eventbus_core::{
    ConnectionWatch, EnsureMode, Error, HealthReport, HealthStatus, StartPosition, Subscription,
    SubscriptionControl, TopicAdmin, TopicReport, TopicSpec, async_trait, validate_topic,
};
use eventbus_pool::consume::Runtime;
use eventbus_pool::transport::{AckFuture, Outgoing, SubscribeRequest, Transport};
use eventbus_pool::{BusSettings, ShutdownReport, TransportBus};

use crate::config::KafkaConfig;
use crate::group::{CATCH_UP, Entry, Group, Poller};
use crate::producer::Publisher;

/// What `close` allows beyond the drain timeout for the last commit and leaving the group.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long subscribing a new topic waits for the group's rebalance.
const ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);

/// An event bus on Apache Kafka: the [`TransportBus`] over [`KafkaTransport`], made by
/// [`connect`](crate::connect).
///
/// One consumer group per bus (`group_id`, default the client ID) consumes every subscribed
/// topic; each assigned partition has a reader per subscription on the shared consume runtime
/// (a scope of the engine), so records of one partition run concurrently across aggregates and
/// in order per aggregate. Offsets are committed only up to the first unfinished record. See
/// [docs/kafka.md](https://github.com/eventbus-rs/eventbus/blob/main/docs/kafka.md).
pub type KafkaBus = TransportBus<KafkaTransport>;

/// The Kafka backend's transport: the producer, the consumer group and its poll thread.
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Arc<Publisher>,
    runtime: Arc<Runtime>,
    group: Arc<Group>,
    poller: Poller,
    next_subscription: AtomicU64,
    /// Serializes subscribe and unsubscribe: a topic's group membership changes one at a time.
    membership: tokio::sync::Mutex<()>,
    closed: AtomicBool,
}

/// Starts the producer and the consumer group of `config` as `settings.client_id`, and the
/// consume runtime on the current tokio runtime, once the brokers were asked for metadata
/// with the configuration's security settings (`kafka.properties`): a broker that refuses
/// the credentials, or TLS that fails (a certificate not trusted, none where the broker
/// wants one), fails the call with [`ErrorKind::Security`](eventbus_core::ErrorKind)
/// naming librdkafka's reason, within a second or two rather than a retry loop. Brokers
/// that cannot be reached do not fail it: the bus starts (after at most 10 s, at once
/// when every broker refused the connection), logs a warning, and publishing fails after
/// `publish_timeout` until one answers.
///
/// # Cancel safety
///
/// Cancel safe: only the check of the brokers is awaited, before anything starts; a
/// dropped call starts nothing.
pub async fn connect(settings: BusSettings, config: KafkaConfig) -> Result<KafkaBus, Error> {
    settings.validate()?;
    config.validate()?;
    let client_id = settings.client_id.clone();
    if crate::probe::probe(&config, &client_id).await? == crate::probe::Reached::NotYet {
        tracing::warn!(
            servers = ?config.bootstrap_servers,
            "no Kafka broker answered yet; starting anyway (publishes fail after publish_timeout until one does)"
        );
    }
    let namespace = settings.metrics_namespace.clone();
    let publisher = Arc::new(Publisher::new(config, &client_id)?);
    let runtime = Arc::new(Runtime::new(settings, publisher.clone())?);
    let (group, poller) = Group::start(&publisher.config, &client_id, runtime.clone(), &namespace)?;
    tracing::info!(client_id, group = %group.name, servers = ?publisher.config.bootstrap_servers, "Kafka bus started");
    let transport = KafkaTransport {
        inner: Arc::new(Inner {
            publisher,
            runtime: runtime.clone(),
            group,
            poller,
            next_subscription: AtomicU64::new(0),
            membership: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
        }),
    };
    Ok(TransportBus::new(runtime, transport))
}

impl KafkaTransport {
    /// The consumer group of this bus.
    pub fn group_id(&self) -> &str {
        &self.inner.group.name
    }

    /// Partitions assigned to this bus now.
    pub fn assigned_partitions(&self) -> usize {
        self.inner.group.assigned_count()
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn name(&self) -> &'static str {
        "kafka"
    }

    /// Hands the record to librdkafka's queue and returns; its acknowledgement is the
    /// record's partition and offset. The key chooses the partition: an envelope's is its
    /// aggregate ID (one aggregate, one partition).
    async fn send(&self, outgoing: Outgoing<'_>) -> Result<AckFuture, Error> {
        self.inner
            .publisher
            .start_publish(outgoing.topic, &outgoing.message)
            .await
    }

    /// Subscribes `handler` to `topic`: the topic is created if missing, and joins the group's
    /// subscription (this waits for the rebalance that follows, up to 30 s) unless another
    /// subscription of this bus reads it already, in which case this one reads from the records
    /// polled next. A group whose other members use an assignor this bus does not offer refuses
    /// the join: that is a [`Config`](eventbus_core::ErrorKind::Config) error naming
    /// `kafka.assignment_strategy`, and the topic is taken out of the group's subscription again.
    /// [`SubscribeOptions::durable`](eventbus_core::SubscribeOptions::durable) other than the group's name and [`SubscribeOptions::start`](eventbus_core::SubscribeOptions::start)
    /// other than `All` are configuration errors: the group and where it starts are the bus's
    /// (`kafka.group_id`, `kafka.auto_offset_reset`).
    ///
    /// # Cancel safety
    ///
    /// The work runs on a task of its own: a dropped call still completes the subscription,
    /// whose handle is then lost (it stays until `close`).
    async fn subscribe(&self, request: SubscribeRequest) -> Result<Subscription, Error> {
        let SubscribeRequest { spec, options, .. } = request;
        let topic = spec.topic.clone();
        let topic = topic.as_str();
        let group = &self.inner.group.name;
        if let Some(name) = options.durable.as_ref().filter(|name| *name != group) {
            return Err(Error::config(
                "durable",
                format!(
                    "a Kafka bus reads with one consumer group, kafka.group_id ({group:?}): to \
                     adopt the group {name:?}, set kafka.group_id to it"
                ),
            ));
        }
        if options.start != StartPosition::All {
            return Err(Error::config(
                "start",
                "on Kafka, where a group without committed offsets starts reading is \
                 kafka.auto_offset_reset",
            ));
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let entry = Arc::new(Entry {
            id: self.inner.next_subscription.fetch_add(1, Ordering::Relaxed) + 1,
            topic: topic.to_owned(),
            // Kafka records have no subject to take a key from.
            spec: spec.with_subject_keys(false),
            leaving: Arc::new(AtomicBool::new(false)),
        });
        let inner = self.inner.clone();
        let added = entry.clone();
        tokio::spawn(async move {
            let _membership = inner.membership.lock().await;
            if inner.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            inner.publisher.ensure_topic(&added.topic).await?;
            if inner.group.add(added.clone()) {
                let seen = inner.group.assignments();
                inner.group.clear_join_refusal();
                if let Err(error) = inner.poller.set_topics(inner.group.topics()).await {
                    inner.group.remove(&added);
                    return Err(error);
                }
                // The group rebalances with the new topic; what this member gets of it is
                // read from the next poll on.
                let deadline = tokio::time::Instant::now() + ASSIGNMENT_WAIT;
                match inner.group.wait_assignment(seen, deadline).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(topic = %added.topic, "no assignment yet after subscribing; consuming once the group rebalances");
                    }
                    Err(refused) => {
                        inner.group.remove(&added);
                        let _ = inner.poller.set_topics(inner.group.topics()).await;
                        return Err(refused);
                    }
                }
            } else {
                inner.group.add_readers(&added);
            }
            Ok(())
        })
        .await
        .map_err(|_| Error::Closed)??;
        tracing::info!(topic, group = %self.inner.group.name, subscription = entry.id, "subscribed");
        Ok(Subscription::new(
            topic,
            Control {
                inner: Arc::downgrade(&self.inner),
                entry,
            },
        ))
    }

    fn health(&self, report: HealthReport) -> HealthReport {
        let group = &self.inner.group;
        let down = group.brokers_down();
        report.with_component(
            "brokers",
            if down {
                HealthStatus::Degraded
            } else {
                HealthStatus::Healthy
            },
            Some(format!(
                "{}; group {}, {} partitions assigned",
                if down {
                    "every broker unreachable (the client keeps retrying)"
                } else {
                    "reachable"
                },
                group.name,
                group.assigned_count()
            )),
        )
    }

    /// The topics the group consumes.
    fn subscription_count(&self) -> Option<usize> {
        Some(self.inner.group.topics().len())
    }

    fn connection_state(&self) -> ConnectionWatch {
        self.inner.group.connection_state()
    }

    fn topic_admin(&self) -> Option<&dyn TopicAdmin> {
        Some(self)
    }

    /// Takes what the assigned partitions held when `close` was called (up to half the drain
    /// timeout, at most 5 s) and stops polling; the bus then lets queued and running records
    /// finish up to the drain timeout, and the poll thread commits what finished and leaves the
    /// group: what did not finish is read again by the partitions' next owner.
    async fn stop_intake(&self, _deadline: tokio::time::Instant) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        inner.group.closed();
        let drain = inner.runtime.settings().drain_timeout;
        // Catching up takes half the drain timeout (5 s at most), draining the drain timeout;
        // committing and leaving the group get a few seconds more.
        inner
            .poller
            .close((drain / 2).min(CATCH_UP) + drain + CLOSE_GRACE)
            .await;
    }

    /// Flushes the producer.
    async fn finish_close(&self, _report: &ShutdownReport) {
        let publisher = self.inner.publisher.clone();
        let _ = tokio::task::spawn_blocking(move || publisher.flush(CLOSE_GRACE)).await;
        tracing::info!("Kafka bus closed");
    }
}

#[async_trait]
impl TopicAdmin for KafkaTransport {
    async fn ensure_topic(&self, spec: &TopicSpec, mode: EnsureMode) -> Result<TopicReport, Error> {
        validate_topic(&spec.name)?;
        self.inner.publisher.ensure_spec(spec, mode).await
    }
}

/// Stops one subscription.
struct Control {
    inner: Weak<Inner>,
    entry: Arc<Entry>,
}

#[async_trait]
impl SubscriptionControl for Control {
    /// The last subscription of a topic takes the topic out of the group's subscription and
    /// returns once its partitions are revoked here (their readers closed: queued records given
    /// back, running ones finished up to the drain timeout, finished offsets committed), so a new
    /// subscription reads on from the committed offset. Another subscription of the topic closes
    /// only its own readers.
    ///
    /// # Cancel safety
    ///
    /// The work runs on a task of its own: a dropped call does not cut it short.
    async fn unsubscribe(&self) -> Result<(), Error> {
        let Some(inner) = self.inner.upgrade() else {
            return Ok(());
        };
        let entry = self.entry.clone();
        let task = tokio::spawn(async move {
            let _membership = inner.membership.lock().await;
            let drain = inner.runtime.settings().drain_timeout;
            if inner.group.remove(&entry) {
                inner.poller.set_topics(inner.group.topics()).await?;
                let deadline = tokio::time::Instant::now() + drain + Duration::from_secs(30);
                if !inner.group.wait_revoked(&entry.topic, deadline).await {
                    tracing::warn!(topic = %entry.topic, "partitions not revoked in time after unsubscribe");
                }
            } else {
                entry.leaving.store(true, Ordering::SeqCst);
                let readers = inner.group.take_readers(&entry);
                for reader in &readers {
                    reader.consumer.begin_stop();
                }
                let closes = readers.iter().map(|reader| reader.consumer.close(drain));
                futures::future::join_all(closes).await;
            }
            tracing::info!(topic = %entry.topic, subscription = entry.id, "unsubscribed");
            Ok::<(), Error>(())
        });
        task.await.map_err(|_| Error::Closed)?
    }
}
