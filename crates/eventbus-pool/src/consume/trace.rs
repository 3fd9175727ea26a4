//! Trace context through the runtime: read from each consumed message, made current while its
//! handler runs, and written on each publish.

use std::sync::{Arc, OnceLock};

use eventbus_core::{Envelope, Headers, TraceContext};

/// How trace context crosses the bus when a tracing system owns the spans (OpenTelemetry through
/// `tracing-opentelemetry`: the facade's `opentelemetry` feature installs one). Without one, the
/// runtime carries the incoming context itself and gives each publish a random parent span ID.
pub trait TracePropagation: Send + Sync + 'static {
    /// A message's `consume` span was made and the message carried `incoming`: make it the
    /// span's remote parent.
    fn consumed(&self, span: &tracing::Span, incoming: &TraceContext);

    /// The context a message published inside `span` carries: `span`'s trace, with `span` as
    /// the parent. `None` when the span has no valid context (the runtime then falls back to
    /// its own).
    fn outgoing(&self, span: &tracing::Span) -> Option<TraceContext>;
}

static PROPAGATION: OnceLock<Box<dyn TracePropagation>> = OnceLock::new();

/// Installs the process's [`TracePropagation`]; once per process. Returns `false` (and keeps the
/// first) when one was installed already.
pub fn set_trace_propagation(propagation: impl TracePropagation) -> bool {
    PROPAGATION.set(Box::new(propagation)).is_ok()
}

fn propagation() -> Option<&'static dyn TracePropagation> {
    PROPAGATION.get().map(Box::as_ref)
}

/// Links a message's `consume` span to the context it arrived with, when a tracing system is
/// installed.
pub(crate) fn link(span: &tracing::Span, incoming: Option<&TraceContext>) {
    if let (Some(propagation), Some(incoming)) = (propagation(), incoming) {
        propagation.consumed(span, incoming);
    }
}

tokio::task_local! {
    /// The trace context of the message whose handler runs in this task.
    static CURRENT: Arc<TraceContext>;
}

/// The trace context of the message whose handler is running in this task, if any: what
/// events published from the handler continue.
pub fn current_trace_context() -> Option<Arc<TraceContext>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// Runs `future` with `trace` as the current trace context (for publishes made by it).
pub(crate) async fn with_current<F: Future>(
    trace: Option<Arc<TraceContext>>,
    future: F,
) -> F::Output {
    match trace {
        Some(trace) => CURRENT.scope(trace, future).await,
        None => future.await,
    }
}

/// A new span ID: random, never zero.
pub(crate) fn new_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

/// The trace context a consumed message carries: its `traceparent` header, or for an envelope
/// without one, the trace its W3C `trace_id` names (with an unknown parent). A malformed
/// `traceparent` is ignored (logged at debug): tracing never costs a message.
pub(crate) fn incoming(
    headers: &Headers,
    envelope: Option<&Envelope>,
) -> Option<Arc<TraceContext>> {
    match TraceContext::from_headers(headers) {
        Some(Ok(context)) => return Some(Arc::new(context)),
        Some(Err(error)) => tracing::debug!(%error, "traceparent ignored"),
        None => {}
    }
    let trace_id = TraceContext::parse_trace_id(&envelope?.trace_id)?;
    // Made up from the ID alone: sampled, so that the trace the sender named is followed.
    TraceContext::new(trace_id, new_span_id(), true).map(Arc::new)
}

/// The trace context an envelope is published with, and the envelope with its `trace_id` filled
/// in when it had none and a trace is current. The envelope's own W3C `trace_id`, when it has
/// one, names the trace; otherwise the current one (a handler's message) does.
pub(crate) fn outgoing_envelope(
    envelope: &Envelope,
    span: &tracing::Span,
) -> (Option<TraceContext>, Option<Envelope>) {
    if let Some(context) = propagation().and_then(|propagation| propagation.outgoing(span)) {
        // The tracing system's span is the truth; an envelope without a trace ID gets its.
        let filled = envelope
            .trace_id
            .is_empty()
            .then(|| envelope.clone().with_trace_id(context.trace_id()));
        return (Some(context), filled);
    }
    let span = new_span_id();
    let current = current_trace_context();
    match (TraceContext::parse_trace_id(&envelope.trace_id), current) {
        (Some(named), Some(current)) if named == current.trace_id_bytes() => {
            (Some(current.child(span)), None)
        }
        (Some(named), _) => (TraceContext::new(named, span, true), None),
        (None, Some(current)) if envelope.trace_id.is_empty() => {
            let filled = envelope.clone().with_trace_id(current.trace_id());
            (Some(current.child(span)), Some(filled))
        }
        // A free-form trace ID of an older service is kept as it is.
        (None, Some(current)) => (Some(current.child(span)), None),
        (None, None) => (None, None),
    }
}

/// The trace context a plain message is published with: its own `traceparent`, when it carries
/// one, is left alone; otherwise the current trace's.
pub(crate) fn outgoing_plain(headers: &Headers, span: &tracing::Span) -> Option<TraceContext> {
    if headers.contains(eventbus_core::TRACEPARENT) {
        return None;
    }
    if let Some(context) = propagation().and_then(|propagation| propagation.outgoing(span)) {
        return Some(context);
    }
    current_trace_context().map(|current| current.child(new_span_id()))
}
