//! W3C trace context: the `traceparent` and `tracestate` headers that carry one trace from a
//! publisher through its consumers to the events they publish in turn.
//!
//! The bus reads them from each consumed message (a handler sees them in
//! [`HandlerContext::trace_context`](crate::HandlerContext::trace_context)) and writes them on
//! each publish; an envelope's `trace_id` holds the same trace ID.

use std::fmt;

/// The header with the trace ID, the parent span ID and the flags.
pub const TRACEPARENT: &str = "traceparent";

/// The header with vendor-specific trace state, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// A position in a trace: the trace, the span that sent the message, and whether it is sampled.
///
/// ```
/// use eventbus_core::TraceContext;
///
/// let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// let context = TraceContext::parse(header)?;
/// assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(context.is_sampled());
/// assert_eq!(context.traceparent(), header);
///
/// // A span of this service, in the same trace.
/// let child = context.child([1, 2, 3, 4, 5, 6, 7, 8]);
/// assert_eq!(child.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01");
/// # Ok::<(), eventbus_core::TraceContextError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    state: Option<String>,
}

/// Why a `traceparent` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent: {kind}")]
pub struct TraceContextError {
    kind: TraceContextErrorKind,
}

impl TraceContextError {
    /// What was wrong.
    pub fn kind(&self) -> TraceContextErrorKind {
        self.kind
    }
}

/// What was wrong with a `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceContextErrorKind {
    /// Not `version-traceid-parentid-flags` with the lengths the version asks for.
    Format,
    /// A field holds something other than lowercase hexadecimal digits.
    NotHex,
    /// Version `ff`, which the standard forbids.
    Version,
    /// A trace ID or parent ID of all zeros.
    ZeroId,
}

impl fmt::Display for TraceContextErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceContextErrorKind::Format => "not version-traceid-parentid-flags",
            TraceContextErrorKind::NotHex => "not lowercase hexadecimal",
            TraceContextErrorKind::Version => "version ff is invalid",
            TraceContextErrorKind::ZeroId => "an ID of all zeros",
        })
    }
}

fn error(kind: TraceContextErrorKind) -> TraceContextError {
    TraceContextError { kind }
}

impl TraceContext {
    /// A context in trace `trace_id` whose parent span is `parent_id`; `None` when either is all
    /// zeros (invalid in W3C trace context).
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8], sampled: bool) -> Option<Self> {
        (trace_id != [0; 16] && parent_id != [0; 8]).then_some(Self {
            trace_id,
            parent_id,
            flags: u8::from(sampled),
            state: None,
        })
    }

    /// Parses a `traceparent` value: `00-{32 hex}-{16 hex}-{2 hex}`. A later version is read as
    /// version 00, ignoring what follows the flags, as the standard asks.
    pub fn parse(traceparent: &str) -> Result<Self, TraceContextError> {
        let format = || error(TraceContextErrorKind::Format);
        let mut fields = traceparent.trim().split('-');
        let mut field = |len: usize| {
            fields
                .next()
                .filter(|field| field.len() == len)
                .map(str::as_bytes)
                .ok_or_else(format)
        };
        let version = hex_byte(field(2)?)?;
        if version == 0xff {
            return Err(error(TraceContextErrorKind::Version));
        }
        let (trace, parent, flags) = (field(32)?, field(16)?, field(2)?);
        // Version 00 ends with the flags; a later version may add fields after a dash.
        if version == 0 && fields.next().is_some() {
            return Err(format());
        }
        let mut trace_id = [0; 16];
        hex_into(trace, &mut trace_id)?;
        let mut parent_id = [0; 8];
        hex_into(parent, &mut parent_id)?;
        let flags = hex_byte(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(error(TraceContextErrorKind::ZeroId));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
            state: None,
        })
    }

    /// Reads the context of a message's headers: `None` without a `traceparent`, an error when
    /// it is malformed; `tracestate` comes along when present.
    pub fn from_headers(headers: &crate::Headers) -> Option<Result<Self, TraceContextError>> {
        let parent = headers.get(TRACEPARENT)?;
        let parsed = std::str::from_utf8(parent)
            .map_err(|_| error(TraceContextErrorKind::NotHex))
            .and_then(Self::parse)
            .map(|context| match headers.get_str(TRACESTATE) {
                Some(state) if !state.is_empty() => context.with_state(state),
                _ => context,
            });
        Some(parsed)
    }

    /// Writes `traceparent` (and `tracestate`, when there is one) into `headers`, replacing
    /// what they held.
    pub fn write_headers(&self, headers: &mut crate::Headers) {
        headers.insert(TRACEPARENT, self.traceparent());
        headers.remove(TRACESTATE);
        if let Some(state) = &self.state {
            headers.insert(TRACESTATE, state.clone());
        }
    }

    /// The same trace and state, with `span_id` as the parent: what a message sent from span
    /// `span_id` carries. Flags this version does not know are cleared, as W3C asks of a
    /// participant that passes a context on.
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        Self {
            parent_id: if span_id == [0; 8] {
                self.parent_id
            } else {
                span_id
            },
            flags: self.flags & 1,
            ..self.clone()
        }
    }

    /// Adds vendor trace state (the `tracestate` header's value).
    pub fn with_state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    /// The trace ID as 32 lowercase hex digits (what an envelope's `trace_id` holds).
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The trace ID's bytes.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The parent span ID's bytes.
    pub fn parent_id_bytes(&self) -> [u8; 8] {
        self.parent_id
    }

    /// True when the sender sampled the trace (flag bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `tracestate` value, if any.
    pub fn state(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The `traceparent` value, version 00.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }

    /// Reads a trace ID written as 32 hex digits (an envelope's `trace_id` set from a W3C
    /// context); `None` for anything else, such as the free-form IDs of older services.
    pub fn parse_trace_id(text: &str) -> Option<[u8; 16]> {
        let mut id = [0; 16];
        let bytes = text.as_bytes();
        (bytes.len() == 32
            && bytes.iter().all(u8::is_ascii_hexdigit)
            && hex_into(&text.to_ascii_lowercase().into_bytes(), &mut id).is_ok()
            && id != [0; 16])
            .then_some(id)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.state)
            .finish()
    }
}

