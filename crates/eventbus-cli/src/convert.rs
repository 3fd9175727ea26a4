//! `eventbus config convert`: a Go SDK YAML configuration (jxt-core `sdk/config`
//! `EventBusConfig`) to the equivalent `eventbus.toml`, with a comment on every setting that has
//! no equivalent or a different meaning.
//!
//! The Go SDK reads its YAML with viper into structs without key tags, so keys match the Go
//! field names without regard to case (`serviceName`, `servicename`, `ServiceName`); this reads
//! them the same way, and also ignores `_` and `-` in keys (`service_name`). Keys are the Go
//! fields documented in the project's Go SDK inventory; anything else is listed as not
//! converted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use yaml_serde::Value;

use crate::CliError;

/// Options of `eventbus config convert`.
#[derive(Args)]
pub(crate) struct ConvertArgs {
    /// The Go SDK's YAML configuration (its `eventbus` section, or a file holding one under an
    /// `eventbus:` key).
    #[arg(long)]
    from: PathBuf,
    /// NATS: a topic whose Go subscriber this service replaces; written as
    /// `[nats.topics."T"] take_over_from = "business-consumer-unified_{T, . as _}"` (repeat for
    /// more topics; docs/migration.md, "A NATS takeover").
    #[arg(long, value_name = "TOPIC")]
    take_over: Vec<String>,
}

/// The durable a YAML-configured Go service reads `topic` with (nats.go,
/// `subscribeJetStreamWithStorage`: `business-consumer` + `-unified`, `_`, the topic with `.` as
/// `_`, `*` as `wildcard`, `>` as `all`).
pub(crate) fn go_durable(topic: &str) -> String {
    format!(
        "business-consumer-unified_{}",
        topic
            .replace('.', "_")
            .replace('*', "wildcard")
            .replace('>', "all")
    )
}

/// A YAML mapping with keys folded (lowercase, without `_` and `-`).
struct Section<'a> {
    path: String,
    entries: BTreeMap<String, (&'a str, &'a Value)>,
}

fn fold(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

impl<'a> Section<'a> {
    fn new(path: &str, value: Option<&'a Value>) -> Self {
        let mut entries = BTreeMap::new();
        if let Some(Value::Mapping(mapping)) = value {
            for (key, value) in mapping {
                if let Value::String(key) = key {
                    entries.insert(fold(key), (key.as_str(), value));
                }
            }
        }
        Self {
            path: path.to_owned(),
            entries,
        }
    }

    /// Takes the value of `key` (folded), so that what is left is what was not converted.
    fn take(&mut self, key: &str) -> Option<&'a Value> {
        self.entries.remove(&fold(key)).map(|(_, value)| value)
    }

    fn section(&mut self, key: &str) -> Section<'a> {
        let path = format!("{}.{key}", self.path);
        Section::new(&path, self.take(key))
    }

    /// The keys nobody took, as `path.key`.
    fn rest(&self) -> Vec<String> {
        self.entries
            .values()
            .map(|(key, _)| format!("{}.{key}", self.path))
            .collect()
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Sequence(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    }
}

fn quoted(text: &str) -> String {
    format!("{text:?}")
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| quoted(item)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A Go duration (`30s`, `2m`, `500ms`, `1h30m`) as humantime text, or a bare number of
/// nanoseconds (viper decodes plain integers as `time.Duration` nanoseconds).
fn duration(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => humantime::parse_duration(text)
            .ok()
            .map(|d| humantime::format_duration(d).to_string()),
        Value::Number(number) => number.as_u64().map(|nanos| {
            humantime::format_duration(std::time::Duration::from_nanos(nanos)).to_string()
        }),
        _ => None,
    }
}

/// The TOML text and its notes.
#[derive(Default)]
struct Output {
    top: Vec<String>,
    sections: BTreeMap<&'static str, Vec<String>>,
    /// Arrays of tables (`[[nats.streams]]`), after the sections.
    tables: Vec<String>,
    notes: Vec<String>,
}

