//! The facade's `opentelemetry` feature: with `tracing-opentelemetry` exporting the bus's spans
//! (to an in-memory exporter here), one trace runs from a publish through its handler to the
//! event the handler publishes and that event's handler, on the memory backend and through a
//! real NATS server.

// Test code: a failed unwrap or index is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_pool::BusSettings;
use integration_tests::Recorder;
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use test_brokers::NatsServer;
use tracing_subscriber::layer::SubscriberExt;

/// The attribute `key` of `span`, as text.
fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// The one span named `name` whose `topic` is `topic`.
fn span<'a>(spans: &'a [SpanData], name: &str, topic: &str) -> &'a SpanData {
    let found: Vec<&SpanData> = spans
        .iter()
        .filter(|span| span.name == name && attribute(span, "topic").as_deref() == Some(topic))
        .collect();
    assert_eq!(found.len(), 1, "{name} spans of {topic}: {spans:#?}");
    found[0]
}

/// Runs the chain on the bus `connect` makes, under a subscriber exporting to memory, and
/// checks the trace.
fn one_trace_through(connect: impl AsyncFnOnce() -> Arc<dyn EventBus>) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    eventbus::opentelemetry::install();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        tokio.block_on(async {
            let bus = connect().await;
            let done = Recorder::<String>::new();
            let publisher = bus.clone();
            bus.subscribe_envelope(
                "otel.orders",
                Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                    let publisher = publisher.clone();
                    async move {
                        let follow_up = Envelope::new(&envelope.aggregate_id, "Shipped", 1, &1)?;
                        publisher
                            .publish_envelope("otel.shipments", &follow_up)
                            .await
                            .map_err(HandlerError::transient)
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
            let d = done.clone();
            bus.subscribe_envelope(
                "otel.shipments",
                Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                    let d = d.clone();
                    async move {
                        d.push(envelope.trace_id);
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap();
            let request = tracing::info_span!("request");
            let order = Envelope::new("order-1", "Placed", 1, &1).unwrap();
            tracing::Instrument::instrument(
                bus.publish_envelope("otel.orders", &order),
                request.clone(),
            )
            .await
            .unwrap();
            drop(request);
            let trace_ids = done
                .wait_for("the follow-up handled", |e| !e.is_empty())
                .await;
            // Both consume spans end once their messages are settled.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while exporter
                .get_finished_spans()
                .unwrap()
                .iter()
                .filter(|span| span.name == "consume")
                .count()
                < 2
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "consume spans not ended"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bus.close().await.unwrap();
            let spans = exporter.get_finished_spans().unwrap();
            let request = spans.iter().find(|span| span.name == "request").unwrap();
            let trace = request.span_context.trace_id();
            let publish_order = span(&spans, "publish", "otel.orders");
            let consume_order = span(&spans, "consume", "otel.orders");
            let publish_shipment = span(&spans, "publish", "otel.shipments");
            let consume_shipment = span(&spans, "consume", "otel.shipments");
            for part in [
                publish_order,
                consume_order,
                publish_shipment,
                consume_shipment,
            ] {
                assert_eq!(
                    part.span_context.trace_id(),
                    trace,
                    "{} of one trace",
                    part.name
                );
            }
            let parent = |span: &SpanData| span.parent_span_id;
            assert_eq!(parent(publish_order), request.span_context.span_id());
            assert_eq!(parent(consume_order), publish_order.span_context.span_id());
            assert_eq!(
                parent(publish_shipment),
                consume_order.span_context.span_id()
            );
            assert_eq!(
                parent(consume_shipment),
                publish_shipment.span_context.span_id()
            );
            assert_ne!(parent(consume_order), SpanId::INVALID);
            // The follow-up envelope names the trace too.
            assert_eq!(trace_ids[0], trace.to_string());
        });
    });
}

#[test]
fn one_trace_runs_from_a_publish_through_two_handlers_on_memory() {
    one_trace_through(async || {
        let bus: Arc<dyn EventBus> =
            Arc::new(eventbus_memory::start(BusSettings::new("memory", "otel")).unwrap());
        bus
    });
}

#[test]
fn one_trace_runs_from_a_publish_through_two_handlers_on_nats() {
    let server = NatsServer::start();
    one_trace_through(async || {
        let bus: Arc<dyn EventBus> = Arc::new(
            eventbus_nats::connect(
                BusSettings::new("nats", "otel"),
                integration_tests::nats_config(&server.url()),
            )
            .await
            .unwrap(),
        );
        bus
    });
}
