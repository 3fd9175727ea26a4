//! Fetching: the pull loop of a durable subscription and the loop of an ephemeral one, handing
//! every message to the subscription's consumer in the runtime.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use eventbus_core::{CancellationToken, DeliveryMeta, Error, OffsetDateTime, StartPosition};
use eventbus_pool::consume::Consumer;
use eventbus_pool::transport::{Delivery, Receipt};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};

use crate::config::ConsumerSettings;
use crate::connection::{ConnectionState, LEADER_RETRIES, leader_away};
use crate::consumer::{DurableSpec, PRIORITY_GROUP, Position, Resume, ensure_consumer};
use crate::publish::Broker;
use crate::receipt::{CoreReceipt, JetStreamReceipt, take_apart};
use crate::stats::Stat;
use crate::streams::{Kind, stream_spec};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a subscription's fetcher works with.
pub(crate) struct Fetch {
    /// The subject its durable filters: the topic, or one partition of a partitioned topic.
    pub(crate) topic: String,
    /// The partitioned topic `topic` belongs to, which handlers see as the message's topic;
    /// `None` for a topic read whole.
    logical_topic: Option<String>,
    /// Pulls as a client of the partition's pinned consumer: the `Nats-Pin-Id` the server gave
    /// this fetcher, if any (`None` also for a topic read whole, which pulls without a group).
    pin: Option<Arc<Mutex<Option<String>>>>,
    pub(crate) durable: String,
    /// The durable was named by the subscription, not by the bus.
    explicit_durable: bool,
    /// Where the durable starts when it is made.
    start: StartPosition,
    /// A partition's durable: how long its group's pins live.
    pin_lifetime: Option<Duration>,
    pub(crate) consumer: Arc<Consumer>,
    /// Stop fetching.
    pub(crate) stop: CancellationToken,
    /// Stopping because the bus closes: take one last batch first.
    draining: AtomicBool,
    /// The connection, to notice that the server was lost (and may come back with older state).
    connection: Arc<ConnectionState>,
    /// The highest stream sequence taken so far and when it was stored (none yet: `None`).
    last_taken: Mutex<Option<(u64, OffsetDateTime)>>,
    /// Where the durable stood when the subscription began (its first unacknowledged message),
    /// the position until a message is taken.
    origin: Option<Position>,
    /// What it knows of the durable's deliveries, to notice ones lost on the way.
    deliveries: Mutex<Deliveries>,
}

impl Fetch {
    pub(crate) fn new(
        topic: &str,
        durable: DurableSpec<'_>,
        consumer: Arc<Consumer>,
        connection: Arc<ConnectionState>,
        origin: Option<Position>,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            logical_topic: None,
            pin: None,
            durable: durable.name.to_owned(),
            explicit_durable: durable.explicit,
            start: durable.start,
            pin_lifetime: durable.pin_lifetime,
            consumer,
            stop: CancellationToken::new(),
            draining: AtomicBool::new(false),
            connection,
            last_taken: Mutex::new(None),
            origin,
            deliveries: Mutex::default(),
        }
    }

    /// Reads one partition of `logical_topic` through its pinned consumer.
    pub(crate) fn reading_a_partition_of(mut self, logical_topic: &str) -> Self {
        self.logical_topic = Some(logical_topic.to_owned());
        self.pin = Some(Arc::default());
        self
    }

    /// The durable it reads with.
    pub(crate) fn durable_spec(&self) -> DurableSpec<'_> {
        DurableSpec {
            name: &self.durable,
            explicit: self.explicit_durable,
            start: self.start,
            pin_lifetime: self.pin_lifetime,
        }
    }

    /// Stops fetching; `drain` (close) takes one last batch first. Open pull requests are read
    /// to their end either way, and what they bring is delivered (an unsubscribe then gives it
    /// back in lane order with the rest of the queue).
    pub(crate) fn stop(&self, drain: bool) {
        if drain {
            self.draining.store(true, Ordering::SeqCst);
        }
        self.stop.cancel();
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Where the durable must start if the server lost it or holds a stale view of it: the
    /// lowest message still held, else the one after the last taken; before any, where the
    /// durable stood when the subscription began (so a durable made again while nothing was
    /// taken does not start at its `StartPosition` again: with `New`, what was published in
    /// between would be skipped).
    fn position(&self) -> Option<Position> {
        let Some((last, last_stored)) = *self
            .last_taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        else {
            return self.origin;
        };
        let start = self
            .consumer
            .lowest_held()
            .unwrap_or_else(|| last.saturating_add(1));
        // A delivery lost on the way is below the last taken: replayed too.
        let start = lock(&self.deliveries)
            .lost_from
            .map_or(start, |lost| start.min(lost));
        Some(Position { start, last_stored })
    }

    /// Reads with `consumer` from now on: when it is not the durable read so far (made again),
    /// its deliveries are counted anew, and what was lost on the way is replayed by it.
    fn bound(&self, consumer: &PullConsumer) {
        let info = consumer.cached_info();
        let mut deliveries = lock(&self.deliveries);
        if deliveries.made != Some(info.created) {
            // Numbered on from what the durable had delivered when it was read: a first
            // delivery lost on the way (to a request that died with its connection) shows as a
            // gap like any other.
            *deliveries = Deliveries {
                made: Some(info.created),
                next: Some(info.delivered.consumer_sequence.saturating_add(1)),
                shared: deliveries.shared,
                ..Deliveries::default()
            };
        }
    }
}

