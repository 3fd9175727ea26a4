//! The publish side of a bus: one span, the trace context and the per-topic metrics around each
//! backend send, so that every backend publishes the same way; and the pipeline of publishes in
//! flight (a window bounding them, results settled in the order the publishes started).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use eventbus_core::{
    CancellationToken, Envelope, Error, OutboundMessage, PendingPublish, Position, PublishFailure,
    PublishResult, PublishResults,
};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use metrics::{Counter, Histogram, counter, histogram};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tracing::Instrument;

use super::Runtime;
use super::trace::{outgoing_envelope, outgoing_plain};
use crate::transport::AckFuture;

/// Per-topic publish metrics, registered at a topic's first publish.
pub(crate) struct PublishMetrics {
    namespace: String,
    topics: Mutex<HashMap<String, TopicMetrics>>,
}

#[derive(Clone)]
struct TopicMetrics {
    published: Counter,
    failed: Counter,
    duration: Histogram,
}

impl PublishMetrics {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            topics: Mutex::new(HashMap::new()),
        }
    }

    fn topic(&self, topic: &str) -> TopicMetrics {
        // Nothing panics while holding this lock.
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(metrics) = topics.get(topic) {
            return metrics.clone();
        }
        let name = |suffix: &str| format!("{}_{suffix}", self.namespace);
        let label = topic.to_owned();
        let metrics = TopicMetrics {
            published: counter!(name("published_total"), "topic" => label.clone(), "result" => "ok"),
            failed: counter!(name("published_total"), "topic" => label.clone(), "result" => "error"),
            duration: histogram!(name("publish_duration_seconds"), "topic" => label),
        };
        topics.insert(topic.to_owned(), metrics.clone());
        metrics
    }
}

/// One publish in flight, on its way to the driver with its acknowledgement.
struct InFlight {
    settle: oneshot::Sender<Result<Position, Error>>,
    /// Its result for the streams; `None` when no stream existed at its start (a stream
    /// reports the publishes started after it was made).
    result: Option<PublishResult>,
    metrics: TopicMetrics,
    span: tracing::Span,
    started: Instant,
    /// Its place in the window, given back when its result is settled (none for a handler's
    /// publish over the bound).
    permit: Option<OwnedSemaphorePermit>,
}

/// The publishes in flight of one bus: the window, the results streams and the driver task that
/// settles the acknowledgements in the order the publishes started.
pub(crate) struct Pipeline {
    window: Arc<Semaphore>,
    /// `None` once the runtime has closed: the streams then end.
    results: Mutex<Option<broadcast::Sender<PublishResult>>>,
    /// `None` once the runtime closes.
    queue: Mutex<Option<mpsc::UnboundedSender<(AckFuture, InFlight)>>>,
    driver: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Fires at the close deadline: what is still in flight settles as `Closed` at once.
    stop: CancellationToken,
}

impl Pipeline {
    /// A pipeline of at most `max_in_flight` publishes, its driver spawned on `handle`.
    pub(crate) fn start(max_in_flight: usize, handle: &tokio::runtime::Handle) -> Self {
        let (queue, received) = mpsc::unbounded_channel();
        let (results, _) = broadcast::channel(max_in_flight);
        let stop = CancellationToken::new();
        let driver = handle.spawn(drive(received, results.clone(), stop.clone()));
        Self {
            stop,
            window: Arc::new(Semaphore::new(max_in_flight)),
            results: Mutex::new(Some(results)),
            queue: Mutex::new(Some(queue)),
            driver: Mutex::new(Some(driver)),
        }
    }

    pub(crate) fn results(&self) -> PublishResults {
        let results = self.results.lock().unwrap_or_else(PoisonError::into_inner);
        match &*results {
            Some(sender) => PublishResults::new(sender.subscribe()),
            // Closed: a stream that ends at once.
            None => PublishResults::new(broadcast::channel(1).1),
        }
    }

    /// True when a results stream exists: only then is a publish's result made.
    fn reported(&self) -> bool {
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|sender| sender.receiver_count() > 0)
    }

    fn queue(&self) -> Option<mpsc::UnboundedSender<(AckFuture, InFlight)>> {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Refuses new publishes and waits until the driver has settled every publish in flight,
    /// or `deadline` passes: then the rest settle as `Closed` (their outcome unknown: the broker
    /// may still store them), results included, and a message handed over after that makes its
    /// `start_publish*` fail with `Closed`.
    pub(crate) async fn close(&self, deadline: tokio::time::Instant) {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.window.close();
        let driver = self
            .driver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut driver) = driver
            && tokio::time::timeout_at(deadline, &mut driver)
                .await
                .is_err()
        {
            tracing::warn!(
                "publishes still unacknowledged at the close deadline: settled as closed"
            );
            self.stop.cancel();
            // The driver settles what it holds at once and ends.
            let _ = driver.await;
        }
        // Every result is out: the streams end once their readers have read them.
        self.results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// Settles the acknowledgements as they come, in the order the publishes started; ends once the
/// pipeline is closed and every publish in flight is settled. Once `stop` fires, every ack
/// future resolves to `Closed` at once (each watches it).
async fn drive(
    mut queue: mpsc::UnboundedReceiver<(AckFuture, InFlight)>,
    results: broadcast::Sender<PublishResult>,
    stop: CancellationToken,
) {
    let mut acks = FuturesOrdered::new();
    let mut open = true;
    let mut stopping = false;
    while open || !acks.is_empty() {
        tokio::select! {
            // Still takes what was queued, but nothing more.
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                queue.close();
            }
            received = queue.recv(), if open => match received {
                Some((ack, in_flight)) => acks.push_back(async move { (ack.await, in_flight) }),
                None => open = false,
            },
            Some((outcome, in_flight)) = acks.next(), if !acks.is_empty() => {
                settle(&results, outcome, in_flight);
            }
            else => break,
        }
    }
}

