//! The Go SDK's health-check heartbeat, on the wire: the JSON message its services publish to a
//! shared topic every couple of minutes, and the checks its subscriber applies before a message
//! counts. Services on this SDK publish and read the same messages, so a fleet of Go and Rust
//! services keeps one health view.
//!
//! ```
//! use eventbus_core::{Heartbeat, OffsetDateTime};
//!
//! let beat = Heartbeat::new("billing", "nats");
//! let bytes = beat.to_bytes()?;
//! let read = Heartbeat::from_bytes(&bytes, OffsetDateTime::now_utc())?;
//! assert_eq!(read.source, "billing");
//! assert_eq!(read.event_bus_type, "nats");
//! # Ok::<(), eventbus_core::Error>(())
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::Error;
use crate::timestamp;

/// The Go SDK's default health-check topic (`DefaultHealthCheckTopic`).
pub const HEARTBEAT_TOPIC: &str = "jxt-core-health-check";

/// A heartbeat older than this is refused (the Go SDK's `DefaultBacklogTimeThreshold`).
pub const HEARTBEAT_MAX_AGE: Duration = Duration::from_secs(5 * 60);

/// The bus types a heartbeat may name.
const BUS_TYPES: [&str; 3] = ["kafka", "nats", "memory"];

/// One health-check message, field for field the Go SDK's
/// (`{messageId, timestamp, source, eventBusType, version, metadata}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Heartbeat {
    /// `hc-{unix nanoseconds}-{16 hex digits}`.
    pub message_id: String,
    /// When it was sent.
    #[serde(with = "go_time")]
    pub timestamp: OffsetDateTime,
    /// The service that sent it.
    pub source: String,
    /// `kafka`, `nats` or `memory`.
    pub event_bus_type: String,
    /// The message format's version, `2.0.0`.
    pub version: String,
    /// `checkType` (`periodic`) and `instanceId` (`{source}-{unix seconds}`).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Heartbeat {
    /// A periodic heartbeat from `source` on a bus of `event_bus_type`, sent now.
    pub fn new(source: impl Into<String>, event_bus_type: impl Into<String>) -> Self {
        let source = source.into();
        let now = OffsetDateTime::now_utc();
        // The low half of a UUID v7 is random (62 bits).
        let random = uuid::Uuid::now_v7().as_u64_pair().1;
        let metadata = BTreeMap::from([
            ("checkType".to_owned(), "periodic".to_owned()),
            (
                "instanceId".to_owned(),
                format!("{source}-{}", now.unix_timestamp()),
            ),
        ]);
        Self {
            message_id: format!("hc-{}-{random:016x}", now.unix_timestamp_nanos()),
            timestamp: now,
            source,
            event_bus_type: event_bus_type.into(),
            version: "2.0.0".to_owned(),
            metadata,
        }
    }

    /// The message as the Go SDK writes it.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(|error| HeartbeatError::Encode(error.to_string()).into())
    }

    /// Reads a heartbeat and applies the Go SDK's checks as of `now`: it decodes, the message
    /// ID, source and bus type are there, the bus type is `kafka`, `nats` or `memory`, and it is
    /// at most [`HEARTBEAT_MAX_AGE`] old.
    pub fn from_bytes(bytes: &[u8], now: OffsetDateTime) -> Result<Self, Error> {
        let beat: Heartbeat = serde_json::from_slice(bytes)
            .map_err(|error| HeartbeatError::Decode(error.to_string()))?;
        for (field, value) in [
            ("messageId", &beat.message_id),
            ("source", &beat.source),
            ("eventBusType", &beat.event_bus_type),
        ] {
            if value.trim().is_empty() {
                return Err(HeartbeatError::Missing(field).into());
            }
        }
        if !BUS_TYPES.contains(&beat.event_bus_type.as_str()) {
            return Err(HeartbeatError::UnknownBusType(beat.event_bus_type).into());
        }
        let age = now - beat.timestamp;
        if age > HEARTBEAT_MAX_AGE {
            return Err(HeartbeatError::TooOld {
                age_seconds: age.whole_seconds(),
            }
            .into());
        }
        Ok(beat)
    }
}

/// Why bytes are not a heartbeat that counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeartbeatError {
    /// Not the heartbeat JSON.
    #[error("not a health-check message: {0}")]
    Decode(String),
    /// A required field is empty or missing.
    #[error("health-check message without {0}")]
    Missing(&'static str),
    /// The bus type is not `kafka`, `nats` or `memory`.
    #[error("health-check message of unknown bus type {0:?}")]
    UnknownBusType(String),
    /// Older than [`HEARTBEAT_MAX_AGE`].
    #[error("health-check message {age_seconds} s old")]
    TooOld {
        /// Its age.
        age_seconds: i64,
    },
    /// Could not be written (a timestamp Go cannot write).
    #[error("health-check message cannot be written: {0}")]
    Encode(String),
}

/// Go's `time.Time` JSON form.
mod go_time {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub(super) fn serialize<S: Serializer>(
        value: &OffsetDateTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let text = super::timestamp::format(value).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::timestamp::parse(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_reads_back_as_written_with_the_go_field_names() {
        let beat = Heartbeat::new("billing", "kafka");
        let bytes = beat.to_bytes().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        for field in [
            "messageId",
            "timestamp",
            "source",
            "eventBusType",
            "version",
            "metadata",
        ] {
            assert!(json.get(field).is_some(), "{field} missing: {json}");
        }
        assert_eq!(json["metadata"]["checkType"], "periodic");
        assert!(beat.message_id.starts_with("hc-"));
        assert_eq!(
            Heartbeat::from_bytes(&bytes, OffsetDateTime::now_utc()).unwrap(),
            beat
        );
    }

    #[test]
    fn stale_unknown_or_incomplete_heartbeats_are_refused_with_the_reason() {
        let now = OffsetDateTime::now_utc();
        let mut old = Heartbeat::new("billing", "nats");
        old.timestamp = now - time::Duration::minutes(6);
        let error = Heartbeat::from_bytes(&old.to_bytes().unwrap(), now).unwrap_err();
        assert!(error.to_string().contains("s old"), "{error}");
        let mut odd = Heartbeat::new("billing", "nats");
        odd.event_bus_type = "rabbit".into();
        let error = Heartbeat::from_bytes(&odd.to_bytes().unwrap(), now).unwrap_err();
        assert!(error.to_string().contains("rabbit"), "{error}");
        let mut nameless = Heartbeat::new("billing", "nats");
        nameless.source = " ".into();
        let error = Heartbeat::from_bytes(&nameless.to_bytes().unwrap(), now).unwrap_err();
        assert!(error.to_string().contains("source"), "{error}");
        for bad in [&b""[..], b"{", b"[]", b"{\"messageId\":1}", b"\xff\xfe"] {
            let error = Heartbeat::from_bytes(bad, now).unwrap_err();
            assert_eq!(error.kind(), crate::ErrorKind::InvalidHeartbeat, "{bad:?}");
        }
    }
}
