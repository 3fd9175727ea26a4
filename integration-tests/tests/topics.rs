//! `TopicAdmin::ensure_topic` (through the bus) against real brokers: each mode creates, changes or only reports,
//! and the report names every difference.

// Test code: a failed unwrap or index is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::time::Duration;

use eventbus_core::{EnsureMode, TopicReport, TopicSpec, TopicStorage};
use eventbus_pool::BusSettings;
use integration_tests::{eventually, kafka_config, nats_config};
use test_brokers::{NatsServer, kafka_bootstrap};

fn fields(report: &TopicReport) -> (Vec<&str>, Vec<&str>) {
    (
        report.updated.iter().map(|m| m.field).collect(),
        report.mismatches.iter().map(|m| m.field).collect(),
    )
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_streams_are_created_validated_and_updated_as_each_mode_allows() {
    integration_tests::capture_logs();
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(
        BusSettings::new("nats", "topics"),
        nats_config(&server.url()),
    )
    .await
    .unwrap();
    let spec = TopicSpec::new("managed.orders")
        .with_retention(HOUR)
        .with_replicas(1)
        .with_storage(TopicStorage::File);

    let missing = bus
        .ensure_topic(&spec, EnsureMode::ValidateOnly)
        .await
        .unwrap();
    assert_eq!(fields(&missing), (vec![], vec!["exists"]));
    let created = bus
        .ensure_topic(&spec, EnsureMode::CreateOnly)
        .await
        .unwrap();
    assert!(created.created && created.matches(), "{created}");
    assert!(
        bus.ensure_topic(&spec, EnsureMode::ValidateOnly)
            .await
            .unwrap()
            .matches()
    );

    let longer = spec.clone().with_retention(2 * HOUR);
    let kept = bus
        .ensure_topic(&longer, EnsureMode::CreateOnly)
        .await
        .unwrap();
    assert_eq!(fields(&kept), (vec![], vec!["retention"]));
    let updated = bus
        .ensure_topic(&longer, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(fields(&updated), (vec!["retention"], vec![]), "{updated}");
    assert!(
        bus.ensure_topic(&longer, EnsureMode::ValidateOnly)
            .await
            .unwrap()
            .matches()
    );

    // Storage is fixed once made; partitions are the configuration's.
    let other = longer.with_storage(TopicStorage::Memory).with_partitions(4);
    let differs = bus
        .ensure_topic(&other, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(
        fields(&differs),
        (vec![], vec!["partitions", "storage"]),
        "{differs}"
    );
    assert!(
        bus.ensure_topic(&TopicSpec::new("a b"), EnsureMode::CreateOnly)
            .await
            .is_err()
    );
    // JetStream keeps 1 to 5 replicas: 7 is refused before the server is asked.
    let seven = bus
        .ensure_topic(
            &TopicSpec::new("managed.seven").with_replicas(7),
            EnsureMode::CreateOrUpdate,
        )
        .await
        .unwrap_err();
    assert_eq!(seven.kind(), eventbus_core::ErrorKind::Config, "{seven}");
    assert!(seven.to_string().contains("1 to 5"), "{seven}");
    // The bus still publishes to the topic it manages.
    let envelope = eventbus_core::Envelope::new("order-1", "Placed", 1, &1).unwrap();
    bus.publish_envelope("managed.orders", &envelope)
        .await
        .unwrap();
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_are_created_grown_and_validated_keeping_their_other_settings() {
    use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    integration_tests::capture_logs();
    let bootstrap = kafka_bootstrap();
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "topics"),
        kafka_config(&bootstrap),
    )
    .await
    .unwrap();
    let topic = "managed.payments";
    let spec = TopicSpec::new(topic)
        .with_partitions(2)
        .with_replicas(1)
        .with_retention(HOUR);

    let missing = bus
        .ensure_topic(&spec, EnsureMode::ValidateOnly)
        .await
        .unwrap();
    assert_eq!(fields(&missing), (vec![], vec!["exists"]));
    let created = bus
        .ensure_topic(&spec, EnsureMode::CreateOnly)
        .await
        .unwrap();
    assert!(created.created, "{created}");
    eventually("the new topic validated", || {
        let (bus, spec) = (&bus, &spec);
        async move {
            bus.ensure_topic(spec, EnsureMode::ValidateOnly)
                .await
                .is_ok_and(|report| report.matches())
        }
    })
    .await;

    // A setting of the topic's own, made outside the bus: kept when retention changes.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let own = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("retention.ms", "3600000")
        .set("max.message.bytes", "200000");
    admin
        .alter_configs([&own], &AdminOptions::new())
        .await
        .unwrap();

    let grown = spec.clone().with_partitions(4).with_retention(2 * HOUR);
    let validated = bus
        .ensure_topic(&grown, EnsureMode::ValidateOnly)
        .await
        .unwrap();
    assert_eq!(
        fields(&validated),
        (vec![], vec!["partitions", "retention"])
    );
    let updated = bus
        .ensure_topic(&grown, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(
        fields(&updated),
        (vec!["partitions", "retention"], vec![]),
        "{updated}"
    );
    eventually("the grown topic validated", || {
        let (bus, grown) = (&bus, &grown);
        async move {
            bus.ensure_topic(grown, EnsureMode::ValidateOnly)
                .await
                .is_ok_and(|report| report.matches())
        }
    })
    .await;
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
        .await
        .unwrap();
    let resource = configs.into_iter().next().unwrap().unwrap();
    assert_eq!(
        resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref()),
        Some("200000"),
        "the topic's own setting survived the retention change"
    );

    // Partitions never shrink, the replication factor is fixed, storage is disk.
    let smaller = grown
        .clone()
        .with_partitions(1)
        .with_replicas(3)
        .with_storage(TopicStorage::Memory);
    let differs = bus
        .ensure_topic(&smaller, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(
        fields(&differs),
        (vec![], vec!["storage", "partitions", "replicas"]),
        "{differs}"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_stream_lacking_its_partition_subjects_is_reported_then_covered() {
    integration_tests::capture_logs();
    let server = NatsServer::start();
    // The stream exists for the bare topic only, as one made before the topic was partitioned.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "split".into(),
        subjects: vec!["managed.split".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut config = nats_config(&server.url());
    config.topics.insert(
        "managed.split".into(),
        eventbus_nats::TopicOptions {
            partitions: Some(3),
            ..eventbus_nats::TopicOptions::default()
        },
    );
    let bus = eventbus_nats::connect(BusSettings::new("nats", "split"), config)
        .await
        .unwrap();
    let spec = TopicSpec::new("managed.split").with_partitions(3);
    let lacking = bus
        .ensure_topic(&spec, EnsureMode::ValidateOnly)
        .await
        .unwrap();
    assert_eq!(fields(&lacking), (vec![], vec!["partitions"]), "{lacking}");
    let covered = bus
        .ensure_topic(&spec, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(fields(&covered), (vec!["partitions"], vec![]), "{covered}");
    assert!(
        bus.ensure_topic(&spec, EnsureMode::ValidateOnly)
            .await
            .unwrap()
            .matches()
    );
    bus.close().await.unwrap();
}

/// Adding partitions to a Kafka topic that holds records moves aggregates to other partitions,
/// where their next events can be consumed before the ones still waiting: `CreateOrUpdate`
/// refuses it and says why (the topic keeps its partitions); only
/// `CreateOrUpdateAllowingRepartition` adds them. A topic without records still grows under
/// `CreateOrUpdate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_partitions_are_not_added_to_a_topic_with_records_unless_asked() {
    use eventbus_core::Envelope;
    integration_tests::capture_logs();
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "repartition"),
        kafka_config(&kafka_bootstrap()),
    )
    .await
    .unwrap();
    let topic = "managed.repartition";
    let spec = TopicSpec::new(topic).with_partitions(2);
    bus.ensure_topic(&spec, EnsureMode::CreateOnly)
        .await
        .unwrap();
    let envelope = Envelope::new("order-1", "Placed", 1, &1).unwrap();
    bus.publish_envelope(topic, &envelope).await.unwrap();
    let grown = spec.clone().with_partitions(4);
    let refused = bus
        .ensure_topic(&grown, EnsureMode::CreateOrUpdate)
        .await
        .unwrap();
    assert_eq!(fields(&refused), (vec![], vec!["partitions"]), "{refused}");
    assert!(
        refused.mismatches[0].actual.contains("holds records"),
        "{refused}"
    );
    let still = bus
        .ensure_topic(&spec, EnsureMode::ValidateOnly)
        .await
        .unwrap();
    assert!(still.matches(), "the topic kept 2 partitions: {still}");
    let asked = bus
        .ensure_topic(&grown, EnsureMode::CreateOrUpdateAllowingRepartition)
        .await
        .unwrap();
    assert_eq!(fields(&asked), (vec!["partitions"], vec![]), "{asked}");
    eventually("the topic grown when asked", || {
        let (bus, grown) = (&bus, &grown);
        async move {
            bus.ensure_topic(grown, EnsureMode::ValidateOnly)
                .await
                .is_ok_and(|report| report.matches())
        }
    })
    .await;
    bus.close().await.unwrap();
}

/// `min_insync_replicas` is set on the topics the bus makes, on first use (a publish) and
/// through `ensure_topic`. (Kafka 4 accepts writes on a topic whose `min.insync.replicas`
/// exceeds its replication factor, so the single test broker shows the setting, not a refused
/// write.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_topics_get_their_min_insync_replicas_on_first_use_and_through_ensure() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;
    integration_tests::capture_logs();
    let bootstrap = kafka_bootstrap();
    let mut config = kafka_config(&bootstrap);
    for topic in ["isr.first-use", "isr.ensured"] {
        config.topics.insert(
            topic.to_owned(),
            eventbus_kafka::TopicOptions {
                min_insync_replicas: Some(2),
                ..eventbus_kafka::TopicOptions::default()
            },
        );
    }
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", "isr"), config)
        .await
        .unwrap();
    let created = bus
        .ensure_topic(&TopicSpec::new("isr.ensured"), EnsureMode::CreateOnly)
        .await
        .unwrap();
    assert!(created.created, "{created}");
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    let min_insync_of = |topic: &'static str| {
        let admin = &admin;
        async move {
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new())
                .await
                .unwrap();
            let resource = described.into_iter().next().unwrap().unwrap();
            resource
                .get("min.insync.replicas")
                .and_then(|entry| entry.value.clone())
        }
    };
    // A topic just made may be described before its configuration is known everywhere.
    eventually("isr.ensured with min.insync.replicas 2", || async {
        min_insync_of("isr.ensured").await.as_deref() == Some("2")
    })
    .await;
    bus.publish(
        "isr.first-use",
        eventbus_core::OutboundMessage::new(&b"x"[..]),
    )
    .await
    .unwrap();
    eventually("isr.first-use with min.insync.replicas 2", || async {
        min_insync_of("isr.first-use").await.as_deref() == Some("2")
    })
    .await;
    bus.close().await.unwrap();
}
