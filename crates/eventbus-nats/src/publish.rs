//! Publishing: JetStream publishes that wait for the PubAck, core NATS for ephemeral topics, and
//! dead letters for the consume runtime.

use std::borrow::Cow;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue};
use async_trait::async_trait;
use eventbus_core::{DeadLetterStore, Error, OutboundMessage, Position};
use eventbus_pool::transport::{AckFuture, DeadLetterWriter, Outgoing};

use crate::config::NatsConfig;
use crate::partition::{partition_of, partition_subject};
use crate::stats::Counters;
use crate::streams::{Kind, StreamSpec, Streams, stream_spec};

/// The header that carries an [`OutboundMessage::key`] on NATS (which has no record key); the
/// consumer side turns it back into [`eventbus_core::Message::key`].
pub const KEY_HEADER: &str = eventbus_core::HEADER_MESSAGE_KEY;

/// The connection and what publishing and consuming share: the client, JetStream, the
/// configuration, the streams and the counters.
pub(crate) struct Broker {
    pub(crate) client: Client,
    pub(crate) js: jetstream::Context,
    pub(crate) config: NatsConfig,
    pub(crate) streams: Streams,
    pub(crate) counters: Counters,
    /// The watches of the topics that take over from another durable.
    pub(crate) take_overs: crate::take_over::TakeOvers,
}

/// NATS headers from ours, plus the key header; a header NATS cannot carry is a typed error.
fn nats_headers(message: &OutboundMessage) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    let invalid = |name: &str, why: String| Error::Broker {
        message: format!("header {name:?} cannot be sent on NATS: {why}"),
        source: None,
    };
    for (name, value) in message.headers.iter() {
        let header =
            HeaderName::try_from(name).map_err(|error| invalid(name, error.to_string()))?;
        let text = std::str::from_utf8(value)
            .map_err(|_| invalid(name, "the value is not UTF-8".to_owned()))?;
        let value: HeaderValue =
            text.parse()
                .map_err(|error: async_nats::header::ParseHeaderValueError| {
                    invalid(name, error.to_string())
                })?;
        headers.append(header, value);
    }
    if let Some(key) = &message.key {
        let text = std::str::from_utf8(key)
            .map_err(|_| invalid(KEY_HEADER, "the key is not UTF-8".to_owned()))?;
        let value: HeaderValue =
            text.parse()
                .map_err(|error: async_nats::header::ParseHeaderValueError| {
                    invalid(KEY_HEADER, error.to_string())
                })?;
        headers.insert(KEY_HEADER, value);
    }
    Ok(headers)
}