/// What a fetcher knows of its durable's deliveries. The server numbers each delivery of a
/// durable (its consumer sequence); one this fetcher never received (sent by a consumer leader
/// that died before it arrived, or to a pull request given up) would come back only after
/// `ack_wait`, after later events of its aggregate.
#[derive(Debug, Default)]
struct Deliveries {
    /// When the durable read was made: another time means it was made again, and its
    /// deliveries are numbered anew.
    made: Option<OffsetDateTime>,
    /// The consumer sequence the next delivery should have.
    next: Option<u64>,
    /// The stream sequence from which messages were lost on the way, until the durable is
    /// replayed from there.
    lost_from: Option<u64>,
    /// Another client pulls from this durable (a topic read whole by two processes, as a work
    /// queue): the deliveries this fetcher does not receive are that client's, not lost.
    shared: bool,
}

/// Fetches from the durable consumer until the subscription stops, delivering every message to
/// the runtime without waiting for the ones before it.
///
/// One pull request is open at a time. With two open, the server spreads new messages over
/// both (it serves waiting requests in turn), and reading one request's messages before the
/// other's would hand an aggregate's later event to the runtime before an earlier one. The
/// next request is sent as soon as the current one has *arrived* in full (all `fetch_batch`
/// messages received, not yet delivered), so the server prepares it while these are delivered.
pub(crate) async fn pull_loop(broker: Arc<Broker>, fetch: Arc<Fetch>, mut consumer: PullConsumer) {
    fetch.bound(&consumer);
    let _lag = AbortOnDrop(tokio::spawn(lag_loop(consumer.clone(), fetch.clone())));
    let settings = broker.config.consumer.clone();
    let envelopes = !fetch.consumer.wants_headers();
    let mut failures = 0u32;
    // Closing takes one last batch without waiting, after the open requests: what was
    // published just before `close` is handled, and a long backlog is left for the next run.
    let mut last_batch_taken = false;
    let mut disconnects = fetch.connection.disconnects();
    // The request sent when the current one had arrived in full.
    let mut next_request = None;
    'pulls: loop {
        if fetch.connection.disconnects() != disconnects && !fetch.stop.is_cancelled() {
            // The server was lost: its pull requests died with it, and it may have come back
            // with an older view of the durable.
            next_request = None;
            match reconcile(&broker, &fetch, envelopes).await {
                Ok(Some(fresh)) => {
                    consumer = fresh;
                    fetch.bound(&consumer);
                    disconnects = fetch.connection.disconnects();
                }
                Ok(None) => disconnects = fetch.connection.disconnects(),
                // Not reachable yet: checked again before the next pull.
                Err(error) => {
                    tracing::debug!(durable = %fetch.durable, %error, "durable not checked yet")
                }
            }
        }
        if next_request.is_none()
            && !fetch.stop.is_cancelled()
            && lock(&fetch.deliveries).lost_from.is_some()
        {
            // Deliveries were lost on the way: nothing more is pulled until the durable is
            // replayed from the first lost (tried again, with backoff, until it is: order is
            // not traded for progress).
            match replay_what_was_lost(&broker, &fetch, &mut consumer, envelopes).await {
                Ok(Some(fresh)) => {
                    consumer = fresh;
                    fetch.bound(&consumer);
                }
                Ok(None) => {}
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(durable = %fetch.durable, %error, failures, "replaying the lost deliveries failed; trying again");
                    if backoff(&fetch, failures).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let stopping = fetch.stop.is_cancelled();
        if stopping && next_request.is_none() && (!fetch.draining() || last_batch_taken) {
            break;
        }
        // Requests sent from now on die with the connection if it is lost.
        let sent_at = fetch.connection.disconnects();
        let batch = if let Some(batch) = next_request.take() {
            batch
        } else if stopping {
            last_batch_taken = true;
            request(&broker, &fetch, &consumer, &settings, Wait::No).await
        } else {
            // Not raced against `stop`: a pull request dropped half-sent could still be
            // answered, and what it brought would wait for `ack_wait`.
            request(&broker, &fetch, &consumer, &settings, Wait::Expires).await
        };
        let mut failed = None;
        match batch {
            Err(error) => failed = Some(error),
            Ok(mut current) => loop {
                current.take_arrived();
                if current.received >= settings.fetch_batch
                    && next_request.is_none()
                    && !fetch.stop.is_cancelled()
                {
                    next_request =
                        Some(request(&broker, &fetch, &consumer, &settings, Wait::Expires).await);
                }
                // An open request is read to its end even when the subscription stops: what
                // the server sends to it would otherwise wait for `ack_wait`.
                let next = match current.arrived.pop_front() {
                    Some(item) => Some(item),
                    None if current.ended => None,
                    None => {
                        let item = if fetch.stop.is_cancelled() {
                            current.batch.next().await
                        } else {
                            tokio::select! {
                                next = current.batch.next() => next,
                                () = fetch.stop.cancelled() => continue,
                                () = connection_lost(&fetch.connection, sent_at) => {
                                    // The request died with the connection: what it would
                                    // still bring is replayed once the durable is checked.
                                    next_request = None;
                                    break;
                                }
                            }
                        };
                        current.count(item.as_ref());
                        item
                    }
                };
                let Some(next) = next else { break };
                let message = match next {
                    Ok(message) => message,
                    Err(error) => {
                        // The stream or consumer went away, the server is unreachable, ...:
                        // back off and find them again rather than asking again at once.
                        failed = Some(error);
                        break;
                    }
                };
                failures = 0;
                // While the runtime makes room, what arrives is read into memory: the client
                // ends a pull request's stream `expires` + 5 s after it was sent, and drops what
                // is still unread then.
                let delivering = deliver(&broker, &fetch, message);
                tokio::pin!(delivering);
                let delivered = loop {
                    tokio::select! {
                        biased;
                        result = &mut delivering => break result,
                        item = current.batch.next(), if !current.ended => current.keep(item),
                        item = next_of(&mut next_request) => {
                            if let Some(Ok(open)) = next_request.as_mut() {
                                open.keep(item);
                            }
                        }
                    }
                };
                match delivered {
                    Ok(Taken::Delivered) => {}
                    Ok(Taken::AfterLostDelivery) => {
                        // Nothing more of these requests is delivered: they are read to their
                        // end and given back, then the durable is replayed from the first
                        // message lost, in order.
                        give_back_the_rest(&mut current, settings.fetch_expires).await;
                        if let Some(Ok(mut open)) = next_request.take() {
                            give_back_the_rest(&mut open, settings.fetch_expires).await;
                        }
                        break;
                    }
                    // The runtime has shut down (close gave up waiting): stop fetching.
                    Err(Error::Closed) => break 'pulls,
                    Err(error) => {
                        tracing::warn!(durable = %fetch.durable, %error, "message not delivered; given back");
                    }
                }
            },
        }
        if let Some(error) = failed {
            next_request = None;
            failures = failures.saturating_add(1);
            tracing::warn!(durable = %fetch.durable, %error, failures, "pull request failed");
            broker.counters.add(Stat::FetchErrors, 1);
            if backoff(&fetch, failures).await {
                break;
            }
            if leader_away(&*error) && failures < LEADER_RETRIES {
                // A cluster electing the consumer's leader: pulling again finds it as soon as
                // it is there, where asking about the consumer now waits `request_timeout`.
                continue;
            }
            // The stream or consumer may be gone (a memory stream after a server restart, a
            // deleted consumer): find or make them again.
            broker.streams.forget(&fetch.topic).await;
            let resume = fetch.position().map_or(Resume::No, Resume::MissingFrom);
            match ensure_consumer(
                &broker,
                &fetch.topic,
                fetch.durable_spec(),
                envelopes,
                resume,
            )
            .await
            {
                Ok(fresh) => {
                    consumer = fresh;
                    fetch.bound(&consumer);
                }
                Err(error) => {
                    tracing::warn!(durable = %fetch.durable, %error, "consumer not ready")
                }
            }
        }
    }
    tracing::debug!(durable = %fetch.durable, "stopped fetching");
}

/// Waits until the messages this subscription holds are settled; one stalled for good (no
/// dead-letter topic, a dead letter the server refuses) is not waited for beyond the progress
/// interval. `false` when the subscription stopped meanwhile.
async fn held_ones_settled(broker: &Broker, fetch: &Fetch) -> bool {
    let patience = tokio::time::Instant::now() + broker.config.consumer.progress_interval();
    while fetch.consumer.held() > 0 && tokio::time::Instant::now() < patience {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = fetch.stop.cancelled() => return false,
        }
    }
    true
}

