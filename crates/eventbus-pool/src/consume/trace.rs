//! Trace context through the runtime: read from each consumed message, made current while its
//! handler runs, and written on each publish.

use std::sync::Arc;

use eventbus_core::{Envelope, Headers, TraceContext};

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
    TraceContext::new(trace_id, new_span_id(), true).map(Arc::new)
}

/// The trace context an envelope is published with, and the envelope with its `trace_id` filled
/// in when it had none and a trace is current. The envelope's own W3C `trace_id`, when it has
/// one, names the trace; otherwise the current one (a handler's message) does.
pub(crate) fn outgoing_envelope(envelope: &Envelope) -> (Option<TraceContext>, Option<Envelope>) {
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
pub(crate) fn outgoing_plain(headers: &Headers) -> Option<TraceContext> {
    if headers.contains(eventbus_core::TRACEPARENT) {
        return None;
    }
    current_trace_context().map(|current| current.child(new_span_id()))
}
