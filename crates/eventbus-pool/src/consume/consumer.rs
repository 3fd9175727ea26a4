//! One subscription's consumer: deliveries in, engine jobs out, held messages tracked.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use eventbus_core::{
    CancellationToken, DeliveryClass, Envelope, Error, HandlerContext, HandlerError, Message,
    MessageSource, Outcome, Position, RetryPolicy, TraceContext, extract_aggregate_id,
};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::Shared;
use super::park::{ParkCheck, ParkedBehind, Parking};
use super::settle::{Verdict, settle};
use super::stats::{Consumed, Stat};
use super::trace::{incoming, with_current};
use crate::job::{AttemptFuture, FinishFuture, Work};
use crate::transport::{DeadLetterWriter, Delivery, Handler, Receipt};
use crate::{Job, JobContext, Scope, ScopeReport};

/// What a subscription consumes and where its failures go.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionSpec {
    /// The subscribed topic (handler contexts show it).
    pub topic: String,
    /// The subscription's identity at the broker (a durable consumer, a consumer group): named
    /// in logs, and part of each dead letter's idempotency key.
    pub name: String,
    /// The handler.
    pub handler: Handler,
    /// Take the aggregate ID from subject tokens when no other source has one.
    pub subject_keys: bool,
    /// Where exhausted and undecodable envelopes go; `None` keeps an exhausted envelope in its
    /// lane, retried at the longest backoff.
    pub dead_letter: Option<String>,
    /// How often held messages get an in-progress signal ([`Receipt::in_progress`]); `None`
    /// for none.
    pub progress_interval: Option<Duration>,
    /// How long one attempt of the handler may run; `None` takes the bus's
    /// [`BusSettings::handler_timeout`](crate::BusSettings::handler_timeout).
    pub handler_timeout: Option<Duration>,
    /// Park an aggregate behind its dead letter (envelopes with a dead-letter topic; see
    /// `SubscribeOptions::park_on_dead_letter`).
    pub park_on_dead_letter: bool,
    /// Who writes and owns the subscription's dead letters (`X-Dead-Lettered-By`): only a
    /// subscription of the same owner removes one once it has handled its replayed copy. A
    /// stable identity across the subscription's parts and lifetimes: a NATS durable (a
    /// partitioned topic's group), a Kafka consumer group and topic. `None`: the name.
    pub owner: Option<String>,
    /// Parking subscriptions of one runtime with the same group share their parked aggregates:
    /// the subjects of a partitioned topic, where an aggregate's events may come on two
    /// subjects (its partition, and the bare topic a publisher that does not partition writes
    /// to) and a replay on one must unpark it on the other. `None`: its own.
    pub park_group: Option<String>,
    /// How the handler is retried; `None`: the bus's policy (`PoolConfig::retry`).
    pub retry: Option<Arc<RetryPolicy>>,
}

impl SubscriptionSpec {
    /// A subscription of `handler` to `topic` named `name`: dead letters to `{topic}.DLQ`, no
    /// subject keys, no progress signals.
    pub fn new(topic: impl Into<String>, name: impl Into<String>, handler: Handler) -> Self {
        let topic = topic.into();
        Self {
            dead_letter: Some(format!("{topic}{}", eventbus_core::DEAD_LETTER_SUFFIX)),
            topic,
            name: name.into(),
            handler,
            subject_keys: false,
            progress_interval: None,
            handler_timeout: None,
            park_on_dead_letter: false,
            owner: None,
            park_group: None,
            retry: None,
        }
    }

    /// Retries the handler by `policy` instead of the bus's (`None`: the bus's).
    pub fn with_retry(mut self, policy: Option<RetryPolicy>) -> Self {
        self.retry = policy.map(Arc::new);
        self
    }

    /// Names the subscription (see [`name`](Self::name)).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the dead-letter topic (`None`: none).
    pub fn with_dead_letter(mut self, topic: Option<String>) -> Self {
        self.dead_letter = topic;
        self
    }

