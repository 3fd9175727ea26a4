//! Dead-letter messages: what a failed message becomes on its dead-letter topic.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::error::Error;
use crate::headers::header_value;
use crate::message::{Message, OutboundMessage, Position};
use crate::timestamp;

/// Header: the topic the message was consumed from.
pub const HEADER_ORIGINAL_TOPIC: &str = "X-Original-Topic";
/// Header: why the message was dead-lettered (the last error or panic, or the decode error).
pub const HEADER_ERROR_MESSAGE: &str = "X-Error-Message";
/// Header: how many handler attempts were made (0 for an undecodable envelope).
pub const HEADER_FAILED_ATTEMPTS: &str = "X-Failed-Attempts";
/// Header: when the message was dead-lettered (RFC 3339, UTC).
pub const HEADER_DEAD_LETTERED_AT: &str = "X-Dead-Lettered-At";
/// Header: the Kafka partition the message came from.
pub const HEADER_ORIGINAL_PARTITION: &str = "X-Original-Partition";
/// Header: the Kafka offset the message came from.
pub const HEADER_ORIGINAL_OFFSET: &str = "X-Original-Offset";
/// Header: the stream sequence (NATS JetStream, memory) the message came from.
pub const HEADER_ORIGINAL_STREAM_SEQUENCE: &str = "X-Original-Stream-Sequence";

/// The message to write to the dead-letter topic for `message`: its payload, key and headers
/// byte for byte, plus the `X-Original-*`, `X-Error-Message`, `X-Failed-Attempts` and
/// `X-Dead-Lettered-At` headers (earlier values of those headers are replaced). The error text
/// goes through [`header_value`](crate::header_value): line breaks and control characters
/// escaped, at most 4 KiB.
///
/// ```
/// use eventbus_core::{dead_letter_message, Message, Position};
///
/// let mut message = Message::new("orders", &b"{}"[..]);
/// message.meta.position = Position::Sequence(42);
/// let dead = dead_letter_message(&message, "database down", 3);
/// assert_eq!(dead.payload, message.payload);
/// assert_eq!(dead.headers.get_str("X-Original-Topic"), Some("orders"));
/// assert_eq!(dead.headers.get_str("X-Failed-Attempts"), Some("3"));
/// assert_eq!(dead.headers.get_str("X-Original-Stream-Sequence"), Some("42"));
/// ```
pub fn dead_letter_message(message: &Message, error: &str, attempts: u32) -> OutboundMessage {
    let mut headers = message.headers.clone();
    headers.insert(HEADER_ORIGINAL_TOPIC, message.topic.clone());
    headers.insert(HEADER_ERROR_MESSAGE, header_value(error));
    headers.insert(HEADER_FAILED_ATTEMPTS, attempts.to_string());
    let now = timestamp::format(&OffsetDateTime::now_utc())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned());
    headers.insert(HEADER_DEAD_LETTERED_AT, now);
    match message.meta.position {
        Position::Partition { partition, offset } => {
            headers.insert(HEADER_ORIGINAL_PARTITION, partition.to_string());
            headers.insert(HEADER_ORIGINAL_OFFSET, offset.to_string());
        }
        Position::Sequence(sequence) => {
            headers.insert(HEADER_ORIGINAL_STREAM_SEQUENCE, sequence.to_string());
        }
        Position::Unknown => {}
    }
    OutboundMessage {
        payload: message.payload.clone(),
        key: message.key.clone(),
        headers,
    }
}

/// Header: the event was not handled but parked behind an earlier dead letter of its aggregate
/// (`SubscribeOptions::with_park_on_dead_letter`).
pub const HEADER_PARKED: &str = "X-Parked";
/// Header: the message is a replay of a dead letter (`eventbus dlq replay`).
pub const HEADER_REPLAYED: &str = "X-Replayed";
/// Header: the first replayed message of its aggregate in one replay: a parking subscription
/// lets the aggregate's replayed messages through from here.
pub const HEADER_REPLAY_HEAD: &str = "X-Replay-Head";
/// Header: the last replayed message of its aggregate in one replay: once it is handled, a
/// parking subscription handles the aggregate's new events again.
pub const HEADER_REPLAY_LAST: &str = "X-Replay-Last";

