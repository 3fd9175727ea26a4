//! The event envelope: the JSON wire format shared with the Go services.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::aggregate_id::{self, AggregateId, AggregateIdError};
use crate::error::Error;
use crate::headers::{Headers, header_value};
use crate::json::{self, Next, Reader, SyntaxError};
use crate::timestamp;

/// Header carrying the event ID of a published envelope.
pub const HEADER_EVENT_ID: &str = "X-Event-ID";
/// Header carrying the aggregate ID of a published envelope.
pub const HEADER_AGGREGATE_ID: &str = "X-Aggregate-ID";
/// Header carrying the event type of a published envelope.
pub const HEADER_EVENT_TYPE: &str = "X-Event-Type";
/// Header carrying the event version (decimal) of a published envelope.
pub const HEADER_EVENT_VERSION: &str = "X-Event-Version";
/// Header carrying the trace ID of a published envelope, when set.
pub const HEADER_TRACE_ID: &str = "X-Trace-ID";
/// Header carrying the correlation ID of a published envelope, when set.
pub const HEADER_CORRELATION_ID: &str = "X-Correlation-ID";
/// Header carrying the tenant ID (decimal) of a published envelope, when not 0.
pub const HEADER_TENANT_ID: &str = "X-Tenant-ID";

/// Why envelope bytes or an envelope's fields were rejected.
///
/// The validation messages are the Go SDK's (`event_id is required`, ...).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The bytes are not JSON.
    #[error("malformed JSON at byte {offset}: {reason}")]
    Syntax {
        /// Byte offset of the problem.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// The JSON document is not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A field holds a value of the wrong JSON type (or an out-of-range integer).
    #[error("{field}: {reason}")]
    FieldType {
        /// The field.
        field: &'static str,
        /// What was expected.
        reason: &'static str,
    },
    /// A required field is missing or blank (`payload: null` counts as missing).
    #[error("{field} is required")]
    Required {
        /// The field.
        field: &'static str,
    },
    /// `event_version` is zero or negative.
    #[error("event_version must be positive")]
    NonPositiveVersion {
        /// The rejected version.
        version: i64,
    },
    /// `aggregate_id` is not a valid aggregate ID.
    #[error("invalid aggregate_id: {0}")]
    AggregateId(AggregateIdError),
    /// `timestamp` cannot be read or written in Go's RFC 3339 form.
    #[error("timestamp: {reason}")]
    Timestamp {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The payload given is not a JSON document.
    #[error("payload is not valid JSON: {reason} at byte {offset}")]
    PayloadNotJson {
        /// Byte offset in the payload.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
}

impl EnvelopeError {
    /// The envelope field the error is about, if it is about one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            EnvelopeError::Syntax { .. } | EnvelopeError::NotAnObject => None,
            EnvelopeError::FieldType { field, .. } | EnvelopeError::Required { field } => {
                Some(field)
            }
            EnvelopeError::NonPositiveVersion { .. } => Some("event_version"),
            EnvelopeError::AggregateId(_) => Some("aggregate_id"),
            EnvelopeError::Timestamp { .. } => Some("timestamp"),
            EnvelopeError::PayloadNotJson { .. } => Some("payload"),
        }
    }
}

impl From<SyntaxError> for EnvelopeError {
    fn from(error: SyntaxError) -> Self {
        EnvelopeError::Syntax {
            offset: error.offset,
            reason: error.reason,
        }
    }
}

