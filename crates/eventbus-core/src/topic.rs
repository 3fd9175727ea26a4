//! Topic names valid on both Kafka and NATS.

use crate::error::Error;

/// The longest valid topic name, in characters (Kafka's limit).
pub const MAX_TOPIC_LEN: usize = 249;

/// The suffix of the default dead-letter topic: `{topic}.DLQ`.
pub const DEAD_LETTER_SUFFIX: &str = ".DLQ";

/// Why a topic name is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] characters.
    #[error("topic name is {len} characters long (max 249)")]
    TooLong {
        /// The length in characters.
        len: usize,
    },
    /// A character outside `[A-Za-z0-9._-]`.
    #[error("topic name contains invalid character {} at byte {position}", character.escape_debug())]
    InvalidCharacter {
        /// The first offending character.
        character: char,
        /// Its byte position.
        position: usize,
    },
    /// An empty `.`-separated token (a leading, trailing or doubled `.`; also `.` and `..`).
    #[error("topic name has an empty '.'-separated token at byte {position}")]
    EmptyToken {
        /// The byte position where the empty token starts.
        position: usize,
    },
}

/// Checks that `topic` is valid on both brokers: 1 to 249 characters of `[A-Za-z0-9._-]`,
/// and no empty `.`-separated token (so neither `.` nor `..`, no leading, trailing or doubled dot).
///
/// ```
/// use eventbus_core::{validate_topic, ErrorKind};
///
/// assert!(validate_topic("orders.created").is_ok());
/// assert_eq!(validate_topic("orders..created").unwrap_err().kind(), ErrorKind::InvalidTopic);
/// assert!(validate_topic("orders.*").is_err());
/// ```
pub fn validate_topic(topic: &str) -> Result<(), Error> {
    check(topic).map_err(|reason| Error::InvalidTopic {
        topic: topic.to_owned(),
        reason,
    })
}

fn check(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    let len = topic.chars().count();
    if len > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len });
    }
    if let Some((position, character)) = topic
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(TopicError::InvalidCharacter {
            character,
            position,
        });
    }
    let mut position = 0;
    for token in topic.split('.') {
        if token.is_empty() {
            return Err(TopicError::EmptyToken { position });
        }
        position += token.len() + 1;
    }
    Ok(())
}

/// The default dead-letter topic of `topic`: `{topic}.DLQ`, checked to be a valid topic.
///
/// ```
/// assert_eq!(eventbus_core::dead_letter_topic("orders")?, "orders.DLQ");
/// # Ok::<(), eventbus_core::Error>(())
/// ```
pub fn dead_letter_topic(topic: &str) -> Result<String, Error> {
    validate_topic(topic)?;
    let dead_letter = format!("{topic}{DEAD_LETTER_SUFFIX}");
    validate_topic(&dead_letter)?;
    Ok(dead_letter)
}