    /// Opts into aggregate IDs from subject tokens.
    pub fn with_subject_keys(mut self, subject_keys: bool) -> Self {
        self.subject_keys = subject_keys;
        self
    }

    /// Limits each attempt of the handler to `timeout` (`None`: the bus's default). When it
    /// passes, the handler's cancellation token fires and the attempt fails as transient; a
    /// handler still running after as long again (at most [`CANCEL_GRACE_MAX`] more) is dropped
    /// and counted in [`ConsumeStats::handlers_dropped`](super::ConsumeStats::handlers_dropped).
    pub fn with_handler_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.handler_timeout = timeout;
        self
    }

    /// Parks an aggregate behind its dead letter (see
    /// [`park_on_dead_letter`](Self::park_on_dead_letter)).
    pub fn with_park_on_dead_letter(mut self, park: bool) -> Self {
        self.park_on_dead_letter = park;
        self
    }

    /// Sets who owns the subscription's dead letters (see [`owner`](Self::owner)).
    pub fn with_owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Shares the parked aggregates with the runtime's other parking subscriptions of `group`
    /// (see [`park_group`](Self::park_group)).
    pub fn with_park_group(mut self, group: impl Into<String>) -> Self {
        self.park_group = Some(group.into());
        self
    }

    /// Sends in-progress signals for held messages every `interval`.
    pub fn with_progress_interval(mut self, interval: Option<Duration>) -> Self {
        self.progress_interval = interval;
        self
    }
}

/// What [`Consumer::deliver`] did with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Queued in the engine; its receipt will be settled.
    Queued,
    /// A copy of a message still held: dropped, the held copy settles it.
    Duplicate,
}

/// A message held: delivered and not yet settled.
struct Held {
    receipt: Arc<dyn Receipt>,
    since: Instant,
}

type HeldMap = Arc<Mutex<HashMap<u64, Held>>>;

/// Removes a held message from the registry when its job is done with it (settled, or dropped).
pub(crate) struct HeldGuard {
    held: Option<(HeldMap, u64)>,
}

