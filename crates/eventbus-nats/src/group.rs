//! Scaling out: the instances of a service share a partitioned topic.
//!
//! Every instance of a service (one `client_id`) that subscribes to a partitioned topic joins
//! its **group**: a JetStream key-value bucket (`eventbus_{durable}`) where each instance keeps
//! a membership key (`members.{instance}`) and a claim per subject it reads
//! (`claims.{slot}`), renewed in rounds (every fifth of the bucket's `max_age`, and at once
//! when the watched bucket shows a member joining or leaving or a claim given up) and expiring
//! after the bucket's `max_age` when their instance stops renewing them. The bucket is made
//! with the `pinned_ttl` of the instance that makes it; later instances bind it as it is (one
//! with another `pinned_ttl` must not shorten the running ones' claims). The members' partition
//! count lives there too, written with a compare-and-set and renewed every round.
//!
//! The topic's `n + 1` subjects (its partitions, then the bare topic, slots `0..=n`) are
//! assigned over the live members in the order of their IDs: slot `s` to member `s mod m`, so
//! every member reads within one subject of the others. An instance reads a subject only while
//! it holds the subject's claim (taken with a create, renewed with the revision it got: two
//! instances never hold one). A new holder waits until the subject's pinned consumer has no
//! pinned client left (the previous reader unpinned it, or its pin expired), then subscribes
//! to it the usual way: what the previous reader left unacknowledged is replayed in order from
//! the ack floor before anything newer. The server's pin stays the guard: only the pinned
//! client receives messages, so an instance that still pulls while it should not (paused past
//! its claim) gets nothing once another is pinned.
//!
//! An instance that loses a subject in a rebalance gives it back as an unsubscribe does (queued
//! messages back to the server in lane order, running ones finished up to the drain timeout),
//! then unpins the consumer and deletes its claim, so the next holder starts at once. A claim
//! that could not be renewed stops its subject the same way (without deleting the claim, which
//! may be another's by then). Leaving gives every subject back at once, renewing meanwhile.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use eventbus_core::{
    CancellationToken, Error, SubscribeOptions, Subscription, SubscriptionControl,
};
use eventbus_pool::consume::SubscriptionSpec;
use futures::StreamExt;
use tokio::task::JoinHandle;

use crate::bus::{Inner, Target};
use crate::connection::{LEADER_RETRIES, leader_away};
use crate::consumer::{DurableSpec, PRIORITY_GROUP, Resume, ensure_consumer};
use crate::names::durable_name;
use crate::partition::partition_subject;
use crate::streams::{Kind, stream_spec};

