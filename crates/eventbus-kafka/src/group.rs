//! The consumer group of a bus: one librdkafka consumer over every subscribed topic, polled on a
//! thread of its own (rebalance callbacks run there and may block without starving the tokio
//! runtime), partitions paused and resumed for backpressure, finished offsets committed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventbus_core::{
    ConnectionState, DeliveryMeta, Error, Headers, Message, OffsetDateTime, Position,
};
use eventbus_pool::consume::{Runtime, SubscriptionSpec};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::config::{GroupProtocol, KafkaConfig};
use crate::partition::{Assigned, Reader, lock};

/// Where "latest" was for a partition when its topic was subscribed.
enum SubscribedEnd {
    /// Its end offset then.
    At(i64),
    /// Not looked up (the lookup failed): its end at assignment stands in.
    Unknown,
    /// The partition was added to the topic since: all of it came after.
    AddedSince,
}

/// How long a rebalance callback waits for a committed offset or an end offset.
const POSITION_LOOKUP: Duration = Duration::from_secs(5);

/// Records taken from librdkafka's queue in one round of the poll loop before they are handed
/// to their partitions' dispatchers.
const POLL_BURST: usize = 512;

/// The longest a close spends taking what was published just before it.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(5);

/// One subscription of the bus.
pub(crate) struct Entry {
    pub(crate) id: u64,
    pub(crate) topic: String,
    /// What each of its readers consumes (named per partition and generation).
    pub(crate) spec: SubscriptionSpec,
    pub(crate) leaving: Arc<AtomicBool>,
}

/// What the poll thread is asked to do.
enum Command {
    /// Consume exactly these topics.
    Topics(Vec<String>, oneshot::Sender<Result<(), Error>>),
    /// Drain, commit and leave the group.
    Close(oneshot::Sender<()>),
}

/// The state the bus and the poll thread share.
pub(crate) struct Group {
    pub(crate) name: String,
    runtime: Arc<Runtime>,
    handle: tokio::runtime::Handle,
    drain_timeout: Duration,
    max_in_flight: usize,
    /// `auto_offset_reset = latest`: a partition without a committed offset starts at the end
    /// it had when it was assigned (see [`Group::start_at_end`]).
    start_at_end: bool,
    /// With `start_at_end`: the end offset of each partition of a topic when the topic was
    /// subscribed, where a partition without a committed offset starts when it is assigned
    /// (however much later that is).
    /// (`None`: the partition existed, its end could not be looked up.)
    subscribed_ends: Mutex<HashMap<String, HashMap<i32, Option<i64>>>>,
    subscriptions: Mutex<BTreeMap<String, Vec<Arc<Entry>>>>,
    assigned: Mutex<HashMap<(String, i32), Arc<Assigned>>>,
    generation: AtomicU64,
    /// Revokes under way (their partitions are already out of `assigned`).
    revoking: std::sync::atomic::AtomicUsize,
    /// Signalled after every revoke.
    revoked: tokio::sync::Notify,
    /// Assignments received; signalled through `assigned_event`.
    assignments: AtomicU64,
    assigned_event: tokio::sync::Notify,
    /// Every broker is unreachable (cleared by the next record or commit).
    brokers_down: AtomicBool,
    /// What [`EventBus::connection_state`](eventbus_core::EventBus::connection_state) watches:
    /// reconnecting while every broker is unreachable.
    connection: tokio::sync::watch::Sender<ConnectionState>,
    /// Why the group coordinator refused this member's join (an assignor the group's other
    /// members do not share); cleared by the next assignment. Signalled through `assigned_event`.
    join_refused: Mutex<Option<String>>,
    rebalances: metrics::Counter,
    commit_failures: metrics::Counter,
    paused: metrics::Gauge,
    /// Held while an offset commit is sent and answered: commits of the commit thread and of
    /// revokes and close go one at a time, so an older offset never lands after a newer one.
    commit_lock: Mutex<()>,
}

/// The handle of the poll thread. The thread is never joined: with the brokers gone,
/// librdkafka's group leave can block for longer than any close budget, and a join parked on a
/// blocking task would hold up the shutdown of the caller's runtime. The thread reports its end
/// through `ended` instead.
pub(crate) struct Poller {
    commands: Mutex<mpsc::Sender<Command>>,
    ended: Mutex<Option<oneshot::Receiver<()>>>,
}