/// A domain event wrapped for transport: the JSON envelope the Go services publish.
///
/// Fields are public so that an envelope received from elsewhere can be inspected and adjusted;
/// [`validate`](Self::validate) (called by [`to_bytes`](Self::to_bytes)) checks them. The payload
/// is private because it must always be a JSON document.
///
/// # Wire format
///
/// [`to_bytes`](Self::to_bytes) writes compact JSON with the fields in this order:
/// `event_id`, `aggregate_id`, `event_type`, `event_version`, `timestamp` (Go's `RFC3339Nano`),
/// `trace_id` and `correlation_id` (left out when empty), `tenant_id` (left out when 0) and
/// `payload` (embedded verbatim). Strings are escaped as the Go SDK escapes them, `<`, `>` and
/// `&` included. For the same values the bytes are the Go SDK's.
///
/// [`from_bytes`](Self::from_bytes) accepts what the Go SDK accepts and rejects what it rejects:
/// unknown fields are ignored, field names match ASCII case-insensitively, a repeated field takes
/// its last value, `null` empties a string field or the payload (a `null` or missing payload is
/// then refused) and leaves a number or the timestamp as it was, a missing timestamp is Go's zero
/// time, invalid UTF-8 in string fields becomes U+FFFD.
///
/// ```
/// use eventbus_core::Envelope;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize, Debug, PartialEq)]
/// struct OrderPlaced { total_cents: u64 }
///
/// let envelope = Envelope::new("order-42", "OrderPlaced", 1, &OrderPlaced { total_cents: 1250 })?
///     .with_trace_id("trace-1");
/// let bytes = envelope.to_bytes()?;
/// let decoded = Envelope::from_bytes(&bytes)?;
/// assert_eq!(decoded.aggregate_id, "order-42");
/// assert_eq!(decoded.payload_as::<OrderPlaced>()?, OrderPlaced { total_cents: 1250 });
/// assert_eq!(decoded.to_bytes()?, bytes);
/// # Ok::<(), eventbus_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique ID of the event (a UUID v7 string when generated). Required, not blank.
    pub event_id: String,
    /// The aggregate the event belongs to; events of one aggregate are handled in order.
    pub aggregate_id: String,
    /// The event's type name. Required, not blank.
    pub event_type: String,
    /// The event's version within its aggregate; must be positive.
    pub event_version: i64,
    /// When the event was created (decoded envelopes keep the offset they were written with;
    /// one without a timestamp gets Go's zero time, `0001-01-01T00:00:00Z`).
    pub timestamp: OffsetDateTime,
    /// Distributed trace ID; empty when unset.
    pub trace_id: String,
    /// Correlation ID; empty when unset.
    pub correlation_id: String,
    /// Tenant ID; 0 means global / single-tenant.
    pub tenant_id: i64,
    payload: Bytes,
}

impl Envelope {
    /// A new envelope with a generated UUID v7 event ID, the current time (UTC) and `payload`
    /// serialized to JSON. Fails if a field is invalid or the payload cannot be serialized.
    pub fn new<T: Serialize + ?Sized>(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: &T,
    ) -> Result<Self, Error> {
        let payload = serde_json::to_vec(payload).map_err(Error::EncodePayload)?;
        Self::new_raw(aggregate_id, event_type, event_version, payload)
    }

    /// Like [`new`](Self::new), with a payload that is already JSON (checked, kept verbatim).
    pub fn new_raw(
        aggregate_id: impl Into<String>,
        event_type: impl Into<String>,
        event_version: i64,
        payload: impl Into<Bytes>,
    ) -> Result<Self, Error> {
        let envelope = Self {
            event_id: Uuid::now_v7().to_string(),
            aggregate_id: aggregate_id.into(),
            event_type: event_type.into(),
            event_version,
            timestamp: OffsetDateTime::now_utc(),
            trace_id: String::new(),
            correlation_id: String::new(),
            tenant_id: 0,
            payload: Bytes::new(),
        }
        .with_raw_payload(payload)?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// Replaces the event ID.
    pub fn with_event_id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = event_id.into();
        self
    }

    /// Replaces the timestamp.
    pub fn with_timestamp(mut self, timestamp: OffsetDateTime) -> Self {
        self.timestamp = timestamp;
        self
    }