fn hex_digit(digit: u8) -> Result<u8, TraceContextError> {
    match digit {
        b'0'..=b'9' => Ok(digit - b'0'),
        b'a'..=b'f' => Ok(digit - b'a' + 10),
        _ => Err(error(TraceContextErrorKind::NotHex)),
    }
}

fn hex_byte(pair: &[u8]) -> Result<u8, TraceContextError> {
    match pair {
        [high, low] => Ok(hex_digit(*high)? << 4 | hex_digit(*low)?),
        _ => Err(error(TraceContextErrorKind::Format)),
    }
}

fn hex_into(hex: &[u8], out: &mut [u8]) -> Result<(), TraceContextError> {
    if hex.len() != out.len() * 2 {
        return Err(error(TraceContextErrorKind::Format));
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = hex_byte(pair)?;
    }
    Ok(())
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn malformed_values_get_the_kind_of_their_fault() {
        let kind = |value: &str| TraceContext::parse(value).unwrap_err().kind();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceContext::parse(good).is_ok());
        assert_eq!(kind(""), TraceContextErrorKind::Format);
        assert_eq!(kind(&good[..54]), TraceContextErrorKind::Format);
        assert_eq!(kind(&format!("{good}-x")), TraceContextErrorKind::Format);
        assert_eq!(kind(&good.replace('-', "_")), TraceContextErrorKind::Format);
        assert_eq!(
            kind(&good.replace("4bf9", "4BF9")),
            TraceContextErrorKind::NotHex
        );
        assert_eq!(
            kind(&good.replacen("00", "ff", 1)),
            TraceContextErrorKind::Version
        );
        assert_eq!(
            kind("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            TraceContextErrorKind::ZeroId
        );
        assert_eq!(
            kind("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            TraceContextErrorKind::ZeroId
        );
        assert_eq!(kind("00-\u{e9}"), TraceContextErrorKind::Format);
        // A later version may append fields after a dash.
        let later = TraceContext::parse(&format!("01{}-extra", &good[2..])).unwrap();
        assert_eq!(later.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn headers_carry_traceparent_and_tracestate_both_ways() {
        let mut headers = crate::Headers::new();
        assert!(TraceContext::from_headers(&headers).is_none());
        headers.insert(TRACEPARENT, "junk");
        assert!(TraceContext::from_headers(&headers).unwrap().is_err());
        let context = TraceContext::new([7; 16], [9; 8], true)
            .unwrap()
            .with_state("vendor=1");
        context.write_headers(&mut headers);
        assert_eq!(
            TraceContext::from_headers(&headers).unwrap().unwrap(),
            context
        );
        let plain = TraceContext::new([7; 16], [9; 8], false).unwrap();
        plain.write_headers(&mut headers);
        assert!(!headers.contains(TRACESTATE));
        assert!(TraceContext::new([0; 16], [1; 8], true).is_none());
    }

    #[test]
    fn envelope_trace_ids_are_read_only_when_they_are_w3c_ids() {
        assert_eq!(
            TraceContext::parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736").map(|id| id[0]),
            Some(0x4b)
        );
        assert_eq!(TraceContext::parse_trace_id("trace-1"), None);
        assert_eq!(TraceContext::parse_trace_id(&"0".repeat(32)), None);
        assert_eq!(TraceContext::parse_trace_id(&"\u{e9}".repeat(16)), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,80}") {
            let _ = TraceContext::parse(&text);
            let _ = TraceContext::parse_trace_id(&text);
        }

        #[test]
        fn a_written_context_reads_back_the_same(
            trace in any::<[u8; 16]>(),
            parent in any::<[u8; 8]>(),
            sampled in any::<bool>(),
        ) {
            if let Some(context) = TraceContext::new(trace, parent, sampled) {
                prop_assert_eq!(TraceContext::parse(&context.traceparent()), Ok(context.clone()));
                prop_assert_eq!(
                    TraceContext::parse_trace_id(&context.trace_id()),
                    Some(trace)
                );
            }
        }
    }
}