struct GroupContext {
    group: Arc<Group>,
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.group.set_brokers_down(true);
        }
        if !self.group.note_join_refusal(&error) {
            tracing::warn!(group = %self.group.name, %error, reason, "Kafka consumer error");
        }
    }

    /// librdkafka's statistics (every `statistics.interval.ms`, 5 s unless configured): each
    /// assigned partition's consumer lag (its end offset minus its committed offset) goes to
    /// one reader of the partition (the runtime sums it per topic, and the group's offsets are
    /// the same for every subscription); a broker seen up ends an outage that no record or
    /// commit ended (an idle bus).
    fn stats(&self, statistics: Statistics) {
        if statistics
            .brokers
            .values()
            .any(|broker| broker.state == "UP")
        {
            self.group.set_brokers_down(false);
        }
        let assigned = lock(&self.group.assigned);
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                let Ok(lag) = u64::try_from(stats.consumer_lag) else {
                    continue;
                };
                if let Some(assigned) = assigned.get(&(topic.clone(), *partition))
                    && let Some(reader) = lock(&assigned.readers).first()
                {
                    reader.consumer.report_lag(lag);
                }
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    /// rdkafka's rebalance (pre-rebalance, assign or unassign, incremental with the cooperative
    /// protocols, post-rebalance), with one step before an assignment: with
    /// `auto_offset_reset = latest`, partitions without a committed offset get their start
    /// offset in the assignment itself (see [`Group::place_at_subscribe_ends`]), so librdkafka
    /// never fetches from a "latest" of its own first; the placed offsets are committed once
    /// assigned.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let assigning = err == RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS;
        let placed = if assigning && self.group.start_at_end {
            self.group.place_at_subscribe_ends(consumer, partitions)
        } else {
            Vec::new()
        };
        let rebalance = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Rebalance::Assign(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => Rebalance::Revoke(partitions),
            _ => Rebalance::Error(KafkaError::Rebalance(err.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let applied = match (assigning, cooperative) {
            (true, true) => consumer.incremental_assign(partitions),
            (true, false) => consumer.assign(partitions),
            (false, true) => consumer.incremental_unassign(partitions),
            (false, false) => consumer.unassign(),
        };
        if let Err(error) = applied {
            tracing::warn!(group = %self.group.name, %error, assigning, "Kafka assignment not applied");
        }
        self.post_rebalance(consumer, &rebalance);
        if !placed.is_empty() {
            let entries: Vec<(&str, i32, Option<i64>)> = placed
                .iter()
                .map(|(topic, partition, start)| (topic.as_str(), *partition, Some(*start)))
                .collect();
            if let Err(error) = consumer.commit(&partition_list(&entries), CommitMode::Sync) {
                self.group.commit_failures.increment(1);
                tracing::warn!(group = %self.group.name, %error, "start offsets not committed; a member that takes these partitions before a commit starts at its own latest");
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => self.group.revoke(consumer, partitions),
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                tracing::warn!(group = %self.group.name, %error, "Kafka rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            // librdkafka keeps an application pause across unassign and assign: a partition
            // paused for backpressure when it was revoked would never be fetched again here.
            if let Err(error) = consumer.resume(partitions) {
                tracing::warn!(%error, "cannot resume newly assigned Kafka partitions");
            }
            self.group.assign(partitions);
        }
    }
}

/// The record as the runtime sees it, consumed from `topic`. The payload, the key and the
/// header values are copied once, into one buffer they share (a record's headers used to cost
/// an allocation each, a quarter of the consume path's time).
pub(crate) fn record_message(record: &BorrowedMessage<'_>, topic: &str) -> Message {
    let payload = record.payload().unwrap_or_default();
    let key = record.key();
    let borrowed = record.headers();
    let (count, values) = borrowed.as_ref().map_or((0, 0), |headers| {
        let values = headers
            .iter()
            .map(|header| header.value.map_or(0, <[u8]>::len))
            .sum();
        (headers.count(), values)
    });
    let mut buffer = Vec::with_capacity(payload.len() + key.map_or(0, <[u8]>::len) + values);
    buffer.extend_from_slice(payload);
    if let Some(key) = key {
        buffer.extend_from_slice(key);
    }
    // Where each header's value sits in the buffer.
    let mut values = Vec::with_capacity(count);
    if let Some(borrowed) = &borrowed {
        for header in borrowed.iter() {
            if let Some(value) = header.value {
                let start = buffer.len();
                buffer.extend_from_slice(value);
                values.push((header.key, start..buffer.len()));
            }
        }
    }
    // One shared buffer, sliced: the payload, the key, then each header value.
    let buffer = Bytes::from(buffer);
    let key = key.map(|key| buffer.slice(payload.len()..payload.len() + key.len()));
    let mut headers = Headers::with_capacity(values.len());
    for (name, range) in values {
        headers.append(name, buffer.slice(range));
    }
    let timestamp = record.timestamp().to_millis().and_then(|millis| {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
    });
    let mut message = Message::new(topic, buffer.slice(..payload.len()));
    message.key = key;
    message.headers = headers;
    message.meta = DeliveryMeta {
        position: Position::Partition {
            partition: record.partition(),
            offset: record.offset(),
        },
        delivery_attempt: 1,
        timestamp,
    };
    message
}

fn partition_list(entries: &[(&str, i32, Option<i64>)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::with_capacity(entries.len());
    for (topic, partition, offset) in entries {
        match offset {
            Some(offset) => {
                // Only an offset below zero is refused, and none is.
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(*offset));
            }
            None => {
                list.add_partition(topic, *partition);
            }
        }
    }
    list
}

/// The group consumer's librdkafka configuration: [`CONSUMER_DEFAULTS`](crate::CONSUMER_DEFAULTS)
/// and the lag statistics, then [`KafkaConfig::properties`], then
/// [`KafkaConfig::consumer_properties`] (a later one wins), and the properties the bus owns.
fn consumer_config(config: &KafkaConfig, client_id: &str, group: &str) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", config.bootstrap_servers.join(","))
        .set("client.id", client_id)
        // The consumer lag of each partition comes with librdkafka's statistics.
        .set("statistics.interval.ms", "5000");
    match config.group_protocol {
        GroupProtocol::Classic => {
            client.set(
                "partition.assignment.strategy",
                config.assignment_strategy.librdkafka_name(),
            );
        }
        GroupProtocol::Consumer => {
            client.set("group.protocol", "consumer");
        }
    }
    for (name, value) in config.consumer_tuning() {
        client.set(name, value);
    }
    client
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            match config.auto_offset_reset {
                crate::OffsetReset::Earliest => "earliest",
                crate::OffsetReset::Latest => "latest",
            },
        );
    client
}

impl Group {
    /// Starts the consumer of `config` and its poll thread.
    pub(crate) fn start(
        config: &KafkaConfig,
        client_id: &str,
        runtime: Arc<Runtime>,
        namespace: &str,
    ) -> Result<(Arc<Self>, Poller), Error> {
        let settings = runtime.settings().clone();
        let name = config.group(client_id).to_owned();
        let group = Arc::new(Self {
            name: name.clone(),
            runtime,
            handle: tokio::runtime::Handle::try_current().map_err(|_| {
                Error::config("runtime", "the Kafka bus needs a tokio runtime to start on")
            })?,
            drain_timeout: settings.drain_timeout,
            max_in_flight: config.max_in_flight_per_partition,
            start_at_end: config.auto_offset_reset == crate::OffsetReset::Latest,
            subscribed_ends: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(BTreeMap::new()),
            assigned: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            revoking: std::sync::atomic::AtomicUsize::new(0),
            revoked: tokio::sync::Notify::new(),
            assignments: AtomicU64::new(0),
            assigned_event: tokio::sync::Notify::new(),
            brokers_down: AtomicBool::new(false),
            connection: tokio::sync::watch::Sender::new(ConnectionState::Connected),
            join_refused: Mutex::new(None),
            rebalances: metrics::counter!(format!("{namespace}_rebalances_total")),
            commit_failures: metrics::counter!(format!("{namespace}_commit_failures_total")),
            paused: metrics::gauge!(format!("{namespace}_partitions_paused")),
            commit_lock: Mutex::new(()),
        });
        let client = consumer_config(config, client_id, &name);
        let consumer: BaseConsumer<GroupContext> = client
            .create_with_context(GroupContext {
                group: group.clone(),
            })
            .map_err(|error| Error::config("kafka.consumer_properties", error.to_string()))?;
        let consumer = Arc::new(consumer);
        let (commands, receiver) = mpsc::channel();
        let (commit_requests, requested) = mpsc::channel();
        let committing = group.clone();
        let commit_consumer = consumer.clone();
        let committer = std::thread::Builder::new()
            .name(format!("kafka-commit-{name}"))
            .spawn(move || committing.commit_loop(&commit_consumer, &requested))
            .map_err(|error| Error::broker("cannot start the Kafka commit thread", error))?;
        let polling = group.clone();
        let commit_interval = config.commit_interval;
        let (end, ended) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("kafka-poll-{name}"))
            .spawn(move || {
                polling.run(&consumer, &receiver, commit_interval, &commit_requests);
                // The commit thread ends with its requests; then the consumer closes
                // (librdkafka leaves the group) before the end is reported.
                drop(commit_requests);
                let _ = committer.join();
                drop(consumer);
                let _ = end.send(());
            })
            .map_err(|error| Error::broker("cannot start the Kafka poll thread", error))?;
        Ok((
            group,
            Poller {
                commands: Mutex::new(commands),
                ended: Mutex::new(Some(ended)),
            },
        ))
    }

    /// The poll loop: commands, records, periodic commits, resumes.
    fn run(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        commands: &mpsc::Receiver<Command>,
        commit_interval: Duration,
        commit_requests: &mpsc::Sender<Vec<CommitRequest>>,
    ) {
        let mut next_commit = Instant::now() + commit_interval;
        // The partitions of the records taken in this round, flushed at its end.
        let mut taken: Vec<Arc<Assigned>> = Vec::new();
        loop {
            match commands.try_recv() {
                Ok(Command::Topics(topics, reply)) => {
                    if self.start_at_end {
                        self.note_subscribed_ends(consumer, &topics);
                    }
                    let result = if topics.is_empty() {
                        consumer.unsubscribe();
                        Ok(())
                    } else {
                        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                        consumer
                            .subscribe(&names)
                            .map_err(|error| Error::broker("cannot subscribe on Kafka", error))
                    };
                    let _ = reply.send(result);
                }
                Ok(Command::Close(reply)) => {
                    self.leave(consumer, true);
                    let _ = reply.send(());
                    return;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    // The bus was dropped without `close`.
                    self.leave(consumer, false);
                    return;
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            // While a partition is paused, look often for room to resume it: a paused partition
            // whose records are all handled would otherwise wait for the poll to time out.
            let wait = if self.paused_any() {
                Duration::from_millis(2)
            } else {
                Duration::from_millis(50)
            };
            // What librdkafka has fetched already is taken in one go (up to `POLL_BURST`
            // records) and handed to each partition's dispatcher as one batch. Every record
            // polled is taken: the next poll comes only when there is room for its record.
            let mut polled = consumer.poll(wait);
            let mut burst = 0;
            loop {
                match polled {
                    Some(Ok(record)) => {
                        self.set_brokers_down(false);
                        self.take(consumer, &record, &mut taken);
                    }
                    Some(Err(error)) => {
                        if !self.note_join_refusal(&error) {
                            tracing::warn!(group = %self.name, %error, "Kafka poll error");
                        }
                        break;
                    }
                    None => break,
                }
                burst += 1;
                if burst == POLL_BURST {
                    break;
                }
                polled = consumer.poll(Duration::ZERO);
            }
            for assigned in taken.drain(..) {
                assigned.flush();
            }
            if Instant::now() >= next_commit {
                self.request_commits(commit_requests);
                next_commit = Instant::now() + commit_interval;
            }
            self.resume_drained(consumer);
        }
    }

    /// Hands a polled record to its partition (which `taken` then holds, to be flushed by the
    /// caller); pauses the partition at the in-flight bound.
    fn take(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        record: &BorrowedMessage<'_>,
        taken: &mut Vec<Arc<Assigned>>,
    ) {
        let (topic, partition) = (record.topic(), record.partition());
        // rdkafka's `poll` returns nothing right after it has served a rebalance, which ends
        // the round, so a partition of `taken` is not revoked within it; should that change, a
        // revoked one (maybe assigned again, a new generation) is looked up afresh.
        let current = taken.iter().find(|assigned| {
            assigned.is(topic, partition) && !assigned.revoked.load(Ordering::SeqCst)
        });
        let assigned = match current {
            Some(assigned) => assigned.clone(),
            None => {
                let key = (topic.to_owned(), partition);
                let Some(assigned) = lock(&self.assigned).get(&key).cloned() else {
                    tracing::warn!(
                        topic,
                        partition,
                        "record of a partition not assigned here; skipped"
                    );
                    return;
                };
                taken.push(assigned.clone());
                assigned
            }
        };
        if !assigned.take(record.offset(), record_message(record, topic)) {
            tracing::debug!(
                topic,
                partition,
                offset = record.offset(),
                "record already taken in this generation; skipped"
            );
            return;
        }
        if assigned.in_flight() >= self.max_in_flight
            && !assigned.paused.swap(true, Ordering::SeqCst)
        {
            let list = partition_list(&[(&assigned.topic, assigned.partition, None)]);
            if let Err(error) = consumer.pause(&list) {
                assigned.paused.store(false, Ordering::SeqCst);
                tracing::warn!(%error, "cannot pause a Kafka partition");
            } else {
                tracing::debug!(topic = %assigned.topic, partition = assigned.partition, offset = record.offset(), "partition paused");
                self.paused.increment(1.0);
            }
        }
    }

    /// True while a partition is paused.
    fn paused_any(&self) -> bool {
        lock(&self.assigned)
            .values()
            .any(|assigned| assigned.paused.load(Ordering::SeqCst))
    }

    /// Resumes paused partitions whose unfinished records fell to half the bound.
    fn resume_drained(&self, consumer: &BaseConsumer<GroupContext>) {
        let paused: Vec<Arc<Assigned>> = lock(&self.assigned)
            .values()
            .filter(|assigned| assigned.paused.load(Ordering::SeqCst))
            .cloned()
            .collect();
        for assigned in paused {
            if assigned.in_flight() <= self.max_in_flight / 2 {
                let list = partition_list(&[(&assigned.topic, assigned.partition, None)]);
                if consumer.resume(&list).is_ok() {
                    // librdkafka's broker thread, with nothing left to fetch, sleeps up to a
                    // second and does not notice a resume before: a request through it wakes it.
                    let _ = consumer.fetch_watermarks(
                        &assigned.topic,
                        assigned.partition,
                        Duration::from_secs(1),
                    );
                    tracing::debug!(topic = %assigned.topic, partition = assigned.partition, "partition resumed");
                    assigned.paused.store(false, Ordering::SeqCst);
                    self.paused.decrement(1.0);
                }
            }
        }
    }

    /// Hands the commit thread the offsets to commit now: each assigned partition's
    /// committable offset unless the broker confirmed it already or a request for it is still
    /// unanswered. What failed before is asked for again here.
    fn request_commits(&self, commit_requests: &mpsc::Sender<Vec<CommitRequest>>) {
        let requests: Vec<CommitRequest> = lock(&self.assigned)
            .values()
            .filter_map(|assigned| {
                let offset = assigned.take_commit()?;
                Some(CommitRequest {
                    partition: assigned.clone(),
                    offset,
                })
            })
            .collect();
        if requests.is_empty() {
            return;
        }
        if let Err(mpsc::SendError(requests)) = commit_requests.send(requests) {
            for request in requests {
                request.partition.commit_failed(request.offset);
            }
        }
    }

    /// The commit thread: commits what the poll thread asks for, one request at a time, and
    /// waits for the broker's answer (librdkafka reports nothing of an asynchronous manual
    /// commit through rdkafka's event API: a failed one would pass unseen). A confirmed offset
    /// counts as committed; a failed one is counted in `commit_failures_total` and asked for
    /// again by the next periodic commit, until it succeeds or the partition is revoked.
    fn commit_loop(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        requests: &mpsc::Receiver<Vec<CommitRequest>>,
    ) {
        while let Ok(mut batch) = requests.recv() {
            // Requests that queued up meanwhile go in the same commit, the newest offset of
            // each partition.
            while let Ok(more) = requests.try_recv() {
                for request in more {
                    match batch
                        .iter_mut()
                        .find(|queued| Arc::ptr_eq(&queued.partition, &request.partition))
                    {
                        Some(queued) if queued.offset < request.offset => *queued = request,
                        Some(_) => {}
                        None => batch.push(request),
                    }
                }
            }
            let _committing = lock(&self.commit_lock);
            // A revoke or close committed these partitions meanwhile (at least as far).
            batch.retain(|request| {
                !request.partition.revoked.load(Ordering::SeqCst)
                    && request
                        .partition
                        .confirmed()
                        .is_none_or(|confirmed| confirmed < request.offset)
            });
            if batch.is_empty() {
                continue;
            }
            let entries: Vec<(&str, i32, Option<i64>)> = batch
                .iter()
                .map(|request| {
                    (
                        request.partition.topic.as_str(),
                        request.partition.partition,
                        Some(request.offset),
                    )
                })
                .collect();
            match consumer.commit(&partition_list(&entries), CommitMode::Sync) {
                Ok(()) => {
                    self.set_brokers_down(false);
                    for request in batch {
                        request.partition.commit_confirmed(request.offset);
                    }
                }
                Err(error) => {
                    self.commit_failures.increment(1);
                    tracing::warn!(group = %self.name, %error, partitions = batch.len(), "Kafka offset commit failed; asked for again at the next commit");
                    for request in batch {
                        request.partition.commit_failed(request.offset);
                    }
                }
            }
        }
    }

    /// The partitions of `partitions` are taken away: their readers close (queued records are
    /// given back, running ones finish up to the drain timeout), then what they finished is
    /// committed through the consumer the callback got. A lost assignment (the session expired:
    /// the group has given the partitions to other members already) is not drained: its running
    /// handlers are cancelled at once, so they stop before the new owner runs the same
    /// aggregates, and nothing is committed.
    fn revoke(&self, consumer: &BaseConsumer<GroupContext>, partitions: &TopicPartitionList) {
        self.rebalances.increment(1);
        self.revoking.fetch_add(1, Ordering::SeqCst);
        let revoked: Vec<Arc<Assigned>> = {
            let mut assigned = lock(&self.assigned);
            partitions
                .elements()
                .iter()
                .filter_map(|element| {
                    assigned.remove(&(element.topic().to_owned(), element.partition()))
                })
                .collect()
        };
        let lost = consumer.assignment_lost();
        let drain = if lost {
            Duration::ZERO
        } else {
            self.drain_timeout
        };
        self.close_partitions(&revoked, drain);
        if !lost {
            self.commit_now(consumer, &revoked);
        }
        for assigned in &revoked {
            assigned.revoked.store(true, Ordering::SeqCst);
            if assigned.paused.swap(false, Ordering::SeqCst) {
                self.paused.decrement(1.0);
            }
        }
        tracing::info!(group = %self.name, partitions = revoked.len(), lost, "Kafka partitions revoked");
        self.revoking.fetch_sub(1, Ordering::SeqCst);
        self.revoked.notify_waiters();
    }

    /// Closes the readers of `partitions` (up to `drain`), then stops their dispatchers.
    fn close_partitions(&self, partitions: &[Arc<Assigned>], drain: Duration) {
        let readers: Vec<Arc<Reader>> = partitions
            .iter()
            .flat_map(|assigned| lock(&assigned.readers).clone())
            .collect();
        for reader in &readers {
            reader.consumer.begin_stop();
        }
        if !readers.is_empty() {
            self.handle.block_on(async {
                let closes = readers.iter().map(|reader| reader.consumer.close(drain));
                futures::future::join_all(closes).await;
            });
        }
        for assigned in partitions {
            assigned.stop_dispatch();
        }
    }

    /// Notes the end offset of every partition of each topic newly in `topics` (and forgets
    /// the topics no longer in it), before the consumer subscribes to them: with
    /// `auto_offset_reset = latest` that is where their partitions start.
    fn note_subscribed_ends(&self, consumer: &BaseConsumer<GroupContext>, topics: &[String]) {
        let mut noted = lock(&self.subscribed_ends);
        noted.retain(|topic, _| topics.contains(topic));
        for topic in topics {
            if noted.contains_key(topic) {
                continue;
            }
            let partitions = match consumer.fetch_metadata(Some(topic), POSITION_LOOKUP) {
                Ok(metadata) => metadata
                    .topics()
                    .iter()
                    .flat_map(|found| found.partitions().iter().map(|p| p.id()))
                    .collect::<Vec<_>>(),
                Err(error) => {
                    tracing::warn!(topic, %error, "partitions not known at subscribe; they start at their end when assigned");
                    continue;
                }
            };
            let mut ends = HashMap::new();
            for partition in partitions {
                match consumer.fetch_watermarks(topic, partition, POSITION_LOOKUP) {
                    Ok((_, high)) => {
                        ends.insert(partition, Some(high));
                    }
                    Err(error) => {
                        tracing::warn!(topic, partition, %error, "end offset not known at subscribe; the partition starts at its end when assigned");
                        ends.insert(partition, None);
                    }
                }
            }
            noted.insert(topic.clone(), ends);
        }
    }

    /// Where "latest" was for `partition` of `topic` when this member subscribed to the topic.
    fn subscribed_end(&self, topic: &str, partition: i32) -> SubscribedEnd {
        match lock(&self.subscribed_ends).get(topic) {
            None => SubscribedEnd::Unknown,
            Some(ends) => match ends.get(&partition) {
                None => SubscribedEnd::AddedSince,
                Some(None) => SubscribedEnd::Unknown,
                Some(Some(end)) => SubscribedEnd::At(*end),
            },
        }
    }

    /// With `auto_offset_reset = latest`, sets the start offset of each partition of
    /// `partitions` (about to be assigned) that has no committed offset to where "latest" was
    /// when this member subscribed to its topic, and returns them (the caller commits them once
    /// assigned):
    ///
    /// - a partition that existed then starts at the end it had then (looked up now when that
    ///   failed), kept within the log's current bounds; librdkafka would resolve "latest" only at
    ///   the partition's first fetch, and a record published after `subscribe` returned but
    ///   before that fetch (or before the group assigned the partition at all) would never be
    ///   read;
    /// - a partition added to the topic since starts at its beginning: all of it was published
    ///   after `subscribe`;
    /// - once committed, the position is the group's: a member (or this service after a
    ///   restart) that gets the partition before anything was handled starts there too.
    ///
    /// A partition whose committed offset cannot be read is left to librdkafka (never placed,
    /// so never committed over an offset the group has); when a lookup fails, librdkafka's own
    /// reset applies (and the warning says so).
    fn place_at_subscribe_ends(
        &self,
        consumer: &BaseConsumer<GroupContext>,
        partitions: &mut TopicPartitionList,
    ) -> Vec<(String, i32, i64)> {
        let committed = match consumer.committed_offsets(partitions.clone(), POSITION_LOOKUP) {
            Ok(committed) => committed,
            Err(error) => {
                tracing::warn!(group = %self.name, %error, "committed offsets not known; librdkafka resolves latest at the first fetch");
                return Vec::new();
            }
        };
        let unplaced: Vec<(String, i32)> = committed
            .elements()
            .iter()
            .filter(|element| element.error().is_ok() && element.offset() == Offset::Invalid)
            .map(|element| (element.topic().to_owned(), element.partition()))
            .collect();
        let mut placed = Vec::new();
        for (topic, partition) in unplaced {
            let noted = self.subscribed_end(&topic, partition);
            let start = consumer
                .fetch_watermarks(&topic, partition, POSITION_LOOKUP)
                .map(|(low, high)| match noted {
                    SubscribedEnd::At(end) => end.clamp(low, high.max(low)),
                    SubscribedEnd::AddedSince => low,
                    SubscribedEnd::Unknown => high,
                })
                .and_then(|start| {
                    partitions.set_partition_offset(&topic, partition, Offset::Offset(start))?;
                    Ok(start)
                });
            match start {
                Ok(start) => {
                    tracing::debug!(group = %self.name, topic, partition, offset = start, "partition without a committed offset placed where latest was at subscribe");
                    placed.push((topic, partition, start));
                }
                Err(error) => {
                    tracing::warn!(group = %self.name, topic, partition, %error, "start offset not known; librdkafka resolves latest at the first fetch");
                }
            }
        }
        placed
    }

    /// New partitions: a reader per subscription of the topic, a new generation each.
    fn assign(&self, partitions: &TopicPartitionList) {
        self.rebalances.increment(1);
        for element in partitions.elements() {
            let topic = element.topic();
            let entries = lock(&self.subscriptions)
                .get(topic)
                .cloned()
                .unwrap_or_default();
            let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
            let readers = entries
                .iter()
                .filter_map(|entry| self.reader(entry, element.partition(), generation))
                .collect();
            let assigned = Assigned::start(
                topic,
                element.partition(),
                generation,
                readers,
                &self.handle,
            );
            let old =
                lock(&self.assigned).insert((topic.to_owned(), element.partition()), assigned);
            if let Some(old) = old {
                // Assigned twice without a revoke between: the old generation is closed.
                old.revoked.store(true, Ordering::SeqCst);
                self.close_partitions(&[old], Duration::ZERO);
            }
        }
        tracing::info!(group = %self.name, partitions = partitions.count(), "Kafka partitions assigned");
        lock(&self.join_refused).take();
        self.assignments.fetch_add(1, Ordering::SeqCst);
        self.assigned_event.notify_waiters();
    }

    /// Assignments received so far.
    pub(crate) fn assignments(&self) -> u64 {
        self.assignments.load(Ordering::SeqCst)
    }

    /// Records a refused group join: the coordinator answers `INCONSISTENT_GROUP_PROTOCOL`
    /// when this member offers no assignor that every member of the group offers (a Go service
    /// with sarama's eager `range` beside this bus's default `cooperative-sticky`). Returns
    /// whether `error` was one.
    fn note_join_refusal(&self, error: &KafkaError) -> bool {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::InconsistentGroupProtocol) {
            return false;
        }
        let reason = format!(
            "the consumer group {} refused this member: its other members use a partition \
             assignment strategy this member does not offer ({error}). Members of one group \
             must share one; beside Go services (sarama: range) set \
             assignment_strategy = \"range\"",
            self.name
        );
        let first = lock(&self.join_refused).replace(reason.clone()).is_none();
        if first {
            tracing::error!(group = %self.name, %error, "{reason}");
        }
        self.assigned_event.notify_waiters();
        true
    }

    /// Forgets an earlier refused join: the next join is judged on its own (the members that
    /// refused it may have left since).
    pub(crate) fn clear_join_refusal(&self) {
        lock(&self.join_refused).take();
    }

    /// Waits until an assignment after the first `seen` arrives (`Ok(true)`), or `deadline`
    /// (`Ok(false)`); a refused join is a configuration error naming
    /// `kafka.assignment_strategy`.
    pub(crate) async fn wait_assignment(
        &self,
        seen: u64,
        deadline: tokio::time::Instant,
    ) -> Result<bool, Error> {
        loop {
            let assigned = self.assigned_event.notified();
            tokio::pin!(assigned);
            assigned.as_mut().enable();
            if self.assignments() > seen {
                return Ok(true);
            }
            if let Some(reason) = lock(&self.join_refused).clone() {
                return Err(Error::config("kafka.assignment_strategy", reason));
            }
            if tokio::time::timeout_at(deadline, assigned).await.is_err() {
                return Ok(false);
            }
        }
    }

    /// A runtime consumer for `entry` on one partition (a scope of its own).
    fn reader(&self, entry: &Entry, partition: i32, generation: u64) -> Option<Arc<Reader>> {
        let name = format!(
            "{}/{}/{partition}/{generation}#{}",
            self.name, entry.topic, entry.id
        );
        // Every reader of the topic in the group, whichever member and generation, owns its
        // dead letters: a copy is handled wherever its partition is read then.
        let spec = entry
            .spec
            .clone()
            .with_name(name)
            .with_owner(format!("{}/{}", self.name, entry.topic));
        match self.runtime.subscribe(spec) {
            Ok(consumer) => Some(Arc::new(Reader {
                subscription: entry.id,
                consumer,
                leaving: entry.leaving.clone(),
                plain: !entry.spec.handler.is_envelope(),
            })),
            Err(error) => {
                tracing::debug!(%error, "no reader: the runtime is closing");
                None
            }
        }
    }

    /// Drains every partition (or, when the bus was dropped, none), commits, and leaves.
    fn leave(&self, consumer: &BaseConsumer<GroupContext>, drain: bool) {
        if drain {
            let started = Instant::now();
            self.catch_up(consumer, started + (self.drain_timeout / 2).min(CATCH_UP));
        }
        let all: Vec<Arc<Assigned>> = lock(&self.assigned).drain().map(|(_, a)| a).collect();
        if drain {
            self.close_partitions(&all, self.drain_timeout);
        }
        if !consumer.assignment_lost() {
            self.commit_now(consumer, &all);
        }
        for assigned in &all {
            assigned.revoked.store(true, Ordering::SeqCst);
            assigned.stop_dispatch();
        }
        self.revoked.notify_waiters();
        // Dropping the consumer (by the caller) leaves the group.
    }

    /// Before a close drains: takes what the assigned partitions held when `close` was called
    /// (up to their high watermarks), so that what was published just before is handled, until
    /// `deadline`. Paused partitions stay paused: their rest is read by the next owner.
    fn catch_up(&self, consumer: &BaseConsumer<GroupContext>, deadline: Instant) {
        let assigned: Vec<Arc<Assigned>> = lock(&self.assigned).values().cloned().collect();
        let mut targets: Vec<(Arc<Assigned>, i64)> = Vec::new();
        let left = || deadline.saturating_duration_since(Instant::now());
        for partition in assigned {
            if partition.paused.load(Ordering::SeqCst) || left().is_zero() {
                continue;
            }
            let high = consumer.fetch_watermarks(
                &partition.topic,
                partition.partition,
                left().min(Duration::from_secs(2)),
            );
            if let Ok((_, high)) = high {
                targets.push((partition, high));
            }
        }
        let start_of = |partition: &Assigned| -> Option<i64> {
            if let Some(next) = partition.next_offset() {
                return Some(next);
            }
            let list = partition_list(&[(&partition.topic, partition.partition, None)]);
            let committed = consumer
                .committed_offsets(list, Duration::from_secs(2))
                .ok()?;
            let element = committed.elements().into_iter().next()?;
            match element.offset() {
                Offset::Offset(offset) => Some(offset),
                _ => consumer
                    .fetch_watermarks(
                        &partition.topic,
                        partition.partition,
                        Duration::from_secs(2),
                    )
                    .ok()
                    .map(|(low, _)| low),
            }
        };
        targets.retain(|(partition, high)| start_of(partition).is_none_or(|start| start < *high));
        while !targets.is_empty() && Instant::now() < deadline {
            if let Some(Ok(record)) = consumer.poll(Duration::from_millis(50)) {
                let mut taken = Vec::new();
                self.take(consumer, &record, &mut taken);
                for assigned in taken {
                    assigned.flush();
                }
            }
            targets.retain(|(partition, high)| {
                !partition.paused.load(Ordering::SeqCst)
                    && partition.next_offset().is_none_or(|next| next < *high)
            });
        }
    }

    /// Topics with at least one subscription.
    pub(crate) fn topics(&self) -> Vec<String> {
        lock(&self.subscriptions).keys().cloned().collect()
    }

    /// Adds `entry`; returns true when it is the first subscription of its topic.
    pub(crate) fn add(&self, entry: Arc<Entry>) -> bool {
        let mut subscriptions = lock(&self.subscriptions);
        let list = subscriptions.entry(entry.topic.clone()).or_default();
        list.push(entry);
        list.len() == 1
    }

    /// Removes `entry`; returns true when it was the last subscription of its topic.
    pub(crate) fn remove(&self, entry: &Entry) -> bool {
        let mut subscriptions = lock(&self.subscriptions);
        let Some(list) = subscriptions.get_mut(&entry.topic) else {
            return false;
        };
        list.retain(|other| other.id != entry.id);
        if list.is_empty() {
            subscriptions.remove(&entry.topic);
            true
        } else {
            false
        }
    }

    /// Gives `entry` a reader on every partition of its topic assigned now.
    pub(crate) fn add_readers(&self, entry: &Entry) {
        let assigned: Vec<Arc<Assigned>> = lock(&self.assigned)
            .values()
            .filter(|assigned| assigned.topic == entry.topic)
            .cloned()
            .collect();
        for assigned in assigned {
            if let Some(reader) = self.reader(entry, assigned.partition, assigned.generation) {
                let mut readers = lock(&assigned.readers);
                if !readers.iter().any(|other| other.subscription == entry.id) {
                    readers.push(reader);
                }
            }
        }
    }

    /// Takes `entry`'s readers off every partition and returns them.
    pub(crate) fn take_readers(&self, entry: &Entry) -> Vec<Arc<Reader>> {
        let assigned: Vec<Arc<Assigned>> = lock(&self.assigned).values().cloned().collect();
        let mut taken = Vec::new();
        for assigned in assigned {
            lock(&assigned.readers).retain(|reader| {
                if reader.subscription == entry.id {
                    taken.push(reader.clone());
                    false
                } else {
                    true
                }
            });
        }
        taken
    }

    /// Waits until no partition of `topic` is assigned here and no revoke is under way (its
    /// drain and commit done), or `deadline`.
    pub(crate) async fn wait_revoked(&self, topic: &str, deadline: tokio::time::Instant) -> bool {
        loop {
            let revoked = self.revoked.notified();
            tokio::pin!(revoked);
            revoked.as_mut().enable();
            if self.revoking.load(Ordering::SeqCst) == 0
                && !lock(&self.assigned).keys().any(|(t, _)| t == topic)
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, revoked).await.is_err() {
                return false;
            }
        }
    }

    /// Partitions assigned here now.
    pub(crate) fn assigned_count(&self) -> usize {
        lock(&self.assigned).len()
    }

    /// True while every broker is unreachable.
    pub(crate) fn brokers_down(&self) -> bool {
        self.brokers_down.load(Ordering::SeqCst)
    }

    fn set_brokers_down(&self, down: bool) {
        if self.brokers_down.swap(down, Ordering::SeqCst) == down {
            return;
        }
        let state = if down {
            ConnectionState::Reconnecting
        } else {
            ConnectionState::Connected
        };
        // A closed bus stays closed.
        self.connection.send_if_modified(|now| {
            let changed = *now != ConnectionState::Closed && *now != state;
            if changed {
                *now = state;
            }
            changed
        });
    }

    /// A watch of the connection's state.
    pub(crate) fn connection_state(&self) -> eventbus_core::ConnectionWatch {
        self.connection.subscribe()
    }

    /// The bus closed: nothing reconnects any more.
    pub(crate) fn closed(&self) {
        self.connection.send_replace(ConnectionState::Closed);
    }
}

/// An offset the poll thread asks the commit thread to commit.
struct CommitRequest {
    partition: Arc<Assigned>,
    offset: i64,
}

impl Group {
    /// Commits everything committable of `partitions` and waits for the answer (revoke and
    /// close), in turn with the commit thread.
    fn commit_now(&self, consumer: &BaseConsumer<GroupContext>, partitions: &[Arc<Assigned>]) {
        let offsets: Vec<(&Arc<Assigned>, i64)> = partitions
            .iter()
            .filter_map(|assigned| Some((assigned, assigned.committable()?)))
            .collect();
        if offsets.is_empty() {
            return;
        }
        let entries: Vec<(&str, i32, Option<i64>)> = offsets
            .iter()
            .map(|(assigned, offset)| (assigned.topic.as_str(), assigned.partition, Some(*offset)))
            .collect();
        let _committing = lock(&self.commit_lock);
        match consumer.commit(&partition_list(&entries), CommitMode::Sync) {
            Ok(()) => {
                for (assigned, offset) in offsets {
                    assigned.commit_confirmed(offset);
                }
            }
            Err(error) => {
                self.commit_failures.increment(1);
                tracing::warn!(group = %self.name, %error, "Kafka offset commit failed");
            }
        }
    }
}

impl Poller {
    /// Makes the group consume exactly `topics` (a rebalance follows).
    pub(crate) async fn set_topics(&self, topics: Vec<String>) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        lock(&self.commands)
            .send(Command::Topics(topics, reply))
            .map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Drains, commits and leaves the group; returns once the poll thread has ended, or after
    /// `limit` (with the brokers gone, the commit and the group leave wait on librdkafka's own
    /// timeouts: the thread is then left to finish them on its own).
    pub(crate) async fn close(&self, limit: Duration) {
        let (reply, answer) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + limit;
        if lock(&self.commands).send(Command::Close(reply)).is_ok()
            && tokio::time::timeout_at(deadline, answer).await.is_err()
        {
            tracing::warn!(
                "the Kafka consumer did not leave its group in time; left to finish in the background"
            );
            return;
        }
        let ended = lock(&self.ended).take();
        if let Some(ended) = ended
            && tokio::time::timeout_at(deadline, ended).await.is_err()
        {
            tracing::warn!(
                "the Kafka consumer did not close in time; left to finish in the background"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_starts_from_the_defaults_and_configured_properties_override_them() {
        let mut config = KafkaConfig::default();
        let client = consumer_config(&config, "svc", "svc");
        for (name, value) in crate::CONSUMER_DEFAULTS {
            assert_eq!(client.get(name), Some(value), "{name}");
        }
        for (name, value) in [
            ("fetch.queue.backoff.ms", "200"),
            ("statistics.interval.ms", "0"),
            ("fetch.wait.max.ms", "300"),
        ] {
            config.properties.0.insert(name.into(), value.into());
        }
        config
            .consumer_properties
            .0
            .insert("fetch.wait.max.ms".into(), "400".into());
        let client = consumer_config(&config, "svc", "svc");
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("200"));
        assert_eq!(client.get("statistics.interval.ms"), Some("0"));
        assert_eq!(client.get("fetch.wait.max.ms"), Some("400"));
        assert_eq!(client.get("enable.auto.commit"), Some("false"));
        assert_eq!(client.get("group.id"), Some("svc"));
    }
}
