//! Side by side with the Go services on Apache Kafka: a Go service running the Go SDK itself
//! (jxt-core v1.7.5 through `interop/go/cmd/peer`: its YAML start-up path, `PublishEnvelope`,
//! `SubscribeEnvelope`, `Close`) and this SDK publish to and consume from the same topics of a
//! real broker.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use eventbus::{HEARTBEAT_TOPIC, HeartbeatOptions, Heartbeats};
use eventbus_core::{
    Envelope, ErrorKind, EventBus, HandlerContext, HandlerError, Position, StartPosition,
    SubscribeOptions,
};
use eventbus_kafka::{AssignmentStrategy, Partitioner};
use eventbus_pool::BusSettings;
use integration_tests::go_peer::{
    GoHandled, GoService, HandledAt, assert_handled_by_go_as_sent, assert_handled_here_as_sent,
    heartbeat_sources, interop_envelopes as envelopes, record_envelopes, record_with_time,
};
use integration_tests::{
    Recorder, assert_first_handlings_in_order, eventually, kafka_group_config,
};
use test_brokers::kafka_bootstrap;

/// The Go service publishes; an ordered envelope subscription here handles every event, each
/// aggregate's in version order, with the payload bytes exactly as the Go service sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_the_go_service_publishes_are_handled_here_in_order_with_identical_payloads() {
    let (topic, group) = ("interop.go-to-rust", "interop-go-to-rust");
    let sent = envelopes("g2r", 40, 25);
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", group),
        kafka_group_config(&kafka_bootstrap(), group, topic, 8),
    )
    .await
    .unwrap();
    let handled = record_envelopes(&bus, topic).await;

    tokio::task::block_in_place(|| GoService::kafka(&kafka_bootstrap()).publish(topic, &sent));

    assert_handled_here_as_sent(&handled, &sent, 40, 25).await;
    bus.close().await.unwrap();
}

/// This SDK publishes; the Go service (`SubscribeEnvelope`: sarama consumer group, its actor
/// pool) handles every event with the same fields, each aggregate's in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_published_here_are_handled_by_the_go_service_with_equal_fields() {
    let (topic, group) = ("interop.rust-to-go", "interop-rust-to-go");
    let sent = envelopes("r2g", 40, 25);
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", "interop-rust-publisher"),
        kafka_group_config(&kafka_bootstrap(), group, topic, 8),
    )
    .await
    .unwrap();
    for envelope in &sent {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }

    let mut go = GoService::kafka(&kafka_bootstrap())
        .with_group(group)
        .subscribe(topic, Some(sent.len()));
    let mut handled: Vec<GoHandled> = Vec::new();
    go.read_until("every event published here", &mut handled, |h| {
        h.len() >= sent.len()
    })
    .await;
    assert_handled_by_go_as_sent(&handled, &sent, 40, 25);
    bus.close().await.unwrap();
}

/// Co-publishing: the Go service (sarama's hash partitioner) and this SDK with
/// `partitioner = "sarama"` publish events of the same 200 aggregates to one 8-partition topic;
/// every aggregate's events must all be on one partition, or the aggregate's order is lost
/// between the two producers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_service_and_this_sdk_put_each_aggregate_on_the_same_partition() {
    let (topic, group) = ("interop.co-publish", "interop-co-publish");
    let mut config = kafka_group_config(&kafka_bootstrap(), group, topic, 8);
    config.partitioner = Partitioner::Sarama;
    let bus = eventbus_kafka::connect(BusSettings::new("kafka", group), config)
        .await
        .unwrap();
    let go_sent = envelopes("co", 200, 1);
    let rust_sent: Vec<Envelope> = (0..200)
        .map(|aggregate| {
            Envelope::new(
                format!("co-{aggregate}"),
                "Interop.Changed",
                2,
                &serde_json::json!({"n": 2}),
            )
            .unwrap()
        })
        .collect();
    // The topic exists (made by the bus, with 8 partitions) before the Go service writes to it.
    bus.publish_envelope(topic, &rust_sent[0]).await.unwrap();
    for envelope in &rust_sent[1..] {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }
    tokio::task::block_in_place(|| GoService::kafka(&kafka_bootstrap()).publish(topic, &go_sent));

    let partitions = Recorder::<(String, i32)>::new();
    let p = partitions.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let p = p.clone();
            async move {
                if let Position::Partition { partition, .. } = ctx.meta().position {
                    p.push((envelope.aggregate_id.clone(), partition));
                }
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let seen = partitions
        .wait_for("all 400 records", |e| e.len() >= 400)
        .await;
    let mut per_aggregate: HashMap<&str, BTreeSet<i32>> = HashMap::new();
    for (aggregate, partition) in &seen {
        per_aggregate
            .entry(aggregate)
            .or_default()
            .insert(*partition);
    }
    assert_eq!(per_aggregate.len(), 200);
    let split: Vec<_> = per_aggregate.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(
        split.is_empty(),
        "aggregates on more than one partition: {split:?}"
    );
    let used: BTreeSet<i32> = seen.iter().map(|(_, p)| *p).collect();
    assert!(used.len() > 1, "every record on one partition: {used:?}");
    bus.close().await.unwrap();
}

