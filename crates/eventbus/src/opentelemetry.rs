//! OpenTelemetry (cargo feature `opentelemetry`): the bus's `consume` and `publish` spans in the
//! traces of `tracing-opentelemetry`.
//!
//! The bus emits `tracing` spans; a service that exports them with `tracing-opentelemetry`
//! calls [`install`] once, and then:
//!
//! - a consumed message's `consume` span has the context its `traceparent` header carried as
//!   its remote parent, so the handler's work joins the publisher's trace;
//! - a publish writes the `traceparent` of its own `publish` span (a child of the handler's
//!   span when published from a handler), so the next consumer continues the same trace.
//!
//! With `tracing-subscriber` and an `opentelemetry_sdk` tracer (what
//! `integration-tests/tests/opentelemetry.rs` runs, with an exporter):
//!
//! ```
//! use opentelemetry::trace::TracerProvider as _;
//! use tracing_subscriber::layer::SubscriberExt;
//!
//! // The service installs its subscriber with the OpenTelemetry layer...
//! let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
//! let subscriber = tracing_subscriber::registry()
//!     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("billing")));
//! tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
//! // ...and links the bus's spans to it.
//! eventbus::opentelemetry::install();
//! ```

use std::str::FromStr;

use eventbus_core::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Propagation through `tracing-opentelemetry`'s span contexts.
struct OpenTelemetry;

impl eventbus_pool::consume::TracePropagation for OpenTelemetry {
    fn consumed(&self, span: &tracing::Span, incoming: &TraceContext) {
        let flags = if incoming.is_sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = incoming
            .state()
            .and_then(|state| TraceState::from_str(state).ok())
            .unwrap_or_default();
        let remote = SpanContext::new(
            TraceId::from_bytes(incoming.trace_id_bytes()),
            SpanId::from_bytes(incoming.parent_id_bytes()),
            flags,
            true,
            state,
        );
        let parent = opentelemetry::Context::new().with_remote_span_context(remote);
        if let Err(error) = span.set_parent(parent) {
            tracing::debug!(%error, "consume span not linked to its trace");
        }
    }

    fn outgoing(&self, span: &tracing::Span) -> Option<TraceContext> {
        let context = span.context();
        let otel_span = context.span();
        let own = otel_span.span_context();
        if !own.is_valid() {
            return None;
        }
        let trace = TraceContext::new(
            own.trace_id().to_bytes(),
            own.span_id().to_bytes(),
            own.is_sampled(),
        )?;
        let state = own.trace_state().header();
        Some(if state.is_empty() {
            trace
        } else {
            trace.with_state(state)
        })
    }
}

/// Links the bus's spans to OpenTelemetry traces (see the [module docs](self)). Call it once
/// per process, before buses handle messages; returns `false` when a propagation was installed
/// already (the first one stays).
pub fn install() -> bool {
    eventbus_pool::consume::set_trace_propagation(OpenTelemetry)
}