    /// Sets the trace ID.
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = trace_id.into();
        self
    }

    /// Sets the correlation ID.
    pub fn with_correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    /// Sets the tenant ID.
    pub fn with_tenant_id(mut self, tenant_id: i64) -> Self {
        self.tenant_id = tenant_id;
        self
    }

    /// Replaces the payload with `payload` serialized to JSON.
    pub fn with_payload<T: Serialize + ?Sized>(self, payload: &T) -> Result<Self, Error> {
        let payload = serde_json::to_vec(payload).map_err(Error::EncodePayload)?;
        self.with_raw_payload(payload)
    }

    /// Replaces the payload with bytes that must hold one JSON document (kept verbatim).
    pub fn with_raw_payload(mut self, payload: impl Into<Bytes>) -> Result<Self, Error> {
        let payload = payload.into();
        json::is_valid(&payload).map_err(|error| EnvelopeError::PayloadNotJson {
            offset: error.offset,
            reason: error.reason,
        })?;
        self.payload = payload;
        Ok(self)
    }

    /// The payload's JSON bytes, as they travel.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Deserializes the payload.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(Error::DecodePayload)
    }

    /// The aggregate ID, validated and trimmed.
    pub fn aggregate(&self) -> Result<AggregateId, Error> {
        AggregateId::new(&self.aggregate_id)
    }

    /// Checks the fields in the Go SDK's order: `event_id`, `aggregate_id`, `event_type`
    /// (present, not blank), `event_version` (positive), `payload` (present, not `null`),
    /// then the aggregate ID's format.
    pub fn validate(&self) -> Result<(), Error> {
        let required = |field| Err(EnvelopeError::Required { field }.into());
        if self.event_id.trim().is_empty() {
            return required("event_id");
        }
        if self.aggregate_id.trim().is_empty() {
            return required("aggregate_id");
        }
        if self.event_type.trim().is_empty() {
            return required("event_type");
        }
        if self.event_version <= 0 {
            return Err(EnvelopeError::NonPositiveVersion {
                version: self.event_version,
            }
            .into());
        }
        if self.payload.is_empty() || json::is_null(&self.payload) {
            return required("payload");
        }
        aggregate_id::check(&self.aggregate_id)
            .map(drop)
            .map_err(|reason| EnvelopeError::AggregateId(reason).into())
    }

    /// Validates and encodes the envelope as the Go SDK does (see [Wire format](Self#wire-format)).
    pub fn to_bytes(&self) -> Result<Bytes, Error> {
        self.validate()?;
        let timestamp = timestamp::format(&self.timestamp)
            .map_err(|reason| EnvelopeError::Timestamp { reason })?;
        let mut out = Vec::with_capacity(
            160 + self.event_id.len()
                + self.aggregate_id.len()
                + self.event_type.len()
                + self.trace_id.len()
                + self.correlation_id.len()
                + self.payload.len(),
        );
        out.extend_from_slice(br#"{"event_id":"#);
        json::write_string(&mut out, &self.event_id);
        out.extend_from_slice(br#","aggregate_id":"#);
        json::write_string(&mut out, &self.aggregate_id);
        out.extend_from_slice(br#","event_type":"#);
        json::write_string(&mut out, &self.event_type);
        out.extend_from_slice(br#","event_version":"#);
        out.extend_from_slice(self.event_version.to_string().as_bytes());
        out.extend_from_slice(br#","timestamp":""#);
        out.extend_from_slice(timestamp.as_bytes());
        out.push(b'"');
        if !self.trace_id.is_empty() {
            out.extend_from_slice(br#","trace_id":"#);
            json::write_string(&mut out, &self.trace_id);
        }
        if !self.correlation_id.is_empty() {
            out.extend_from_slice(br#","correlation_id":"#);
            json::write_string(&mut out, &self.correlation_id);
        }
        if self.tenant_id != 0 {
            out.extend_from_slice(br#","tenant_id":"#);
            out.extend_from_slice(self.tenant_id.to_string().as_bytes());
        }
        out.extend_from_slice(br#","payload":"#);
        out.extend_from_slice(&self.payload);
        out.push(b'}');
        Ok(Bytes::from(out))
    }

    /// Decodes and validates envelope bytes (see [Wire format](Self#wire-format)).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let envelope = decode(bytes)?;
        envelope.validate()?;
        Ok(envelope)
    }

    /// The headers a published envelope carries, in the order the Go SDK writes them:
    /// `X-Event-ID`, `X-Aggregate-ID`, `X-Event-Version`, `X-Event-Type`, and when set
    /// `X-Trace-ID`, `X-Correlation-ID`, `X-Tenant-ID`.
    pub fn headers(&self) -> Headers {
        let mut headers = Headers::new();
        headers.append(HEADER_EVENT_ID, header_value(&self.event_id));
        headers.append(HEADER_AGGREGATE_ID, self.aggregate_id.clone());
        headers.append(HEADER_EVENT_VERSION, self.event_version.to_string());
        headers.append(HEADER_EVENT_TYPE, header_value(&self.event_type));
        if !self.trace_id.is_empty() {
            headers.append(HEADER_TRACE_ID, header_value(&self.trace_id));
        }
        if !self.correlation_id.is_empty() {
            headers.append(HEADER_CORRELATION_ID, header_value(&self.correlation_id));
        }
        if self.tenant_id != 0 {
            headers.append(HEADER_TENANT_ID, self.tenant_id.to_string());
        }
        headers
    }
}

/// The envelope's fields, as matched by name.
#[derive(Clone, Copy)]
enum Field {
    EventId,
    AggregateId,
    EventType,
    EventVersion,
    Timestamp,
    TraceId,
    CorrelationId,
    TenantId,
    Payload,
}

const FIELDS: [(&str, Field); 9] = [
    ("event_id", Field::EventId),
    ("aggregate_id", Field::AggregateId),
    ("event_type", Field::EventType),
    ("event_version", Field::EventVersion),
    ("timestamp", Field::Timestamp),
    ("trace_id", Field::TraceId),
    ("correlation_id", Field::CorrelationId),
    ("tenant_id", Field::TenantId),
    ("payload", Field::Payload),
];

/// Matches a member name to a field the way the Go SDK's decoder (jsoniter) does: ASCII
/// case-insensitively, with no other folding.
fn field_named(name: &str) -> Option<Field> {
    FIELDS
        .iter()
        .find(|(field_name, _)| field_name.eq_ignore_ascii_case(name))
        .map(|&(_, field)| field)
}

/// Decodes the envelope object without validating it.
fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    let mut envelope = Envelope {
        event_id: String::new(),
        aggregate_id: String::new(),
        event_type: String::new(),
        event_version: 0,
        timestamp: timestamp::GO_ZERO_TIME,
        trace_id: String::new(),
        correlation_id: String::new(),
        tenant_id: 0,
        payload: Bytes::new(),
    };
    let mut reader = Reader::new(bytes);
    reader.skip_whitespace();
    match reader.next_kind()? {
        Next::Object => {}
        Next::Null => {
            reader.null()?;
            return end(&mut reader).map(|()| envelope);
        }
        _ => {
            reader.skip_value()?;
            end(&mut reader)?;
            return Err(EnvelopeError::NotAnObject);
        }
    }
    reader.expect(b'{')?;
    reader.skip_whitespace();
    if !reader.eat(b'}') {
        loop {
            reader.skip_whitespace();
            let name = reader.string()?;
            reader.skip_whitespace();
            reader.expect(b':')?;
            reader.skip_whitespace();
            match field_named(&name) {
                Some(Field::EventId) => {
                    read_string(&mut reader, "event_id", &mut envelope.event_id)?
                }
                Some(Field::AggregateId) => {
                    read_string(&mut reader, "aggregate_id", &mut envelope.aggregate_id)?
                }
                Some(Field::EventType) => {
                    read_string(&mut reader, "event_type", &mut envelope.event_type)?
                }
                Some(Field::EventVersion) => {
                    read_i64(&mut reader, "event_version", &mut envelope.event_version)?
                }
                Some(Field::Timestamp) => read_timestamp(&mut reader, &mut envelope.timestamp)?,
                Some(Field::TraceId) => {
                    read_string(&mut reader, "trace_id", &mut envelope.trace_id)?
                }
                Some(Field::CorrelationId) => {
                    read_string(&mut reader, "correlation_id", &mut envelope.correlation_id)?
                }
                Some(Field::TenantId) => {
                    read_i64(&mut reader, "tenant_id", &mut envelope.tenant_id)?
                }
                Some(Field::Payload) => {
                    let (start, stop) = reader.skip_value()?;
                    envelope.payload = Bytes::copy_from_slice(reader.slice(start, stop));
                }
                None => {
                    reader.skip_value()?;
                }
            }
            reader.skip_whitespace();
            if reader.eat(b'}') {
                break;
            }
            reader.expect(b',')?;
        }
    }
    end(&mut reader)?;
    Ok(envelope)
}

fn end(reader: &mut Reader<'_>) -> Result<(), EnvelopeError> {
    if reader.at_end() {
        Ok(())
    } else {
        Err(EnvelopeError::Syntax {
            offset: reader.position(),
            reason: "invalid character after top-level value",
        })
    }
}

/// Skips a value of the wrong type and reports it.
fn wrong_type(
    reader: &mut Reader<'_>,
    field: &'static str,
    reason: &'static str,
) -> Result<(), EnvelopeError> {
    reader.skip_value()?;
    Err(EnvelopeError::FieldType { field, reason })
}

fn read_string(
    reader: &mut Reader<'_>,
    field: &'static str,
    target: &mut String,
) -> Result<(), EnvelopeError> {
    match reader.next_kind()? {
        Next::Null => {
            // jsoniter empties a string on `null` (encoding/json would keep it).
            target.clear();
            Ok(reader.null()?)
        }
        Next::String => {
            *target = reader.string()?.into_owned();
            Ok(())
        }
        _ => wrong_type(reader, field, "expected a string"),
    }
}

fn read_i64(
    reader: &mut Reader<'_>,
    field: &'static str,
    target: &mut i64,
) -> Result<(), EnvelopeError> {
    match reader.next_kind()? {
        Next::Null => Ok(reader.null()?),
        Next::Number => {
            let (text, integer) = reader.number()?;
            if !integer {
                return Err(EnvelopeError::FieldType {
                    field,
                    reason: "expected an integer",
                });
            }
            *target = std::str::from_utf8(text)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(EnvelopeError::FieldType {
                    field,
                    reason: "integer out of range",
                })?;
            Ok(())
        }
        _ => wrong_type(reader, field, "expected an integer"),
    }
}

fn read_timestamp(
    reader: &mut Reader<'_>,
    target: &mut OffsetDateTime,
) -> Result<(), EnvelopeError> {
    match reader.next_kind()? {
        Next::Null => Ok(reader.null()?),
        Next::String => {
            // Like Go, the text between the quotes is parsed as it is, escapes included.
            let raw = reader.raw_string()?;
            *target =
                timestamp::parse(raw).map_err(|reason| EnvelopeError::Timestamp { reason })?;
            Ok(())
        }
        _ => wrong_type(reader, "timestamp", "expected an RFC 3339 string"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn sample() -> Envelope {
        Envelope::new_raw("order-1", "OrderPlaced", 3, r#"{"a":1}"#)
            .unwrap()
            .with_event_id("evt-1")
            .with_timestamp(datetime!(2024-05-06 07:08:09.5 UTC))
    }

    #[test]
    fn generated_event_ids_are_uuid_v7() {
        let envelope = Envelope::new("order-1", "OrderPlaced", 1, &1).unwrap();
        let id = Uuid::parse_str(&envelope.event_id).unwrap();
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(envelope.event_id, id.hyphenated().to_string());
    }

    #[test]
    fn encoding_orders_fields_and_omits_empty_optional_ones() {
        assert_eq!(
            sample().to_bytes().unwrap(),
            &br#"{"event_id":"evt-1","aggregate_id":"order-1","event_type":"OrderPlaced","event_version":3,"timestamp":"2024-05-06T07:08:09.5Z","payload":{"a":1}}"#[..]
        );
        let full = sample()
            .with_trace_id("t<1>")
            .with_correlation_id("c&1")
            .with_tenant_id(-7);
        assert_eq!(
            full.to_bytes().unwrap(),
            &br#"{"event_id":"evt-1","aggregate_id":"order-1","event_type":"OrderPlaced","event_version":3,"timestamp":"2024-05-06T07:08:09.5Z","trace_id":"t\u003c1\u003e","correlation_id":"c\u00261","tenant_id":-7,"payload":{"a":1}}"#[..]
        );
    }

    #[test]
    fn payload_is_embedded_verbatim() {
        let envelope = sample().with_raw_payload(" [1, 2,\n 3] ").unwrap();
        let bytes = envelope.to_bytes().unwrap();
        assert!(bytes.ends_with(b",\"payload\": [1, 2,\n 3] }"));
        assert_eq!(
            Envelope::from_bytes(&bytes).unwrap().payload(),
            "[1, 2,\n 3]"
        );
    }

    #[test]
    fn non_json_payload_is_refused_with_the_field_named() {
        let error = sample().with_raw_payload("not json").unwrap_err();
        let Error::InvalidEnvelope(reason) = &error else {
            panic!("{error:?}")
        };
        assert_eq!(reason.field(), Some("payload"));
        assert!(Envelope::new_raw("a", "b", 1, "").is_err());
        assert!(Envelope::new_raw("a", "b", 1, "null").is_err());
    }

    #[test]
    fn typed_payload_round_trips() {
        #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Body {
            name: String,
            items: Vec<u32>,
        }
        let body = Body {
            name: "x<y".into(),
            items: vec![1, 2],
        };
        let envelope = sample().with_payload(&body).unwrap();
        assert_eq!(envelope.payload_as::<Body>().unwrap(), body);
        let error = envelope.payload_as::<Vec<u8>>().unwrap_err();
        assert_eq!(error.kind(), crate::ErrorKind::InvalidPayload);
    }

    #[test]
    fn headers_mirror_the_envelope_in_the_go_sdks_order() {
        let headers = sample().with_trace_id("t").with_tenant_id(9).headers();
        let pairs: Vec<(&str, &[u8])> = headers.iter().collect();
        assert_eq!(
            pairs,
            [
                ("X-Event-ID", &b"evt-1"[..]),
                ("X-Aggregate-ID", b"order-1"),
                ("X-Event-Version", b"3"),
                ("X-Event-Type", b"OrderPlaced"),
                ("X-Trace-ID", b"t"),
                ("X-Tenant-ID", b"9"),
            ]
        );
    }

    #[test]
    fn field_names_match_ascii_case_insensitively_like_go() {
        assert!(field_named("EVENT_ID").is_some());
        assert!(field_named("Tenant_Id").is_some());
        assert!(field_named("timeſtamp").is_none());
        assert!(field_named("event_İd").is_none());
        assert!(field_named("event-id").is_none());
        assert!(field_named("event_id ").is_none());
    }
}