/// Header: on a replayed message, the dead letter it is a copy of, as
/// `{dead-letter topic}@{position}` (`orders.DLQ@17`, `orders.DLQ@2/35`): once a subscription
/// has handled the copy (or dead-lettered it again), it removes that dead letter, so the dead
/// letter stays, and keeps a parking subscription that starts meanwhile parked, until then.
pub const HEADER_REPLAY_OF: &str = "X-Replay-Of";

/// The dead letter a replayed message is a copy of, from its [`HEADER_REPLAY_OF`]: the
/// dead-letter topic and the position there. `None` without the header, or with one that
/// does not read.
pub fn replayed_dead_letter(headers: &crate::Headers) -> Option<(&str, Position)> {
    let (topic, position) = headers.get_str(HEADER_REPLAY_OF)?.rsplit_once('@')?;
    crate::validate_topic(topic).ok()?;
    Some((topic, Position::parse(position)?))
}

/// Header: the subscription that wrote the dead letter (its durable or consumer group): only
/// that subscription removes it once it has handled its replayed copy.
pub const HEADER_DEAD_LETTERED_BY: &str = "X-Dead-Lettered-By";

/// The headers a dead letter adds to the original message, and those of an earlier replay:
/// what a replay removes.
pub const DEAD_LETTER_HEADERS: [&str; 13] = [
    HEADER_ORIGINAL_TOPIC,
    HEADER_ERROR_MESSAGE,
    HEADER_FAILED_ATTEMPTS,
    HEADER_DEAD_LETTERED_AT,
    HEADER_ORIGINAL_PARTITION,
    HEADER_ORIGINAL_OFFSET,
    HEADER_ORIGINAL_STREAM_SEQUENCE,
    HEADER_PARKED,
    HEADER_REPLAYED,
    HEADER_REPLAY_HEAD,
    HEADER_REPLAY_LAST,
    HEADER_REPLAY_OF,
    HEADER_DEAD_LETTERED_BY,
];

/// Reading and removing the dead letters a broker keeps: what `eventbus dlq list`, `replay`
/// and `drop` use, and what a parking subscription reads when it starts.
///
/// A capability of its own, beside [`EventBus`](crate::EventBus): the NATS and Kafka backends
/// keep dead letters on their dead-letter topics; the memory backend hands them to the
/// dead-letter topic's subscribers and keeps none, so it answers every call with
/// [`Error::Unsupported`].
#[async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// The dead letters `dead_letter_topic` holds now, oldest first. Reads the topic from its
    /// start to where it ends when called, without taking anything from the bus's
    /// subscriptions.
    async fn dead_letters(&self, dead_letter_topic: &str) -> Result<Vec<StoredDeadLetter>, Error>;

    /// The dead letter at `position` of `dead_letter_topic`, or `None` when there is none there
    /// (removed already, or another message of a shared stream sits at that position).
    async fn dead_letter_at(
        &self,
        dead_letter_topic: &str,
        position: Position,
    ) -> Result<Option<StoredDeadLetter>, Error>;

    /// Removes a dead letter: it is no longer listed. NATS deletes it from its stream; Kafka,
    /// whose records cannot be deleted one by one, records its position in
    /// `{dead-letter topic}.replayed`. A replayed copy (`X-Replay-Of`) removes its dead letter
    /// by itself once a subscription has handled it; this is for dead letters dropped by hand.
    /// Idempotent: a dead letter removed already is no error.
    async fn remove_dead_letter(&self, letter: &StoredDeadLetter) -> Result<(), Error>;
}

/// A dead letter as its dead-letter topic holds it: the message, with its place in that topic
/// in `message.meta.position` (what [`DeadLetterStore::dead_letters`] returns).
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    /// The dead letter: its topic is the dead-letter topic.
    pub message: Message,
}

impl StoredDeadLetter {
    /// Where it sits in its dead-letter topic.
    pub fn position(&self) -> Position {
        self.message.meta.position
    }

    /// `X-Original-Topic`: where it was consumed from, and where a replay sends it.
    pub fn original_topic(&self) -> Option<&str> {
        self.message.headers.get_str(HEADER_ORIGINAL_TOPIC)
    }

