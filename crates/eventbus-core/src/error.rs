//! The crate's error type.

use std::time::Duration;

use crate::aggregate_id::AggregateIdError;
use crate::envelope::EnvelopeError;
use crate::topic::TopicError;

/// A boxed error that can cross threads: the cause carried by broker and handler errors.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error of every fallible operation of the SDK's core types and of [`EventBus`](crate::EventBus).
///
/// Match on [`Error::kind`] to decide what to do; the variants carry the details.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Envelope bytes could not be decoded, or an envelope failed validation.
    #[error("invalid envelope: {0}")]
    InvalidEnvelope(#[from] EnvelopeError),
    /// Bytes are not a health-check heartbeat that counts.
    #[error(transparent)]
    InvalidHeartbeat(#[from] crate::heartbeat::HeartbeatError),
    /// A string is not a valid aggregate ID.
    #[error("invalid aggregate_id: {0}")]
    InvalidAggregateId(#[from] AggregateIdError),
    /// A topic name is not valid on every broker.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The rejected topic name.
        topic: String,
        /// Why it was rejected.
        reason: TopicError,
    },
    /// A payload value could not be serialized to JSON.
    #[error("failed to encode payload: {0}")]
    EncodePayload(#[source] serde_json::Error),
    /// A payload could not be deserialized into the requested type.
    #[error("failed to decode payload: {0}")]
    DecodePayload(#[source] serde_json::Error),
    /// The bus (or the component asked) is closed.
    #[error("the event bus is closed")]
    Closed,
    /// A bounded queue is full and the caller asked not to wait.
    #[error("{what} is full")]
    Full {
        /// What is full (for example `lane` or `pool`).
        what: &'static str,
    },
    /// An operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// The operation that timed out.
        operation: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The broker or its client library reported an error.
    #[error("broker error: {message}")]
    Broker {
        /// What failed.
        message: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused this client's credentials (a wrong password, token or key), or TLS
    /// could not be set up (the broker's certificate is not trusted, the broker wants a client
    /// certificate and got none or one it does not trust). Trying again does not help: the
    /// configuration or the broker's security settings must change.
    #[error("refused by the broker's security: {message}")]
    Security {
        /// What was refused, and the broker's or the client library's reason.
        message: String,
        /// The client library's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend does not offer this operation (the memory backend keeps no dead letters to
    /// list, for example). Trying again does not help; another backend might.
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        /// What was asked (`dead_letters`, `ensure_topic`, ...).
        operation: &'static str,
        /// The backend asked (`memory`, `nats`, `kafka`).
        backend: &'static str,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The offending field, as written in the configuration (`pool.pool_size`).
        field: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// What kind of error an [`Error`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`Error::InvalidEnvelope`].
    InvalidEnvelope,
    /// See [`Error::InvalidAggregateId`].
    InvalidAggregateId,
    /// See [`Error::InvalidHeartbeat`].
    InvalidHeartbeat,
    /// See [`Error::InvalidTopic`].
    InvalidTopic,
    /// See [`Error::EncodePayload`] and [`Error::DecodePayload`].
    InvalidPayload,
    /// See [`Error::Closed`].
    Closed,
    /// See [`Error::Full`].
    Full,
    /// See [`Error::Timeout`].
    Timeout,
    /// See [`Error::Broker`].
    Broker,
    /// See [`Error::Security`].
    Security,
    /// See [`Error::Config`].
    Config,
    /// See [`Error::Unsupported`].
    Unsupported,
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidEnvelope(_) => ErrorKind::InvalidEnvelope,
            Error::InvalidAggregateId(_) => ErrorKind::InvalidAggregateId,
            Error::InvalidHeartbeat(_) => ErrorKind::InvalidHeartbeat,
            Error::InvalidTopic { .. } => ErrorKind::InvalidTopic,
            Error::EncodePayload(_) | Error::DecodePayload(_) => ErrorKind::InvalidPayload,
            Error::Closed => ErrorKind::Closed,
            Error::Full { .. } => ErrorKind::Full,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Broker { .. } => ErrorKind::Broker,
            Error::Security { .. } => ErrorKind::Security,
            Error::Config { .. } => ErrorKind::Config,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
        }
    }

    /// This error with every cause behind it, for a log line or a message to a person:
    /// `broker error: cannot publish to orders: publish failed: JetStream error 503 …`. The
    /// error's own [`Display`](std::fmt::Display) shows only its outermost message (the causes
    /// are its [`source`](std::error::Error::source) chain, for error reporters that walk it);
    /// this shows them all on one line, with line breaks and control characters in them
    /// escaped.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }

    /// A broker error with a message and the client library's error.
    pub fn broker(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Broker {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A configuration error for `field`.
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// An [`Error`] with its causes, on one line: see [`Error::report`].
#[derive(Debug, Clone, Copy)]
pub struct Report<'a>(&'a Error);

impl std::fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self.0);
        let mut first = true;
        let mut last = String::new();
        while let Some(error) = cause {
            let text = error.to_string();
            // A library that puts its source's text at the end of its own message too
            // (`cannot connect: refused`, then `refused`) is not repeated.
            if last != text && !last.ends_with(&format!(": {text}")) {
                if !first {
                    f.write_str(": ")?;
                }
                for c in text.chars() {
                    if c.is_control() {
                        write!(f, "{}", c.escape_default())?;
                    } else {
                        write!(f, "{c}")?;
                    }
                }
                first = false;
            }
            last = text;
            cause = error.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_shows_every_cause_on_one_line() {
        let io = std::io::Error::other("connection reset\nby peer");
        let error = Error::broker("cannot publish to orders", io);
        assert_eq!(error.to_string(), "broker error: cannot publish to orders");
        assert_eq!(
            error.report().to_string(),
            "broker error: cannot publish to orders: connection reset\\nby peer"
        );
        assert_eq!(
            Error::Closed.report().to_string(),
            Error::Closed.to_string()
        );
    }

    #[test]
    fn every_variant_reports_its_kind() {
        let cases = [
            (
                Error::from(EnvelopeError::Required { field: "event_id" }),
                ErrorKind::InvalidEnvelope,
            ),
            (
                Error::from(AggregateIdError::Empty),
                ErrorKind::InvalidAggregateId,
            ),
            (
                Error::InvalidTopic {
                    topic: String::new(),
                    reason: TopicError::Empty,
                },
                ErrorKind::InvalidTopic,
            ),
            (
                Error::DecodePayload(serde_json::from_str::<u8>("x").unwrap_err()),
                ErrorKind::InvalidPayload,
            ),
            (
                Error::EncodePayload(serde_json::from_str::<u8>("x").unwrap_err()),
                ErrorKind::InvalidPayload,
            ),
            (Error::Closed, ErrorKind::Closed),
            (Error::Full { what: "lane" }, ErrorKind::Full),
            (
                Error::Timeout {
                    operation: "publish",
                    after: Duration::from_secs(1),
                },
                ErrorKind::Timeout,
            ),
            (Error::broker("connect", "refused"), ErrorKind::Broker),
            (
                Error::config("pool.pool_size", "must be > 0"),
                ErrorKind::Config,
            ),
            (
                Error::Unsupported {
                    operation: "dead_letters",
                    backend: "memory",
                },
                ErrorKind::Unsupported,
            ),
        ];
        for (error, kind) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn messages_name_the_problem() {
        assert_eq!(
            Error::config("pool.pool_size", "must be > 0").to_string(),
            "invalid configuration: pool.pool_size: must be > 0"
        );
        assert_eq!(
            Error::Unsupported {
                operation: "dead_letters",
                backend: "memory"
            }
            .to_string(),
            "dead_letters is not supported by the memory backend"
        );
        assert_eq!(
            Error::from(AggregateIdError::Empty).to_string(),
            "invalid aggregate_id: aggregate_id cannot be empty"
        );
    }
}