/// The key holding the partition count of the group's members.
const PARTITIONS_KEY: &str = "partitions";

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One instance's membership in the group of a partitioned topic.
pub(crate) struct Group {
    inner: Weak<Inner>,
    topic: String,
    /// The topic's partitions; slot `partitions` is the bare topic.
    partitions: u16,
    /// The durable of the bare topic; a partition's is derived from it.
    durable: String,
    /// Whether the partitions' durables are named after `durable` (`{durable}_{n}`): named by
    /// the subscription, or a further subscription of the topic by this bus.
    named: bool,
    /// The bus's numbered slot of the topic (none when the subscription named its durable).
    topic_slot: Option<usize>,
    /// The bus's client ID (the durables' names start with it).
    client_id: String,
    /// This instance's ID in the group.
    instance: String,
    /// What each subject's subscription consumes (named per subject when it opens).
    spec: SubscriptionSpec,
    options: SubscribeOptions,
    bucket: kv::Store,
    /// How long a claim, a membership and the partition count live without renewal: the
    /// bucket's `max_age`.
    ttl: Duration,
    /// Ends the group's task.
    stop: CancellationToken,
    /// The bus is closing: rounds only renew (membership and claims) while it drains.
    closing: std::sync::atomic::AtomicBool,
    /// Set once the instance has left (unsubscribe or close): leaving happens once.
    left: tokio::sync::Mutex<bool>,
    /// A start or a give-back finished: the next round comes at once (to read the subject, or
    /// drop the claim).
    finished: tokio::sync::Notify,
    /// The subjects this instance holds a claim on, by slot.
    claims: Mutex<BTreeMap<u16, Claim>>,
    /// Subjects whose claim was lost, still being given back: leaving waits for them too.
    lost: Mutex<Vec<JoinHandle<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// A claim this instance holds, and what it does with the subject.
struct Claim {
    /// The claim key's revision, for the next renewal.
    revision: u64,
    /// When it was last renewed (or taken).
    renewed: tokio::time::Instant,
    state: ClaimState,
}

enum ClaimState {
    /// Waiting for the previous reader's pin to go (until the token is cancelled), then
    /// subscribing.
    Starting(JoinHandle<Result<Subscription, Error>>, CancellationToken),
    /// Reading the subject.
    Reading(Subscription),
    /// Giving the subject back (unsubscribe, then unpin).
    Releasing(JoinHandle<()>),
    /// Given back by [`Group::leave`], which still renews the claim until that is done.
    Leaving,
}

/// Subscribes to the partitioned `topic`: joins its group and reads the subjects assigned to
/// this instance, following the group as instances come and go.
pub(crate) async fn subscribe(
    inner: &Arc<Inner>,
    topic: &str,
    partitions: u16,
    spec: SubscriptionSpec,
    options: SubscribeOptions,
) -> Result<Subscription, Error> {
    let client_id = inner.runtime.settings().client_id.clone();
    // As for a topic read whole: the bus's n-th subscription of the topic reads with the n-th
    // durable (its own group), and a subscription of a topic still being left waits for that.
    let (durable, named, mut topic_claim) = match &options.durable {
        Some(name) => {
            crate::names::validate_durable_name(name)?;
            (name.clone(), true, None)
        }
        None => {
            let claim = inner.claim_slot(topic).await;
            let durable = durable_name(&client_id, topic, claim.slot);
            (durable, claim.slot > 1, Some(claim))
        }
    };
    if inner.has_group(&durable) {
        return Err(Error::config(
            "durable",
            format!("this bus already reads {topic} with durable {durable:?}"),
        ));
    }
    let broker = &inner.broker;
    let (bucket, ttl) = open_bucket(
        &broker.js,
        &bucket_name(&durable),
        topic,
        broker.config.scale_out.pinned_ttl,
        broker.config.replicas_of(topic),
    )
    .await?;
    // Every instance must split the topic alike: `claims.{n}` names a subject by its number.
    agree_partition_count(&bucket, topic, partitions).await?;
    let group = Arc::new(Group {
        inner: Arc::downgrade(inner),
        topic: topic.to_owned(),
        partitions,
        durable,
        named,
        topic_slot: topic_claim.as_ref().map(|claim| claim.slot),
        client_id,
        instance: instance_id(),
        spec,
        options,
        bucket,
        ttl,
        stop: CancellationToken::new(),
        closing: std::sync::atomic::AtomicBool::new(false),
        left: tokio::sync::Mutex::new(false),
        finished: tokio::sync::Notify::new(),
        claims: Mutex::new(BTreeMap::new()),
        lost: Mutex::new(Vec::new()),
        task: Mutex::new(None),
    });
    // Every subject's durable exists when subscribe returns, so one made to start at `New`
    // keeps what is published from now on, whichever instance reads it later.
    for slot in 0..=partitions {
        let (subject, durable) = (group.subject(slot), group.durable_of(slot));
        let spec = DurableSpec {
            name: &durable,
            explicit: group.named,
            start: group.options.start,
            pin_lifetime: Some(group.ttl),
        };
        ensure_consumer(
            broker,
            &subject,
            spec,
            group.spec.handler.is_envelope(),
            Resume::No,
        )
        .await?;
    }
    // The membership is written by the group's task (its first round): a subscribe dropped
    // before this point leaves no member behind for the others to wait for.
    inner.add_group(group.clone());
    if let Some(claim) = &mut topic_claim {
        claim.kept = true;
    }
    let task = tokio::spawn(group.clone().run());
    *lock(&group.task) = Some(task);
    tracing::info!(topic, instance = %group.instance, partitions, "joined the group of a partitioned topic");
    Ok(Subscription::new(topic, GroupControl { group }))
}

/// Opens the group's bucket `name`: binds it when it exists, makes it (`max_age` =
/// `pinned_ttl`, with `replicas`) when it does not. An existing bucket is never changed: its `max_age` is the
/// group's claim lifetime, which an instance with another `pinned_ttl` (refused or not) must
/// not shorten under the running ones; it is returned, and this instance renews at its pace.
async fn open_bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    topic: &str,
    pinned_ttl: Duration,
    replicas: u16,
) -> Result<(kv::Store, Duration), Error> {
    let mut last_failure = String::new();
    for _ in 0..3 {
        // Missing (or not readable now): made below, or found at the next turn.
        if let Ok(store) = js.get_key_value(name).await {
            let ttl = match store.status().await {
                Ok(status) if !status.max_age().is_zero() => status.max_age(),
                _ => pinned_ttl,
            };
            if ttl != pinned_ttl {
                tracing::warn!(topic, bucket = name, group_ttl = ?ttl, ?pinned_ttl, "the group's claims live for its pinned_ttl, not this instance's; give every instance the same scale_out.pinned_ttl");
            }
            return Ok((store, ttl));
        }
        let made = js
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                description: format!("members and claims of the instances reading {topic}"),
                history: 1,
                max_age: pinned_ttl,
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: usize::from(replicas),
                ..kv::Config::default()
            })
            .await;
        match made {
            Ok(store) => return Ok((store, pinned_ttl)),
            // Made meanwhile by another instance: bound at the next turn.
            Err(error) => last_failure = error.to_string(),
        }
    }
    Err(Error::Broker {
        message: format!("cannot open bucket {name}: {last_failure}"),
        source: None,
    })
}