/// A rolling deploy: a Go member consumes the topic; a member of this SDK joins the same
/// consumer group (with `assignment_strategy = "range"`, the eager assignor sarama uses, so the
/// group forms) and takes partitions over; the Go member leaves. Nothing is lost, and on the
/// two members' merged timeline every aggregate's first handlings follow its versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_migration_in_one_consumer_group_loses_nothing_and_keeps_order() {
    let (topic, group) = ("interop.rolling", "interop-rolling");
    let all = envelopes("roll", 20, 60);
    let thirds: Vec<&[Envelope]> = all.chunks(all.len() / 3).collect();
    let mut config = kafka_group_config(&kafka_bootstrap(), group, topic, 8);
    config.assignment_strategy = AssignmentStrategy::Range;
    let publisher = eventbus_kafka::connect(
        BusSettings::new("kafka", "interop-rolling-publisher"),
        kafka_group_config(&kafka_bootstrap(), "interop-rolling-publisher", topic, 8),
    )
    .await
    .unwrap();
    // The topic with its 8 partitions, before the Go member subscribes.
    for envelope in thirds[0] {
        publisher.publish_envelope(topic, envelope).await.unwrap();
    }

    let mut go = GoService::kafka(&kafka_bootstrap())
        .with_group(group)
        .subscribe(topic, None);
    let mut go_handled: Vec<GoHandled> = Vec::new();
    go.read_until("the first third on the Go member", &mut go_handled, |h| {
        h.len() >= thirds[0].len()
    })
    .await;

    let rust = eventbus_kafka::connect(BusSettings::new("kafka", group), config)
        .await
        .unwrap();
    let rust_handled = Recorder::<HandledAt>::new();
    rust.subscribe_envelope(
        topic,
        record_with_time(&rust_handled),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    assert!(
        rust.transport().assigned_partitions() > 0 && rust.transport().assigned_partitions() < 8,
        "the group did not share the partitions: {} here",
        rust.transport().assigned_partitions()
    );
    for envelope in thirds[1] {
        publisher.publish_envelope(topic, envelope).await.unwrap();
    }
    let second: BTreeSet<&str> = thirds[1].iter().map(|e| e.event_id.as_str()).collect();
    // Both members handle part of the second third.
    rust_handled
        .wait_for("part of the second third here", |e| {
            e.iter().any(|(.., id, _)| second.contains(id.as_str()))
        })
        .await;
    go.read_until(
        "part of the second third on the Go member",
        &mut go_handled,
        |h| h.iter().any(|g| second.contains(g.event_id.as_str())),
    )
    .await;

    tokio::task::block_in_place(|| go.stop());
    go.read_available(&mut go_handled);
    for envelope in thirds[2..].iter().flat_map(|third| third.iter()) {
        publisher.publish_envelope(topic, envelope).await.unwrap();
    }
    let everything: BTreeSet<&str> = all.iter().map(|e| e.event_id.as_str()).collect();
    let go_ids: BTreeSet<String> = go_handled.iter().map(|g| g.event_id.clone()).collect();
    let events = rust_handled
        .wait_for("the rest here after the Go member left", |e| {
            let mut ids: BTreeSet<&str> = go_ids.iter().map(String::as_str).collect();
            ids.extend(e.iter().map(|(.., id, _)| id.as_str()));
            ids == everything
        })
        .await;

    let mut timeline: Vec<(i64, String, i64)> = go_handled
        .iter()
        .map(|g| (g.handled_at_ns, g.aggregate_id.clone(), g.event_version))
        .chain(events.iter().map(|(a, v, _, at)| (*at, a.clone(), *v)))
        .collect();
    timeline.sort_by_key(|(at, ..)| *at);
    let order: Vec<(String, i64)> = timeline.into_iter().map(|(_, a, v)| (a, v)).collect();
    assert_first_handlings_in_order(&order, 20, 60);
    rust.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// The default assignor (`cooperative-sticky`) beside a Go member (sarama's eager `range`): the
/// group coordinator refuses the join, and `subscribe` says so with a configuration error that
/// names `kafka.assignment_strategy`, instead of returning as if the member had joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_assignor_the_go_members_do_not_share_is_refused_at_subscribe() {
    let (topic, group) = ("interop.assignors", "interop-assignors");
    let publisher = eventbus_kafka::connect(
        BusSettings::new("kafka", "interop-assignors-publisher"),
        kafka_group_config(&kafka_bootstrap(), "interop-assignors-publisher", topic, 4),
    )
    .await
    .unwrap();
    let sent = envelopes("assignors", 4, 1);
    for envelope in &sent {
        publisher.publish_envelope(topic, envelope).await.unwrap();
    }
    let mut go = GoService::kafka(&kafka_bootstrap())
        .with_group(group)
        .subscribe(topic, None);
    let mut go_handled = Vec::new();
    go.read_until("the Go member in the group", &mut go_handled, |h| {
        h.len() >= sent.len()
    })
    .await;

    let config = kafka_group_config(&kafka_bootstrap(), group, topic, 4);
    assert_eq!(
        config.assignment_strategy,
        AssignmentStrategy::CooperativeSticky
    );
    let rust = eventbus_kafka::connect(BusSettings::new("kafka", group), config)
        .await
        .unwrap();
    let refused = rust
        .subscribe_envelope(
            topic,
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new(),
        )
        .await
        .expect_err("the join was refused, and subscribe must say so");
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(
        refused.to_string().contains("kafka.assignment_strategy"),
        "{refused}"
    );
    // Once the Go member has left, the same bus joins: the refusal was about that group.
    tokio::task::block_in_place(|| go.stop());
    rust.subscribe_envelope(
        topic,
        Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async { Ok::<(), HandlerError>(()) }),
        SubscribeOptions::new(),
    )
    .await
    .expect("a join after the Go member left");
    rust.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// On Kafka the group a bus reads with, and where a group without offsets starts, are the