/// After the server was lost: once this subscription holds nothing (or only messages stalled for
/// good), a durable with more unacknowledged messages than it holds has them only in the
/// server's (older) view, since everything else this bus took was settled. Left alone, the server would redeliver them after `ack_wait`, after
/// newer events of their aggregates; instead the durable is re-created from its ack floor, so
/// that the server replays a suffix in order. `None` when nothing had to change.
async fn reconcile(
    broker: &Broker,
    fetch: &Fetch,
    envelopes: bool,
) -> Result<Option<PullConsumer>, Error> {
    if !held_ones_settled(broker, fetch).await {
        return Ok(None);
    }
    let kind = if envelopes {
        Kind::Envelopes
    } else {
        Kind::Plain
    };
    let spec = stream_spec(&broker.config, &fetch.topic, kind);
    let stream = broker
        .streams
        .ensure(&broker.js, &fetch.topic, spec)
        .await?;
    let read = |error: String| Error::Broker {
        message: format!("cannot read consumer {}: {error}", fetch.durable),
        source: None,
    };
    // Asked with a short timeout: while a cluster elects the consumer's leader nobody answers,
    // and every try waits its whole timeout without pulling (the pull finds the new leader).
    let mut quick = broker.js.clone();
    quick.set_timeout(broker.config.request_timeout.min(RECONCILE_TIMEOUT));
    let mut existing = quick
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
            &fetch.durable,
            &stream,
        )
        .await
        .map_err(|error| read(error.to_string()))?;
    let info = existing
        .info()
        .await
        .map_err(|error| read(error.to_string()))?;
    // Everything unacknowledged that this bus does not hold is stale. Held messages come back
    // from a re-created durable as copies: dropped, and settled through the newest delivery.
    if info.num_ack_pending <= fetch.consumer.held() {
        return Ok(None);
    }
    if let Some(pin) = &fetch.pin {
        // A partition another instance reads now (it claimed it while the server was away): its
        // unacknowledged messages are that instance's, and this one stops at its next round.
        let ours = pin.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let another = info
            .priority_groups
            .iter()
            .any(|group| group.pinned_client_id.is_some() && group.pinned_client_id != ours);
        if another || info.num_waiting > 0 {
            return Ok(None);
        }
    }
    ensure_consumer(
        broker,
        &fetch.topic,
        fetch.durable_spec(),
        envelopes,
        fetch.position().map_or(Resume::Always, Resume::ResetTo),
    )
    .await
    .map(Some)
}

