//! Scaling out on NATS: partitioned topics shared by the instances of a service, against a real
//! nats-server. Each partition is read by one instance at a time (a pinned consumer, claims in a
//! key-value bucket); instances that come, go or die move partitions without losing an event or
//! reordering an aggregate's.

// Test code: a failed unwrap, index or expect is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{
    Envelope, HEADER_REPLAY_HEAD, HEADER_REPLAY_LAST, HandlerContext, HandlerError,
    SubscribeOptions,
};
use eventbus_nats::{NatsBus, NatsConfig, ScaleOutSettings, TopicOptions, partition_of};
use futures::StreamExt;
use integration_tests::{
    Recorder, assert_first_handlings_in_order, eventually, nats_config, nats_settings,
    record_versions,
};
use test_brokers::NatsServer;

fn envelope(aggregate: usize, version: i64) -> Envelope {
    Envelope::new(
        format!("agg-{aggregate}"),
        "Changed",
        version,
        &serde_json::json!({"aggregate": aggregate, "version": version}),
    )
    .unwrap()
}

/// A configuration with `topic` split into `partitions`, a 2 s `pinned_ttl`.
fn partitioned_config(url: &str, topic: &str, partitions: u16) -> NatsConfig {
    let mut config = nats_config(url);
    config.topics.insert(
        topic.to_owned(),
        TopicOptions {
            partitions: Some(partitions),
            ..TopicOptions::default()
        },
    );
    config.scale_out = ScaleOutSettings {
        pinned_ttl: Duration::from_secs(2),
    };
    config
}

/// A bus of client `client` with `config`.
async fn connect(client: &str, config: NatsConfig) -> NatsBus {
    eventbus_nats::connect(nats_settings(client), config)
        .await
        .unwrap()
}