impl Output {
    fn set(&mut self, section: &'static str, line: String) {
        if section.is_empty() {
            self.top.push(line);
        } else {
            self.sections.entry(section).or_default().push(line);
        }
    }

    fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    fn render(&self) -> String {
        let mut out = String::from(
            "# eventbus.toml converted from a Go SDK (jxt-core) configuration by `eventbus config convert`.\n\
             # Read the notes: they name every Go setting that has no equivalent here or means something else.\n",
        );
        for note in &self.notes {
            out.push_str(&format!("# NOTE {note}\n"));
        }
        for line in &self.top {
            out.push_str(line);
            out.push('\n');
        }
        for (section, lines) in &self.sections {
            out.push_str(&format!("\n[{section}]\n"));
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        for table in &self.tables {
            out.push('\n');
            out.push_str(table);
            out.push('\n');
        }
        out
    }
}

/// Converts the Go SDK's YAML text; on NATS, the bus takes over from the Go durables of the
/// topics in `take_over`.
pub(crate) fn convert(yaml: &str, take_over: &[String]) -> Result<String, CliError> {
    let document: Value =
        yaml_serde::from_str(yaml).map_err(|error| CliError(format!("not YAML: {error}")))?;
    let mut root = Section::new("", Some(&document));
    // A whole application config with an `eventbus:` section, or the section itself.
    let mut bus = if root.entries.contains_key("eventbus") {
        root.section("eventbus")
    } else {
        Section::new("", Some(&document))
    };
    bus.path = String::new();
    let mut out = Output::default();

    let backend = bus
        .take("type")
        .and_then(text)
        .unwrap_or_else(|| "memory".to_owned());
    match backend.as_str() {
        "memory" | "kafka" | "nats" => out.set("", format!("type = {}", quoted(&backend))),
        other => return Err(CliError(format!("type {other:?}: memory, kafka or nats"))),
    }
    if let Some(service) = bus.take("serviceName").and_then(text) {
        out.set("", format!("client_id = {}", quoted(&service)));
        out.note(format!(
            "serviceName became client_id; it names this SDK's NATS durables ({service}_{{topic}}), \
             its Kafka group (unless kafka.group_id) and its metric namespace"
        ));
    }

    let mut subscriber = bus.section("subscriber");
    let mut handling = subscriber.section("errorHandling");
    if let Some(attempts) = handling.take("maxRetryAttempts").and_then(text) {
        out.set("retry", format!("max_attempts = {attempts}"));
    }
    if let Some(base) = handling.take("retryBackoffBase").and_then(duration) {
        out.set("retry", format!("initial_backoff = {}", quoted(&base)));
    }
    if let Some(max) = handling.take("retryBackoffMax").and_then(duration) {
        out.set("retry", format!("max_backoff = {}", quoted(&max)));
    }
    if let Some(topic) = handling.take("deadLetterTopic").and_then(text) {
        out.note(format!(
            "subscriber.errorHandling.deadLetterTopic {topic:?}: dead letters go to {{topic}}.DLQ by \
             default; a fixed topic is per subscription here (SubscribeOptions::with_dead_letter)"
        ));
    }
    for key in ["maxConcurrency", "processTimeout"] {
        if subscriber.take(key).is_some() {
            out.note(format!(
                "subscriber.{key}: unused by every Go backend; the engine's pool.pool_size bounds concurrency here"
            ));
        }
    }

    let mut publisher = bus.section("publisher");
    let publish_timeout = publisher.take("publishTimeout").and_then(duration);
    for key in ["maxReconnectAttempts", "initialBackoff", "maxBackoff"] {
        if publisher.take(key).is_some() {
            out.note(format!(
                "publisher.{key}: the clients reconnect on their own here (nats.max_reconnects; librdkafka's reconnect.backoff.* in kafka.properties)"
            ));
        }
    }

    let mut health = bus.section("healthCheck");
    if !health.entries.is_empty() {
        health.entries.clear();
        out.note(
            "healthCheck: the heartbeat is started in code here (eventbus::Heartbeats, the same \
             topic and message); it has no configuration section",
        );
    }

    let mut kafka = bus.section("kafka");
    let kafka_used = backend == "kafka" || !kafka.entries.is_empty();
    if let Some(brokers) = kafka.take("brokers") {
        out.set(
            "kafka",
            format!("bootstrap_servers = {}", list(&strings(brokers))),
        );
    }
    let mut consumer = kafka.section("consumer");
    if let Some(group) = consumer.take("groupId").and_then(text) {
        out.set("kafka", format!("group_id = {}", quoted(&group)));
        out.set(
            "kafka",
            "# sarama's eager assignor: needed while Go members share the group".to_owned(),
        );
        out.set("kafka", "assignment_strategy = \"range\"".to_owned());
        out.set(
            "kafka",
            "# the Go services' partitioner: one aggregate, one partition".to_owned(),
        );
        out.set("kafka", "partitioner = \"sarama\"".to_owned());
    }
    match consumer.take("autoOffsetReset").and_then(text).as_deref() {
        Some(reset @ ("earliest" | "latest")) => {
            out.set("kafka", format!("auto_offset_reset = {}", quoted(reset)));
        }
        Some(other) => out.note(format!(
            "kafka.consumer.autoOffsetReset {other:?}: earliest or latest here"
        )),
        None if kafka_used => {
            out.set("kafka", "auto_offset_reset = \"latest\"".to_owned());
            out.note(
                "kafka.consumer.autoOffsetReset not set: the Go SDK's YAML default is latest (its NewFactory and \
                 GetDefaultConfig paths say earliest); kept as latest, where a new group starts: set earliest to \
                 read what is already on the topic",
            );
        }
        None => {}
    }
    // The Go SDK's YAML defaults (config.SetDefaults): session 30 s, heartbeat 3 s.
    let mut consumer_properties = Vec::new();
    let session = consumer.take("sessionTimeout").and_then(duration);
    let heartbeat = consumer.take("heartbeatInterval").and_then(duration);
    if kafka_used {
        consumer_properties.push(("session.timeout.ms", session.unwrap_or("30s".into())));
        consumer_properties.push(("heartbeat.interval.ms", heartbeat.unwrap_or("3s".into())));
    }
    for (property, value) in consumer_properties {
        let millis = humantime::parse_duration(&value)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        out.set(
            "kafka.consumer_properties",
            format!("{} = \"{millis}\"", quoted(property)),
        );
    }
    if consumer.take("pipeline").is_some() {
        out.note("kafka.consumer.pipeline: many records of a partition always run at once here, in order per aggregate");
    }
    let mut producer = kafka.section("producer");
    if producer.take("requiredAcks").is_some() {
        out.note("kafka.producer.requiredAcks: always all (and idempotent) here, as the Go SDK's YAML start-up forces too (its NewFactory and GetDefaultConfig paths use acks=1, not idempotent)");
    }
    for key in ["flushFrequency", "flushMessages", "timeout"] {
        if producer.take(key).is_some() {
            out.note(format!(
                "kafka.producer.{key}: librdkafka batches on its own; set linger.ms or batch.num.messages in kafka.producer_properties if needed"
            ));
        }
    }
    if backend == "kafka"
        && let Some(timeout) = &publish_timeout
    {
        out.set("kafka", format!("publish_timeout = {}", quoted(timeout)));
    }

    let mut nats = bus.section("nats");
    if let Some(urls) = nats.take("urls") {
        let urls = strings(urls);
        out.set("nats", format!("urls = {}", list(&urls)));
        if urls.len() > 1 {
            out.note("nats.urls: the Go SDK used only the first URL; this SDK uses all of them");
        }
    }
    if let Some(reconnects) = nats.take("maxReconnects").and_then(text) {
        if reconnects.starts_with('-') {
            out.note(
                "nats.maxReconnects -1: unlimited is the default here (leave max_reconnects out)",
            );
        } else {
            out.set("nats", format!("max_reconnects = {reconnects}"));
        }
    }
    if let Some(timeout) = nats.take("connectionTimeout").and_then(duration) {
        out.set("nats", format!("connection_timeout = {}", quoted(&timeout)));
    }
    if nats.take("reconnectWait").is_some() {
        out.note(
            "nats.reconnectWait: async-nats backs off on its own up to nats.reconnect_max_delay",
        );
    }
    if backend == "nats"
        && let Some(timeout) = &publish_timeout
    {
        out.set("nats", format!("publish_timeout = {}", quoted(timeout)));
    }
    let nats_used = backend == "nats" || !nats.entries.is_empty();
    let mut jetstream = nats.section("jetStream");
    match jetstream.take("enabled") {
        Some(Value::Bool(true)) => {}
        _ if nats_used => out.note(
            "nats.jetstream.enabled is not true: the Go SDK then runs on core NATS (no stream, no durable, \
             at-most-once, and PublishEnvelope reports no results); this SDK always keeps envelopes in \
             JetStream (core NATS per topic with [nats.topics.\"T\"] ephemeral = true)",
        ),
        _ => {}
    }
    if let Some(wait) = jetstream.take("ackWait").and_then(duration) {
        out.set("nats.consumer", format!("ack_wait = {}", quoted(&wait)));
        out.note("nats.jetStream.ackWait: the Go SDK's per-topic consumers never used it (nats.go defaults, 30 s); here it applies to every durable");
    }
    if let Some(deliver) = jetstream.take("maxDeliver").and_then(text) {
        out.set("nats.consumer", format!("max_deliver = {deliver}"));
        out.note(format!(
            "nats.jetStream.maxDeliver {deliver}: the Go SDK's per-topic consumers never used it (unlimited); here it bounds the server's redeliveries, while retries run in the aggregate's lane (retry.max_attempts) before a dead letter"
        ));
    }
    if jetstream.take("publishTimeout").is_some() {
        out.note(
            "nats.jetStream.publishTimeout: publisher.publishTimeout / nats.publish_timeout here",
        );
    }
    let mut stream = jetstream.section("stream");
    let mut jet_consumer = jetstream.section("consumer");
    if nats_used {
        // What the Go SDK's YAML start-up really uses (eventbus.convertConfig copies only
        // jetstream.enabled and domain; convertJetStreamConfig fills in the rest).
        out.set(
            "nats",
            "# streams made here for topics outside BUSINESS_STREAM get the names the Go SDK's \
             subscribe looks for (BUSINESS_STREAM_{topic, . as _})"
                .to_owned(),
        );
        out.set("nats", "stream_prefix = \"BUSINESS_STREAM_\"".to_owned());
        out.tables.push(
            "# The Go services' stream (the Go SDK's YAML start-up makes it whatever the YAML names): bound \
             as it is when it exists, made with the Go SDK's settings when it does not\n\
             [[nats.streams]]\nname = \"BUSINESS_STREAM\"\nsubjects = [\"business.>\"]\nstorage = \"file\"\n\
             limits = { max_msgs = 10000, max_bytes = 104857600, max_age = \"24h\" }"
                .to_owned(),
        );
        out.note(
            "BUSINESS_STREAM keeps at most 10,000 messages / 100 MiB / 24 h and discards the oldest: dead letters \
             of business.* topics belong in a topic outside it (SubscribeOptions::with_dead_letter), or they are \
             discarded with the rest",
        );
        out.note(
            "the Go SDK's plain Publish (and its health check on jxt-core-health-check) adds its topic to \
             BUSINESS_STREAM's subjects; a topic this SDK made a stream for first stays in that stream",
        );
    }
    if let Some(name) = stream.take("name").and_then(text) {
        let subjects = stream.take("subjects").map(strings).unwrap_or_default();
        out.note(format!(
            "nats.jetstream.stream {name:?} {}: ignored by the Go SDK's YAML start-up, which uses BUSINESS_STREAM \
             over business.> whatever the YAML says; bound here as such",
            list(&subjects)
        ));
    }
    for key in [
        "subjects",
        "storage",
        "retention",
        "replicas",
        "maxAge",
        "maxBytes",
        "maxMsgs",
        "discard",
    ] {
        if stream.take(key).is_some() {
            out.note(format!(
                "nats.jetstream.stream.{key}: ignored by the Go SDK's YAML start-up (BUSINESS_STREAM: file, \
                 10,000 messages, 100 MiB, 24 h, discard old)"
            ));
        }
    }
    if let Some(durable) = jet_consumer.take("durableName").and_then(text) {
        out.note(format!(
            "nats.jetstream.consumer.durableName {durable:?}: ignored by the Go SDK's YAML start-up; its durables \
             are business-consumer-unified_{{topic, . as _}}, and its Close deletes them. Take one over with \
             [nats.topics.\"T\"] take_over_from (convert --take-over T), or adopt a killed service's with \
             SubscribeOptions::with_durable (docs/migration.md)"
        ));
    }
    if nats_used {
        for topic in take_over {
            out.tables.push(format!(
                "# Take over from the Go service's durable of {topic}: wait while it reads it, then start right after its ack floor\n\
                 [nats.topics.{}]\ntake_over_from = {}",
                quoted(topic),
                quoted(&go_durable(topic))
            ));
        }
    } else if !take_over.is_empty() {
        return Err(CliError(
            "--take-over takes over NATS durables: the configuration is not for NATS".into(),
        ));
    }
    for key in [
        "maxAckPending",
        "maxWaiting",
        "deliverPolicy",
        "ackPolicy",
        "replayPolicy",
        "maxDeliver",
    ] {
        if jet_consumer.take(key).is_some() {
            out.note(format!(
                "nats.jetStream.consumer.{key}: the Go SDK's per-topic consumers used nats.go defaults; see [nats.consumer] here"
            ));
        }
    }
    if let Some(reset) = publish_timeout.filter(|_| backend == "memory") {
        out.note(format!(
            "publisher.publishTimeout {reset}: not used by the memory backend"
        ));
    }

    let mut rest: Vec<String> = Vec::new();
    for section in [
        &bus,
        &subscriber,
        &handling,
        &publisher,
        &kafka,
        &consumer,
        &producer,
        &nats,
        &jetstream,
        &stream,
        &jet_consumer,
    ] {
        rest.extend(section.rest());
    }
    for key in ["security", "monitoring", "memory"] {
        if rest.iter().any(|r| fold(r.trim_start_matches('.')) == key) {
            out.note(format!(
                "{key}: no equivalent section; see docs/configuration.md"
            ));
        }
    }
    for key in rest {
        let key = key.trim_start_matches('.');
        if !["security", "monitoring", "memory"].contains(&fold(key).as_str()) {
            out.note(format!("{key}: not converted (no equivalent here)"));
        }
    }
    let toml = out.render();
    // What is printed must be a configuration this SDK accepts.
    eventbus::Config::from_toml_str(&toml).map_err(|error| {
        CliError(format!(
            "the converted configuration is not valid ({error}):\n{toml}"
        ))
    })?;
    Ok(toml)
}

/// `eventbus config convert --from FILE`.
pub(crate) fn run(args: &ConvertArgs) -> Result<std::process::ExitCode, CliError> {
    let yaml = std::fs::read_to_string(&args.from)
        .map_err(|error| CliError(format!("cannot read {}: {error}", args.from.display())))?;
    print!("{}", convert(&yaml, &args.take_over)?);
    Ok(std::process::ExitCode::SUCCESS)
}
