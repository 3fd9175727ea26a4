//! What the runtime lets an operator see: the `consume` span of each message with its fields,
//! the `publish` span, the trace context written on publish, and the per-topic metrics.

// Test code: a failed unwrap or index is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{
    DeliveryMeta, Envelope, Error, HandlerContext, HandlerError, Message, OutboundMessage,
    Position, TraceContext, async_trait,
};
use eventbus_pool::BusSettings;
use eventbus_pool::consume::{Runtime, SubscriptionSpec};
use eventbus_pool::transport::{DeadLetterWriter, Delivery, Handler, Outgoing, Receipt};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A span's fields, by name.
type SpanFields = BTreeMap<String, String>;

/// The spans a test saw: name and fields, by span ID.
#[derive(Default, Clone)]
struct Spans(Arc<Mutex<BTreeMap<u64, (String, SpanFields)>>>);

struct Fields<'a>(&'a mut SpanFields);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

struct Capture {
    spans: Spans,
    next: AtomicU64,
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fields = BTreeMap::new();
        span.record(&mut Fields(&mut fields));
        self.spans
            .0
            .lock()
            .unwrap()
            .insert(id, (span.metadata().name().to_owned(), fields));
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some((_, fields)) = self.spans.0.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Spans {
    fn named(&self, name: &str) -> Vec<SpanFields> {
        self.0
            .lock()
            .unwrap()
            .values()
            .filter(|(span, _)| span == name)
            .map(|(_, fields)| fields.clone())
            .collect()
    }
}

struct NoDeadLetters;

#[async_trait]
impl DeadLetterWriter for NoDeadLetters {
    async fn publish_dead_letter(&self, _: Outgoing<'_>) -> Result<(), Error> {
        Ok(())
    }
}

struct Settled(Arc<AtomicU64>);

#[async_trait]
impl Receipt for Settled {
    async fn ack(&self) -> Result<(), Error> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn give_back(&self) -> Result<(), Error> {
        Ok(())
    }
    async fn terminate(&self) -> Result<(), Error> {
        Ok(())
    }
}

const SENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// Runs `test` on a current-thread runtime with the span capture and a metrics recorder, and
/// returns the spans and the metrics (`name{labels}` → value).
fn observed<F, Fut>(test: F) -> (Spans, BTreeMap<String, DebugValue>)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let spans = Spans::default();
    let capture = Capture {
        spans: spans.clone(),
        next: AtomicU64::new(0),
    };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(capture, || {
        metrics::with_local_recorder(&recorder, || tokio.block_on(test()));
    });
    let metrics = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            (
                format!("{}{{{}}}", key.key().name(), labels.join(",")),
                value,
            )
        })
        .collect();
    (spans, metrics)
}

#[test]
fn each_consumed_message_has_a_span_with_its_position_identity_trace_attempt_and_outcome() {
    let (spans, metrics) = observed(|| async {
        let runtime =
            Runtime::new(BusSettings::new("test", "obs"), Arc::new(NoDeadLetters)).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let handler = Handler::Envelope(Arc::new(move |ctx: HandlerContext, _: Envelope| {
            let s = s.clone();
            async move {
                s.lock()
                    .unwrap()
                    .push(ctx.trace_context().map(TraceContext::traceparent));
                if ctx.attempt() == 1 {
                    return Err(HandlerError::transient("once"));
                }
                Ok(())
            }
        }));
        let consumer = runtime
            .subscribe(SubscriptionSpec::new("orders", "sub-obs", handler))
            .unwrap();
        let envelope = Envelope::new("order-7", "OrderPlaced", 1, &1).unwrap();
        let mut message = Message::new("orders", envelope.to_bytes().unwrap());
        message.headers.insert("traceparent", SENT);
        message.meta = DeliveryMeta {
            position: Position::Partition {
                partition: 3,
                offset: 41,
            },
            delivery_attempt: 1,
            timestamp: None,
        };
        let acked = Arc::new(AtomicU64::new(0));
        consumer
            .deliver(Delivery {
                message,
                receipt: Arc::new(Settled(acked.clone())),
                held_id: Some(41),
            })
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never acked");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [Some(SENT.to_owned()), Some(SENT.to_owned())]
        );
        runtime
            .close(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
    });
    let consumed = spans.named("consume");
    assert_eq!(consumed.len(), 1);
    let fields = &consumed[0];
    for (field, value) in [
        ("topic", "orders"),
        ("subscription", "sub-obs"),
        ("partition", "3"),
        ("offset", "41"),
        ("aggregate_id", "order-7"),
        ("event_type", "OrderPlaced"),
        ("trace_id", "0af7651916cd43dd8448eb211c80319c"),
        ("attempt", "2"),
        ("outcome", "handled"),
    ] {
        assert_eq!(
            fields.get(field).map(String::as_str),
            Some(value),
            "{field} in {fields:?}"
        );
    }
    assert!(fields.contains_key("event_id"));
    assert_eq!(
        metrics.get("test_eventbus_obs_consumed_total{topic=orders,outcome=handled}"),
        Some(&DebugValue::Counter(1))
    );
}

#[test]
fn a_publish_has_a_span_per_topic_metrics_and_continues_the_current_trace() {
    let (spans, metrics) = observed(|| async {
        let runtime =
            Runtime::new(BusSettings::new("test", "pub"), Arc::new(NoDeadLetters)).unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let envelope = Envelope::new("order-8", "OrderPlaced", 1, &1).unwrap();
        // Outside a handler and without a W3C trace ID: no trace context is made up.
        let s = sent.clone();
        runtime
            .publish_envelope("orders", &envelope, |message| async move {
                s.lock().unwrap().push(message);
                Ok(())
            })
            .await
            .unwrap();
        let failed = runtime
            .publish("orders", OutboundMessage::new(&b"x"[..]), |_| async {
                Err(Error::Broker {
                    message: "no stream".into(),
                    source: None,
                })
            })
            .await;
        assert!(failed.is_err());
        let traced = envelope
            .clone()
            .with_trace_id("0af7651916cd43dd8448eb211c80319c");
        let s = sent.clone();
        runtime
            .publish_envelope("orders", &traced, |message| async move {
                s.lock().unwrap().push(message);
                Ok(())
            })
            .await
            .unwrap();
        let sent = sent.lock().unwrap();
        assert!(!sent[0].headers.contains("traceparent"));
        let context = TraceContext::from_headers(&sent[1].headers)
            .unwrap()
            .unwrap();
        assert_eq!(context.trace_id(), "0af7651916cd43dd8448eb211c80319c");
    });
    let published = spans.named("publish");
    assert_eq!(published.len(), 3);
    assert_eq!(published[0].get("result").map(String::as_str), Some("ok"));
    assert_eq!(
        published[0].get("aggregate_id").map(String::as_str),
        Some("order-8")
    );
    assert_eq!(
        published[1].get("result").map(String::as_str),
        Some("error")
    );
    assert_eq!(
        published[2].get("trace_id").map(String::as_str),
        Some("0af7651916cd43dd8448eb211c80319c")
    );
    assert_eq!(
        metrics.get("test_eventbus_pub_published_total{topic=orders,result=ok}"),
        Some(&DebugValue::Counter(2))
    );
    assert_eq!(
        metrics.get("test_eventbus_pub_published_total{topic=orders,result=error}"),
        Some(&DebugValue::Counter(1))
    );
    assert!(
        matches!(metrics.get("test_eventbus_pub_publish_duration_seconds{topic=orders}"), Some(DebugValue::Histogram(values)) if values.len() == 3)
    );
}