fn settle(
    results: &broadcast::Sender<PublishResult>,
    outcome: Result<Position, Error>,
    in_flight: InFlight,
) {
    let InFlight {
        settle,
        result,
        metrics,
        span,
        started,
        permit,
    } = in_flight;
    metrics.record(&span, started, outcome.as_ref().map(|_| ()));
    if let Some(mut result) = result {
        result.outcome = outcome.as_ref().copied().map_err(PublishFailure::from);
        // Every stream may have gone meanwhile.
        let _ = results.send(result);
    }
    // The caller may have dropped its `PendingPublish`.
    let _ = settle.send(outcome);
    drop(permit);
}

impl TopicMetrics {
    /// Records how a publish that started at `started` ended, on its metrics and its span.
    fn record(&self, span: &tracing::Span, started: Instant, result: Result<(), &Error>) {
        self.duration.record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                self.published.increment(1);
                span.record("result", "ok");
            }
            Err(error) => {
                self.failed.increment(1);
                span.record("result", "error");
                tracing::debug!(parent: span, %error, "publish failed");
            }
        }
    }
}

impl Runtime {
    /// Publishes `envelope` to `topic` through the backend's `send`, which gets the message to
    /// put on the wire: the envelope's bytes and `X-*` headers, plus `traceparent` (and
    /// `tracestate`) when a trace is known (see [`current_trace_context`](super::current_trace_context)).
    /// An envelope without a `trace_id` published from a handler gets the handled message's
    /// trace ID. Records a `publish` span and the topic's publish metrics.
    ///
    /// # Cancel safety
    ///
    /// As cancel safe as `send`: dropping the future drops `send`'s future, and the attempt is
    /// counted nowhere.
    pub async fn publish_envelope<F, Fut>(
        &self,
        topic: &str,
        envelope: &Envelope,
        send: F,
    ) -> Result<(), Error>
    where
        F: FnOnce(OutboundMessage) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let (span, message) = envelope_message(topic, envelope)?;
        self.observed(topic, span, send(message)).await
    }

    /// Starts publishing `envelope` to `topic` without waiting for the broker: takes a place in
    /// the window (waiting while `publish_max_in_flight` publishes are unacknowledged), hands
    /// the message to the backend's `send` as [`publish_envelope`](Self::publish_envelope)
    /// does, and returns once `send` has handed it to the client, with the future of its
    /// result. `send` resolves to the future of the broker's acknowledgement; the runtime
    /// awaits that, settles results in the order the publishes started, records the publish
    /// metrics and reports a [`PublishResult`] to the [`publish_results`](Self::publish_results)
    /// streams. A `send` that fails is returned as the error, with no result reported.
    ///
    /// # Cancel safety
    ///
    /// Dropped while waiting for room in the window, nothing was sent. Dropped while `send`
    /// runs, as cancel safe as `send`, and no result is reported.
    pub async fn start_publish_envelope<F, Fut, Ack>(
        &self,
        topic: &str,
        envelope: &Envelope,
        send: F,
    ) -> Result<PendingPublish, Error>
    where
        F: FnOnce(OutboundMessage) -> Fut,
        Fut: Future<Output = Result<Ack, Error>>,
        Ack: Future<Output = Result<Position, Error>> + Send + 'static,
    {
        let permit = self.window_place().await?;
        let (span, message) = envelope_message(topic, envelope)?;
        let result = self
            .shared
            .pipeline
            .reported()
            .then(|| PublishResult::for_envelope(topic, envelope, Ok(Position::Unknown)));
        self.pipelined(topic, span, result, permit, send(message))
            .await
    }

    /// Starts publishing a plain message: [`publish`](Self::publish), pipelined as
    /// [`start_publish_envelope`](Self::start_publish_envelope) is.
    ///
    /// # Cancel safety
    ///
    /// As [`start_publish_envelope`](Self::start_publish_envelope).
    pub async fn start_publish<F, Fut, Ack>(
        &self,
        topic: &str,
        message: OutboundMessage,
        send: F,
    ) -> Result<PendingPublish, Error>
    where
        F: FnOnce(OutboundMessage) -> Fut,
        Fut: Future<Output = Result<Ack, Error>>,
        Ack: Future<Output = Result<Position, Error>> + Send + 'static,
    {
        let permit = self.window_place().await?;
        let (span, message) = plain_message(topic, message);
        let result = self
            .shared
            .pipeline
            .reported()
            .then(|| PublishResult::for_message(topic, Ok(Position::Unknown)));
        self.pipelined(topic, span, result, permit, send(message))
            .await
    }

    /// A stream of the results of the pipelined publishes started from now on.
    pub fn publish_results(&self) -> PublishResults {
        self.shared.pipeline.results()
    }

    /// A place in the window. A handler of this bus (a job on the engine's actors) never waits
    /// for one: the publishes holding the window may themselves wait for room that only its
    /// handlers make (the memory backend delivers as it publishes). It takes a free place, or
    /// goes over the bound.
    async fn window_place(&self) -> Result<Option<OwnedSemaphorePermit>, Error> {
        let window = self.shared.pipeline.window.clone();
        if self.shared.pool.runs_current_task() {
            return match window.try_acquire_owned() {
                Ok(permit) => Ok(Some(permit)),
                Err(tokio::sync::TryAcquireError::NoPermits) => Ok(None),
                Err(tokio::sync::TryAcquireError::Closed) => Err(Error::Closed),
            };
        }
        window
            .acquire_owned()
            .await
            .map(Some)
            .map_err(|_| Error::Closed)
    }

    async fn pipelined<Ack>(
        &self,
        topic: &str,
        span: tracing::Span,
        result: Option<PublishResult>,
        permit: Option<OwnedSemaphorePermit>,
        send: impl Future<Output = Result<Ack, Error>>,
    ) -> Result<PendingPublish, Error>
    where
        Ack: Future<Output = Result<Position, Error>> + Send + 'static,
    {
        // Taken before the message is sent: a publish that gets through is always settled.
        let Some(queue) = self.shared.pipeline.queue() else {
            return Err(Error::Closed);
        };
        let metrics = self.shared.published.topic(topic);
        let started = Instant::now();
        let ack = match send.instrument(span.clone()).await {
            Ok(ack) => ack,
            Err(error) => {
                metrics.record(&span, started, Err(&error));
                return Err(error);
            }
        };
        let (settle, pending) = oneshot::channel();
        let stop = self.shared.pipeline.stop.clone();
        let ack: AckFuture = Box::pin(
            async move {
                tokio::select! {
                    biased;
                    acknowledged = ack => acknowledged,
                    () = stop.cancelled() => Err(Error::Closed),
                }
            }
            .instrument(span.clone()),
        );
        let in_flight = InFlight {
            settle,
            result,
            metrics,
            span,
            started,
            permit,
        };
        if queue.send((ack, in_flight)).is_err() {
            // Handed over after the close deadline (or the driver is gone): the message may be
            // stored, and no result will tell.
            return Err(Error::Closed);
        }
        Ok(PendingPublish::new(pending))
    }

    /// Publishes a plain message to `topic` through the backend's `send`, adding the current
    /// trace's `traceparent` unless the message has its own; records a `publish` span and the
    /// topic's publish metrics.
    ///
    /// # Cancel safety
    ///
    /// As cancel safe as `send`.
    pub async fn publish<F, Fut>(
        &self,
        topic: &str,
        message: OutboundMessage,
        send: F,
    ) -> Result<(), Error>
    where
        F: FnOnce(OutboundMessage) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
        let (span, message) = plain_message(topic, message);
        self.observed(topic, span, send(message)).await
    }

    async fn observed(
        &self,
        topic: &str,
        span: tracing::Span,
        send: impl Future<Output = Result<(), Error>>,
    ) -> Result<(), Error> {
        let metrics = self.shared.published.topic(topic);
        let started = Instant::now();
        let result = send.instrument(span.clone()).await;
        metrics.record(&span, started, result.as_ref().copied());
        result
    }
}

