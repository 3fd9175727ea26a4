//! Streams: which stream holds a topic, created on first use.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use eventbus_core::Error;

use crate::config::{
    NatsConfig, Storage, StreamDefinition, StreamLimits, TopicOptions, partitioned,
};
use crate::names::{stream_name, subject_matches};
use crate::partition::subjects;

/// What a topic's messages are, for the stream made for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Plain,
    Envelopes,
    DeadLetters,
}

/// The stream a topic needs: its storage and limits, and whether it holds dead letters (which
/// must be stored on disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamSpec {
    pub(crate) storage: Storage,
    pub(crate) limits: StreamLimits,
    pub(crate) replicas: u16,
    pub(crate) dead_letters: bool,
}

/// The stream for `topic`: file storage for envelope and dead-letter topics, memory for plain
/// topics, unless the topic's options say otherwise; dead-letter topics (`kind`, or a name ending
/// in `.DLQ`) always on file, with the dead-letter limits (no age limit by default).
pub(crate) fn stream_spec(config: &NatsConfig, topic: &str, kind: Kind) -> StreamSpec {
    let dead_letters =
        kind == Kind::DeadLetters || topic.ends_with(eventbus_core::DEAD_LETTER_SUFFIX);
    if dead_letters {
        return StreamSpec {
            storage: Storage::File,
            limits: config.dead_letter_limits,
            replicas: config.replicas_of(topic),
            dead_letters,
        };
    }
    let default = if kind == Kind::Envelopes {
        Storage::File
    } else {
        Storage::Memory
    };
    StreamSpec {
        storage: config.topic(topic).storage.unwrap_or(default),
        limits: config.stream_limits,
        replicas: config.replicas_of(topic),
        dead_letters,
    }
}