/// What one pull request yields.
type Item = Result<jetstream::Message, async_nats::Error>;

/// An open pull request: its stream and what arrived from it and was not delivered yet.
struct Open {
    batch: BoxStream<'static, Item>,
    arrived: VecDeque<Item>,
    /// Messages received from it so far.
    received: usize,
    /// Its stream ended.
    ended: bool,
}

impl Open {
    fn new(batch: BoxStream<'static, Item>) -> Self {
        Self {
            batch,
            arrived: VecDeque::new(),
            received: 0,
            ended: false,
        }
    }

    /// Counts an item taken from the stream.
    fn count(&mut self, item: Option<&Item>) {
        match item {
            Some(item) => self.received += usize::from(item.is_ok()),
            None => self.ended = true,
        }
    }

    /// Keeps an item taken from the stream for later.
    fn keep(&mut self, item: Option<Item>) {
        self.count(item.as_ref());
        self.arrived.extend(item);
    }

    /// Moves what has arrived already into `arrived`, without waiting.
    fn take_arrived(&mut self) {
        while !self.ended {
            match self.batch.next().now_or_never() {
                Some(item) => self.keep(item),
                None => break,
            }
        }
    }
}

/// How long a pull request waits for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Up to `fetch_expires`.
    Expires,
    /// Not at all: what the consumer holds now (the last batch of a closing bus).
    No,
}

