//! Reading and removing stored dead letters (`eventbus dlq`): an ordered consumer over the
//! dead-letter subject up to where it ends when asked, and deletion from the stream.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamByNameErrorKind;
use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use eventbus_core::{DeliveryMeta, Error, Position, StoredDeadLetter};
use futures::StreamExt;

use crate::receipt::take_apart;

fn read_error(topic: &str, error: impl std::fmt::Display) -> Error {
    Error::Broker {
        message: format!("cannot read the dead letters of {topic}: {error}"),
        source: None,
    }
}

/// How long reading a dead-letter topic to its end may take.
const READ_LIMIT: Duration = Duration::from_secs(120);

/// The dead letters `topic` holds now (up to the stream's last message when called), oldest
/// first; none when no stream holds `topic`.
///
/// # Cancel safety
///
/// Cancel safe: the ordered consumer it reads with is ephemeral and goes away with the server's
/// inactivity timeout; nothing is acknowledged.
pub(crate) async fn read(
    js: &jetstream::Context,
    topic: &str,
) -> Result<Vec<StoredDeadLetter>, Error> {
    tokio::time::timeout(READ_LIMIT, read_to_end(js, topic))
        .await
        .map_err(|_| Error::Timeout {
            operation: "reading a dead-letter topic to its end",
            after: READ_LIMIT,
        })?
}

async fn read_to_end(js: &jetstream::Context, topic: &str) -> Result<Vec<StoredDeadLetter>, Error> {
    let name = match js.stream_by_subject(topic).await {
        Ok(name) => name,
        Err(error) if matches!(error.kind(), GetStreamByNameErrorKind::NotFound) => {
            return Ok(Vec::new());
        }
        Err(error) => return Err(read_error(topic, error)),
    };
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|error| read_error(topic, error))?;
    // What was stored when asked: later dead letters are for the next call.
    let end = stream
        .info()
        .await
        .map_err(|error| read_error(topic, error))?
        .state
        .last_sequence;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: topic.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..OrderedConfig::default()
        })
        .await
        .map_err(|error| read_error(topic, error))?;
    let mut letters = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(letters);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|error| read_error(topic, error))?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|error| read_error(topic, error))?;
        let info = message.info().map_err(|error| read_error(topic, error))?;
        let (sequence, pending, published) = (info.stream_sequence, info.pending, info.published);
        if sequence > end {
            break;
        }
        let meta = DeliveryMeta {
            position: Position::Sequence(sequence),
            delivery_attempt: 1,
            timestamp: Some(published),
        };
        let (message, _) = take_apart(message.split().0, true, meta);
        letters.push(StoredDeadLetter { message });
        if pending == 0 || sequence >= end {
            break;
        }
    }
    Ok(letters)
}

/// Deletes the dead letter at `position` (a stream sequence) of `topic` from the stream that
/// holds the topic. A dead letter deleted already (by another subscription's copy, or an
/// earlier attempt whose answer was lost) is no error.
pub(crate) async fn remove(
    js: &jetstream::Context,
    topic: &str,
    position: Position,
) -> Result<(), Error> {
    let Position::Sequence(sequence) = position else {
        return Err(Error::config(
            "position",
            "a NATS dead letter is removed by its stream sequence",
        ));
    };
    let name = js
        .stream_by_subject(topic)
        .await
        .map_err(|error| Error::broker(format!("no stream holds {topic}"), error))?;
    let stream = js
        .get_stream_no_info(&name)
        .await
        .map_err(|error| Error::broker(format!("cannot read stream {name}"), error))?;
    let gone = |error: &async_nats::jetstream::stream::DeleteMessageError| {
        matches!(
            error.kind(),
            async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(error) if is_gone(&error)
        )
    };
    match stream.delete_message(sequence).await {
        // `false`: nothing was deleted, as for a sequence holding nothing.
        Ok(_) => Ok(()),
        Err(error) if gone(&error) => Ok(()),
        Err(error) => Err(Error::broker(
            format!("cannot delete dead letter {sequence} from stream {name}"),
            error,
        )),
    }
}

/// Whether a JetStream error says the message is not in the stream (any more): "no message
/// found", "sequence not found" (a sequence deleted already, or below the stream's first), a
/// sequence past the stream's last ("stream store EOF").
fn is_gone(error: &async_nats::jetstream::Error) -> bool {
    use async_nats::jetstream::ErrorCode;
    let code = error.error_code();
    code == ErrorCode::NO_MESSAGE_FOUND
        || code == ErrorCode::SEQUENCE_NOT_FOUND
        || ((code == ErrorCode::STREAM_MESSAGE_DELETE_FAILED) && {
            let text = error.to_string();
            text.contains("no message found")
                || text.contains("not found")
                || text.contains("store EOF")
        })
}

/// The dead letter at `position` (a stream sequence) of `topic`; `None` when the stream holds
/// no message there, or one of another subject (a stream shared with other topics).
pub(crate) async fn read_at(
    js: &jetstream::Context,
    topic: &str,
    position: Position,
) -> Result<Option<StoredDeadLetter>, Error> {
    let Position::Sequence(sequence) = position else {
        return Err(Error::config(
            "position",
            "a NATS dead letter sits at a stream sequence",
        ));
    };
    let name = match js.stream_by_subject(topic).await {
        Ok(name) => name,
        Err(error) if matches!(error.kind(), GetStreamByNameErrorKind::NotFound) => {
            return Ok(None);
        }
        Err(error) => return Err(read_error(topic, error)),
    };
    let stream = js
        .get_stream_no_info(&name)
        .await
        .map_err(|error| read_error(topic, error))?;
    let stored = match stream.get_raw_message(sequence).await {
        Ok(stored) => stored,
        Err(error) => {
            let gone = match error.kind() {
                async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => true,
                async_nats::jetstream::stream::LastRawMessageErrorKind::JetStream(error) => {
                    is_gone(&error)
                }
                _ => false,
            };
            return if gone {
                Ok(None)
            } else {
                Err(read_error(topic, error))
            };
        }
    };
    if stored.subject.as_str() != topic {
        return Ok(None);
    }
    let message = async_nats::Message {
        subject: stored.subject,
        reply: None,
        payload: stored.payload,
        headers: Some(stored.headers),
        status: None,
        description: None,
        length: 0,
    };
    let meta = DeliveryMeta {
        position,
        delivery_attempt: 1,
        timestamp: None,
    };
    let (message, _) = take_apart(message, true, meta);
    Ok(Some(StoredDeadLetter { message }))
}