    /// `X-Error-Message`: why it failed.
    pub fn reason(&self) -> Option<&str> {
        self.message.headers.get_str(HEADER_ERROR_MESSAGE)
    }

    /// True for an event parked behind an earlier dead letter of its aggregate (`X-Parked`).
    pub fn is_parked(&self) -> bool {
        self.message.headers.contains(HEADER_PARKED)
    }

    /// `X-Failed-Attempts`.
    pub fn attempts(&self) -> Option<u32> {
        self.message
            .headers
            .get_str(HEADER_FAILED_ATTEMPTS)
            .and_then(|attempts| attempts.parse().ok())
    }

    /// `X-Dead-Lettered-At`, parsed.
    pub fn dead_lettered_at(&self) -> Option<OffsetDateTime> {
        self.message
            .headers
            .get(HEADER_DEAD_LETTERED_AT)
            .and_then(|at| timestamp::parse(at).ok())
    }

    /// The envelope it holds, when its payload is one.
    pub fn envelope(&self) -> Option<crate::Envelope> {
        crate::Envelope::from_bytes(&self.message.payload).ok()
    }

    /// The aggregate it belongs to: the envelope's, or else the record key.
    pub fn aggregate_id(&self) -> Option<String> {
        self.envelope()
            .map(|envelope| envelope.aggregate_id)
            .or_else(|| {
                let key = self.message.key.as_ref()?;
                std::str::from_utf8(key).ok().map(str::to_owned)
            })
    }

    /// Whether this is the dead letter whose replayed copy subscription `subscription` of
    /// `topic` handled, with `payload`: it came from `topic`, holds the same bytes, and was
    /// written by that subscription (a dead letter that does not say who wrote it, from an
    /// older version or another SDK, is anyone's). What the runtime checks before it removes a
    /// dead letter an `X-Replay-Of` header names, so that a forged or stale header removes
    /// nothing else.
    pub fn is_dead_letter_of(&self, topic: &str, payload: &[u8], subscription: &str) -> bool {
        self.original_topic() == Some(topic)
            && self.message.payload.as_ref() == payload
            && self
                .message
                .headers
                .get_str(HEADER_DEAD_LETTERED_BY)
                .is_none_or(|by| by == subscription)
    }