/// Sends a pull request for up to `fetch_batch` messages (`$JS.API.CONSUMER.MSG.NEXT`); a
/// partition's pinned consumer is asked through its priority group [`PRIORITY_GROUP`], carrying
/// the pin this fetcher holds (none yet: the server pins it if no other client is pinned,
/// otherwise the request waits on standby until it expires). The pin comes with each delivered
/// message; a request whose pin the server no longer knows ends (status 423) and forgets it, and
/// the next request goes on standby. (async-nats' own batch requests refuse pinned consumers and
/// report a request the server ended only as text, and its continuous pull stream cannot be
/// stopped with its open request read to the end.)
async fn request(
    broker: &Broker,
    fetch: &Fetch,
    consumer: &PullConsumer,
    settings: &ConsumerSettings,
    wait: Wait,
) -> Result<Open, async_nats::Error> {
    let info = consumer.cached_info();
    let subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        info.stream_name, info.name
    );
    let pin_id = fetch.pin.as_ref().and_then(|pin| lock(pin).clone());
    let expires = u64::try_from(settings.fetch_expires.as_nanos()).unwrap_or(u64::MAX);
    let body = serde_json::to_vec(&PullBody {
        batch: settings.fetch_batch,
        expires: (wait == Wait::Expires).then_some(expires),
        no_wait: wait == Wait::No,
        group: fetch.pin.is_some().then_some(PRIORITY_GROUP),
        id: pin_id.as_deref(),
    })?;
    let client = &broker.client;
    let inbox = client.new_inbox();
    let subscriber = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subject, inbox, body.into())
        .await?;
    // As async-nats does for its batches: the request is given up a while after it should have
    // ended, in case the server's closing status was lost.
    let give_up = tokio::time::Instant::now()
        + match wait {
            Wait::Expires => settings.fetch_expires,
            Wait::No => broker.config.request_timeout,
        }
        + Duration::from_secs(5);
    let replies = PullReplies {
        subscriber,
        context: broker.js.clone(),
        pin: fetch.pin.clone(),
        remaining: settings.fetch_batch,
        give_up,
    };
    Ok(Open::new(
        futures::stream::unfold(replies, |mut replies| async move {
            let item = replies.next_item().await?;
            Some((item, replies))
        })
        .boxed(),
    ))
}

/// The header in which the server names the pinned client of a priority group.
const PIN_HEADER: &str = "Nats-Pin-Id";