/// Makes sure the group reads `topic` with `partitions` partitions: writes the count when the
/// bucket has none (a create, which fails when another instance wrote one meanwhile) and
/// otherwise renews it (an update at the revision read, which fails when another instance
/// changed it meanwhile), comparing what is there each time. Instances that start at the same
/// moment with different counts therefore cannot both pass: the second write fails and its
/// instance reads the first one's count. Renewed every round, so the count lives as long as
/// the group does (the bucket's `max_age` is `pinned_ttl`).
///
/// Fails with [`Error::Config`] (field `nats.topics.partitions`) when the group's count
/// differs, with [`Error::Broker`] when the bucket cannot be read or written.
async fn agree_partition_count(
    bucket: &kv::Store,
    topic: &str,
    partitions: u16,
) -> Result<(), Error> {
    let ours = partitions.to_string();
    let mut last_failure = String::new();
    // Each failed write means another instance wrote the count just now: read it again.
    for _ in 0..5 {
        let entry = read_count(bucket, topic).await?;
        let written = match entry {
            // Another instance wrote (or renewed) our count just after our write failed: the
            // group agrees, and the count was renewed just now.
            Some(entry)
                if entry.operation == kv::Operation::Put
                    && !last_failure.is_empty()
                    && entry.value.as_ref() == ours.as_bytes() =>
            {
                return Ok(());
            }
            Some(entry) if entry.operation == kv::Operation::Put => {
                if entry.value.as_ref() != ours.as_bytes() {
                    return Err(Error::config(
                        "nats.topics.partitions",
                        format!(
                            "the running instances read {topic} with {} partitions, this one with {partitions}: every instance needs the same number",
                            String::from_utf8_lossy(&entry.value)
                        ),
                    ));
                }
                bucket
                    .update(PARTITIONS_KEY, ours.clone().into(), entry.revision)
                    .await
                    .map(drop)
                    .map_err(|error| error.to_string())
            }
            _ => bucket
                .create(PARTITIONS_KEY, ours.clone().into())
                .await
                .map(drop)
                .map_err(|error| error.to_string()),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(failure) => last_failure = failure,
        }
    }
    Err(Error::Broker {
        message: format!(
            "cannot write the partition count of {topic}: {last_failure} (written by others at the same time, five times in a row)"
        ),
        source: None,
    })
}

/// Reads the group's partition count. A bucket made a moment ago on a cluster may have no
/// leader yet (no responders): read again with backoff, [`LEADER_RETRIES`] times at most.
async fn read_count(bucket: &kv::Store, topic: &str) -> Result<Option<kv::Entry>, Error> {
    let mut failures = 0;
    loop {
        match bucket.entry(PARTITIONS_KEY).await {
            Ok(entry) => return Ok(entry),
            Err(error) if failures < LEADER_RETRIES && leader_away(&error) => {
                failures += 1;
                tracing::debug!(topic, %error, failures, "the group's bucket has no leader yet; reading again");
                tokio::time::sleep(Duration::from_millis(100 << failures)).await;
            }
            Err(error) => {
                return Err(Error::broker(
                    format!("cannot read the partition count of {topic}"),
                    error,
                ));
            }
        }
    }
}