    /// What a replay publishes, and where: the original key, payload and headers, without the
    /// dead-letter headers, marked [`HEADER_REPLAYED`] and, when the dead letter's position is
    /// known, [`HEADER_REPLAY_OF`] (the subscription that handles the copy removes the dead
    /// letter), to `X-Original-Topic`. Fails with `Config` (field `X-Original-Topic`) for a
    /// message that names no topic to go back to.
    pub fn replay(&self) -> Result<(String, OutboundMessage), crate::Error> {
        let topic = self
            .original_topic()
            .filter(|topic| crate::validate_topic(topic).is_ok())
            .ok_or_else(|| {
                crate::Error::config(
                    HEADER_ORIGINAL_TOPIC,
                    "the dead letter names no valid topic to go back to",
                )
            })?
            .to_owned();
        let mut headers = self.message.headers.clone();
        for name in DEAD_LETTER_HEADERS {
            headers.remove(name);
        }
        headers.insert(HEADER_REPLAYED, "true");
        if self.position() != Position::Unknown {
            headers.insert(
                HEADER_REPLAY_OF,
                format!("{}@{}", self.message.topic, self.position()),
            );
        }
        Ok((
            topic,
            OutboundMessage {
                payload: self.message.payload.clone(),
                key: self.message.key.clone(),
                headers,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_key_and_headers_are_kept_and_the_reason_added() {
        let mut message = Message::new("orders", &b"\xff raw"[..]);
        message.key = Some("order-1".into());
        message.headers.append("X-Trace", "t1");
        message.headers.append("X-Error-Message", "stale");
        message.meta.position = Position::Partition {
            partition: 3,
            offset: 99,
        };
        let dead = dead_letter_message(&message, "boom", 4);
        assert_eq!(dead.payload, message.payload);
        assert_eq!(dead.key, message.key);
        assert_eq!(dead.headers.get_str("X-Trace"), Some("t1"));
        assert_eq!(dead.headers.get_all("X-Error-Message").count(), 1);
        assert_eq!(dead.headers.get_str("X-Error-Message"), Some("boom"));
        assert_eq!(dead.headers.get_str("X-Failed-Attempts"), Some("4"));
        assert_eq!(dead.headers.get_str("X-Original-Partition"), Some("3"));
        assert_eq!(dead.headers.get_str("X-Original-Offset"), Some("99"));
        assert!(!dead.headers.contains("X-Original-Stream-Sequence"));
        let at = dead.headers.get_str("X-Dead-Lettered-At").unwrap();
        assert!(timestamp::parse(at.as_bytes()).is_ok(), "{at}");
    }

    #[test]
    fn a_replay_is_the_original_message_back_to_its_topic() {
        let mut message = Message::new("orders", &b"{}"[..]);
        message.key = Some("order-1".into());
        message.headers.append("X-Trace", "t1");
        message.meta.position = Position::Sequence(7);
        let written = dead_letter_message(&message, "boom", 2);
        let mut stored = Message::new("orders.DLQ", written.payload.clone());
        stored.key = written.key.clone();
        stored.headers = written.headers.clone();
        stored.meta.position = Position::Partition {
            partition: 2,
            offset: 35,
        };
        let letter = StoredDeadLetter { message: stored };
        assert_eq!(letter.reason(), Some("boom"));
        assert_eq!(letter.attempts(), Some(2));
        assert!(letter.dead_lettered_at().is_some());
        assert_eq!(letter.aggregate_id().as_deref(), Some("order-1"));
        let (topic, replay) = letter.replay().unwrap();
        assert_eq!(topic, "orders");
        assert_eq!(replay.key, message.key);
        assert_eq!(replay.payload, message.payload);
        let mut marked = message.headers.clone();
        marked.insert(HEADER_REPLAYED, "true");
        marked.insert(HEADER_REPLAY_OF, "orders.DLQ@2/35");
        assert_eq!(replay.headers, marked, "the original headers, marked");
        assert_eq!(
            replayed_dead_letter(&replay.headers),
            Some((
                "orders.DLQ",
                Position::Partition {
                    partition: 2,
                    offset: 35
                }
            ))
        );
        let mut orphan = letter.clone();
        orphan.message.headers.remove(HEADER_ORIGINAL_TOPIC);
        assert_eq!(
            orphan.replay().unwrap_err().kind(),
            crate::ErrorKind::Config
        );
    }

    #[test]
    fn replay_of_headers_that_do_not_read_name_no_dead_letter() {
        for value in [
            "",
            "orders.DLQ",
            "orders.DLQ@",
            "@17",
            "orders.DLQ@x/1",
            "a b@1",
            "t@-",
        ] {
            let mut headers = crate::Headers::new();
            headers.insert(HEADER_REPLAY_OF, value);
            assert_eq!(replayed_dead_letter(&headers), None, "{value:?}");
        }
        let mut headers = crate::Headers::new();
        headers.insert(HEADER_REPLAY_OF, "a@b.DLQ@17");
        assert_eq!(
            replayed_dead_letter(&headers),
            None,
            "a topic cannot hold @"
        );
    }

    #[test]
    fn positions_read_back_what_they_print() {
        for position in [
            Position::Sequence(17),
            Position::Partition {
                partition: 2,
                offset: 35,
            },
        ] {
            assert_eq!(Position::parse(&position.to_string()), Some(position));
        }
        assert_eq!(Position::parse(&Position::Unknown.to_string()), None);
    }

    #[test]
    fn a_multi_line_error_is_one_escaped_line() {
        let message = Message::new("orders", &b"{}"[..]);
        let reason = "assertion `left == right` failed\n  left: 1\n right: 2\r\0";
        let dead = dead_letter_message(&message, reason, 1);
        let written = dead.headers.get_str("X-Error-Message").unwrap();
        assert_eq!(
            written,
            "assertion `left == right` failed\\n  left: 1\\n right: 2\\r\\u0000"
        );
        assert!(!written.chars().any(|c| c.is_control()));
        let long = "x".repeat(10_000);
        let dead = dead_letter_message(&message, &long, 1);
        let written = dead.headers.get_str("X-Error-Message").unwrap();
        assert!(written.len() <= crate::MAX_HEADER_VALUE && written.ends_with('…'));
    }
}