/// The `publish` span of an envelope and the message to put on the wire: its bytes and `X-*`
/// headers, plus the trace context.
fn envelope_message(
    topic: &str,
    envelope: &Envelope,
) -> Result<(tracing::Span, OutboundMessage), Error> {
    let span = tracing::info_span!(
        "publish",
        topic,
        event_id = %envelope.event_id,
        aggregate_id = %envelope.aggregate_id,
        event_type = %envelope.event_type,
        trace_id = tracing::field::Empty,
        result = tracing::field::Empty,
    );
    let (trace, filled) = outgoing_envelope(envelope, &span);
    let envelope = filled.as_ref().unwrap_or(envelope);
    let mut message = OutboundMessage::from_envelope(envelope)?;
    if let Some(trace) = &trace {
        trace.write_headers(&mut message.headers);
        span.record("trace_id", trace.trace_id());
    }
    Ok((span, message))
}

/// The `publish` span of a plain message, and the message with the current trace's
/// `traceparent` unless it has its own.
fn plain_message(topic: &str, mut message: OutboundMessage) -> (tracing::Span, OutboundMessage) {
    let span = tracing::info_span!(
        "publish",
        topic,
        trace_id = tracing::field::Empty,
        result = tracing::field::Empty,
    );
    if let Some(trace) = outgoing_plain(&message.headers, &span) {
        trace.write_headers(&mut message.headers);
        span.record("trace_id", trace.trace_id());
    }
    (span, message)
}