/// The next change the watch reports; never while there is no watch, `None` when it ended.
async fn next_change(watch: &mut Option<kv::Watch>) -> Option<kv::Entry> {
    match watch {
        Some(watch) => match watch.next().await {
            Some(Ok(entry)) => Some(entry),
            _ => None,
        },
        None => std::future::pending().await,
    }
}

/// A bucket name for the group of `durable`: only letters, digits, `_` and `-`.
fn bucket_name(durable: &str) -> String {
    format!("eventbus_{}", crate::names::kv_safe(durable))
}

/// An ID for this instance: unique among the group's members (process, time and a counter).
fn instance_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Group {
    fn member_key(&self) -> String {
        format!("members.{}", self.instance)
    }

    fn claim_key(slot: u16) -> String {
        format!("claims.{slot}")
    }

    /// The subject of `slot`: a partition, or the bare topic for the last slot.
    fn subject(&self, slot: u16) -> String {
        if slot == self.partitions {
            self.topic.clone()
        } else {
            partition_subject(&self.topic, slot)
        }
    }

    /// The durable of `slot`'s subject.
    fn durable_of(&self, slot: u16) -> String {
        match (slot == self.partitions, self.named) {
            (true, _) => self.durable.clone(),
            (false, true) => format!("{}_{slot}", self.durable),
            (false, false) => durable_name(&self.client_id, &self.subject(slot), 1),
        }
    }

    /// Renews the partition count the members share and this instance's membership. Returns
    /// `false` when the group's count is not this instance's (another instance wrote its own
    /// while this one could not renew it for `pinned_ttl`): then this instance is no member
    /// (its membership is deleted, so the others assign its subjects among themselves) and reads
    /// nothing.
    async fn join(&self) -> Result<bool, Error> {
        match agree_partition_count(&self.bucket, &self.topic, self.partitions).await {
            Err(error) if error.kind() == eventbus_core::ErrorKind::Config => {
                tracing::error!(topic = %self.topic, %error, "partition count differs from the group's; reading nothing");
                let _ = self.bucket.delete(self.member_key()).await;
                return Ok(false);
            }
            // Not known now (a reconnect, say): the membership is renewed all the same, and
            // the count next round.
            Err(error) => {
                tracing::warn!(topic = %self.topic, %error, "partition count not renewed; trying again next round");
            }
            Ok(()) => {}
        }
        self.bucket
            .put(self.member_key(), self.instance.clone().into())
            .await
            .map_err(|error| Error::broker("cannot renew the group membership", error))?;
        Ok(true)
    }

    /// The live members, in the order of their IDs (this instance among them).
    async fn members(&self) -> Result<Vec<String>, Error> {
        let read = |error: String| Error::Broker {
            message: format!("cannot read the group's members: {error}"),
            source: None,
        };
        // The subjects of the member keys, from the stream's info: listing the bucket's keys
        // would make a consumer on the server per round (one that lingers for 30 s).
        let prefix = format!("{}members.", self.bucket.prefix);
        let mut subjects = self
            .bucket
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(|error| read(error.to_string()))?;
        let mut candidates = Vec::new();
        while let Some(subject) = subjects.next().await {
            let (subject, _) = subject.map_err(|error| read(error.to_string()))?;
            if let Some(member) = subject.strip_prefix(&prefix)
                && member != self.instance
            {
                candidates.push(member.to_owned());
            }
        }
        let mut members = vec![self.instance.clone()];
        for member in candidates {
            // A member that left has a delete marker as its last message.
            let entry = self
                .bucket
                .entry(format!("members.{member}"))
                .await
                .map_err(|error| read(error.to_string()))?;
            if entry.is_some_and(|entry| entry.operation == kv::Operation::Put) {
                members.push(member);
            }
        }
        members.sort();
        Ok(members)
    }

    /// Renews membership and claims and follows the assignment, every renew interval and
    /// whenever another instance joins or leaves or gives a subject up (the bucket is watched),
    /// until stopped.
    async fn run(self: Arc<Self>) {
        let interval = crate::config::renew_interval(self.ttl);
        let mut watch = None;
        let mut members: Vec<String> = Vec::new();
        loop {
            if self.inner.strong_count() == 0 {
                // The bus was dropped without close: its claims and membership expire.
                return;
            }
            match self.step().await {
                Ok(now) => members = now,
                Err(error) => {
                    tracing::warn!(topic = %self.topic, %error, "group round failed; trying again")
                }
            }
            if watch.is_none() {
                watch = self.bucket.watch_all().await.ok();
            }
            let next_round = tokio::time::sleep(interval);
            tokio::pin!(next_round);
            loop {
                tokio::select! {
                    () = &mut next_round => break,
                    () = self.stop.cancelled() => return,
                    () = self.finished.notified() => break,
                    change = next_change(&mut watch) => match change {
                        Some(entry) if self.concerns(&entry, &members) => break,
                        Some(_) => {}
                        // The watch ended (a lost connection): made again after the next round.
                        None => watch = None,
                    },
                }
            }
        }
    }

    /// True when a change in the bucket may change what this instance reads: a member that
    /// joined or left, a claim given up.
    fn concerns(&self, entry: &kv::Entry, members: &[String]) -> bool {
        let removed = matches!(
            entry.operation,
            kv::Operation::Delete | kv::Operation::Purge
        );
        match entry.key.strip_prefix("members.") {
            Some(member) => {
                member != self.instance && (removed || !members.iter().any(|m| m == member))
            }
            None => removed && entry.key.starts_with("claims."),
        }
    }

    /// One round: renew, look at the members, release what is no longer this instance's,
    /// claim what is.
    async fn step(self: &Arc<Self>) -> Result<Vec<String>, Error> {
        let agreed = self.join().await?;
        self.renew_claims().await;
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            // The bus drains what it holds: its claims stay this instance's until that is done.
            return Ok(Vec::new());
        }
        self.settle_finished().await;
        let members = self.members().await?;
        let position = members
            .iter()
            .position(|member| *member == self.instance)
            .unwrap_or(0);
        let count = members.len();
        let mine = |slot: u16| agreed && usize::from(slot) % count == position;
        // Release first: the subjects this instance gives up start elsewhere sooner.
        let leaving: Vec<u16> = lock(&self.claims)
            .iter()
            .filter(|(slot, claim)| !mine(**slot) && matches!(claim.state, ClaimState::Reading(_)))
            .map(|(slot, _)| *slot)
            .collect();
        for slot in leaving {
            let mut claims = lock(&self.claims);
            let Some(Claim {
                revision,
                renewed,
                state,
            }) = claims.remove(&slot)
            else {
                continue;
            };
            let state = match state {
                ClaimState::Reading(subscription) => {
                    tracing::info!(topic = %self.topic, slot, members = count, "giving a partition to another instance");
                    let group = self.clone();
                    ClaimState::Releasing(tokio::spawn(async move {
                        let _ = subscription.unsubscribe().await;
                        group.unpin(slot).await;
                        group.finished.notify_one();
                    }))
                }
                other => other,
            };
            claims.insert(
                slot,
                Claim {
                    revision,
                    renewed,
                    state,
                },
            );
        }
        for slot in 0..=self.partitions {
            if !mine(slot) || lock(&self.claims).contains_key(&slot) || self.stop.is_cancelled() {
                continue;
            }
            let Ok(revision) = self
                .bucket
                .create(Self::claim_key(slot), self.instance.clone().into())
                .await
            else {
                // Another instance still holds it: it gives it up, or its claim expires.
                continue;
            };
            tracing::info!(topic = %self.topic, slot, members = count, "partition claimed");
            let cancel = CancellationToken::new();
            let task = tokio::spawn(self.clone().start(slot, cancel.clone()));
            lock(&self.claims).insert(
                slot,
                Claim {
                    revision,
                    renewed: tokio::time::Instant::now(),
                    state: ClaimState::Starting(task, cancel),
                },
            );
        }
        Ok(members)
    }

    /// Renews every claim. A claim that is no longer this instance's (its revision moved on: it
    /// expired, and may be another's now), or that could not be renewed for `pinned_ttl` (so it
    /// has expired), stops its subject at once; other failures (a timeout while reconnecting)
    /// are tried again next round.
    async fn renew_claims(self: &Arc<Self>) {
        let pinned_ttl = self.ttl;
        let held: Vec<(u16, u64, tokio::time::Instant)> = lock(&self.claims)
            .iter()
            .map(|(slot, claim)| (*slot, claim.revision, claim.renewed))
            .collect();
        for (slot, revision, renewed) in held {
            match self
                .bucket
                .update(
                    Self::claim_key(slot),
                    self.instance.clone().into(),
                    revision,
                )
                .await
            {
                Ok(revision) => {
                    if let Some(claim) = lock(&self.claims).get_mut(&slot) {
                        claim.revision = revision;
                        claim.renewed = tokio::time::Instant::now();
                    }
                }
                Err(error)
                    if error.kind() != kv::UpdateErrorKind::WrongLastRevision
                        && renewed.elapsed() < pinned_ttl =>
                {
                    tracing::debug!(topic = %self.topic, slot, %error, "claim not renewed; trying again");
                }
                Err(error) => {
                    tracing::warn!(topic = %self.topic, slot, %error, "partition claim lost; stopping it");
                    let Some(claim) = lock(&self.claims).remove(&slot) else {
                        continue;
                    };
                    let group = self.clone();
                    let task =
                        tokio::spawn(async move { group.give_back(slot, claim.state).await });
                    let mut lost = lock(&self.lost);
                    lost.retain(|task| !task.is_finished());
                    lost.push(task);
                }
            }
        }
    }

    /// Moves finished starts to reading, and drops the claims of finished releases and failed
    /// starts.
    async fn settle_finished(&self) {
        let finished: Vec<(u16, u64, tokio::time::Instant, ClaimState)> = {
            let mut claims = lock(&self.claims);
            let done: Vec<u16> = claims
                .iter()
                .filter(|(_, claim)| match &claim.state {
                    ClaimState::Starting(task, _) => task.is_finished(),
                    ClaimState::Releasing(task) => task.is_finished(),
                    ClaimState::Reading(_) | ClaimState::Leaving => false,
                })
                .map(|(slot, _)| *slot)
                .collect();
            done.into_iter()
                .filter_map(|slot| {
                    let claim = claims.remove(&slot)?;
                    Some((slot, claim.revision, claim.renewed, claim.state))
                })
                .collect()
        };
        for (slot, revision, renewed, state) in finished {
            let started = match state {
                ClaimState::Starting(task, _) => task.await,
                ClaimState::Releasing(task) => {
                    let _ = task.await;
                    self.drop_claim(slot, revision).await;
                    continue;
                }
                ClaimState::Reading(_) | ClaimState::Leaving => continue,
            };
            match started {
                Ok(Ok(subscription)) => {
                    let state = ClaimState::Reading(subscription);
                    let claim = Claim {
                        revision,
                        renewed,
                        state,
                    };
                    lock(&self.claims).insert(slot, claim);
                }
                Ok(Err(error)) => {
                    tracing::warn!(topic = %self.topic, slot, %error, "partition not started; released");
                    self.drop_claim(slot, revision).await;
                }
                Err(_) => self.drop_claim(slot, revision).await,
            }
        }
    }

    /// Stops reading `slot` (whatever `state` it is in) and unpins it: a start is cancelled, or
    /// what it started unsubscribed; a subscription unsubscribed. The caller deals with the
    /// claim.
    async fn give_back(&self, slot: u16, state: ClaimState) {
        let subscription = match state {
            ClaimState::Starting(task, cancel) => {
                // A start still waiting for the previous reader's pin ends there; one already
                // subscribing is not cut short (it may be re-creating the consumer from its ack
                // floor) and hands over its subscription.
                cancel.cancel();
                match task.await {
                    Ok(Ok(subscription)) => Some(subscription),
                    _ => None,
                }
            }
            ClaimState::Reading(subscription) => Some(subscription),
            ClaimState::Releasing(task) => {
                let _ = task.await;
                None
            }
            ClaimState::Leaving => None,
        };
        if let Some(subscription) = subscription {
            let _ = subscription.unsubscribe().await;
        }
        self.unpin(slot).await;
    }

    /// Deletes a claim this instance holds at `revision`.
    async fn drop_claim(&self, slot: u16, revision: u64) {
        if let Err(error) = self
            .bucket
            .delete_expect_revision(Self::claim_key(slot), Some(revision))
            .await
        {
            tracing::debug!(topic = %self.topic, slot, %error, "claim not deleted; it expires");
        }
    }

    /// Starts reading `slot` once no other client is pinned to its consumer or pulls from it,
    /// unless `cancel` fires first.
    async fn start(
        self: Arc<Self>,
        slot: u16,
        cancel: CancellationToken,
    ) -> Result<Subscription, Error> {
        let inner = self.inner.upgrade().ok_or(Error::Closed)?;
        let subject = self.subject(slot);
        let durable = self.durable_of(slot);
        tokio::select! {
            waited = self.wait_until_unread(&inner, &subject, &durable) => waited?,
            () = cancel.cancelled() => return Err(Error::Closed),
        }
        let options = self.options.clone().with_durable(durable);
        let opened = inner
            .open(
                Target::Partition {
                    topic: &self.topic,
                    subject: &subject,
                    group: &self.durable,
                    pin_lifetime: self.ttl,
                },
                self.spec.clone(),
                options,
            )
            .await;
        self.finished.notify_one();
        opened
    }

    /// Waits until the consumer `durable` of `subject` has no pinned client and no pull request
    /// waiting (or does not exist): the previous reader gave it up, or its pin and its last
    /// requests expired. A pin alone is not enough: the server may forget it (a new consumer
    /// leader) while the previous reader, whose claim expired in an outage, still pulls; a
    /// reader starting then would not replay what that one holds (`Resume::IfAbandoned` sees
    /// another client pulling) and would read newer messages first. Once nobody pulls, what
    /// the previous reader left unacknowledged is replayed in order.
    async fn wait_until_unread(
        &self,
        inner: &Inner,
        subject: &str,
        durable: &str,
    ) -> Result<(), Error> {
        let broker = &inner.broker;
        let kind = if self.spec.handler.is_envelope() {
            Kind::Envelopes
        } else {
            Kind::Plain
        };
        let stream = broker
            .streams
            .ensure(
                &broker.js,
                subject,
                stream_spec(&broker.config, subject, kind),
            )
            .await?;
        let mut logged = false;
        loop {
            let busy = match broker
                .js
                .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
                    durable, &stream,
                )
                .await
            {
                Ok(mut consumer) => match consumer.info().await {
                    Ok(info) => {
                        info.num_waiting > 0
                            || info
                                .priority_groups
                                .iter()
                                .any(|group| group.pinned_client_id.is_some())
                    }
                    // Not known: asked again.
                    Err(_) => true,
                },
                // A consumer that does not exist has no pin; any other error: asked again.
                Err(error) => !matches!(
                    error.kind(),
                    async_nats::jetstream::stream::ConsumerErrorKind::JetStream(error)
                        if error.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND
                ),
            };
            if !busy {
                return Ok(());
            }
            if !logged {
                tracing::info!(topic = %self.topic, subject, "waiting for the previous reader to stop (its pin, its pull requests)");
                logged = true;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = self.stop.cancelled() => return Err(Error::Closed),
            }
        }
    }

    /// Unpins `slot`'s consumer, so the next holder is pinned at once.
    async fn unpin(&self, slot: u16) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let broker = &inner.broker;
        let subject = self.subject(slot);
        let durable = self.durable_of(slot);
        let Ok(stream) = broker.js.stream_by_subject(&subject).await else {
            return;
        };
        let Ok(stream) = broker.js.get_stream_no_info(&stream).await else {
            return;
        };
        if let Err(error) = stream.unpin_consumer(&durable, PRIORITY_GROUP).await {
            tracing::debug!(topic = %self.topic, slot, %error, "not unpinned; the pin expires");
        }
    }

    /// Leaves the group, once: stops the rounds, gives every subject back at once (`unsubscribe`:
    /// each as an unsubscribe does; else the bus has closed them) and unpins it, renewing
    /// meanwhile, deletes the claims and the membership, and frees the bus's slot of the topic
    /// (a new subscription of the topic waited for that).
    async fn leave(self: &Arc<Self>, unsubscribe: bool) {
        let mut left = self.left.lock().await;
        if *left {
            return;
        }
        self.stop.cancel();
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.give_everything_back(unsubscribe).await;
        *left = true;
        if let Some(inner) = self.inner.upgrade() {
            inner.remove_group(self);
            if let Some(slot) = self.topic_slot {
                inner.release_slot(&self.topic, slot);
            }
        }
        tracing::info!(topic = %self.topic, instance = %self.instance, "left the group");
    }

    /// Gives every subject back at once (`unsubscribe`: each as an unsubscribe does; else only
    /// what started after the bus closed its subscriptions) and unpins it, renewing the claims
    /// and the membership meanwhile; then deletes them.
    async fn give_everything_back(self: &Arc<Self>, unsubscribe: bool) {
        let states: Vec<(u16, ClaimState)> = {
            let mut claims = lock(&self.claims);
            claims
                .iter_mut()
                .map(|(slot, claim)| {
                    (
                        *slot,
                        std::mem::replace(&mut claim.state, ClaimState::Leaving),
                    )
                })
                .collect()
        };
        let lost: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.lost));
        let giving_back = futures::future::join(
            futures::future::join_all(states.into_iter().map(|(slot, state)| {
                let state = match state {
                    // The bus has closed these subscriptions itself.
                    ClaimState::Reading(_) if !unsubscribe => ClaimState::Leaving,
                    state => state,
                };
                async move { self.give_back(slot, state).await }
            })),
            futures::future::join_all(lost),
        );
        tokio::pin!(giving_back);
        let interval = crate::config::renew_interval(self.ttl);
        loop {
            tokio::select! {
                _ = &mut giving_back => break,
                () = tokio::time::sleep(interval) => {
                    let _ = self.join().await;
                    self.renew_claims().await;
                }
            }
        }
        let claims: Vec<(u16, u64)> = std::mem::take(&mut *lock(&self.claims))
            .into_iter()
            .map(|(slot, claim)| (slot, claim.revision))
            .collect();
        for (slot, revision) in claims {
            self.drop_claim(slot, revision).await;
        }
        let _ = self.bucket.delete(self.member_key()).await;
    }

    /// The bus is closing: from now on rounds only renew the membership and the claims, while
    /// the bus gives back what its subscriptions hold (the claims must not expire under a long
    /// drain: another instance would replay what still runs here).
    pub(crate) fn begin_close(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.finished.notify_one();
    }

    /// The bus was dropped without `close`: the group's task ends, and the claims and membership
    /// expire after `pinned_ttl`.
    pub(crate) fn abandon(&self) {
        self.stop.cancel();
    }

    /// After the bus closed its subscriptions: unpin what this instance read and delete its
    /// claims and membership, so that the others take over at once.
    pub(crate) async fn release_after_close(self: &Arc<Self>) {
        self.leave(false).await;
    }

    /// The topic's subjects this instance reads now, by slot (the partitions, then the bare
    /// topic as slot `partitions`).
    pub(crate) fn reading(&self) -> Vec<u16> {
        lock(&self.claims)
            .iter()
            .filter(|(_, claim)| matches!(claim.state, ClaimState::Reading(_)))
            .map(|(slot, _)| *slot)
            .collect()
    }

    /// The partitioned topic.
    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    /// The durable this group reads the bare topic with.
    pub(crate) fn durable(&self) -> &str {
        &self.durable
    }
}

