//! The publish side of a bus: one span, the trace context and the per-topic metrics around each
//! backend send, so that every backend publishes the same way.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use eventbus_core::{Envelope, Error, OutboundMessage};
use metrics::{Counter, Histogram, counter, histogram};
use tracing::Instrument;

use super::Runtime;
use super::trace::{outgoing_envelope, outgoing_plain};

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
        self.observed(topic, span, send(message)).await
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
        mut message: OutboundMessage,
        send: F,
    ) -> Result<(), Error>
    where
        F: FnOnce(OutboundMessage) -> Fut,
        Fut: Future<Output = Result<(), Error>>,
    {
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
        metrics.duration.record(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                metrics.published.increment(1);
                span.record("result", "ok");
            }
            Err(error) => {
                metrics.failed.increment(1);
                span.record("result", "error");
                tracing::debug!(parent: &span, %error, "publish failed");
            }
        }
        result
    }
}
