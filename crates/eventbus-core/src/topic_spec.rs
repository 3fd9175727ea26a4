//! Topics managed from code or a deploy pipeline: what a topic should be, and what
//! [`TopicAdmin::ensure_topic`](crate::TopicAdmin::ensure_topic) did about it.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Error;

/// Making topics what a [`TopicSpec`] says: what `eventbus topics ensure` and a deploy step use.
///
/// A capability of its own, beside [`EventBus`](crate::EventBus). The memory backend has
/// nothing to configure (every topic exists and matches) and reports an empty
/// [`TopicReport`].
#[async_trait]
pub trait TopicAdmin: Send + Sync {
    /// Makes `spec.name` what `spec` says, as far as `mode` allows, and reports what it did and
    /// how the topic still differs.
    async fn ensure_topic(&self, spec: &TopicSpec, mode: EnsureMode) -> Result<TopicReport, Error>;
}

/// Where a topic's messages are kept (NATS JetStream streams; Kafka always uses disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicStorage {
    /// On disk: survives a server restart.
    File,
    /// In memory: lost when the server restarts.
    Memory,
}

/// What a topic should be. Unset fields are left to the broker (or to what the topic has).
///
/// ```
/// use std::time::Duration;
/// use eventbus_core::TopicSpec;
///
/// let spec = TopicSpec::new("orders")
///     .with_partitions(12)
///     .with_replicas(3)
///     .with_retention(Duration::from_secs(7 * 24 * 3600));
/// assert_eq!(spec.partitions, Some(12));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicSpec {
    /// The topic.
    pub name: String,
    /// Kafka: the topic's partitions (can only grow). NATS: the stream holds one subject per
    /// partition; partitioning itself is `[nats.topics."t"] partitions`, so NATS validates the
    /// subjects but never changes it here.
    pub partitions: Option<u32>,
    /// Copies of the data: Kafka's replication factor (fixed at creation), NATS's stream
    /// replicas.
    pub replicas: Option<u16>,
    /// How long messages are kept: Kafka's `retention.ms`, NATS's stream `max_age`. `Some(ZERO)`
    /// keeps them for ever.
    pub retention: Option<Duration>,
    /// NATS: file or memory (fixed at creation). Kafka accepts only `File`.
    pub storage: Option<TopicStorage>,
}

impl TopicSpec {
    /// A spec that leaves everything to the broker.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            partitions: None,
            replicas: None,
            retention: None,
            storage: None,
        }
    }

    /// Sets the partitions.
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Sets the replicas.
    pub fn with_replicas(mut self, replicas: u16) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Sets the retention (`Duration::ZERO`: for ever).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Sets the storage.
    pub fn with_storage(mut self, storage: TopicStorage) -> Self {
        self.storage = Some(storage);
        self
    }
}

/// What [`TopicAdmin::ensure_topic`](crate::TopicAdmin::ensure_topic) may do (the Go SDK's
/// `ConfigureTopic` strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EnsureMode {
    /// Create the topic when it is missing; never change an existing one (its differences are
    /// reported).
    CreateOnly,
    /// Create it when missing, and change what can be changed on an existing one (Kafka:
    /// retention, and more partitions while the topic holds no records; NATS: retention,
    /// replicas); what cannot be changed is reported. Partitions are **not** added to a Kafka
    /// topic that holds records: that moves aggregates to other partitions, where their next
    /// events can be consumed before the ones still waiting in the old partition (reported as
    /// a mismatch that says so).
    CreateOrUpdate,
    /// As [`CreateOrUpdate`](Self::CreateOrUpdate), and adds partitions to a Kafka topic that
    /// holds records too: asked for explicitly, when the events of an aggregate published
    /// across the change may be consumed out of order (the consumers are drained first, say).
    CreateOrUpdateAllowingRepartition,
    /// Change nothing: report how the topic differs, a missing topic included.
    ValidateOnly,
}

impl EnsureMode {
    /// Whether an existing topic may be changed.
    pub fn updates(self) -> bool {
        matches!(
            self,
            EnsureMode::CreateOrUpdate | EnsureMode::CreateOrUpdateAllowingRepartition
        )
    }
}

/// One way a topic differs from its spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMismatch {
    /// The setting: `exists`, `partitions`, `replicas`, `retention`, `storage`.
    pub field: &'static str,
    /// What the spec asks for.
    pub wanted: String,
    /// What the topic has.
    pub actual: String,
}

impl TopicMismatch {
    /// Compares one setting: `Some(mismatch)` when the spec asks for something and the topic
    /// has something else.
    pub fn compare<T: PartialEq + fmt::Debug>(
        field: &'static str,
        wanted: Option<T>,
        actual: T,
    ) -> Option<Self> {
        let wanted = wanted?;
        (wanted != actual).then(|| Self {
            field,
            wanted: format!("{wanted:?}"),
            actual: format!("{actual:?}"),
        })
    }

    /// The mismatch of a topic that does not exist.
    pub fn missing() -> Self {
        Self {
            field: "exists",
            wanted: "yes".to_owned(),
            actual: "no".to_owned(),
        }
    }
}

impl fmt::Display for TopicMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: wanted {}, has {}",
            self.field, self.wanted, self.actual
        )
    }
}

/// What [`TopicAdmin::ensure_topic`](crate::TopicAdmin::ensure_topic) did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TopicReport {
    /// The topic did not exist and was created.
    pub created: bool,
    /// Settings changed to match the spec.
    pub updated: Vec<TopicMismatch>,
    /// Differences left as they are (validate-only, create-only, or not changeable).
    pub mismatches: Vec<TopicMismatch>,
}

impl TopicReport {
    /// True when the topic matches its spec now.
    pub fn matches(&self) -> bool {
        self.mismatches.is_empty()
    }
}

impl fmt::Display for TopicReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |items: &[TopicMismatch]| {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut parts = Vec::new();
        if self.created {
            parts.push("created".to_owned());
        }
        if !self.updated.is_empty() {
            parts.push(format!("updated ({})", list(&self.updated)));
        }
        if !self.mismatches.is_empty() {
            parts.push(format!("differs ({})", list(&self.mismatches)));
        }
        if parts.is_empty() {
            parts.push("as specified".to_owned());
        }
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_what_was_done_and_what_differs() {
        assert_eq!(TopicReport::default().to_string(), "as specified");
        let report = TopicReport {
            created: false,
            updated: vec![TopicMismatch::compare("partitions", Some(6), 3).unwrap()],
            mismatches: vec![TopicMismatch::compare("replicas", Some(3u16), 1).unwrap()],
        };
        assert_eq!(
            report.to_string(),
            "updated (partitions: wanted 6, has 3), differs (replicas: wanted 3, has 1)"
        );
        assert!(!report.matches());
        let created = TopicReport {
            created: true,
            updated: Vec::new(),
            mismatches: vec![TopicMismatch::missing()],
        };
        assert_eq!(
            created.to_string(),
            "created, differs (exists: wanted yes, has no)"
        );
        assert_eq!(TopicMismatch::compare("partitions", None, 3), None);
        assert_eq!(TopicMismatch::compare("partitions", Some(3), 3), None);
    }
}
