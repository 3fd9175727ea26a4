//! Aggregate IDs: validation and extraction from a consumed message.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::envelope::Envelope;
use crate::error::Error;
use crate::headers::Headers;
use crate::message::Message;

/// The longest valid aggregate ID, in bytes (after trimming).
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// The headers that may carry an aggregate ID, in the order they are consulted.
pub const AGGREGATE_ID_HEADERS: [&str; 4] = [
    "X-Aggregate-ID",
    "x-aggregate-id",
    "Aggregate-ID",
    "aggregate-id",
];

/// Why a string is not a valid aggregate ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateIdError {
    /// Nothing is left after trimming whitespace.
    #[error("aggregate_id cannot be empty")]
    Empty,
    /// Longer than [`MAX_AGGREGATE_ID_LEN`] bytes after trimming.
    #[error("aggregate_id too long (max 256 characters)")]
    TooLong {
        /// The trimmed length in bytes.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9:_\-./]`.
    #[error("aggregate_id contains invalid character: {}", character.escape_debug())]
    InvalidCharacter {
        /// The first offending character.
        character: char,
        /// Its byte position in the trimmed ID.
        position: usize,
    },
}

/// Checks that `id` is a valid aggregate ID: after trimming whitespace, 1 to 256 bytes of
/// `[A-Za-z0-9:_\-./]`.
///
/// ```
/// use eventbus_core::{validate_aggregate_id, ErrorKind};
///
/// assert!(validate_aggregate_id(" order-42 ").is_ok());
/// let err = validate_aggregate_id("order#42").unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidAggregateId);
/// assert_eq!(err.to_string(), "invalid aggregate_id: aggregate_id contains invalid character: #");
/// ```
pub fn validate_aggregate_id(id: &str) -> Result<(), Error> {
    check(id).map(drop).map_err(Error::from)
}

/// Validates and returns the trimmed ID.
pub(crate) fn check(id: &str) -> Result<&str, AggregateIdError> {
    let trimmed = id.trim();
    if trimmed.is_empty() {
        return Err(AggregateIdError::Empty);
    }
    if trimmed.len() > MAX_AGGREGATE_ID_LEN {
        return Err(AggregateIdError::TooLong { len: trimmed.len() });
    }
    match trimmed
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-' | '.' | '/')))
    {
        Some((position, character)) => Err(AggregateIdError::InvalidCharacter {
            character,
            position,
        }),
        None => Ok(trimmed),
    }
}

/// A valid, trimmed aggregate ID: the routing key that keeps one aggregate's events in order.
///
/// Cheap to clone (shared), compares and hashes as its string, and borrows as `str`, so a map
/// keyed by `AggregateId` can be looked up with a `&str`.
///
/// ```
/// use eventbus_core::AggregateId;
///
/// let id = AggregateId::new("  order-42 ")?;
/// assert_eq!(id.as_str(), "order-42");
/// assert!(AggregateId::new("").is_err());
/// # Ok::<(), eventbus_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateId(Arc<str>);

impl AggregateId {
    /// Validates `id` and keeps it trimmed.
    pub fn new(id: impl AsRef<str>) -> Result<Self, Error> {
        Ok(Self(Arc::from(check(id.as_ref())?)))
    }

    /// Validates bytes that should hold an ID (a header value, a record key).
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|id| Self::new(id).ok())
    }

    /// The ID as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for AggregateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for AggregateId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for AggregateId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for AggregateId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for AggregateId {
    type Error = Error;

    fn try_from(value: &str) -> Result<Self, Error> {
        Self::new(value)
    }
}

impl TryFrom<String> for AggregateId {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Error> {
        Self::new(value)
    }
}

/// The parts of a consumed message that may carry its aggregate ID.
///
/// Subject keys are off unless [`with_subject_keys`](Self::with_subject_keys) is called: a plain
/// subject such as `orders.events` would otherwise put every message into one lane.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageSource<'a> {
    payload: &'a [u8],
    headers: Option<&'a Headers>,
    key: Option<&'a [u8]>,
    subject: Option<&'a str>,
}

impl<'a> MessageSource<'a> {
    /// A source with only a payload.
    pub fn new(payload: &'a [u8]) -> Self {
        Self {
            payload,
            ..Self::default()
        }
    }

    /// The payload, headers and key of a consumed message (not its topic).
    pub fn from_message(message: &'a Message) -> Self {
        Self {
            payload: &message.payload,
            headers: Some(&message.headers),
            key: message.key.as_deref(),
            subject: None,
        }
    }

    /// Adds the message headers.
    pub fn with_headers(mut self, headers: &'a Headers) -> Self {
        self.headers = Some(headers);
        self
    }

    /// Adds the record key (Kafka).
    pub fn with_key(mut self, key: &'a [u8]) -> Self {
        self.key = Some(key);
        self
    }

    /// Opts into taking the aggregate ID from the tokens of `subject` (NATS) as the last resort.
    pub fn with_subject_keys(mut self, subject: &'a str) -> Self {
        self.subject = Some(subject);
        self
    }
}

/// Finds the aggregate ID of a consumed message; the first hit wins:
///
/// 1. the payload is a valid [`Envelope`]: its `aggregate_id`;
/// 2. the headers [`AGGREGATE_ID_HEADERS`], in that order (exact names; with repeated headers the
///    last value counts; a value that is not a valid ID is skipped);
/// 3. the record key, if it is a valid ID;
/// 4. only when opted in, the subject's `.`-separated tokens from the last one backwards: the
///    first valid token.
///
/// Every candidate is trimmed. Returns `None` when no source holds a valid ID; the message then
/// has no routing key.
///
/// ```
/// use eventbus_core::{extract_aggregate_id, Headers, MessageSource};
///
/// let mut headers = Headers::new();
/// headers.append("X-Aggregate-ID", "order-7");
/// let source = MessageSource::new(b"not an envelope").with_headers(&headers);
/// assert_eq!(extract_aggregate_id(&source).unwrap().as_str(), "order-7");
///
/// let subject = MessageSource::new(b"{}").with_subject_keys("orders.created.order-9");
/// assert_eq!(extract_aggregate_id(&subject).unwrap().as_str(), "order-9");
/// assert!(extract_aggregate_id(&MessageSource::new(b"{}")).is_none());
/// ```
pub fn extract_aggregate_id(source: &MessageSource<'_>) -> Option<AggregateId> {
    if let Ok(envelope) = Envelope::from_bytes(source.payload)
        && let Ok(id) = AggregateId::new(&envelope.aggregate_id)
    {
        return Some(id);
    }
    if let Some(headers) = source.headers {
        let from_header = AGGREGATE_ID_HEADERS
            .iter()
            .filter_map(|name| headers.get(name))
            .find_map(AggregateId::from_bytes);
        if from_header.is_some() {
            return from_header;
        }
    }
    if let Some(id) = source.key.and_then(AggregateId::from_bytes) {
        return Some(id);
    }
    source.subject.and_then(|subject| {
        subject
            .rsplit('.')
            .find_map(|token| AggregateId::new(token).ok())
    })
}