/// The body of a pull request (`$JS.API.CONSUMER.MSG.NEXT`).
#[derive(serde::Serialize)]
struct PullBody<'a> {
    batch: usize,
    /// Nanoseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_wait: bool,
    /// The priority group of a pinned consumer.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    /// The pin held, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// The replies to one pull request.
struct PullReplies {
    subscriber: async_nats::Subscriber,
    context: jetstream::Context,
    /// A pinned consumer's fetcher's pin, set from the delivered messages.
    pin: Option<Arc<Mutex<Option<String>>>>,
    /// Messages still to come at most.
    remaining: usize,
    give_up: tokio::time::Instant,
}

impl PullReplies {
    /// The next message, an error that ends the request, or `None` when it ended.
    async fn next_item(&mut self) -> Option<Item> {
        use async_nats::StatusCode;
        while self.remaining > 0 {
            let message = tokio::time::timeout_at(self.give_up, self.subscriber.next())
                .await
                .ok()??;
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.remaining -= 1;
                    let id = message.headers.as_ref().and_then(|h| h.get(PIN_HEADER));
                    if let (Some(pin), Some(id)) = (&self.pin, id) {
                        let mut pin = lock(pin);
                        if pin.as_deref() != Some(id.as_str()) {
                            tracing::debug!(pin = id.as_str(), "pinned to the partition");
                            *pin = Some(id.as_str().to_owned());
                        }
                    }
                    return Some(Ok(jetstream::Message {
                        message,
                        context: self.context.clone(),
                    }));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                // Expired, or nothing to take now (no wait).
                Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => return None,
                Some(StatusCode::PIN_ID_MISMATCH) => {
                    // Another client holds the partition now: wait on standby from here on.
                    tracing::debug!("pin lost; pulling on standby");
                    if let Some(pin) = &self.pin {
                        *lock(pin) = None;
                    }
                    return None;
                }
                Some(status) => {
                    self.remaining = 0;
                    let description = message.description.unwrap_or_default();
                    return Some(Err(Box::new(PullFailed::new(status, &description))));
                }
            }
        }
        None
    }
}

/// A pull request the server ended with an error status.
#[derive(Debug)]
pub(crate) struct PullFailed {
    status: async_nats::StatusCode,
    description: String,
}

impl PullFailed {
    /// A request ended with `status` and `description`.
    pub(crate) fn new(status: async_nats::StatusCode, description: &str) -> Self {
        Self {
            status,
            description: description.to_owned(),
        }
    }

    /// The consumer has no leader now (503) or its leader changed (409 Leadership Change).
    pub(crate) fn leader_away(&self) -> bool {
        self.status == async_nats::StatusCode::NO_RESPONDERS
            || (self.status == async_nats::StatusCode::REQUEST_TERMINATED
                && self.description.eq_ignore_ascii_case("Leadership Change"))
    }
}

impl std::fmt::Display for PullFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pull request failed: {} {}",
            self.status, self.description
        )
    }
}

impl std::error::Error for PullFailed {}

/// The next item of the pipelined request, or never when there is none open.
async fn next_of(next_request: &mut Option<Result<Open, async_nats::Error>>) -> Option<Item> {
    match next_request {
        Some(Ok(open)) if !open.ended => open.batch.next().await,
        _ => std::future::pending().await,
    }
}

/// Waits before the next pull after `failures` failures in a row; true when the subscription
/// stopped meanwhile (a closing bus still takes its last batch).
async fn backoff(fetch: &Fetch, failures: u32) -> bool {
    let delay = Duration::from_millis(50)
        .saturating_mul(2u32.saturating_pow(failures.min(6)))
        .min(Duration::from_secs(2));
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = fetch.stop.cancelled() => {}
    }
    fetch.stop.is_cancelled() && !fetch.draining()
}

/// How long `reconcile` waits for the consumer's state.
const RECONCILE_TIMEOUT: Duration = Duration::from_secs(1);