impl HeldGuard {
    /// The receipt of the message's latest delivery (a broker's redelivered copy replaces the
    /// first one, so that settling answers the delivery the broker knows now).
    pub(crate) fn latest_receipt(&self) -> Option<Arc<dyn Receipt>> {
        let (held, id) = self.held.as_ref()?;
        lock(held).get(id).map(|held| held.receipt.clone())
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        if let Some((held, id)) = self.held.take() {
            lock(&held).remove(&id);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One subscription's consume state. Made by
/// [`Runtime::subscribe`](super::Runtime::subscribe).
pub struct Consumer {
    spec: SubscriptionSpec,
    /// What every message's job shares.
    subscription: Arc<Subscription>,
    /// The parked aggregates, when the subscription parks.
    parking: Option<Arc<Parking>>,
    /// Fired once a parking subscription has parked again the aggregates its dead-letter topic
    /// still holds: deliveries wait for it.
    parking_restored: CancellationToken,
    /// What the broker holds for this subscription beyond what it delivered
    /// ([`report_lag`](Self::report_lag)); `u64::MAX` until reported.
    lag: AtomicU64,
    scope: Scope,
    /// Weak: the runtime holds its consumers.
    runtime: Weak<Shared>,
    held: HeldMap,
    closed: AtomicBool,
    /// The transport is stopping: deliveries stop waiting for room.
    stopping: CancellationToken,
    /// Ends the progress task.
    finished: CancellationToken,
    progress: Mutex<Option<JoinHandle<()>>>,
}

impl Consumer {
    pub(crate) fn start(runtime: &Arc<Shared>, spec: SubscriptionSpec) -> Result<Arc<Self>, Error> {
        let handler_timeout = spec.handler_timeout.or(runtime.settings.handler_timeout);
        if handler_timeout.is_some_and(|timeout| timeout.is_zero()) {
            return Err(Error::config("handler_timeout", "must be longer than 0"));
        }
        if let Some(policy) = &spec.retry {
            policy.validate("retry")?;
        }
        if spec.park_on_dead_letter && (!spec.handler.is_envelope() || spec.dead_letter.is_none()) {
            return Err(Error::config(
                "park_on_dead_letter",
                "parking needs an envelope subscription with a dead-letter topic",
            ));
        }
        let parking = spec
            .park_on_dead_letter
            .then(|| runtime.parking_of(spec.park_group.as_deref()));
        let scope = runtime.pool.open_scope()?;
        let subscription = Arc::new(Subscription {
            handler: spec.handler.clone(),
            topic: Arc::from(spec.topic.as_str()),
            name: Arc::from(spec.name.as_str()),
            owner: Arc::from(spec.owner.as_deref().unwrap_or(&spec.name)),
            dead_letter: spec.dead_letter.as_deref().map(Arc::from),
            timeout: handler_timeout,
            runtime: Arc::downgrade(runtime),
            cancel: scope.cancel.clone(),
            consumed: Consumed::new(&runtime.settings.metrics_namespace, &spec.topic),
        });
        let consumer = Arc::new(Self {
            subscription,
            spec,
            lag: AtomicU64::new(u64::MAX),
            parking: parking.clone(),
            parking_restored: CancellationToken::new(),
            scope,
            runtime: Arc::downgrade(runtime),
            held: Arc::default(),
            closed: AtomicBool::new(false),
            stopping: CancellationToken::new(),
            finished: CancellationToken::new(),
            progress: Mutex::new(None),
        });
        match (&parking, &consumer.subscription.dead_letter) {
            (Some(parking), Some(dead_letter)) => {
                runtime.handle.spawn(restore_parking(
                    runtime.dead_letters.clone(),
                    parking.clone(),
                    consumer.subscription.topic.clone(),
                    dead_letter.clone(),
                    consumer.parking_restored.clone(),
                    consumer.finished.clone(),
                    runtime.settlement,
                ));
            }
            _ => consumer.parking_restored.cancel(),
        }
        if let Some(interval) = consumer.spec.progress_interval {
            let task = runtime.handle.spawn(progress_loop(
                consumer.held.clone(),
                Arc::downgrade(runtime),
                consumer.finished.clone(),
                interval,
            ));
            *lock(&consumer.progress) = Some(task);
        }
        Ok(consumer)
    }

    /// The subscription's description.
    pub fn spec(&self) -> &SubscriptionSpec {
        &self.spec
    }

    /// True when the handler needs the message's headers and key (plain handlers); envelope
    /// handlers see only the envelope, so a backend may leave headers for
    /// [`Receipt::full_message`].
    pub fn wants_headers(&self) -> bool {
        !self.spec.handler.is_envelope()
    }

    /// True once [`close`](Self::close) has begun (or the runtime closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Messages held now (queued, running, retrying, settling).
    pub fn held(&self) -> usize {
        lock(&self.held).len()
    }

    /// Aggregates parked behind a dead letter now (or being replayed), when the subscription
    /// parks (shared with the other subscriptions of its park group).
    pub fn parked_aggregates(&self) -> usize {
        self.parking.as_ref().map_or(0, |parking| parking.len())
    }

    /// The parked aggregates this subscription shares, for counting each group once.
    pub(crate) fn parking(&self) -> Option<&Arc<Parking>> {
        self.parking.as_ref()
    }

    /// Records the subscription's consumer lag: messages the broker holds for it that it has
    /// not finished (NATS: the durable's pending and unacknowledged counts; Kafka: the
    /// partition's end offset minus its committed offset). The runtime sums it per topic in
    /// `consumer_lag` and in the health report.
    pub fn report_lag(&self, lag: u64) {
        self.lag.store(lag.min(u64::MAX - 1), Ordering::Relaxed);
    }

    /// The last lag reported, if any.
    pub fn lag(&self) -> Option<u64> {
        Some(self.lag.load(Ordering::Relaxed)).filter(|lag| *lag != u64::MAX)
    }

    /// The lowest `held_id` held now (a stream sequence on NATS): where a transport that lost
    /// its broker-side position resumes, so that nothing unsettled is skipped.
    pub fn lowest_held(&self) -> Option<u64> {
        lock(&self.held).keys().min().copied()
    }

    /// Hands one message to the engine, waiting while its lane or the engine is full
    /// (backpressure). Envelopes are decoded here; the aggregate ID picks the lane. The receipt
    /// is settled in the lane once the message has its outcome.
    ///
    /// Fails with `Closed` when the subscription or the runtime is closing; the receipt is then
    /// not used, and the backend gives the message back.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the future is dropped before it completes, the message was not queued,
    /// nothing of it stays held, and its receipt was not used.
    pub async fn deliver(&self, delivery: Delivery) -> Result<Delivered, Error> {
        if !self.parking_restored.is_cancelled() {
            // A parking subscription starts once it knows which aggregates wait for a replay.
            tokio::select! {
                () = self.parking_restored.cancelled() => {}
                () = self.stopping.cancelled() => return Err(Error::Closed),
                () = self.finished.cancelled() => return Err(Error::Closed),
            }
        }
        let runtime = match self.runtime.upgrade() {
            Some(runtime) if !self.is_closed() => runtime,
            _ => return Err(Error::Closed),
        };
        let Delivery {
            message,
            receipt,
            held_id,
        } = delivery;
        let guard = match held_id {
            None => HeldGuard { held: None },
            Some(id) => {
                let mut held = lock(&self.held);
                if let Some(earlier) = held.get_mut(&id) {
                    // Settle through the latest delivery: the broker may have forgotten the
                    // first one (a consumer re-created after a server restart).
                    earlier.receipt = receipt;
                    drop(held);
                    runtime.counters.add(Stat::RedeliveriesDropped, 1);
                    tracing::debug!(subscription = %self.spec.name, id, "redelivered copy of a held message dropped");
                    return Ok(Delivered::Duplicate);
                }
                held.insert(
                    id,
                    Held {
                        receipt: receipt.clone(),
                        since: Instant::now(),
                    },
                );
                HeldGuard {
                    held: Some((self.held.clone(), id)),
                }
            }
        };
        let job = self.job(message, receipt, guard);
        // A refused job drops its guard: the message is no longer held.
        runtime
            .pool
            .submit_detached_until(job, self.stopping.cancelled())
            .await?;
        Ok(Delivered::Queued)
    }

    /// The engine job of one message: its lane, its attempts, and its settlement.
    fn job(&self, message: Message, receipt: Arc<dyn Receipt>, guard: HeldGuard) -> Job {
        let (key, class, first, undecodable) = match &self.spec.handler {
            Handler::Plain(_) => {
                let mut source = MessageSource::from_message(&message);
                if self.spec.subject_keys {
                    source = source.with_subject_keys(&message.topic);
                }
                (
                    extract_aggregate_id(&source),
                    DeliveryClass::AtMostOnce,
                    None,
                    None,
                )
            }
            Handler::Envelope(_) => match Envelope::from_bytes(&message.payload) {
                Ok(envelope) => (
                    envelope.aggregate().ok(),
                    DeliveryClass::AtLeastOnce,
                    Some(envelope),
                    None,
                ),
                Err(error) => (
                    None,
                    DeliveryClass::AtLeastOnce,
                    None,
                    Some(error.to_string()),
                ),
            },
        };
        let park = match (&self.parking, &key, &first) {
            (Some(parking), Some(key), Some(envelope)) => Some(ParkCheck::new(
                parking.clone(),
                key.clone(),
                envelope.event_version,
                &message.headers,
            )),
            _ => None,
        };
        let trace = incoming(&message.headers, first.as_ref());
        let span = self.span(&message, first.as_ref(), trace.as_deref());
        let unlimited = class == DeliveryClass::AtLeastOnce
            && self.spec.dead_letter.is_none()
            && undecodable.is_none();
        let work = MessageJob {
            subscription: self.subscription.clone(),
            class,
            message,
            receipt,
            guard,
            span,
            trace,
            park,
            first,
            undecodable,
        };
        let mut job = Job::from_work(key, class, Box::new(work)).in_scope(&self.scope);
        if let Some(policy) = &self.spec.retry {
            job = job.with_retry(policy.clone());
        }
        if unlimited {
            job.with_unlimited_attempts()
        } else {
            job
        }
    }

    /// The `consume` span of one message: every attempt runs in it, and settling records its
    /// outcome.
    fn span(
        &self,
        message: &Message,
        envelope: Option<&Envelope>,
        trace: Option<&TraceContext>,
    ) -> tracing::Span {
        let span = tracing::info_span!(
            "consume",
            topic = %self.subscription.topic,
            subscription = %self.subscription.name,
            partition = tracing::field::Empty,
            offset = tracing::field::Empty,
            sequence = tracing::field::Empty,
            aggregate_id = envelope.map(|envelope| envelope.aggregate_id.as_str()),
            event_type = envelope.map(|envelope| envelope.event_type.as_str()),
            event_id = envelope.map(|envelope| envelope.event_id.as_str()),
            trace_id = trace.map(TraceContext::trace_id),
            attempt = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        super::trace::link(&span, trace);
        match message.meta.position {
            Position::Partition { partition, offset } => {
                span.record("partition", partition);
                span.record("offset", offset);
            }
            Position::Sequence(sequence) => {
                span.record("sequence", sequence);
            }
            _ => {}
        }
        span
    }

    /// The transport is stopping this subscription: from now on a delivery does not wait for
    /// room in a full lane or engine (it joins its lane over the bounds), so the transport can
    /// hand over what it already took (at most one fetch) and [`close`](Self::close) gives it
    /// back in lane order. Call it before waiting for the fetcher to end.
    pub fn begin_stop(&self) {
        self.stopping.cancel();
    }

    /// Stops the subscription (unsubscribe): no delivery is accepted any more, its queued
    /// messages are given back in lane order, its running ones finish until `drain` has
    /// passed (then they are cancelled and given back), and its progress task ends.
    ///
    /// # Cancel safety
    ///
    /// Intake stops and queued messages are given back at the first poll; if the future is
    /// dropped later, running messages settle as usual and the progress task ends once the
    /// runtime closes.
    pub async fn close(&self, drain: Duration) -> ScopeReport {
        self.closed.store(true, Ordering::SeqCst);
        let Some(runtime) = self.runtime.upgrade() else {
            return ScopeReport {
                drained: true,
                handed_back: 0,
            };
        };
        let report = runtime.pool.close_scope(&self.scope, drain).await;
        self.stop_progress().await;
        runtime
            .consumers()
            .retain(|consumer| !std::ptr::eq(Arc::as_ptr(consumer), self));
        tracing::debug!(subscription = %self.spec.name, drained = report.drained, handed_back = report.handed_back, "subscription closed");
        report
    }

    /// Ends the progress task and waits for it.
    pub(crate) async fn stop_progress(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.finished.cancel();
        let task = lock(&self.progress).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Ends the progress task without waiting (the runtime is dropped).
    pub(crate) fn abort_progress(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.finished.cancel();
    }
}

/// The longest a handler past its timeout gets to return after its cancellation token fired,
/// before it is dropped: 5 s (or its timeout, when shorter).
pub const CANCEL_GRACE_MAX: Duration = Duration::from_secs(5);

/// What the jobs of one subscription's messages share.
pub(super) struct Subscription {
    handler: Handler,
    pub(super) topic: Arc<str>,
    /// The subscription's name (in logs, and in each dead letter's idempotency key).
    pub(super) name: Arc<str>,
    /// Who owns its dead letters (`X-Dead-Lettered-By`).
    pub(super) owner: Arc<str>,
    pub(super) dead_letter: Option<Arc<str>>,
    /// The spec's handler timeout, or the bus's.
    timeout: Option<Duration>,
    pub(super) runtime: Weak<Shared>,
    /// The subscription's scope token: fires at its drain deadline.
    pub(super) cancel: Arc<CancellationToken>,
    pub(super) consumed: Consumed,
}

/// One message in the engine: everything its attempts and its settling need, in one
/// allocation. Each attempt runs the handler with a fresh context, under the subscription's
/// handler timeout (an undecodable envelope never reaches the handler; the first attempt takes
/// the envelope decoded for its key, a retry decodes the payload again); its finishing step
/// settles the message ([`settle`]).
pub(super) struct MessageJob {
    pub(super) subscription: Arc<Subscription>,
    class: DeliveryClass,
    pub(super) message: Message,
    pub(super) receipt: Arc<dyn Receipt>,
    /// Dropped when settling ends (or is cut short at the deadline).
    pub(super) guard: HeldGuard,
    /// The message's `consume` span: every attempt runs in it, settling records its outcome.
    pub(super) span: tracing::Span,
    trace: Option<Arc<TraceContext>>,
    /// The message's aggregate in a parking subscription.
    pub(super) park: Option<ParkCheck>,
    /// The envelope decoded for its key, until the first attempt takes it.
    first: Option<Envelope>,
    /// Why the envelope could not be decoded.
    undecodable: Option<String>,
}

impl Work for MessageJob {
    fn attempt(&mut self, ctx: JobContext) -> AttemptFuture {
        if self.undecodable.is_some() {
            return Box::pin(async { Err(HandlerError::permanent("undecodable envelope")) });
        }
        if self.park.as_ref().is_some_and(|park| !park.admits()) {
            return Box::pin(async { Err(HandlerError::permanent(ParkedBehind)) });
        }
        let shared = &*self.subscription;
        // A timed attempt gets a token of its own, which also fires with the subscription's.
        let timer = shared.timeout.map(|timeout| Timer {
            timeout,
            cancel: Arc::new(ctx.cancellation.child_token()),
            subscription: shared.name.clone(),
            runtime: shared.runtime.clone(),
        });
        let cancellation = timer
            .as_ref()
            .map_or_else(|| ctx.cancellation.clone(), |timer| timer.cancel.clone());
        let context = HandlerContext::new(
            shared.topic.clone(),
            self.message.meta.clone(),
            ctx.attempt(),
            cancellation,
        )
        .with_trace_context(self.trace.clone());
        self.span.record("attempt", ctx.attempt());
        let attempt: AttemptFuture = match &shared.handler {
            Handler::Plain(handler) => {
                let (handler, message) = (handler.clone(), self.message.clone());
                Box::pin(async move { handler.handle(context, message).await })
            }
            Handler::Envelope(handler) => {
                let envelope = match self.first.take() {
                    Some(envelope) => envelope,
                    None => match Envelope::from_bytes(&self.message.payload) {
                        Ok(envelope) => envelope,
                        Err(error) => {
                            return Box::pin(async { Err(HandlerError::permanent(error)) });
                        }
                    },
                };
                let handler = handler.clone();
                Box::pin(async move { handler.handle(context, envelope).await })
            }
        };
        let attempt: AttemptFuture = match timer {
            Some(timer) => Box::pin(timer.run(attempt)),
            None => attempt,
        };
        if self.trace.is_none() && self.span.is_disabled() {
            // Nothing to observe: spared a second allocation per attempt.
            return attempt;
        }
        Box::pin(with_current(self.trace.clone(), attempt).instrument(self.span.clone()))
    }

    fn finish(mut self: Box<Self>, outcome: &Outcome) -> Option<FinishFuture> {
        let dead_letters = self.subscription.dead_letter.is_some();
        let verdict = Verdict::of(outcome, self.class, self.undecodable.take(), dead_letters);
        Some(Box::pin(settle(self, verdict)))
    }
}

/// The handler timeout of one attempt.
struct Timer {
    timeout: Duration,
    /// The attempt's cancellation token.
    cancel: Arc<CancellationToken>,
    subscription: Arc<str>,
    runtime: Weak<Shared>,
}

impl Timer {
    /// Runs `attempt` for up to the timeout. Past it, the attempt's token fires and the attempt
    /// fails as transient whatever the handler returns (a handler asked to stop may return
    /// `Ok` without having done its work, and nothing unhandled is acknowledged); a handler
    /// that does not return within the grace period is dropped and counted.
    async fn run(self, attempt: AttemptFuture) -> Result<(), HandlerError> {
        let mut attempt = attempt;
        if let Ok(result) = tokio::time::timeout(self.timeout, &mut attempt).await {
            return result;
        }
        self.cancel.cancel();
        let runtime = self.runtime.upgrade();
        if let Some(runtime) = &runtime {
            runtime.counters.add(Stat::HandlerTimeouts, 1);
        }
        let grace = self.timeout.min(CANCEL_GRACE_MAX);
        let returned = tokio::time::timeout(grace, attempt).await.is_ok();
        if returned {
            tracing::warn!(subscription = %self.subscription, timeout = ?self.timeout, "handler timed out; its attempt fails and is retried or dead-lettered");
        } else {
            if let Some(runtime) = &runtime {
                runtime.counters.add(Stat::HandlersDropped, 1);
            }
            tracing::error!(subscription = %self.subscription, timeout = ?self.timeout, ?grace, "handler timed out and ignored its cancellation: dropped; its attempt fails and is retried or dead-lettered");
        }
        Err(HandlerError::transient(HandlerTimedOut(self.timeout)))
    }
}

/// The failure of an attempt that outlived its handler timeout (the dead letter's reason).
#[derive(Debug)]
struct HandlerTimedOut(Duration);

impl std::fmt::Display for HandlerTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handler timed out after {:?}", self.0)
    }
}

impl std::error::Error for HandlerTimedOut {}

/// Parks the aggregates of `topic` whose dead letters `dead_letter` still holds (a restarted
/// service, a partition taken over), then fires `restored`. A failed read is retried with the
/// settlement backoff: deliveries wait meanwhile rather than run a parked aggregate out of order.
async fn restore_parking(
    dead_letters: Arc<dyn DeadLetterWriter>,
    parking: Arc<Parking>,
    topic: Arc<str>,
    dead_letter: Arc<str>,
    restored: CancellationToken,
    finished: CancellationToken,
    settlement: eventbus_core::Backoff,
) {
    let Some(store) = dead_letters.store() else {
        // Nothing kept: nothing to park again.
        restored.cancel();
        return;
    };
    let mut failures = 0u32;
    loop {
        match store.dead_letters(&dead_letter).await {
            Ok(letters) => {
                for letter in letters {
                    if letter.original_topic() != Some(&*topic) {
                        continue;
                    }
                    let Some(envelope) = letter.envelope() else {
                        continue;
                    };
                    if let Ok(key) = envelope.aggregate() {
                        parking.park(key, envelope.event_version, !letter.is_parked());
                    }
                }
                if parking.len() > 0 {
                    tracing::warn!(%topic, dead_letter_topic = %dead_letter, aggregates = parking.len(), "aggregates parked again behind their dead letters");
                }
                restored.cancel();
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%topic, dead_letter_topic = %dead_letter, %error, failures, "parked aggregates not read yet; deliveries wait");
                tokio::select! {
                    () = tokio::time::sleep(settlement.delay(failures)) => {}
                    () = finished.cancelled() => return,
                }
            }
        }
    }
}

/// Sends an in-progress signal for every message held longer than `interval`, until `finished`.
async fn progress_loop(
    held: HeldMap,
    runtime: Weak<Shared>,
    finished: CancellationToken,
    interval: Duration,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = finished.cancelled() => break,
        }
        let due: Vec<Arc<dyn Receipt>> = lock(&held)
            .values()
            .filter(|held| held.since.elapsed() >= interval)
            .map(|held| held.receipt.clone())
            .collect();
        let Some(runtime) = runtime.upgrade() else {
            break;
        };
        for receipt in due {
            match receipt.in_progress().await {
                Ok(()) => runtime.counters.add(Stat::ProgressSignals, 1),
                Err(error) => {
                    runtime.counters.add(Stat::SettleFailures, 1);
                    tracing::debug!(%error, "in-progress signal not sent");
                }
            }
        }
    }
}