impl Broker {
    /// Where a message of `topic` about `aggregate` goes: its partition's subject when the topic
    /// is partitioned and the aggregate is known, the topic itself otherwise.
    pub(crate) fn subject<'a>(&self, topic: &'a str, aggregate: Option<&str>) -> Cow<'a, str> {
        match (
            self.config
                .topics
                .get(topic)
                .and_then(|options| options.partitions),
            aggregate,
        ) {
            (Some(partitions), Some(aggregate)) => Cow::Owned(partition_subject(
                topic,
                partition_of(aggregate, partitions),
            )),
            _ => Cow::Borrowed(topic),
        }
    }

    /// Publishes to `topic` (a topic, or a partition's subject) and waits for the PubAck (none
    /// on an ephemeral topic). A stream that went away (a memory stream after a server restart)
    /// is found or made again, once.
    pub(crate) async fn publish_to(
        &self,
        topic: &str,
        message: OutboundMessage,
        message_id: Option<&str>,
        stream: StreamSpec,
    ) -> Result<(), Error> {
        match self
            .hand_over(topic, message.clone(), message_id, stream)
            .await?
            .await
        {
            Err(PublishFailure::StreamNotFound) => {
                self.streams.forget(topic).await;
                self.hand_over(topic, message, message_id, stream)
                    .await?
                    .await
            }
            other => other,
        }
        .map(|_| ())
        .map_err(|failure| failure.into_error(topic))
    }

    /// Starts a publish to `topic` (a topic, or a partition's subject): returns once the
    /// message is on the connection, with the future of its PubAck.
    ///
    /// Messages started one after the other from one bus go out on its one connection in that
    /// order, and the server stores them in the order it reads them: so one aggregate's
    /// messages keep their order in the stream while many are in flight. A message the stream
    /// does not hold (the stream was deleted) fails alone, and the next start makes sure the
    /// stream exists again.
    pub(crate) async fn start_publish_to(
        self: &Arc<Self>,
        topic: &str,
        message: OutboundMessage,
        message_id: Option<&str>,
        stream: StreamSpec,
    ) -> Result<AckFuture, Error> {
        let ack = self.hand_over(topic, message, message_id, stream).await?;
        let (broker, topic) = (self.clone(), topic.to_owned());
        Ok(Box::pin(async move {
            let failure = match ack.await {
                Ok(position) => return Ok(position),
                Err(failure) => failure,
            };
            if matches!(failure, PublishFailure::StreamNotFound) {
                broker.streams.forget(&topic).await;
            }
            Err(failure.into_error(&topic))
        }))
    }

    /// Hands `message` to the connection: core NATS for an ephemeral topic, which has no
    /// acknowledgement (its future is [`Position::Unknown`] at once), otherwise JetStream into
    /// the topic's stream (made if needed), its future the PubAck's stream sequence, waited for
    /// up to `publish_timeout`.
    async fn hand_over(
        &self,
        topic: &str,
        message: OutboundMessage,
        message_id: Option<&str>,
        stream: StreamSpec,
    ) -> Result<PendingAck, Error> {
        let headers = nats_headers(&message)?;
        if self.config.topic(topic).ephemeral {
            self.client
                .publish_with_headers(topic.to_owned(), headers, message.payload)
                .await
                .map_err(|error| Error::broker(format!("cannot publish to {topic}"), error))?;
            return Ok(Box::pin(std::future::ready(Ok(Position::Unknown))));
        }
        self.streams.ensure(&self.js, topic, stream).await?;
        let mut publish = PublishMessage::build()
            .payload(message.payload)
            .headers(headers);
        if let Some(id) = message_id {
            publish = publish.message_id(id);
        }
        let ack = self
            .js
            .send_publish(topic.to_owned(), publish)
            .await
            .map_err(|error| Error::broker(format!("cannot publish to {topic}"), error))?;
        let timeout = self.config.publish_timeout;
        let js = self.js.clone();
        let (subject, message_id) = (topic.to_owned(), message_id.map(str::to_owned));
        Ok(Box::pin(async move {
            let ack = match tokio::time::timeout(timeout, ack.into_future()).await {
                Err(_) => return Err(PublishFailure::Timeout(timeout)),
                Ok(Ok(ack)) => ack,
                Ok(Err(error)) if error.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(PublishFailure::StreamNotFound);
                }
                Ok(Err(error)) => return Err(PublishFailure::Broker(error)),
            };
            if ack.duplicate {
                // The rare path: the stream already held a message with this ID. It confirms
                // this publish only if it is this subject's copy of this message.
                let stored = tokio::time::timeout(
                    timeout,
                    stored_copy(
                        &js,
                        &ack.stream,
                        ack.sequence,
                        &subject,
                        message_id.as_deref(),
                    ),
                )
                .await
                .map_err(|_| PublishFailure::Timeout(timeout))?;
                stored.map_err(PublishFailure::Duplicate)?;
            }
            Ok(Position::Sequence(ack.sequence))
        }))
    }
}

/// The message stream `stream` stores at `sequence` is the one this publish sent: on
/// `subject`, with `message_id` as its `Nats-Msg-Id`. Answers why not otherwise.
async fn stored_copy(
    js: &jetstream::Context,
    stream: &str,
    sequence: u64,
    subject: &str,
    message_id: Option<&str>,
) -> Result<(), String> {
    let stream_handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|error| format!("cannot read stream {stream}: {error}"))?;
    let stored = stream_handle
        .get_raw_message(sequence)
        .await
        .map_err(|error| format!("cannot read message {sequence} of stream {stream}: {error}"))?;
    let stored_id = stored
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(HeaderValue::as_str);
    if stored.subject.as_str() == subject && stored_id == message_id {
        Ok(())
    } else {
        Err(format!(
            "stream {stream} dropped it as a duplicate of message {sequence}, which is on {} with \
             Nats-Msg-Id {stored_id:?}, not on {subject} with {message_id:?}",
            stored.subject
        ))
    }
}

/// The `Nats-Msg-Id` of an envelope published to `subject`: unique per (subject, event), so
/// the server drops a retried publish of one event to one subject, and never the same event
/// published to another subject of the same stream (JetStream de-duplicates per stream).
pub(crate) fn envelope_message_id(subject: &str, event_id: &str) -> String {
    format!("{subject}:{event_id}")
}

/// The PubAck of a message handed over, its failures still typed.
type PendingAck = Pin<Box<dyn Future<Output = Result<Position, PublishFailure>> + Send>>;

/// Why one JetStream publish failed.
enum PublishFailure {
    StreamNotFound,
    Timeout(Duration),
    Broker(jetstream::context::PublishError),
    /// The server answered with another message's PubAck (a duplicate ID): why it is not ours.
    Duplicate(String),
}

impl PublishFailure {
    fn into_error(self, topic: &str) -> Error {
        match self {
            // The server's "no responders": nothing stored the message.
            PublishFailure::StreamNotFound => Error::Broker {
                message: format!(
                    "not stored: no stream answered for {topic} (no stream holds it, or its \
                     stream has no leader now: a cluster node lost, a leader being elected)"
                ),
                source: None,
            },
            PublishFailure::Timeout(after) => Error::Timeout {
                operation: "publish (waiting for the PubAck)",
                after,
            },
            PublishFailure::Broker(error) => {
                Error::broker(format!("cannot publish to {topic}"), error)
            }
            PublishFailure::Duplicate(why) => Error::Broker {
                message: format!("not stored on {topic}: {why}"),
                source: None,
            },
        }
    }
}