/// Publishes `versions` of each of `aggregates`, one version of all aggregates at a time (many
/// publishes in flight, an aggregate's in order).
async fn publish_versions(
    bus: &NatsBus,
    topic: &str,
    aggregates: usize,
    versions: std::ops::RangeInclusive<i64>,
) {
    for version in versions {
        futures::stream::iter(0..aggregates)
            .map(|aggregate| async move {
                bus.publish_envelope(topic, &envelope(aggregate, version))
                    .await
                    .unwrap();
            })
            .buffer_unordered(200)
            .collect::<Vec<()>>()
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregates_partition_is_the_one_the_servers_partition_transform_picks() {
    use async_nats::jetstream::stream;
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // The server's own implementation of `partition(12, 1)`, as a stream subject transform.
    let mut stream = js
        .create_stream(stream::Config {
            name: "TRANSFORM".into(),
            subjects: vec!["check.*".into()],
            subject_transform: Some(stream::SubjectTransform {
                source: "check.*".into(),
                destination: "checked.{{partition(12,1)}}.{{wildcard(1)}}".into(),
            }),
            ..stream::Config::default()
        })
        .await
        .unwrap();
    let ids: Vec<String> = (0..300)
        .map(|i| format!("order-{i}"))
        .chain([
            "a".into(),
            "Z9".into(),
            "ünïcode-ä".into(),
            "x_y-z=1".into(),
        ])
        .collect();
    for id in &ids {
        js.publish(format!("check.{id}"), "{}".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut seen = HashSet::new();
    for (index, id) in ids.iter().enumerate() {
        let stored = stream
            .get_raw_message(u64::try_from(index).unwrap() + 1)
            .await
            .unwrap();
        let server_partition: u16 = stored.subject.split('.').nth(1).unwrap().parse().unwrap();
        assert_eq!(
            partition_of(id, 12),
            server_partition,
            "{id}: this SDK and the server disagree"
        );
        seen.insert(server_partition);
    }
    assert_eq!(seen.len(), 12, "the check covered every partition");
    stream.info().await.unwrap();
}

/// Waits until `bus` reads `subjects` subjects of `topic`.
async fn wait_reading(bus: &NatsBus, topic: &str, subjects: usize) {
    eventually(&format!("an instance reading {subjects} subjects"), || {
        let reading = bus.transport().partitions_reading(topic).len();
        async move { reading == subjects }
    })
    .await;
}

/// One handling, as the instances report it.
#[derive(Debug, Clone)]
struct Handling {
    instance: usize,
    aggregate: String,
    version: i64,
}

/// What the instances of one process handle, and any aggregate that ran on two at once.
#[derive(Clone)]
struct Watched {
    handled: Arc<Recorder<Handling>>,
    running: Arc<Mutex<HashMap<String, usize>>>,
    overlaps: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    fn new() -> Self {
        Self {
            handled: Recorder::new(),
            running: Arc::default(),
            overlaps: Arc::default(),
        }
    }

    /// A handler for `instance` that works `work` per envelope, noting overlaps.
    fn handler(&self, instance: usize, work: Duration) -> Arc<dyn eventbus_core::EnvelopeHandler> {
        let watched = self.clone();
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let watched = watched.clone();
            async move {
                let id = envelope.aggregate_id.clone();
                if let Some(other) = watched.running.lock().unwrap().insert(id.clone(), instance) {
                    watched
                        .overlaps
                        .lock()
                        .unwrap()
                        .push(format!("{id} on {other} and {instance}"));
                }
                tokio::time::sleep(work).await;
                watched.running.lock().unwrap().remove(&id);
                watched.handled.push(Handling {
                    instance,
                    aggregate: id,
                    version: envelope.event_version,
                });
                Ok::<(), HandlerError>(())
            }
        })
    }

    fn assert_no_overlap(&self) {
        let overlaps = self.overlaps.lock().unwrap();
        assert!(
            overlaps.is_empty(),
            "an aggregate ran on two instances at once: {overlaps:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_never_run_one_aggregate_at_once() {
    let server = NatsServer::start();
    let topic = "scale.shared";
    let (aggregates, versions) = (60usize, 10i64);
    let config = partitioned_config(&server.url(), topic, 6);
    let publisher = connect("publisher", config.clone()).await;
    let watched = Watched::new();
    let mut instances = Vec::new();
    for instance in 0..2 {
        let bus = connect("shared", config.clone()).await;
        bus.subscribe_envelope(
            topic,
            watched.handler(instance, Duration::from_millis(1)),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
        instances.push(bus);
    }
    eventually("the instances read 3 and 4 of the 7 subjects", || {
        let counts: Vec<usize> = instances
            .iter()
            .map(|bus| bus.transport().partitions_reading(topic).len())
            .collect();
        async move { counts.iter().sum::<usize>() == 7 && counts.iter().all(|n| (3..=4).contains(n)) }
    })
    .await;
    publish_versions(&publisher, topic, aggregates, 1..=versions).await;
    let total = aggregates * usize::try_from(versions).unwrap();
    let events = watched
        .handled
        .wait_for("every envelope handled", |events| {
            events
                .iter()
                .map(|h| (h.aggregate.clone(), h.version))
                .collect::<HashSet<_>>()
                .len()
                >= total
        })
        .await;
    let pairs: Vec<(String, i64)> = events
        .iter()
        .map(|h| (h.aggregate.clone(), h.version))
        .collect();
    assert_first_handlings_in_order(&pairs, aggregates, versions);
    watched.assert_no_overlap();
    let mut per_instance: BTreeMap<usize, usize> = BTreeMap::new();
    for handling in &events {
        *per_instance.entry(handling.instance).or_default() += 1;
    }
    eprintln!("events per instance: {per_instance:?}");
    for instance in instances {
        instance.close().await.unwrap();
    }
    publisher.close().await.unwrap();
}

/// One handling reported by an instance process: which, what, and when (ns since the epoch).
#[derive(Debug, Clone)]
struct Timed {
    instance: usize,
    aggregate: String,
    version: i64,
    start: u128,
    end: u128,
}

/// Instance processes of one service (the `consumer` test binary with a partition count),
/// reporting their handlings on one channel.
struct Instances {
    url: String,
    topic: String,
    client_id: String,
    partitions: u16,
    children: Vec<Option<integration_tests::ConsumerProcess>>,
    sender: tokio::sync::mpsc::UnboundedSender<Timed>,
    receiver: tokio::sync::mpsc::UnboundedReceiver<Timed>,
    handled: Vec<Timed>,
    /// The distinct (aggregate, version) pairs of `handled`, counted as they come: recounting
    /// them per handling is quadratic, and a reader that falls that far behind the instances
    /// times out with their lines still queued.
    distinct: HashSet<(String, i64)>,
}

impl Instances {
    fn new(url: &str, topic: &str, client_id: &str, partitions: u16) -> Self {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        Self {
            url: url.to_owned(),
            topic: topic.to_owned(),
            client_id: client_id.to_owned(),
            partitions,
            children: Vec::new(),
            sender,
            receiver,
            handled: Vec::new(),
            distinct: HashSet::new(),
        }
    }

    /// Starts `count` instances and waits until they share the subjects.
    async fn start(&mut self, count: usize) {
        for _ in 0..count {
            self.add();
        }
        self.wait_balanced(count).await;
    }

    /// Starts one more instance; returns its number.
    fn add(&mut self) -> usize {
        let instance = self.children.len();
        let (lines_in, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let partitions = self.partitions.to_string();
        let child = integration_tests::spawn_consumer(
            env!("CARGO_BIN_EXE_consumer"),
            [
                "nats",
                self.url.as_str(),
                self.topic.as_str(),
                self.client_id.as_str(),
                partitions.as_str(),
            ],
            lines_in,
        );
        let sender = self.sender.clone();
        tokio::spawn(async move {
            while let Some(line) = lines.recv().await {
                let fields: Vec<&str> = line.split(' ').collect();
                let [aggregate, version, start, end] = fields[..] else {
                    panic!("instance {instance} printed {line:?}");
                };
                let timed = Timed {
                    instance,
                    aggregate: aggregate.to_owned(),
                    version: version.parse().unwrap(),
                    start: start.parse().unwrap(),
                    end: end.parse().unwrap(),
                };
                if sender.send(timed).is_err() {
                    break;
                }
            }
        });
        self.children.push(Some(child));
        instance
    }

    /// SIGKILLs instance `instance`: no close, nothing it held acknowledged.
    fn kill(&mut self, instance: usize) {
        let mut child = self.children[instance].take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Reads handlings until `condition` holds on what was read (three deadlines at most).
    async fn read_until(&mut self, what: &str, condition: impl Fn(&Self) -> bool) {
        let read = async {
            while !condition(self) {
                let timed = self.receiver.recv().await.expect("instance output");
                self.distinct
                    .insert((timed.aggregate.clone(), timed.version));
                self.handled.push(timed);
            }
        };
        tokio::time::timeout(integration_tests::DEADLINE * 3, read)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {what} ({} handlings so far)",
                    self.handled.len()
                )
            });
    }

    /// Reads until `total` distinct envelopes were handled.
    async fn read_all(&mut self, total: usize) {
        self.read_until(&format!("{total} distinct envelopes"), |read| {
            read.distinct.len() >= total
        })
        .await;
    }

    /// Checks the contract over every handling: each aggregate handled by one instance at a
    /// time (no two handlings of an aggregate overlap, on one instance or two), the first
    /// handlings of its events in version order, every event handled. Returns the handlings per
    /// instance and the duplicates.
    fn check(&self, aggregates: usize, versions: i64) -> (BTreeMap<usize, usize>, usize) {
        let mut sorted = self.handled.clone();
        sorted.sort_by_key(|t| t.start);
        let mut last_end: HashMap<&str, (u128, usize)> = HashMap::new();
        for timed in &sorted {
            if let Some((end, instance)) = last_end.get(timed.aggregate.as_str()) {
                assert!(
                    timed.start >= *end,
                    "{} version {} started on instance {} before a handling on instance {instance} ended",
                    timed.aggregate,
                    timed.version,
                    timed.instance
                );
            }
            let entry = last_end
                .entry(timed.aggregate.as_str())
                .or_insert((timed.end, timed.instance));
            if timed.end >= entry.0 {
                *entry = (timed.end, timed.instance);
            }
        }
        let pairs: Vec<(String, i64)> = sorted
            .iter()
            .map(|t| (t.aggregate.clone(), t.version))
            .collect();
        let duplicates = assert_first_handlings_in_order(&pairs, aggregates, versions);
        let mut per_instance = BTreeMap::new();
        for timed in &self.handled {
            *per_instance.entry(timed.instance).or_insert(0) += 1;
        }
        (per_instance, duplicates)
    }

    /// Waits until the group has `members` members and every subject is claimed, spread within
    /// one subject between them (read from the group's bucket, as an operator would).
    async fn wait_balanced(&self, members: usize) {
        let client = async_nats::connect(&self.url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let bucket = format!(
            "eventbus_{}_{}",
            self.client_id,
            self.topic.replace('.', "_")
        );
        let subjects = usize::from(self.partitions) + 1;
        let (low, high) = (subjects / members, subjects.div_ceil(members));
        eventually(
            &format!("{members} members sharing {subjects} subjects"),
            || {
                let js = js.clone();
                let bucket = bucket.clone();
                async move {
                    let Ok(store) = js.get_key_value(&bucket).await else {
                        return false;
                    };
                    let Ok(mut keys) = store.keys().await else {
                        return false;
                    };
                    let mut names = Vec::new();
                    while let Some(Ok(key)) = keys.next().await {
                        names.push(key);
                    }
                    let live = names.iter().filter(|k| k.starts_with("members.")).count();
                    let mut per_owner: HashMap<String, usize> = HashMap::new();
                    for key in names.iter().filter(|k| k.starts_with("claims.")) {
                        if let Ok(Some(owner)) = store.get(key.as_str()).await {
                            *per_owner
                                .entry(String::from_utf8_lossy(&owner).into_owned())
                                .or_default() += 1;
                        }
                    }
                    live == members
                        && per_owner.len() == members
                        && per_owner.values().sum::<usize>() == subjects
                        && per_owner.values().all(|n| (low..=high).contains(n))
                }
            },
        )
        .await;
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// 500 aggregates, 20 versions each: 10,000 envelopes over 12 partitions.
const AGGREGATES: usize = 500;
const VERSIONS: i64 = 20;
const PARTITIONS: u16 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instance_processes_share_twelve_partitions_in_order_without_loss() {
    let server = NatsServer::start();
    let topic = "scale.three";
    let config = partitioned_config(&server.url(), topic, PARTITIONS);
    let publisher = connect("publisher", config).await;
    let mut instances = Instances::new(&server.url(), topic, "three", PARTITIONS);
    instances.start(3).await;
    publish_versions(&publisher, topic, AGGREGATES, 1..=VERSIONS).await;
    let total = AGGREGATES * usize::try_from(VERSIONS).unwrap();
    instances.read_all(total).await;
    let (per_instance, duplicates) = instances.check(AGGREGATES, VERSIONS);
    eprintln!("three instances: events per instance {per_instance:?}, {duplicates} handled twice");
    assert_eq!(per_instance.len(), 3, "every instance handled events");
    assert_eq!(
        duplicates, 0,
        "nothing failed, so nothing was handled twice"
    );
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_stream_has_its_partitions_taken_over_in_order_without_loss() {
    let server = NatsServer::start();
    let topic = "scale.killed";
    let mut instances = Instances::new(&server.url(), topic, "killed", PARTITIONS);
    instances.start(3).await;
    let publishing = publish_in_background(&server.url(), topic);
    instances
        .read_until("every instance handling", |read| {
            let instances: HashSet<usize> = read.handled.iter().map(|t| t.instance).collect();
            instances.len() == 3 && read.handled.len() >= 1_000
        })
        .await;
    instances.kill(0);
    let killed = std::time::Instant::now();
    let killed_at = instances.handled.len();
    // Mid-stream: most of the stream was still ahead, so the kill found messages the instance
    // held (running, queued, fetched).
    assert!(killed_at < 5_000, "killed mid-stream ({killed_at} handled)");
    instances.wait_balanced(2).await;
    let claimed_after = killed.elapsed();
    publishing.await.unwrap();
    let total = AGGREGATES * usize::try_from(VERSIONS).unwrap();
    instances.read_all(total).await;
    let (per_instance, duplicates) = instances.check(AGGREGATES, VERSIONS);
    eprintln!(
        "killed instance: {killed_at} handled before the kill; its subjects claimed by the others {claimed_after:?} after it (pinned_ttl 2 s); events per instance {per_instance:?}, {duplicates} handled twice"
    );
}

/// Publishes the 10,000 envelopes from a bus of its own, on a task.
fn publish_in_background(url: &str, topic: &'static str) -> tokio::task::JoinHandle<()> {
    let config = partitioned_config(url, topic, PARTITIONS);
    tokio::spawn(async move {
        let publisher = connect("publisher", config).await;
        publish_versions(&publisher, topic, AGGREGATES, 1..=VERSIONS).await;
        publisher.close().await.unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_added_mid_stream_takes_partitions_without_loss_or_overlap() {
    let server = NatsServer::start();
    let topic = "scale.added";
    let mut instances = Instances::new(&server.url(), topic, "added", PARTITIONS);
    instances.start(2).await;
    let publishing = publish_in_background(&server.url(), topic);
    instances
        .read_until("the first instances handling", |read| {
            read.handled.len() >= 1_000
        })
        .await;
    assert!(
        !publishing.is_finished(),
        "added while events are still published"
    );
    let added = instances.add();
    instances.wait_balanced(3).await;
    publishing.await.unwrap();
    let total = AGGREGATES * usize::try_from(VERSIONS).unwrap();
    instances.read_all(total).await;
    let (per_instance, duplicates) = instances.check(AGGREGATES, VERSIONS);
    eprintln!("added instance: events per instance {per_instance:?}, {duplicates} handled twice");
    assert!(
        per_instance.get(&added).copied().unwrap_or(0) > 0,
        "the added instance handled events: {per_instance:?}"
    );
}

/// A topic read whole first, then partitioned: its bare durable (made without a priority
/// group) becomes the bare subject's pinned consumer and keeps its position: what the first run
/// acknowledged is not handled again, what it left is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_partitioned_later_keeps_the_position_of_its_durable() {
    let server = NatsServer::start();
    let topic = "scale.later";
    let whole = connect("later", nats_config(&server.url())).await;
    for version in 1..=3 {
        whole
            .publish_envelope(topic, &envelope(0, version))
            .await
            .unwrap();
    }
    let first = record_versions(&whole, topic, SubscribeOptions::new()).await;
    first
        .wait_for("the first run's events", |v| v.len() == 3)
        .await;
    whole.close().await.unwrap();
    // Published bare while nobody reads: the partitioned run's bare subject has it.
    let publisher = connect("later-publisher", nats_config(&server.url())).await;
    publisher
        .publish_envelope(topic, &envelope(0, 4))
        .await
        .unwrap();

    let partitioned = connect("later", partitioned_config(&server.url(), topic, 3)).await;
    let second = record_versions(&partitioned, topic, SubscribeOptions::new()).await;
    let seen = second
        .wait_for("the event left by the first run", |v| !v.is_empty())
        .await;
    assert_eq!(
        seen,
        [("agg-0".to_owned(), 4)],
        "only what the first run left is handled"
    );
    partitioned.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// An instance subscribed to `topic` with a handler that does nothing.
async fn subscribed(topic: &str, config: NatsConfig) -> (NatsBus, eventbus_core::Subscription) {
    let bus = connect("cancel", config).await;
    let subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    (bus, subscription)
}

/// Cancel safety of a partitioned `subscribe`: dropped at any point, it leaves no member in the
/// group (which the others would give subjects to, unread until it expired): another instance
/// alone reads every subject, well before a membership could expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_partitioned_subscribe_leaves_no_member_behind() {
    let server = NatsServer::start();
    let topic = "scale.dropped-subscribe";
    let mut config = partitioned_config(&server.url(), topic, 4);
    // Far longer than the test waits: only what is never written cannot linger.
    config.scale_out.pinned_ttl = Duration::from_secs(60);
    let dropping = connect("cancel", config.clone()).await;
    for cut in [0_u64, 1, 2, 5, 10, 20, 50] {
        let subscribe = dropping.subscribe_envelope(
            topic,
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new(),
        );
        if let Ok(Ok(subscription)) =
            tokio::time::timeout(Duration::from_millis(cut), subscribe).await
        {
            // Completed in time: a whole subscription, left properly.
            subscription.unsubscribe().await.unwrap();
        }
    }
    let (other, _subscription) = subscribed(topic, config).await;
    wait_reading(&other, topic, 5).await;
    other.close().await.unwrap();
    dropping.close().await.unwrap();
}

/// Cancel safety of a partitioned subscription's `unsubscribe`: dropped after its first poll,
/// the leaving still completes (subjects given back, unpinned, claims and membership deleted), so
/// the other instance takes every subject over at once, not after the claims expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_partitioned_unsubscribe_still_leaves_the_group() {
    use futures::FutureExt;
    let server = NatsServer::start();
    let topic = "scale.dropped-unsubscribe";
    let mut config = partitioned_config(&server.url(), topic, 4);
    config.scale_out.pinned_ttl = Duration::from_secs(60);
    let (leaving, subscription) = subscribed(topic, config.clone()).await;
    let (staying, _kept) = subscribed(topic, config).await;
    let t = std::time::Instant::now();
    eventually("both instances reading", || {
        let counts = (
            leaving.transport().partitions_reading(topic).len(),
            staying.transport().partitions_reading(topic).len(),
        );
        async move { counts.0 + counts.1 == 5 && counts.0 > 0 && counts.1 > 0 }
    })
    .await;
    eprintln!("DBG both reading {:?}", t.elapsed());
    assert!(
        subscription.unsubscribe().now_or_never().is_none(),
        "it had work to do"
    );
    wait_reading(&staying, topic, 5).await;
    eprintln!("DBG taken over {:?}", t.elapsed());
    staying.close().await.unwrap();
    leaving.close().await.unwrap();
    eprintln!("DBG closed {:?}", t.elapsed());
}

/// The instance reading each subject now (the claim keys of the group's bucket).
async fn claims(url: &str, bucket: &str) -> BTreeMap<String, String> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let store = js.get_key_value(bucket).await.unwrap();
    let mut keys = store.keys().await.unwrap();
    let mut claims = BTreeMap::new();
    while let Some(Ok(key)) = keys.next().await {
        if key.starts_with("claims.")
            && let Ok(Some(owner)) = store.get(key.as_str()).await
        {
            claims.insert(key, String::from_utf8_lossy(&owner).into_owned());
        }
    }
    claims
}

/// A claim lost while its instance reads the subject (it expired: an instance cut off from the
/// server for longer than `pinned_ttl`; here deleted, as the age limit would): that instance
/// stops reading the subject and unpins it at its next round, the group reads every subject
/// again, and once it has unsubscribed its handler never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_lost_while_reading_stops_that_reader_and_the_group_reads_every_subject_again() {
    let server = NatsServer::start();
    let topic = "scale.lost";
    let config = partitioned_config(&server.url(), topic, 2);
    let handled = Recorder::<(usize, String)>::new();
    let mut buses = Vec::new();
    let mut subscriptions = Vec::new();
    for instance in 0..2 {
        let bus = connect("lost", config.clone()).await;
        let h = handled.clone();
        subscriptions.push(
            bus.subscribe_envelope(
                topic,
                Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                    let h = h.clone();
                    async move {
                        h.push((instance, envelope.event_id.clone()));
                        Ok::<(), HandlerError>(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap(),
        );
        buses.push(bus);
    }
    eventually("both instances reading", || {
        let counts: Vec<usize> = buses
            .iter()
            .map(|bus| bus.transport().partitions_reading(topic).len())
            .collect();
        async move { counts.iter().sum::<usize>() == 3 && counts.iter().all(|n| *n > 0) }
    })
    .await;
    let bucket = "eventbus_lost_scale_lost";
    let lost = buses[1].transport().partitions_reading(topic)[0];
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_key_value(bucket)
        .await
        .unwrap()
        .delete(format!("claims.{lost}"))
        .await
        .unwrap();
    eventually("every subject claimed and read again", || {
        let reading: usize = buses
            .iter()
            .map(|bus| bus.transport().partitions_reading(topic).len())
            .sum();
        let url = server.url();
        async move { reading == 3 && claims(&url, bucket).await.len() == 3 }
    })
    .await;
    let second = subscriptions.pop().unwrap();
    second.unsubscribe().await.unwrap();
    let after_unsubscribe = handled.events().len();
    let publisher = connect("lost-publisher", config).await;
    for aggregate in 0..30 {
        publisher
            .publish_envelope(topic, &envelope(aggregate, 1))
            .await
            .unwrap();
    }
    let events = handled
        .wait_for(
            "the 30 envelopes published after the unsubscribe",
            |events| events.len() >= after_unsubscribe + 30,
        )
        .await;
    assert!(
        events[after_unsubscribe..]
            .iter()
            .all(|(instance, _)| *instance == 0),
        "an instance handled envelopes after its unsubscribe returned: {:?} (lost {lost})",
        &events[after_unsubscribe..],
    );
    wait_reading(&buses[0], topic, 3).await;
    for bus in buses {
        bus.close().await.unwrap();
    }
    publisher.close().await.unwrap();
}

/// A partition's subject is the group's to read: subscribing to it directly is refused with a
/// typed error (its durable is a pinned consumer one of the group's instances reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_a_partition_subject_is_refused() {
    let server = NatsServer::start();
    let topic = "scale.direct";
    let bus = connect("direct", partitioned_config(&server.url(), topic, 2)).await;
    let refused = bus
        .subscribe_envelope(
            "scale.direct.0",
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        eventbus_core::ErrorKind::Config,
        "{refused}"
    );
    bus.close().await.unwrap();
}

/// `StartPosition::New` on a partitioned topic: every subject's durable exists when `subscribe`
/// returns (before this instance reads any), so what is published from then on is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_subscription_at_new_keeps_what_is_published_once_subscribe_returned() {
    let server = NatsServer::start();
    let topic = "scale.new";
    let config = partitioned_config(&server.url(), topic, 4);
    let publisher = connect("new-publisher", config.clone()).await;
    // Before the subscription: not wanted.
    publisher
        .publish_envelope(topic, &envelope(99, 1))
        .await
        .unwrap();
    let bus = connect("new", config).await;
    let handled = record_versions(
        &bus,
        topic,
        SubscribeOptions::new().with_start(eventbus_core::StartPosition::New),
    )
    .await;
    for aggregate in 0..20 {
        publisher
            .publish_envelope(topic, &envelope(aggregate, 1))
            .await
            .unwrap();
    }
    let events = handled
        .wait_for("the 20 published after subscribe", |events| {
            events.len() >= 20
        })
        .await;
    assert!(
        events.iter().all(|(aggregate, _)| aggregate != "agg-99"),
        "{events:?}"
    );
    bus.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// `close` keeps renewing its claims while it drains: a handler still running when another
/// instance joins (longer than `pinned_ttl`) keeps its subject, and the other instance takes it
/// only once the closing one is done, so the running event is never replayed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_keeps_its_claims_while_draining_so_nothing_running_is_replayed_elsewhere() {
    let server = NatsServer::start();
    let topic = "scale.closing";
    let config = partitioned_config(&server.url(), topic, 1);
    let mut settings = nats_settings("closing");
    settings.drain_timeout = Duration::from_secs(20);
    let publisher = connect("closing-publisher", config.clone()).await;
    let watched = Watched::new();
    let closing = Arc::new(
        eventbus_nats::connect(settings.clone(), config.clone())
            .await
            .unwrap(),
    );
    closing
        .subscribe_envelope(
            topic,
            watched.handler(0, Duration::from_secs(6)),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    wait_reading(&closing, topic, 2).await;
    publisher
        .publish_envelope(topic, &envelope(0, 1))
        .await
        .unwrap();
    eventually("the slow handler running", || {
        let running = watched.running.lock().unwrap().contains_key("agg-0");
        async move { running }
    })
    .await;
    let close = {
        let closing = closing.clone();
        tokio::spawn(async move { closing.close().await })
    };
    let other = eventbus_nats::connect(settings, config).await.unwrap();
    other
        .subscribe_envelope(
            topic,
            watched.handler(1, Duration::from_millis(1)),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    close.await.unwrap().unwrap();
    wait_reading(&other, topic, 2).await;
    publisher
        .publish_envelope(topic, &envelope(1, 1))
        .await
        .unwrap();
    watched
        .handled
        .wait_for("the other instance handling", |events| {
            events
                .iter()
                .any(|h| h.instance == 1 && h.aggregate == "agg-1")
        })
        .await;
    watched.assert_no_overlap();
    other.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// A bus dropped without `close` ends its group: its claims and membership expire and another
/// instance reads every subject after `pinned_ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_dropped_without_close_leaves_its_partitions_to_the_others() {
    let server = NatsServer::start();
    let topic = "scale.dropped-bus";
    let config = partitioned_config(&server.url(), topic, 1);
    let (dropped, _subscription) = subscribed(topic, config.clone()).await;
    wait_reading(&dropped, topic, 2).await;
    drop(dropped);
    let (other, _kept) = subscribed(topic, config).await;
    wait_reading(&other, topic, 2).await;
    other.close().await.unwrap();
}

/// An envelope goes to the partition of its aggregate ID as the subscribers' lanes see it
/// (trimmed): one aggregate, one partition, whatever whitespace a publisher left around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_aggregate_goes_to_one_partition_whatever_whitespace_surrounds_its_id() {
    let server = NatsServer::start();
    let topic = "scale.trimmed";
    let bus = connect("trimmed", partitioned_config(&server.url(), topic, 12)).await;
    let id = (0..100)
        .map(|i| format!("order-{i}"))
        .find(|id| partition_of(id, 12) != partition_of(&format!(" {id}"), 12))
        .unwrap();
    let spaced = Envelope::new(format!(" {id}"), "Changed", 2, &serde_json::json!({})).unwrap();
    assert_eq!(spaced.aggregate().unwrap().as_str(), id, "one aggregate");
    let plain = Envelope::new(id.clone(), "Changed", 1, &serde_json::json!({})).unwrap();
    bus.publish_envelope(topic, &plain).await.unwrap();
    bus.publish_envelope(topic, &spaced).await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js
        .get_stream(js.stream_by_subject(topic).await.unwrap())
        .await
        .unwrap();
    let first = stream.get_raw_message(1).await.unwrap().subject;
    let second = stream.get_raw_message(2).await.unwrap().subject;
    assert_eq!(
        first, second,
        "{id}: version 1 on {first}, version 2 on {second}"
    );
    bus.close().await.unwrap();
}

/// Instances that split a topic differently would mean different subjects by one claim: an
/// instance whose partition count differs from the running ones' is refused at subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_another_partition_count_is_refused() {
    let server = NatsServer::start();
    let topic = "scale.counts";
    let (running, _subscription) =
        subscribed(topic, partitioned_config(&server.url(), topic, 4)).await;
    wait_reading(&running, topic, 5).await;
    let other = connect("cancel", partitioned_config(&server.url(), topic, 3)).await;
    let refused = other
        .subscribe_envelope(
            topic,
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.kind(),
        eventbus_core::ErrorKind::Config,
        "{refused}"
    );
    other.close().await.unwrap();
    running.close().await.unwrap();
}

/// Two instances that subscribe at the same moment with different partition counts: exactly one
/// is refused (the count is written with a create that fails when another instance wrote one),
/// and the accepted one reads every subject, so an event published to the bare topic is
/// handled. Seven topics, each a fresh race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_different_partition_counts_starting_together_are_not_both_accepted() {
    let server = NatsServer::start();
    for round in 0..7 {
        let topic = format!("scale.race{round}");
        let two = connect("race", partitioned_config(&server.url(), &topic, 2)).await;
        let three = connect("race", partitioned_config(&server.url(), &topic, 3)).await;
        let handled = Recorder::<(String, i64)>::new();
        let (with_two, with_three) = tokio::join!(
            two.subscribe_envelope(&topic, handled.envelope_handler(), SubscribeOptions::new()),
            three.subscribe_envelope(&topic, handled.envelope_handler(), SubscribeOptions::new()),
        );
        let accepted = match (&with_two, &with_three) {
            (Ok(_), Err(refused)) => {
                assert_eq!(
                    refused.kind(),
                    eventbus_core::ErrorKind::Config,
                    "{refused}"
                );
                (&two, 3)
            }
            (Err(refused), Ok(_)) => {
                assert_eq!(
                    refused.kind(),
                    eventbus_core::ErrorKind::Config,
                    "{refused}"
                );
                (&three, 4)
            }
            (Ok(_), Ok(_)) => panic!("round {round}: both partition counts were accepted"),
            (Err(a), Err(b)) => panic!("round {round}: both refused: {a}; {b}"),
        };
        wait_reading(accepted.0, &topic, accepted.1).await;
        accepted
            .0
            .publish_envelope(&topic, &envelope(round, 1))
            .await
            .unwrap();
        handled
            .wait_for("the event handled by the accepted instance", |e| {
                e.len() == 1
            })
            .await;
        two.close().await.unwrap();
        three.close().await.unwrap();
    }
}

/// Instances of one service, all with the same partition count, started at the same moment (a
/// deployment scaled to eight replicas): every one of them is accepted. They agree, so none
/// may be refused because the others renewed the count while it tried to. (Found by review:
/// one of eight was refused in each of four runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_with_the_same_partition_count_starting_together_are_all_accepted() {
    let server = NatsServer::start();
    let instances = 8;
    for round in 0..10 {
        let topic = format!("scale.same{round}");
        let mut buses = Vec::new();
        for _ in 0..instances {
            buses.push(
                eventbus_nats::connect(
                    nats_settings("same"),
                    partitioned_config(&server.url(), &topic, 2),
                )
                .await
                .unwrap(),
            );
        }
        let handled = Recorder::<(String, i64)>::new();
        let subscribed = futures::future::join_all(buses.iter().map(|bus| {
            bus.subscribe_envelope(&topic, handled.envelope_handler(), SubscribeOptions::new())
        }))
        .await;
        let refused: Vec<String> = subscribed
            .iter()
            .filter_map(|result| result.as_ref().err().map(ToString::to_string))
            .collect();
        assert!(
            refused.is_empty(),
            "round {round}: {} of {instances} instances with the same partition count refused: \
             {refused:?}",
            refused.len()
        );
        for bus in &buses {
            bus.close().await.unwrap();
        }
    }
}

/// `config` with `pinned_ttl`.
fn with_ttl(mut config: NatsConfig, pinned_ttl: Duration) -> NatsConfig {
    config.scale_out = ScaleOutSettings { pinned_ttl };
    config
}

/// An instance with another partition count is refused, and being refused changes nothing for
/// the running group: here the refused instance also has a shorter `pinned_ttl` (1 s, the
/// running one 10 s). Afterwards another such instance keeps being refused while the running
/// one reads with its count: the group's count must not expire under the running instance.
/// (Found by review: the refused instance had set the bucket's `max_age` to its 1 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_instance_does_not_let_the_group_count_expire_under_the_running_one() {
    let server = NatsServer::start();
    let topic = "scale.ttl";
    let running = eventbus_nats::connect(
        nats_settings("ttl"),
        with_ttl(
            partitioned_config(&server.url(), topic, 2),
            Duration::from_secs(10),
        ),
    )
    .await
    .unwrap();
    let handled = Recorder::<(String, i64)>::new();
    let _subscription = running
        .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    integration_tests::eventually("the running instance reads all 3 subjects", || async {
        running.transport().partitions_reading(topic).len() == 3
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut attempt = 0;
    while tokio::time::Instant::now() < deadline {
        attempt += 1;
        let other = eventbus_nats::connect(
            nats_settings("ttl"),
            with_ttl(
                partitioned_config(&server.url(), topic, 3),
                Duration::from_secs(1),
            ),
        )
        .await
        .unwrap();
        let result = other
            .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
            .await;
        let accepted = result.is_ok();
        let reading = running.transport().partitions_reading(topic);
        other.close().await.unwrap();
        assert!(
            !accepted,
            "attempt {attempt}: an instance with 3 partitions was accepted while the running \
             instance reads the topic with 2 (it reads slots {reading:?})"
        );
        // The next attempt comes once the running instance has renewed the count again: the
        // count must outlive every gap between its renewals.
        let renewed = count_revision(&server, &running, topic).await;
        integration_tests::eventually("the running instance renewing the count", || async {
            count_revision(&server, &running, topic).await != renewed
        })
        .await;
    }
    running.close().await.unwrap();
}

/// An instance joining with another `pinned_ttl` (1 s, the running one 10 s) binds the
/// group's durables as they are: their `priority_timeout` stays the running instance's, so the
/// server does not unpin a running reader after a pause the group was configured to survive.
/// (Found by review: the joining instance rewrote every partition's durable to its own 1 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_with_a_shorter_pinned_ttl_keeps_the_groups_pin_lifetime() {
    let server = NatsServer::start();
    let topic = "scale.pinttl";
    let running = connect(
        "pinttl",
        with_ttl(
            partitioned_config(&server.url(), topic, 2),
            Duration::from_secs(10),
        ),
    )
    .await;
    let handled = Recorder::<(String, i64)>::new();
    let _first = running
        .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let joining = connect(
        "pinttl",
        with_ttl(
            partitioned_config(&server.url(), topic, 2),
            Duration::from_secs(1),
        ),
    )
    .await;
    let _second = joining
        .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    eventually("both instances reading", || async {
        !running.transport().partitions_reading(topic).is_empty()
            && !joining.transport().partitions_reading(topic).is_empty()
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream("STREAM_scale_pinttl").await.unwrap();
    let bare = running.transport().durable_name(topic, 1);
    for durable in [format!("{bare}_0"), format!("{bare}_1"), bare.clone()] {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(&durable).await.unwrap();
        let timeout = consumer.info().await.unwrap().config.priority_timeout;
        assert_eq!(
            timeout,
            Duration::from_secs(10),
            "{durable}: the joining instance changed the group's pin lifetime"
        );
    }
    joining.close().await.unwrap();
    running.close().await.unwrap();
}

/// A partition durable made anew (deleted while the group's bucket stayed) by an instance with
/// a shorter `pinned_ttl` gets the group's pin lifetime (its bucket's `max_age`), as one bound
/// as it is keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_durable_made_again_gets_the_groups_pin_lifetime() {
    let server = NatsServer::start();
    let topic = "scale.pinagain";
    let first = connect(
        "pinagain",
        with_ttl(
            partitioned_config(&server.url(), topic, 2),
            Duration::from_secs(10),
        ),
    )
    .await;
    let handled = Recorder::<(String, i64)>::new();
    first
        .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let bare = first.transport().durable_name(topic, 1);
    first.close().await.unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js.get_stream("STREAM_scale_pinagain").await.unwrap();
    let durables = [format!("{bare}_0"), format!("{bare}_1"), bare.clone()];
    for durable in &durables {
        stream.delete_consumer(durable).await.unwrap();
    }
    let shorter = connect(
        "pinagain",
        with_ttl(
            partitioned_config(&server.url(), topic, 2),
            Duration::from_secs(1),
        ),
    )
    .await;
    shorter
        .subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    for durable in &durables {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer(durable).await.unwrap();
        let timeout = consumer.info().await.unwrap().config.priority_timeout;
        assert_eq!(
            timeout,
            Duration::from_secs(10),
            "{durable}: made again with this instance's pinned_ttl, not the group's"
        );
    }
    shorter.close().await.unwrap();
}

/// The group's rounds cost the server no consumer each: an instance watches the bucket with one
/// consumer and reads the members without making another. After a dozen rounds of two instances,
/// the bucket's stream has at most one consumer per instance. (Found while reading a CI failure:
/// each round listed the bucket's keys, which makes a consumer that lingers 30 s on the server;
/// three instances under load left 214 of them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_groups_rounds_leave_no_consumers_behind_on_the_server() {
    let server = NatsServer::start();
    let topic = "scale.rounds";
    let config = partitioned_config(&server.url(), topic, 2);
    let handled = Recorder::<(String, i64)>::new();
    let mut instances = Vec::new();
    for _ in 0..2 {
        let bus = connect("rounds", config.clone()).await;
        bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
            .await
            .unwrap();
        instances.push(bus);
    }
    eventually("both instances reading", || async {
        instances
            .iter()
            .all(|bus| !bus.transport().partitions_reading(topic).is_empty())
    })
    .await;
    // Each round renews the partition count (a new revision of its key): a dozen renewals seen
    // are a dozen rounds at least.
    let renewals = Arc::new(Mutex::new((None, 0usize)));
    eventually("a dozen rounds", || {
        let renewals = renewals.clone();
        let (server, bus) = (&server, &instances[0]);
        async move {
            let revision = count_revision(server, bus, topic).await;
            let mut renewals = renewals.lock().unwrap();
            if revision.is_some() && revision != renewals.0 {
                *renewals = (revision, renewals.1 + 1);
            }
            renewals.1 > 12
        }
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let bucket = format!(
        "KV_eventbus_{}",
        instances[0].transport().durable_name(topic, 1)
    );
    let consumers = js
        .get_stream(&bucket)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .consumer_count;
    assert!(
        consumers <= instances.len(),
        "{consumers} consumers on {bucket} after a dozen rounds of {} instances",
        instances.len()
    );
    for bus in &instances {
        bus.close().await.unwrap();
    }
}

fn one_attempt(client: &str) -> eventbus_nats::BusSettings {
    let mut settings = nats_settings(client);
    settings.pool.retry.max_attempts = 1;
    settings
}

/// A Go service publishes an aggregate's events to the bare subject of a partitioned topic (as
/// docs/nats.md describes); one fails and is parked. `eventbus dlq replay` (done here as the
/// CLI does it: each dead letter's `replay()`, head and last marked, published with a bus of
/// the service's configuration) brings it back and it is handled. Then the Go service's next
/// event of that aggregate must be handled, not parked again for good. (Found by review: the
/// bare subject's subscription kept the aggregate parked, as the copy went to its partition;
/// the subjects of a partitioned topic now share their parked aggregates.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_parked_on_the_bare_subject_of_a_partitioned_topic_comes_back() {
    let server = NatsServer::start();
    let topic = "pk.orders";
    let dead_letter_topic = format!("{topic}.DLQ");
    let config = partitioned_config(&server.url(), topic, 2);
    let service = eventbus_nats::connect(one_attempt("pk"), config.clone())
        .await
        .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Recorder::<(String, i64)>::new();
    let (b, h) = (broken.clone(), handled.clone());
    let _subscription = service
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (b, h) = (b.clone(), h.clone());
                async move {
                    if envelope.event_version == 1 && b.load(Ordering::SeqCst) {
                        return Err(HandlerError::permanent("price missing"));
                    }
                    h.push((envelope.aggregate_id, envelope.event_version));
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_park_on_dead_letter(true),
        )
        .await
        .unwrap();
    eventually("the service reads all 3 subjects", || async {
        service.transport().partitions_reading(topic).len() == 3
    })
    .await;
    // The Go service: a plain JetStream publish of the envelope to the bare topic.
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let go_publish = |version: i64| {
        let js = js.clone();
        async move {
            let envelope = Envelope::new("order-1", "Changed", version, &version).unwrap();
            js.publish(topic, envelope.to_bytes().unwrap())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    go_publish(1).await;
    eventually("version 1 dead-lettered", || async {
        service
            .dead_letters(&dead_letter_topic)
            .await
            .is_ok_and(|letters| letters.len() == 1)
    })
    .await;
    broken.store(false, Ordering::SeqCst);

    // `eventbus dlq replay --aggregate order-1`, with the service's configuration.
    let replayer = eventbus_nats::connect(nats_settings("pk"), config)
        .await
        .unwrap();
    let letters = replayer.dead_letters(&dead_letter_topic).await.unwrap();
    assert_eq!(letters.len(), 1);
    let (to, mut message) = letters[0].replay().unwrap();
    message.headers.insert(HEADER_REPLAY_HEAD, "true");
    message.headers.insert(HEADER_REPLAY_LAST, "true");
    replayer.publish(&to, message).await.unwrap();
    replayer.close().await.unwrap();
    handled
        .wait_for("the replayed version 1 handled", |events| {
            events.contains(&("order-1".to_owned(), 1))
        })
        .await;

    // The Go service's next event of the aggregate.
    go_publish(2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if handled.events().contains(&("order-1".to_owned(), 2)) {
            break;
        }
        let letters = service.dead_letters(&dead_letter_topic).await.unwrap();
        let parked: Vec<String> = letters
            .iter()
            .map(|letter| {
                format!(
                    "v{:?} parked={}",
                    letter.envelope().map(|e| e.event_version),
                    letter.is_parked()
                )
            })
            .collect();
        assert!(
            tokio::time::Instant::now() < deadline && parked.is_empty(),
            "after the replay the Go service's version 2 was not handled; dead letters now: \
             {parked:?}; handled: {:?}",
            handled.events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.close().await.unwrap();
}

/// The revision of the partition count in the group bucket of `bus`'s subscription to `topic`.
async fn count_revision(server: &NatsServer, bus: &NatsBus, topic: &str) -> Option<u64> {
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.ok()?);
    let bucket = js
        .get_key_value(format!(
            "eventbus_{}",
            bus.transport().durable_name(topic, 1)
        ))
        .await
        .ok()?;
    bucket
        .entry("partitions")
        .await
        .ok()?
        .map(|entry| entry.revision)
}

/// A claim lost while its reader still runs a message of an aggregate, with the server having
/// forgotten the pin too (as it may when the consumer's leader changes; here unpinned by hand
/// over and over, the claim deleted as its expiry in an outage would): the instance claims the
/// subject again at once, and reads it only once its old subscription has given back what it
/// holds (the bus subscribes to a durable again only after its unsubscribe is done). Were it
/// read at once, the durable would be replayed from its ack floor and the running message run
/// a second time beside the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_claim_is_not_read_again_while_its_reader_still_holds_messages() {
    integration_tests::capture_logs();
    let server = NatsServer::start();
    let topic = "scale.held";
    let config = partitioned_config(&server.url(), topic, 1);
    let publisher = connect("held-publisher", config.clone()).await;
    for version in 1..=5 {
        publisher
            .publish_envelope(topic, &envelope(7, version))
            .await
            .unwrap();
    }
    // Version 1 waits for the gate; every handling is recorded with whether another handling
    // of the aggregate was running when it began.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicBool::new(false));
    let handled = Recorder::<(i64, bool)>::new();
    let mut settings = nats_settings("held");
    settings.drain_timeout = Duration::from_secs(60);
    let bus = eventbus_nats::connect(settings, config).await.unwrap();
    let (h, g, r) = (handled.clone(), gate.clone(), running.clone());
    let _subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (h, g, r) = (h.clone(), g.clone(), r.clone());
                async move {
                    let overlapped = r.swap(true, Ordering::SeqCst);
                    h.push((envelope.event_version, overlapped));
                    if envelope.event_version == 1 {
                        let _permit = g.acquire().await;
                    }
                    r.store(false, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    handled
        .wait_for("version 1 running", |events| !events.is_empty())
        .await;
    let subject = format!("{topic}.0");
    let slot = partition_of("agg-7", 1);
    assert_eq!(slot, 0, "one partition");
    let durable = bus.transport().durable_name(&subject, 1);
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_key_value("eventbus_held_scale_held")
        .await
        .unwrap()
        .delete("claims.0")
        .await
        .unwrap();
    let stream = js
        .get_stream(js.stream_by_subject(&subject).await.unwrap())
        .await
        .unwrap();
    // A server that keeps forgetting the pin: unpinned again and again while version 1 runs
    // (the old reader pulls once more before it stops, and would be pinned again).
    let forgetting = tokio::spawn(async move {
        loop {
            let _ = stream.unpin_consumer(&durable, "eventbus").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // The instance notices the lost claim at its next round (a third of the 2 s pinned_ttl)
    // and gives the subject back, which waits for version 1. Meanwhile nothing of the
    // aggregate may run: watched for three rounds.
    let watched = tokio::time::timeout(
        Duration::from_secs(3),
        handled.wait_for("another handling of agg-7", |events| events.len() > 1),
    )
    .await;
    assert!(
        watched.is_err(),
        "agg-7 handled again while version 1 still runs: {:?}",
        handled.events()
    );
    forgetting.abort();
    gate.add_permits(1);
    let events = handled
        .wait_for("versions 2 to 5 after version 1", |events| {
            let versions: HashSet<i64> = events.iter().map(|(version, _)| *version).collect();
            versions.len() == 5
        })
        .await;
    assert!(
        events.iter().all(|(_, overlapped)| !overlapped),
        "agg-7 handled while another of its handlings ran: {events:?}"
    );
    let versions: Vec<(String, i64)> = events
        .iter()
        .map(|(version, _)| ("agg-7".to_owned(), *version))
        .collect();
    assert_first_handlings_in_order(&versions, 1, 5);
    bus.close().await.unwrap();
    publisher.close().await.unwrap();
}