/// Which stream holds each topic the bus has used, found or created once.
pub(crate) struct Streams {
    prefix: String,
    definitions: Vec<StreamDefinition>,
    /// The topics' options: which are partitioned.
    topics: std::collections::BTreeMap<String, TopicOptions>,
    /// The replicas of a declared stream made at connect that names none.
    replicas: u16,
    /// Where each topic lives, once found. Never held across an await.
    known: std::sync::Mutex<HashMap<String, String>>,
    /// The lookup of each topic in progress: one at a time per topic.
    flights: std::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

fn stream_config(
    name: String,
    subjects: Vec<String>,
    storage: Storage,
    limits: StreamLimits,
    replicas: u16,
) -> stream::Config {
    let to_i64 = |value: Option<u64>| value.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
    stream::Config {
        name,
        subjects,
        storage: match storage {
            Storage::File => stream::StorageType::File,
            Storage::Memory => stream::StorageType::Memory,
        },
        max_age: limits.max_age.unwrap_or(Duration::ZERO),
        max_bytes: to_i64(limits.max_bytes),
        max_messages: to_i64(limits.max_msgs),
        num_replicas: usize::from(replicas),
        ..stream::Config::default()
    }
}

/// Warns when the existing stream `name` keeps fewer replicas than the configuration asks for
/// (it is kept as it is: a stream is changed only on an explicit instruction).
fn warn_if_fewer_replicas(name: &str, existing: usize, wanted: u16) {
    if existing.max(1) < usize::from(wanted) {
        tracing::warn!(
            stream = name,
            replicas = existing.max(1),
            configured = wanted,
            "the stream has fewer replicas than configured and is kept as it is: `eventbus topics ensure` (or `update_limits` on a declared stream) changes it"
        );
    }
}

/// Warns when the dead-letter topic `topic` is stored in `stream` only through a wildcard of
/// `subjects`: a stream made for other topics (a Go service's `business.>`, say), whose wildcard
/// subscribers then get the dead letters as messages of their own.
fn warn_if_shared(topic: &str, stream: &str, subjects: &[String]) {
    if !subjects.iter().any(|subject| subject == topic) {
        tracing::warn!(
            dead_letter_topic = topic,
            stream,
            subjects = ?subjects,
            "dead letters go to a stream whose wildcard covers them: a subscriber of that wildcard receives them as messages; give the subscription a dead-letter topic outside it (SubscribeOptions::with_dead_letter)"
        );
    }
}

/// The error for dead letters that would land in a memory stream.
fn memory_dead_letters(topic: &str, stream: &str) -> Error {
    Error::config(
        "nats.streams",
        format!(
            "dead-letter topic {topic} is held by stream {stream}, which keeps messages in memory: \
             dead letters would be lost at the next server restart; give {topic} a file stream"
        ),
    )
}

/// Whether a stream lookup failed because the stream does not exist.
fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(error)
            if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// `existing` as binding `definition` leaves it: the definition's subjects it does not cover
/// added (none removed), its limits (and replicas, when the definition names them) set only with
/// `update_limits`; and what changed.
fn bound_config(
    definition: &StreamDefinition,
    mut existing: stream::Config,
) -> (stream::Config, Vec<String>) {
    let mut changes = Vec::new();
    let missing: Vec<String> = definition
        .subjects
        .iter()
        .filter(|subject| {
            !existing
                .subjects
                .iter()
                .any(|pattern| subject_matches(pattern, subject))
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        changes.push(format!("subjects {missing:?} added"));
        existing.subjects.extend(missing);
    }
    if definition.update_limits {
        let wanted = stream_config(
            definition.name.clone(),
            Vec::new(),
            definition.storage,
            definition.limits,
            definition.replicas.unwrap_or(1),
        );
        if let Some(replicas) = definition.replicas
            && existing.num_replicas.max(1) != usize::from(replicas)
        {
            changes.push(format!("replicas set to {replicas}"));
            existing.num_replicas = usize::from(replicas);
        }
        if (existing.max_age, existing.max_bytes, existing.max_messages)
            != (wanted.max_age, wanted.max_bytes, wanted.max_messages)
        {
            changes.push(format!(
                "limits set to max_age {:?}, max_bytes {}, max_messages {}",
                wanted.max_age, wanted.max_bytes, wanted.max_messages
            ));
            existing.max_age = wanted.max_age;
            existing.max_bytes = wanted.max_bytes;
            existing.max_messages = wanted.max_messages;
        }
    }
    (existing, changes)
}

impl Streams {
    pub(crate) fn new(config: &NatsConfig) -> Self {
        Self {
            prefix: config.stream_prefix.clone(),
            definitions: config.streams.clone(),
            topics: config.topics.clone(),
            replicas: config.replicas,
            known: std::sync::Mutex::new(HashMap::new()),
            flights: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Makes the configured streams that do not exist and binds those that do: an existing
    /// stream gets the configured subjects it does not cover yet and keeps everything else (its
    /// other subjects, limits, storage and replicas), unless the definition says
    /// `update_limits`, which sets its limits too.
    ///
    /// # Cancel safety
    ///
    /// Each stream is made or updated by one request: a dropped call leaves some streams ready
    /// and the others as they were, and the next call goes on from there.
    pub(crate) async fn create_configured(&self, js: &jetstream::Context) -> Result<(), Error> {
        for definition in &self.definitions {
            let name = &definition.name;
            let wanted = stream_config(
                name.clone(),
                definition.subjects.clone(),
                definition.storage,
                definition.limits,
                definition.replicas.unwrap_or(self.replicas),
            );
            let existing = match js.get_stream(name).await {
                Ok(stream) => Some(stream.cached_info().config.clone()),
                Err(error) if is_not_found(&error) => None,
                Err(error) => {
                    return Err(Error::broker(format!("cannot read stream {name}"), error));
                }
            };
            let Some(existing) = existing else {
                match js.create_stream(wanted).await {
                    Ok(_) => {
                        tracing::info!(stream = %name, subjects = ?definition.subjects, "stream created");
                        continue;
                    }
                    // Made meanwhile by another instance: bound below, as any existing stream.
                    Err(error) => match js.get_stream(name).await {
                        Ok(stream) => {
                            let existing = stream.cached_info().config.clone();
                            self.bind(js, definition, existing).await?;
                            continue;
                        }
                        Err(_) => {
                            return Err(Error::broker(
                                format!("cannot create stream {name}"),
                                error,
                            ));
                        }
                    },
                }
            };
            self.bind(js, definition, existing).await?;
        }
        Ok(())
    }

    /// Binds the existing stream whose configuration is `existing` to `definition`: adds the
    /// subjects it lacks, and the limits when the definition says `update_limits`; updates the
    /// stream only when that changes something.
    async fn bind(
        &self,
        js: &jetstream::Context,
        definition: &StreamDefinition,
        existing: stream::Config,
    ) -> Result<(), Error> {
        let name = &definition.name;
        // With `update_limits` and `replicas` the stream is raised below; otherwise it keeps
        // what it has, and fewer than configured is said.
        if !definition.update_limits || definition.replicas.is_none() {
            warn_if_fewer_replicas(
                name,
                existing.num_replicas,
                definition.replicas.unwrap_or(self.replicas),
            );
        }
        if bound_config(definition, existing).1.is_empty() {
            tracing::info!(stream = %name, "existing stream bound as it is");
            return Ok(());
        }
        let changes = change_stream(js, self.replicas, name, |config| {
            bound_config(definition, config)
        })
        .await?;
        tracing::info!(stream = %name, ?changes, "existing stream bound and extended");
        Ok(())
    }

    /// The stream that holds `topic`: a configured stream whose subjects cover it, a stream
    /// already on the server that covers it, or a new `{prefix}{topic}` stream made to `spec`.
    /// Dead letters are refused a stream kept in memory (someone's wildcard stream that covers
    /// the dead-letter topic): they would be lost with the next server restart. A partitioned
    /// topic's partitions (and the topic itself, for any of them) live in the stream of the bare
    /// topic, which gets the partitions' subjects it does not cover yet.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a dropped call leaves at most a created or updated stream that the next call
    /// finds, and lets the next waiting call of its topic look.
    pub(crate) async fn ensure(
        &self,
        js: &jetstream::Context,
        topic: &str,
        spec: StreamSpec,
    ) -> Result<String, Error> {
        if let Some(name) = self.known().get(topic) {
            return Ok(name.clone());
        }
        // One lookup per topic at a time (a partitioned topic's subjects share their topic's):
        // the others wait for it and read what it found, instead of asking the server all at
        // once (200 publishes after a lost stream leader) or making one stream twice with
        // different settings. The map of known streams is not held meanwhile: finding, making
        // or extending a stream may wait up to a minute for another instance's stream lock,
        // and the bus's other topics go on.
        let flight_key = partitioned(&self.topics, topic).map_or(topic, |(base, _)| base);
        let flight = self
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(flight_key.to_owned())
            .or_default()
            .clone();
        let _flight = flight.lock().await;
        if let Some(name) = self.known().get(topic) {
            return Ok(name.clone());
        }
        let Some((base, partitions)) = partitioned(&self.topics, topic) else {
            let name = self.find_or_create(js, topic, spec).await?;
            self.known().insert(topic.to_owned(), name.clone());
            return Ok(name);
        };
        let name = self.find_or_create(js, base, spec).await?;
        let all = subjects(base, partitions);
        cover(js, self.replicas, &name, &all).await?;
        let mut known = self.known();
        for subject in all {
            known.insert(subject, name.clone());
        }
        Ok(name)
    }

    /// Where the topics found so far live.
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // Nothing panics while holding it.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The stream that holds `topic`, found or made (see [`ensure`](Self::ensure)).
    async fn find_or_create(
        &self,
        js: &jetstream::Context,
        topic: &str,
        spec: StreamSpec,
    ) -> Result<String, Error> {
        let configured = self.definitions.iter().find(|definition| {
            definition
                .subjects
                .iter()
                .any(|pattern| subject_matches(pattern, topic))
        });
        let name = if let Some(definition) = configured {
            if spec.dead_letters && definition.storage == Storage::Memory {
                return Err(memory_dead_letters(topic, &definition.name));
            }
            if spec.dead_letters {
                warn_if_shared(topic, &definition.name, &definition.subjects);
            }
            definition.name.clone()
        } else if let Some(name) = existing_stream_of(js, topic).await? {
            // Someone else's stream (a Go service's, an operator's), used as it is.
            let mut stream = js
                .get_stream(&name)
                .await
                .map_err(|error| Error::broker(format!("cannot read stream {name}"), error))?;
            let info = stream
                .info()
                .await
                .map_err(|error| Error::broker(format!("cannot read stream {name}"), error))?;
            if spec.dead_letters {
                if info.config.storage == stream::StorageType::Memory {
                    return Err(memory_dead_letters(topic, &name));
                }
                warn_if_shared(topic, &name, &info.config.subjects);
            }
            warn_if_fewer_replicas(&name, info.config.num_replicas, spec.replicas);
            name
        } else {
            let name = stream_name(&self.prefix, topic);
            let mut created = js
                .get_or_create_stream(stream_config(
                    name.clone(),
                    vec![topic.to_owned()],
                    spec.storage,
                    spec.limits,
                    spec.replicas,
                ))
                .await
                .map_err(|error| Error::broker(format!("cannot create stream {name}"), error))?;
            let info = created
                .info()
                .await
                .map_err(|error| Error::broker(format!("cannot read stream {name}"), error))?;
            if !info
                .config
                .subjects
                .iter()
                .any(|pattern| subject_matches(pattern, topic))
            {
                change_stream(js, self.replicas, &name, |config| {
                    with_subjects(config, &[topic.to_owned()])
                })
                .await?;
            }
            tracing::info!(stream = %name, topic, storage = ?spec.storage, "stream ready");
            name
        };
        Ok(name)
    }

    /// Forgets where `topic` lives (and, for a partitioned topic, its partitions) (its stream was deleted, e.g. a memory stream after a
    /// server restart), so the next [`ensure`](Self::ensure) looks again.
    pub(crate) async fn forget(&self, topic: &str) {
        let mut known = self.known();
        match partitioned(&self.topics, topic) {
            Some((base, partitions)) => {
                for subject in subjects(base, partitions) {
                    known.remove(&subject);
                }
            }
            None => {
                known.remove(topic);
            }
        }
    }
}

/// The stream on the server whose subjects cover `topic`, if any. Not knowing (a timeout while a
/// cluster elects its meta leader) is an error, not "none": a stream is made only for a topic no
/// stream covers.
async fn existing_stream_of(js: &jetstream::Context, topic: &str) -> Result<Option<String>, Error> {
    match js.stream_by_subject(topic).await {
        Ok(name) => Ok(Some(name)),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::context::GetStreamByNameErrorKind::NotFound
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(Error::broker(
            format!("cannot find the stream of {topic}"),
            error,
        )),
    }
}

/// Adds to stream `name` the `subjects` its patterns do not cover yet (`replicas`: of the lock
/// bucket, if this makes it).
async fn cover(
    js: &jetstream::Context,
    replicas: u16,
    name: &str,
    subjects: &[String],
) -> Result<(), Error> {
    let added = change_stream(js, replicas, name, |config| with_subjects(config, subjects)).await?;
    if !added.is_empty() {
        tracing::info!(
            stream = name,
            ?added,
            "partition subjects added to the stream"
        );
    }
    Ok(())
}

/// `config` with the `subjects` its patterns do not cover added, and what that added.
fn with_subjects(mut config: stream::Config, subjects: &[String]) -> (stream::Config, Vec<String>) {
    let missing: Vec<String> = subjects
        .iter()
        .filter(|subject| {
            !config
                .subjects
                .iter()
                .any(|pattern| subject_matches(pattern, subject))
        })
        .cloned()
        .collect();
    config.subjects.extend(missing.iter().cloned());
    let changes = missing
        .into_iter()
        .map(|subject| format!("subject {subject} added"))
        .collect();
    (config, changes)
}

/// The key-value bucket whose keys lock a stream while one instance of the bus changes it.
const STREAM_LOCKS: &str = "eventbus_stream_updates";

/// How long a stream lock lives when its holder never releases it (it died, or its call was
/// dropped); also how long a change waits for the lock.
const STREAM_LOCK_TTL: Duration = Duration::from_secs(30);

/// Changes stream `name` as `change` says (given the stream's configuration, it returns the
/// configuration it wants and what that changes; nothing when it is as wanted). JetStream has
/// no compare-and-set on a stream's configuration: of two updates made from the same read, the
/// later undoes the earlier (two instances connecting at once, each adding its subject). So the
/// change is made under a lock the instances of the bus share (a key in the
/// `eventbus_stream_updates` bucket, one per stream, expiring after 30 s if its holder dies),
/// from a fresh read, and read again afterwards until the read shows nothing left to change (a
/// client that does not take the lock, such as a Go service, may still update meanwhile).
/// Returns what the first update changed (nothing when the stream was already as wanted).
///
/// # Cancel safety
///
/// A dropped call may leave the lock held: it expires after 30 s, and the next change waits
/// for it until then.
async fn change_stream<F>(
    js: &jetstream::Context,
    replicas: u16,
    name: &str,
    change: F,
) -> Result<Vec<String>, Error>
where
    F: Fn(stream::Config) -> (stream::Config, Vec<String>),
{
    let read = |name: &str| {
        let name = name.to_owned();
        async move {
            js.get_stream(&name)
                .await
                .map(|stream| stream.cached_info().config.clone())
                .map_err(|error| Error::broker(format!("cannot read stream {name}"), error))
        }
    };
    if change(read(name).await?).1.is_empty() {
        return Ok(Vec::new());
    }
    let (locks, key, revision) = lock_stream(js, replicas, name).await?;
    let mut made = Vec::new();
    let mut result = Err(Error::Broker {
        message: format!(
            "stream {name} kept changing under this update (a client updating it at the same time)"
        ),
        source: None,
    });
    for _ in 0..5 {
        let (config, changes) = match read(name).await {
            Ok(config) => change(config),
            Err(error) => {
                result = Err(error);
                break;
            }
        };
        if changes.is_empty() {
            result = Ok(made);
            break;
        }
        if let Err(error) = js.update_stream(config).await {
            result = Err(Error::broker(format!("cannot update stream {name}"), error));
            break;
        }
        if made.is_empty() {
            made = changes;
        }
    }
    if let Err(error) = locks.delete_expect_revision(&key, Some(revision)).await {
        tracing::debug!(stream = name, %error, "stream lock not released; it expires");
    }
    result
}

/// Takes the lock on stream `name`: creates its key in [`STREAM_LOCKS`] (made if missing, with
/// `replicas`), waiting while another instance holds it, up to twice [`STREAM_LOCK_TTL`].
async fn lock_stream(
    js: &jetstream::Context,
    replicas: u16,
    name: &str,
) -> Result<(async_nats::jetstream::kv::Store, String, u64), Error> {
    use async_nats::jetstream::kv;
    let locks = match js.get_key_value(STREAM_LOCKS).await {
        Ok(locks) => locks,
        Err(_) => match js
            .create_key_value(kv::Config {
                bucket: STREAM_LOCKS.to_owned(),
                description: "streams being changed by an instance of the event bus".to_owned(),
                history: 1,
                max_age: STREAM_LOCK_TTL,
                storage: stream::StorageType::File,
                num_replicas: usize::from(replicas),
                ..kv::Config::default()
            })
            .await
        {
            Ok(locks) => locks,
            // Made meanwhile by another instance.
            Err(error) => js
                .get_key_value(STREAM_LOCKS)
                .await
                .map_err(|_| Error::broker(format!("cannot open bucket {STREAM_LOCKS}"), error))?,
        },
    };
    let key = crate::names::kv_safe(name);
    // Longer than a lock lives: one left by a holder that died expires before this gives up.
    let deadline = tokio::time::Instant::now() + 2 * STREAM_LOCK_TTL;
    loop {
        match locks.create(&key, name.to_owned().into()).await {
            Ok(revision) => return Ok((locks, key, revision)),
            Err(error) if tokio::time::Instant::now() >= deadline => {
                return Err(Error::broker(
                    format!("stream {name} stayed locked by another instance for 60 s"),
                    error,
                ));
            }
            // Held by another instance: it releases it, or it expires.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Makes the stream holding `spec.name` what `spec` says as far as `mode` allows (see
/// [`TopicAdmin::ensure_topic`](eventbus_core::TopicAdmin::ensure_topic)). A missing stream is
/// made as `{prefix}{topic}` (file storage unless the spec says otherwise, with the partition
/// subjects of a partitioned topic); an existing one can change its retention (`max_age`) and
/// replicas. Storage is fixed once made, and partitions are the configuration's
/// (`[nats.topics."t"] partitions`): their differences are reported. A stream shared by
/// several topics (a wildcard stream) changes for all of them.
///
/// # Cancel safety
///
/// Each request is complete or not sent; a dropped call may leave a stream made or updated,
/// which the next call reports as matching.
pub(crate) async fn ensure_spec(
    js: &jetstream::Context,
    config: &NatsConfig,
    spec: &eventbus_core::TopicSpec,
    mode: eventbus_core::EnsureMode,
) -> Result<eventbus_core::TopicReport, Error> {
    use eventbus_core::{EnsureMode, TopicMismatch, TopicReport, TopicStorage};
    let topic = spec.name.as_str();
    if let Some(replicas) = spec.replicas {
        crate::config::replicas_ok("replicas", replicas)?;
    }
    let configured_partitions = partitioned(&config.topics, topic).map_or(1, |(_, n)| u32::from(n));
    let mut report = TopicReport::default();
    if let Some(mismatch) =
        TopicMismatch::compare("partitions", spec.partitions, configured_partitions)
    {
        report.mismatches.push(mismatch);
    }
    let read = |name: &str, error: String| Error::Broker {
        message: format!("cannot read stream {name}: {error}"),
        source: None,
    };
    // Not knowing is not "missing": nothing is created on a failed lookup.
    let found = existing_stream_of(js, topic).await?;
    let Some(name) = found else {
        if mode == EnsureMode::ValidateOnly {
            report.mismatches.push(TopicMismatch::missing());
            return Ok(report);
        }
        let name = stream_name(&config.stream_prefix, topic);
        let mut subjects_of = vec![topic.to_owned()];
        if let Some((base, partitions)) = partitioned(&config.topics, topic) {
            subjects_of.extend(subjects(base, partitions));
        }
        let storage = match spec.storage {
            Some(TopicStorage::Memory) => Storage::Memory,
            _ => Storage::File,
        };
        // A dead-letter topic gets the dead-letter limits (no age limit by default), as when
        // the bus makes its stream.
        let mut limits = if topic.ends_with(eventbus_core::DEAD_LETTER_SUFFIX) {
            config.dead_letter_limits
        } else {
            config.stream_limits
        };
        if let Some(retention) = spec.retention {
            limits.max_age = Some(retention);
        }
        let replicas = spec.replicas.unwrap_or_else(|| config.replicas_of(topic));
        let stream = stream_config(name.clone(), subjects_of, storage, limits, replicas);
        js.create_stream(stream)
            .await
            .map_err(|error| Error::broker(format!("cannot create stream {name}"), error))?;
        tracing::info!(stream = %name, topic, ?spec, "stream created");
        report.created = true;
        return Ok(report);
    };
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|error| read(&name, error.to_string()))?;
    let info = stream
        .info()
        .await
        .map_err(|error| read(&name, error.to_string()))?;
    let mut wanted = info.config.clone();
    let storage = match info.config.storage {
        stream::StorageType::Memory => TopicStorage::Memory,
        _ => TopicStorage::File,
    };
    if let Some(mismatch) = TopicMismatch::compare("storage", spec.storage, storage) {
        report.mismatches.push(mismatch);
    }
    let mut changes = Vec::new();
    // A partitioned topic's stream must hold every partition's subject.
    if let Some((base, partitions)) = partitioned(&config.topics, topic) {
        let missing: Vec<String> = subjects(base, partitions)
            .into_iter()
            .filter(|subject| {
                !info
                    .config
                    .subjects
                    .iter()
                    .any(|pattern| subject_matches(pattern, subject))
            })
            .collect();
        if !missing.is_empty() {
            let mismatch = TopicMismatch {
                field: "partitions",
                wanted: format!("{partitions} partition subjects"),
                actual: format!("stream {name} lacks {missing:?}"),
            };
            if mode.updates() {
                cover(js, config.replicas, &name, &missing).await?;
                // A later update of the stream keeps them.
                wanted.subjects.extend(missing);
                report.updated.push(mismatch);
            } else {
                report.mismatches.push(mismatch);
            }
        }
    }
    // Only what differs is set, from a fresh read under the stream's lock: a setting the spec
    // does not change keeps whatever another instance or an operator made it meanwhile.
    let mut max_age = None;
    if let Some(mismatch) = TopicMismatch::compare("retention", spec.retention, info.config.max_age)
    {
        max_age = Some(spec.retention.unwrap_or_default());
        changes.push(mismatch);
    }
    let mut num_replicas = None;
    let replicas = u16::try_from(info.config.num_replicas.max(1)).unwrap_or(u16::MAX);
    if let Some(mismatch) = TopicMismatch::compare("replicas", spec.replicas, replicas) {
        num_replicas = spec.replicas.map(usize::from);
        changes.push(mismatch);
    }
    if changes.is_empty() {
        return Ok(report);
    }
    if !mode.updates() {
        report.mismatches.extend(changes);
        return Ok(report);
    }
    change_stream(js, config.replicas, &name, |mut config| {
        let mut changed = Vec::new();
        if let Some(max_age) = max_age
            && config.max_age != max_age
        {
            config.max_age = max_age;
            changed.push(format!("max_age {max_age:?}"));
        }
        if let Some(num_replicas) = num_replicas
            && config.num_replicas != num_replicas
        {
            config.num_replicas = num_replicas;
            changed.push(format!("replicas {num_replicas}"));
        }
        (config, changed)
    })
    .await?;
    tracing::info!(stream = %name, topic, changes = ?changes, "stream updated");
    report.updated = changes;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn existing() -> stream::Config {
        stream::Config {
            name: "BUSINESS_STREAM".into(),
            subjects: vec!["business.>".into(), "health.check".into()],
            max_age: Duration::from_secs(3600),
            max_bytes: 1000,
            max_messages: 10,
            ..stream::Config::default()
        }
    }

    #[test]
    fn binding_an_existing_stream_keeps_its_subjects_and_limits_and_adds_only_what_it_lacks() {
        let definition = StreamDefinition::new(
            "BUSINESS_STREAM",
            vec![
                "business.>".into(),
                "business.orders".into(),
                "audit".into(),
            ],
        );
        let (bound, changes) = bound_config(&definition, existing());
        assert_eq!(bound.subjects, ["business.>", "health.check", "audit"]);
        assert_eq!(
            (bound.max_age, bound.max_bytes, bound.max_messages),
            (Duration::from_secs(3600), 1000, 10),
            "limits kept"
        );
        assert_eq!(changes.len(), 1, "{changes:?}");
        let covered = StreamDefinition::new("BUSINESS_STREAM", vec!["business.>".into()]);
        let (unchanged, changes) = bound_config(&covered, existing());
        assert_eq!(unchanged, existing());
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn update_limits_sets_an_existing_streams_limits_and_still_never_removes_a_subject() {
        let definition = StreamDefinition {
            update_limits: true,
            ..StreamDefinition::new("BUSINESS_STREAM", vec!["business.>".into()])
        };
        let (bound, changes) = bound_config(&definition, existing());
        assert_eq!(bound.subjects, ["business.>", "health.check"]);
        assert_eq!(bound.max_age, Duration::from_secs(24 * 3600));
        assert_eq!(bound.max_messages, 1_000_000);
        assert_eq!(changes.len(), 1, "{changes:?}");
    }
}