/// Dead letters: JetStream publishes into a file stream, without the consumed message's `Nats-*`
/// control headers (a copied `Nats-Msg-Id` would make the server drop a second subscription's
/// dead letter as a duplicate; a copied `Nats-Expected-*` would make every write fail), with the
/// runtime's idempotency key as `Nats-Msg-Id`.
#[async_trait]
impl DeadLetterStore for Broker {
    async fn dead_letters(
        &self,
        topic: &str,
    ) -> Result<Vec<eventbus_core::StoredDeadLetter>, Error> {
        crate::dead_letters::read(&self.js, topic).await
    }

    async fn dead_letter_at(
        &self,
        topic: &str,
        position: Position,
    ) -> Result<Option<eventbus_core::StoredDeadLetter>, Error> {
        crate::dead_letters::read_at(&self.js, topic, position).await
    }

    async fn remove_dead_letter(
        &self,
        letter: &eventbus_core::StoredDeadLetter,
    ) -> Result<(), Error> {
        crate::dead_letters::remove(&self.js, &letter.message.topic, letter.position()).await
    }
}

#[async_trait]
impl DeadLetterWriter for Broker {
    fn store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    async fn publish_dead_letter(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        let (topic, mut letter) = (outgoing.topic, outgoing.message);
        let control: Vec<String> = letter
            .headers
            .iter()
            .map(|(name, _)| name)
            .filter(|name| is_control_header(name))
            .map(str::to_owned)
            .collect();
        for name in control {
            letter.headers.remove(&name);
        }
        let stream = stream_spec(&self.config, topic, Kind::DeadLetters);
        self.publish_to(topic, letter, outgoing.dedup_id, stream)
            .await
    }
}

/// True for the `Nats-*` headers that steer the server (`Nats-Msg-Id`, `Nats-Expected-*`, ...).
fn is_control_header(name: &str) -> bool {
    name.get(..5)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("nats-"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Storage;
    use eventbus_core::ErrorKind;

    #[test]
    fn headers_and_the_key_go_to_nats_headers() {
        let message = OutboundMessage::new(&b"x"[..])
            .with_key("order-7")
            .with_header("X-Trace", "a")
            .with_header("X-Trace", "b");
        let headers = nats_headers(&message).unwrap();
        assert_eq!(headers.get(KEY_HEADER).unwrap().as_str(), "order-7");
        let traces: Vec<&str> = headers
            .get_all("X-Trace")
            .map(HeaderValue::as_str)
            .collect();
        assert_eq!(traces, ["a", "b"]);
    }

    #[test]
    fn headers_nats_cannot_carry_are_typed_errors_not_panics() {
        let cases = [
            OutboundMessage::new(&b"x"[..]).with_header("Bad:Name", "v"),
            OutboundMessage::new(&b"x"[..]).with_header("With Space", "v"),
            OutboundMessage::new(&b"x"[..]).with_header("X-Line", "a\r\nInjected: 1"),
            OutboundMessage::new(&b"x"[..]).with_header("X-Bytes", &b"\xff\xfe"[..]),
            OutboundMessage::new(&b"x"[..]).with_key(&b"\xff"[..]),
            OutboundMessage::new(&b"x"[..]).with_key("two\nlines"),
        ];
        for message in cases {
            let error = nats_headers(&message).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::Broker, "{error}");
        }
    }

    #[test]
    fn only_nats_control_headers_are_control_headers() {
        for name in [
            "Nats-Msg-Id",
            "nats-expected-stream",
            "NATS-Expected-Last-Sequence",
        ] {
            assert!(is_control_header(name), "{name}");
        }
        for name in ["X-Event-ID", "Nats", "X-Nats-Msg-Id", "natsy", ""] {
            assert!(!is_control_header(name), "{name}");
        }
    }

    #[test]
    fn dead_letter_topics_and_envelopes_default_to_file_storage() {
        let config = NatsConfig::default();
        let storage = |topic, kind| stream_spec(&config, topic, kind).storage;
        assert_eq!(storage("orders", Kind::Envelopes), Storage::File);
        assert_eq!(storage("orders", Kind::Plain), Storage::Memory);
        assert_eq!(storage("orders.DLQ", Kind::Plain), Storage::File);
        assert_eq!(storage("orders.failed", Kind::DeadLetters), Storage::File);
        let limits = stream_spec(&config, "orders.failed", Kind::DeadLetters).limits;
        assert_eq!(
            limits.max_age, None,
            "dead letters do not expire by default"
        );
        assert!(
            stream_spec(&config, "orders", Kind::Envelopes)
                .limits
                .max_age
                .is_some()
        );
    }
}