/// Stops a partitioned subscription.
struct GroupControl {
    group: Arc<Group>,
}

#[async_trait]
impl SubscriptionControl for GroupControl {
    /// Leaves the group: every subject this instance reads is given back as an unsubscribe
    /// does, unpinned, and its claim deleted, so the other instances take it over at once.
    ///
    /// # Cancel safety
    ///
    /// The leaving runs on a task of its own: a dropped call still completes it.
    async fn unsubscribe(&self) -> Result<(), Error> {
        let group = self.group.clone();
        // At once, before anything awaits: a subscription of the topic made meanwhile waits
        // until the subjects are given back.
        if let (Some(inner), Some(slot)) = (group.inner.upgrade(), group.topic_slot) {
            inner.mark_slot_closing(&group.topic, slot);
        }
        let leaving = tokio::spawn(async move { group.leave(true).await });
        let _ = leaving.await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_keep_only_what_jetstream_allows() {
        assert_eq!(bucket_name("billing_orders"), "eventbus_billing_orders");
        let odd = bucket_name("a@b");
        assert!(odd.starts_with("eventbus_a_b-"));
        assert_ne!(odd, bucket_name("a#b"));
    }

    #[test]
    fn instance_ids_differ_within_a_process() {
        assert_ne!(instance_id(), instance_id());
    }
}