/// Resolves once the connection was lost after it had been lost `since` times (never while it
/// stays up).
async fn connection_lost(connection: &ConnectionState, since: u64) {
    let mut watch = connection.watch();
    while connection.disconnects() == since {
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How often a subscription asks the server for its consumer's pending count.
pub(crate) const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Reports the subscription's lag every [`LAG_INTERVAL`], until the pull loop ends: what its
/// durable has not had acknowledged, the messages not delivered yet (`num_pending`) and those
/// delivered and not settled (`num_ack_pending`), like Kafka's end offset minus committed
/// offset. A failed request is skipped: the last lag stands until the next one.
async fn lag_loop(mut consumer: PullConsumer, fetch: Arc<Fetch>) {
    loop {
        match consumer.info().await {
            Ok(info) => fetch.consumer.report_lag(
                info.num_pending
                    .saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(0)),
            ),
            Err(error) => {
                tracing::debug!(durable = %fetch.durable, %error, "consumer lag not read")
            }
        }
        tokio::select! {
            () = fetch.stop.cancelled() => return,
            () = tokio::time::sleep(LAG_INTERVAL) => {}
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What [`deliver`] did with a message.
enum Taken {
    /// Handed to the runtime (or given back when it refused).
    Delivered,
    /// Not handed over: a delivery before it never arrived. It and what follows come again
    /// when the durable is replayed from the lost one.
    AfterLostDelivery,
}

/// Hands one JetStream message to the runtime; gives it back when the runtime refuses it.
/// A message whose delivery sequence skips deliveries that never arrived is not handed over
/// ([`Taken::AfterLostDelivery`]): handling it would run it before the lost ones.
async fn deliver(
    broker: &Broker,
    fetch: &Fetch,
    message: jetstream::Message,
) -> Result<Taken, Error> {
    let info = message.info().map_err(|error| Error::Broker {
        message: format!("message without JetStream metadata: {error}"),
        source: None,
    })?;
    let (sequence, delivered, published) = (
        info.stream_sequence,
        u32::try_from(info.delivered).unwrap_or(u32::MAX),
        info.published,
    );
    let lost = {
        let mut deliveries = lock(&fetch.deliveries);
        let expected = deliveries.next;
        if !deliveries.shared && expected.is_some_and(|next| info.consumer_sequence > next) {
            let last = lock(&fetch.last_taken).map(|(taken, _)| taken);
            // The lost ones came after the last taken (or are redeliveries of what is held).
            let from = last.map_or(sequence, |taken| taken.saturating_add(1).min(sequence));
            deliveries.lost_from = Some(deliveries.lost_from.map_or(from, |lost| lost.min(from)));
            Some((expected, from))
        } else {
            // A lower one: a new consumer leader sends again what it had not recorded as sent.
            deliveries.next = Some(info.consumer_sequence.saturating_add(1));
            None
        }
    };
    if let Some((expected, from)) = lost {
        tracing::warn!(
            durable = %fetch.durable,
            expected = ?expected,
            got = info.consumer_sequence,
            from,
            "deliveries were lost on the way; replaying the durable in order from the first lost"
        );
        // Back after the open requests have ended, which are read to their end first.
        let _ = message
            .ack_with(jetstream::AckKind::Nak(Some(
                broker.config.consumer.fetch_expires,
            )))
            .await;
        return Ok(Taken::AfterLostDelivery);
    }
    tracing::trace!(
        durable = %fetch.durable,
        sequence,
        consumer_sequence = info.consumer_sequence,
        delivered,
        "delivery taken"
    );
    if delivered > 1 {
        broker.counters.add(Stat::Redeliveries, 1);
    }
    {
        let mut last = fetch
            .last_taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if last.is_none_or(|(taken, _)| taken < sequence) {
            *last = Some((sequence, published));
        }
    }
    let (message, acker) = message.split();
    let meta = DeliveryMeta {
        position: eventbus_core::Position::Sequence(sequence),
        delivery_attempt: delivered,
        timestamp: Some(published),
    };
    let (mut message, headers) = take_apart(message, fetch.consumer.wants_headers(), meta);
    if let Some(topic) = &fetch.logical_topic {
        // A partition's subject is where the message is stored, not its topic (and its last
        // token is no aggregate ID for subject keys).
        message.topic.clone_from(topic);
    }
    let receipt = Arc::new(JetStreamReceipt { acker, headers });
    let delivery = Delivery {
        message,
        receipt: receipt.clone(),
        held_id: Some(sequence),
    };
    match fetch.consumer.deliver(delivery).await {
        Ok(_) => Ok(Taken::Delivered),
        Err(error) => {
            let _ = receipt.give_back().await;
            Err(error)
        }
    }
}

/// Reads an open pull request to its end, giving back what it brings after `delay` (when the
/// request has ended: it would bring them again). Not cut short by the subscription stopping:
/// what the server still sends to the request would otherwise wait for `ack_wait`, and the
/// request ends by itself within `fetch_expires` (plus the 5 s of [`request`]'s give-up).
async fn give_back_the_rest(open: &mut Open, delay: Duration) {
    loop {
        let item = match open.arrived.pop_front() {
            Some(item) => Some(item),
            None if open.ended => None,
            None => {
                let item = open.batch.next().await;
                open.count(item.as_ref());
                item
            }
        };
        let Some(Ok(message)) = item else { break };
        let _ = message.ack_with(jetstream::AckKind::Nak(Some(delay))).await;
    }
}

/// After deliveries were lost on the way, and this subscription's pull requests have ended:
/// once what it holds is settled (or stalled past the progress interval), the durable is made
/// again from the bus's position, which now starts at the first message lost, so that the
/// server replays it and what followed in stream order. `None` when nothing is replayed: the
/// subscription stopped, or another client pulls from the durable (a topic read whole by two
/// processes) and took the deliveries this one missed; from then on this subscription shares
/// the durable as a work queue and looks for lost deliveries no more.
async fn replay_what_was_lost(
    broker: &Broker,
    fetch: &Fetch,
    consumer: &mut PullConsumer,
    envelopes: bool,
) -> Result<Option<PullConsumer>, Error> {
    if !held_ones_settled(broker, fetch).await {
        return Ok(None);
    }
    let info = consumer
        .info()
        .await
        .map_err(|error| Error::broker(format!("cannot read consumer {}", fetch.durable), error))?;
    // A partition's pinned consumer delivers to this fetcher alone; a whole topic's durable to
    // whoever has a request waiting.
    if fetch.pin.is_none() && info.num_waiting > 0 {
        {
            let mut deliveries = lock(&fetch.deliveries);
            deliveries.shared = true;
            deliveries.lost_from = None;
        }
        tracing::warn!(
            durable = %fetch.durable,
            "another client is pulling from this durable consumer: the two share its messages, events of one aggregate may be handled in both at once"
        );
        return Ok(None);
    }
    let Some(mut position) = fetch.position() else {
        return Ok(None);
    };
    // Never above the ack floor: what another reader of the durable holds unacknowledged (one
    // this fetcher could not tell from a lost delivery) comes back too, rather than being left
    // below the new durable's start.
    position.start = position
        .start
        .min(info.ack_floor.stream_sequence.saturating_add(1));
    ensure_consumer(
        broker,
        &fetch.topic,
        fetch.durable_spec(),
        envelopes,
        Resume::ResetTo(position),
    )
    .await
    .map(Some)
}

/// Takes core NATS messages of an ephemeral topic until the subscription stops (at-most-once:
/// there is nothing to acknowledge).
pub(crate) async fn core_loop(fetch: Arc<Fetch>, mut subscriber: async_nats::Subscriber) {
    let receipt: Arc<dyn Receipt> = Arc::new(CoreReceipt);
    loop {
        let message = tokio::select! {
            message = subscriber.next() => message,
            () = fetch.stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let meta = DeliveryMeta {
            position: eventbus_core::Position::Unknown,
            delivery_attempt: 1,
            timestamp: None,
        };
        let (message, _) = take_apart(message, true, meta);
        let delivery = Delivery {
            message,
            receipt: receipt.clone(),
            held_id: None,
        };
        if let Err(error) = fetch.consumer.deliver(delivery).await {
            tracing::warn!(topic = %fetch.topic, %error, "message not delivered");
            if matches!(error, Error::Closed) {
                break;
            }
        }
    }
    let _ = subscriber.unsubscribe().await;
}