/// bus's (`kafka.group_id`, `kafka.auto_offset_reset`): a subscription naming another group or
/// a start position is a configuration error that says so, not an option silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_cannot_name_another_group_or_a_start_position_on_kafka() {
    let (topic, group) = ("interop.options", "interop-options");
    let bus = eventbus_kafka::connect(
        BusSettings::new("kafka", group),
        kafka_group_config(&kafka_bootstrap(), group, topic, 1),
    )
    .await
    .unwrap();
    let handler = || {
        Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async { Ok::<(), HandlerError>(()) })
    };
    let other = bus
        .subscribe_envelope(
            topic,
            handler(),
            SubscribeOptions::new().with_durable("the-go-services-group"),
        )
        .await
        .expect_err("another group");
    assert_eq!(other.kind(), ErrorKind::Config);
    assert!(other.to_string().contains("kafka.group_id"), "{other}");
    let start = bus
        .subscribe_envelope(
            topic,
            handler(),
            SubscribeOptions::new().with_start(StartPosition::New),
        )
        .await
        .expect_err("a start position");
    assert_eq!(start.kind(), ErrorKind::Config);
    assert!(
        start.to_string().contains("kafka.auto_offset_reset"),
        "{start}"
    );
    // Naming the bus's own group is what it does anyway.
    bus.subscribe_envelope(
        topic,
        handler(),
        SubscribeOptions::new().with_durable(group),
    )
    .await
    .unwrap();
    bus.close().await.unwrap();
}

/// One health view for a mixed fleet on Kafka too: a Go service's health-check record (the Go
/// SDK's own health-check publisher: its JSON, a plain record on `jxt-core-health-check`) is
/// seen by this SDK's watcher, and this SDK's heartbeat passes the Go SDK's parser in a Go
/// service reading the topic with `Subscribe` in its own consumer group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_rust_services_see_each_others_health_check_heartbeats() {
    let bootstrap = kafka_bootstrap();
    let group = "rust-billing";
    let bus: Arc<dyn EventBus> = Arc::new(
        eventbus_kafka::connect(
            BusSettings::new("kafka", group),
            kafka_group_config(&bootstrap, group, HEARTBEAT_TOPIC, 1),
        )
        .await
        .unwrap(),
    );
    let watcher = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("rust-billing", "kafka").with_publishing(false),
    )
    .await
    .unwrap();
    tokio::task::block_in_place(|| GoService::kafka(&bootstrap).health_publish(HEARTBEAT_TOPIC));
    eventually("the Go heartbeat counted", || async {
        watcher.status().received > 0
    })
    .await;
    let seen = watcher.status().last.unwrap();
    // Every Go service's health checker on Kafka names itself `kafka-eventbus`
    // (kafka.go, StartHealthCheckPublisher).
    assert_eq!(
        (seen.source.as_str(), seen.event_bus_type.as_str()),
        ("kafka-eventbus", "kafka")
    );

    let sender = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("rust-billing", "kafka").with_monitoring(false),
    )
    .await
    .unwrap();
    let mut go = GoService::kafka(&bootstrap)
        .with_group("go-billing")
        .health_read(HEARTBEAT_TOPIC, 2);
    let mut lines = Vec::new();
    go.read_lines_until("the Go service reading both heartbeats", &mut lines, |l| {
        l.len() >= 2
    })
    .await;
    let sources = heartbeat_sources(&lines);
    assert!(
        sources.contains("rust-billing") && sources.contains("kafka-eventbus"),
        "{lines:?}"
    );
    sender.stop().await.unwrap();
    watcher.stop().await.unwrap();
    bus.close().await.unwrap();
}
