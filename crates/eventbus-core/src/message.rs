//! Consumed and outbound messages.

use bytes::Bytes;
use time::OffsetDateTime;

use crate::headers::Headers;

/// Where a message sits in its broker: as consumed, or as a publish stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Position {
    /// A Kafka record.
    Partition {
        /// The partition.
        partition: i32,
        /// The record's offset in the partition.
        offset: i64,
    },
    /// A sequence number in a stream: a NATS JetStream stream sequence, or a memory topic's.
    Sequence(u64),
    /// No position (core NATS).
    #[default]
    Unknown,
}

/// As text: `17` (a sequence), `2/35` (partition 2, offset 35), `-` (unknown); what
/// [`Position::parse`] reads back.
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Sequence(sequence) => write!(f, "{sequence}"),
            Position::Partition { partition, offset } => write!(f, "{partition}/{offset}"),
            Position::Unknown => f.write_str("-"),
        }
    }
}

impl Position {
    /// Reads a position written by its `Display`; `None` for anything else (`-` included).
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once('/') {
            Some((partition, offset)) => Some(Position::Partition {
                partition: partition.parse().ok()?,
                offset: offset.parse().ok()?,
            }),
            None => text.parse().ok().map(Position::Sequence),
        }
    }
}

/// Delivery metadata of a consumed message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeliveryMeta {
    /// Where the message sits in the broker.
    pub position: Position,
    /// How many times the broker has delivered the message, this delivery included (1 = first).
    /// Kafka does not count deliveries and always reports 1.
    pub delivery_attempt: u32,
    /// When the broker stored the message, when it says.
    pub timestamp: Option<OffsetDateTime>,
}

/// A consumed message, as handed to a [`MessageHandler`](crate::MessageHandler).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic (NATS subject) it was consumed from.
    pub topic: String,
    /// The record key (Kafka), if any.
    pub key: Option<Bytes>,
    /// The headers.
    pub headers: Headers,
    /// The body.
    pub payload: Bytes,
    /// Delivery metadata.
    pub meta: DeliveryMeta,
}

impl Message {
    /// A message on `topic` with `payload`, no key, no headers, first delivery, no position.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            key: None,
            headers: Headers::new(),
            payload: payload.into(),
            meta: DeliveryMeta {
                delivery_attempt: 1,
                ..DeliveryMeta::default()
            },
        }
    }
}

/// A message to publish: payload, optional key, headers.
///
/// ```
/// use eventbus_core::OutboundMessage;
///
/// let message = OutboundMessage::new(r#"{"hello":"world"}"#)
///     .with_key("order-42")
///     .with_header("X-Source", "billing");
/// assert_eq!(message.key.as_deref(), Some(&b"order-42"[..]));
/// assert_eq!(message.headers.get_str("X-Source"), Some("billing"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutboundMessage {
    /// The body.
    pub payload: Bytes,
    /// The record key (Kafka partitioning); NATS ignores it.
    pub key: Option<Bytes>,
    /// The headers.
    pub headers: Headers,
}

impl OutboundMessage {
    /// A message with `payload`, no key and no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            ..Self::default()
        }
    }

    /// Sets the record key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    pub fn with_header<N: AsRef<str> + Into<String>>(
        mut self,
        name: N,
        value: impl Into<Bytes>,
    ) -> Self {
        self.headers.append(name, value);
        self
    }

    /// `envelope` as every backend publishes it: its JSON as the payload, the aggregate ID as
    /// the key (one aggregate, one Kafka partition), and the `X-*` headers of
    /// [`Envelope::headers`](crate::Envelope::headers). Fails like
    /// [`Envelope::to_bytes`](crate::Envelope::to_bytes).
    pub fn from_envelope(envelope: &crate::Envelope) -> Result<Self, crate::Error> {
        Ok(Self {
            payload: envelope.to_bytes()?,
            key: Some(envelope.aggregate_id.clone().into()),
            headers: envelope.headers(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Envelope;

    #[test]
    fn an_envelope_is_published_keyed_by_its_aggregate_with_its_headers() {
        let envelope = Envelope::new("order-7", "OrderPlaced", 3, &serde_json::json!({"n": 1}))
            .expect("a valid envelope");
        let message = OutboundMessage::from_envelope(&envelope).expect("it encodes");
        assert_eq!(message.key.as_deref(), Some(&b"order-7"[..]));
        assert_eq!(message.headers, envelope.headers());
        assert_eq!(
            Envelope::from_bytes(&message.payload).expect("it decodes"),
            envelope
        );
    }
}
