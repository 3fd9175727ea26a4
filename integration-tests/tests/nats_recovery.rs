//! NATS dead letters and recovery, against a real nats-server: what a dead letter carries on the
//! wire, where it is stored, and a subscription that comes back after its stream or durable
//! vanished.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::StorageType};
use eventbus_core::{
    ConnectionState, Envelope, ErrorKind, HandlerContext, HandlerError, Message, OutboundMessage,
    SubscribeOptions,
};
use integration_tests::{
    Recorder, collect, eventually, nats_config, nats_settings, record_versions,
};
use test_brokers::NatsServer;

async fn raw(server: &NatsServer) -> (async_nats::Client, jetstream::Context) {
    let client = async_nats::connect(server.url()).await.unwrap();
    (client.clone(), jetstream::new(client))
}

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(aggregate, "Changed", version, &version).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_with_nats_control_headers_is_dead_lettered_without_them() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("control"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "orders.control";
    bus.subscribe_envelope(
        topic,
        Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
            Err(HandlerError::permanent("refused"))
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let (client, js) = raw(&server).await;
    let stream = js.stream_by_subject(topic).await.unwrap();
    // A Go service publishing with optimistic concurrency control: the stream name expected.
    let event = envelope("o-1", 1);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.as_str());
    headers.insert("Nats-Expected-Stream", stream.as_str());
    js.publish_with_headers(topic, headers, event.to_bytes().unwrap())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(client);

    let dead_letters = collect(&bus, "orders.control.DLQ").await;
    let letters = dead_letters
        .wait_for("the dead letter", |e| !e.is_empty())
        .await;
    let letter = &letters[0];
    assert_eq!(letter.payload, event.to_bytes().unwrap());
    assert_eq!(letter.headers.get_str("X-Error-Message"), Some("refused"));
    // The original's control headers are gone; the dead letter has its own message ID.
    let control: Vec<&str> = letter
        .headers
        .iter()
        .map(|(name, _)| name)
        .filter(|name| name.to_ascii_lowercase().starts_with("nats-"))
        .collect();
    assert_eq!(control, ["Nats-Msg-Id"], "{:?}", letter.headers);
    let id = letter.headers.get_str("Nats-Msg-Id").unwrap();
    assert!(id != event.event_id && id.starts_with("dlq:"), "{id}");
    assert_eq!(bus.transport().stats().dead_letter_failures, 0);

    let dead = js.stream_by_subject("orders.control.DLQ").await.unwrap();
    let info = js
        .get_stream(dead)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.storage, StorageType::File);
    assert_eq!(
        info.config.max_age,
        Duration::ZERO,
        "dead letters do not expire by default"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_refused_a_memory_stream_and_the_aggregate_waits() {
    let server = NatsServer::start();
    let (client, js) = raw(&server).await;
    // Someone's wildcard stream, in memory, covers the dead-letter topic.
    js.create_stream(jetstream::stream::Config {
        name: "WILD".into(),
        subjects: vec!["wild.>".into()],
        storage: StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(client);
    let bus = eventbus_nats::connect(nats_settings("wild"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "wild.orders";
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_version);
                if envelope.event_version == 1 {
                    return Err(HandlerError::permanent("refused"));
                }
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=2 {
        bus.publish_envelope(topic, &envelope("w-1", version))
            .await
            .unwrap();
    }
    eventually("the dead-letter write to fail", || async {
        bus.transport().stats().dead_letter_failures >= 2
    })
    .await;
    assert_eq!(handled.events(), [1], "v2 ran before v1 was settled");
    let report = bus.health().await;
    assert_eq!(
        report.status(),
        eventbus_core::HealthStatus::Degraded,
        "{report:?}"
    );
    let info = js
        .get_stream("WILD")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.state.messages, 2,
        "nothing was written to the memory stream"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_topic_is_consumed_again_after_the_server_restart_lost_its_memory_stream() {
    let mut server = NatsServer::start();
    let (settings, mut config) = (nats_settings("memory-stream"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_secs(1);
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "metrics.lost";
    let seen = collect(bus.as_ref(), topic).await;
    let states = integration_tests::record_connection_states(bus.connection_state());
    bus.publish(topic, OutboundMessage::new(&b"before"[..]))
        .await
        .unwrap();
    seen.wait_for("the first message", |e| e.len() == 1).await;
    tokio::task::block_in_place(|| server.start_again());
    // The watch saw the connection go and come back.
    states
        .wait_for("reconnecting, then connected", |e| {
            e.iter()
                .skip_while(|state| **state != ConnectionState::Reconnecting)
                .any(|state| *state == ConnectionState::Connected)
        })
        .await;
    // The memory stream and its consumer are gone; publishing re-creates the stream.
    let publisher = bus.clone();
    eventually("a publish after the restart", || {
        let publisher = publisher.clone();
        async move {
            publisher
                .publish(topic, OutboundMessage::new(&b"after"[..]))
                .await
                .is_ok()
        }
    })
    .await;
    let events = seen
        .wait_for("the message after the restart", |e| {
            e.iter().any(|m| m.payload.as_ref() == b"after")
        })
        .await;
    assert!(
        bus.transport().stats().fetch_errors > 0,
        "{:?}",
        bus.transport().stats()
    );
    assert!(events.len() >= 2);
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_deleted_under_a_live_subscription_is_made_again() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("deleted"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "orders.deleted";
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    bus.publish_envelope(topic, &envelope("d-1", 1))
        .await
        .unwrap();
    handled.wait_for("v1", |e| e.contains(&1)).await;
    bus.transport()
        .delete_consumer(topic, &bus.transport().durable_name(topic, 1))
        .await
        .unwrap();
    bus.publish_envelope(topic, &envelope("d-1", 2))
        .await
        .unwrap();
    handled.wait_for("v2", |e| e.contains(&2)).await;
    assert!(
        bus.transport().stats().fetch_errors > 0,
        "{:?}",
        bus.transport().stats()
    );
    bus.close().await.unwrap();
}

/// A durable deleted under a live subscription that has taken nothing yet is made again where
/// the subscription began, not at its `StartPosition` again: with `New`, the events published
/// while it was gone would be skipped (they were: the durable came back with `DeliverNew`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_made_again_before_anything_was_taken_keeps_the_events_published_meanwhile() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("gap"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "orders.gap";
    bus.publish_envelope(topic, &envelope("before", 1))
        .await
        .unwrap();
    let handled = record_versions(
        &bus,
        topic,
        SubscribeOptions::new().with_start(eventbus_core::StartPosition::New),
    )
    .await;
    bus.transport()
        .delete_consumer(topic, &bus.transport().durable_name(topic, 1))
        .await
        .unwrap();
    // Published while the durable is gone (the bus notices at its next pull, then backs off).
    for version in 1..=3 {
        bus.publish_envelope(topic, &envelope("gap", version))
            .await
            .unwrap();
    }
    let events = handled
        .wait_for("the three published while the durable was gone", |e| {
            e.iter().filter(|(a, _)| a == "gap").count() == 3
        })
        .await;
    assert!(
        !events.iter().any(|(a, _)| a == "before"),
        "New still skips what was published before subscribing: {events:?}"
    );
    assert!(
        bus.transport().stats().fetch_errors > 0,
        "{:?}",
        bus.transport().stats()
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_of_our_name_that_filters_another_subject_is_refused_not_moved() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("owner"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "shared.one";
    // One stream holds both topics; our durable name already filters the other one.
    let (client, js) = raw(&server).await;
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "SHARED".into(),
            subjects: vec!["shared.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(bus.transport().durable_name(topic, 1)),
            filter_subject: "shared.two".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(client);
    let refused = bus
        .subscribe(
            topic,
            Arc::new(|_ctx: HandlerContext, _message: Message| async { Ok(()) }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    let (_client, js) = raw(&server).await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(bus.transport().durable_name(topic, 1), "SHARED")
        .await
        .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().config.filter_subject,
        "shared.two"
    );
    bus.close().await.unwrap();
}

/// A delivery the subscription never received (sent to it and lost: the consumer's leader died
/// before it arrived, a pull request given up; here another client takes it and never
/// acknowledges it) is not left to come back after `ack_wait`, after later events of its
/// aggregate: the gap in the consumer's delivery sequence makes the bus replay the durable in
/// order from the first event it did not get. Found while reading a cluster failover report
/// (an event handled after 59 later ones of its aggregate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_on_the_way_is_replayed_in_order_not_after_ack_wait() {
    let server = NatsServer::start();
    let mut config = nats_config(&server.url());
    // Far longer than the test: a redelivery after ack_wait would come too late to pass.
    config.consumer.ack_wait = Duration::from_secs(120);
    let mut settings = nats_settings("gap");
    // One handler and one queued job: a third message waits for room, so the bus stops pulling.
    settings.pool.pool_size = 1;
    settings.pool.inbox_size = 1;
    let bus = eventbus_nats::connect(settings, config).await.unwrap();
    let topic = "orders.gap";
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handled = Recorder::<i64>::new();
    let (g, h) = (gate.clone(), handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (g, h) = (g.clone(), h.clone());
            async move {
                if envelope.event_version == 1 {
                    g.acquire().await.unwrap().forget();
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=3 {
        bus.publish_envelope(topic, &envelope("g-1", version))
            .await
            .unwrap();
    }
    // v1 runs (held at the gate), v2 queued, v3 waiting for room: the bus pulls no more.
    let (_client, js) = raw(&server).await;
    let durable = bus.transport().durable_name(topic, 1);
    let stream = js.get_stream("STREAM_orders_gap").await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = stream.get_consumer(&durable).await.unwrap();
    eventually("the bus with no pull request open", || {
        let mut consumer = consumer.clone();
        async move {
            consumer
                .info()
                .await
                .is_ok_and(|info| info.num_waiting == 0 && info.num_ack_pending == 3)
        }
    })
    .await;
    for version in 4..=6 {
        bus.publish_envelope(topic, &envelope("g-1", version))
            .await
            .unwrap();
    }
    // Another client takes v4 and never acknowledges it: for the bus, a delivery lost.
    let mut taken = consumer.fetch().max_messages(1).messages().await.unwrap();
    let stolen = futures::StreamExt::next(&mut taken).await.unwrap().unwrap();
    let stolen: Envelope = Envelope::from_bytes(&stolen.payload).unwrap();
    assert_eq!(stolen.event_version, 4);
    gate.add_permits(1);
    let versions = handled
        .wait_for("v1 to v6", |versions| {
            (1..=6).all(|version| versions.contains(&version))
        })
        .await;
    let mut first = Vec::new();
    for version in versions {
        if !first.contains(&version) {
            first.push(version);
        }
    }
    assert_eq!(first, [1, 2, 3, 4, 5, 6], "first handlings in order");
    bus.close().await.unwrap();
}

/// Two processes of one service that read a topic whole share its durable as a work queue: the
/// deliveries one does not receive went to the other, and are not taken for deliveries lost on
/// the way (replaying the durable would hand the other's messages out again, over and over).
/// The other reader here is a raw client whose pull request waits all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_client_sharing_a_whole_topics_durable_is_not_taken_for_lost_deliveries() {
    let server = NatsServer::start();
    let topic = "orders.shared";
    let bus = eventbus_nats::connect(nats_settings("shared"), nats_config(&server.url()))
        .await
        .unwrap();
    let handled = Recorder::<(String, i64)>::new();
    bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let (_client, js) = raw(&server).await;
    let durable = bus.transport().durable_name(topic, 1);
    let stream = js.get_stream("STREAM_orders_shared").await.unwrap();
    let mut consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer(&durable).await.unwrap();
    let created = consumer.info().await.unwrap().created;
    let mut other = consumer
        .batch()
        .max_messages(100_000)
        .expires(Duration::from_secs(120))
        .messages()
        .await
        .unwrap();
    let taken = Recorder::<(String, i64)>::new();
    let t = taken.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(message)) = futures::StreamExt::next(&mut other).await {
            let envelope = Envelope::from_bytes(&message.payload).unwrap();
            message.ack().await.unwrap();
            t.push((envelope.aggregate_id, envelope.event_version));
        }
    });
    let total = 400;
    for version in 1..=total / 20 {
        for aggregate in 0..20 {
            bus.publish_envelope(topic, &envelope(&format!("s-{aggregate}"), version))
                .await
                .unwrap();
        }
    }
    let all = usize::try_from(total).unwrap();
    let (h, t) = (handled.clone(), taken.clone());
    eventually(
        "every envelope handled by the bus or taken by the other client",
        || {
            let (h, t) = (h.clone(), t.clone());
            async move {
                let mut seen: std::collections::HashSet<_> = h.events().into_iter().collect();
                seen.extend(t.events());
                seen.len() == all
            }
        },
    )
    .await;
    bus.close().await.unwrap();
    reader.abort();
    let (handled, taken) = (handled.events(), taken.events());
    assert!(
        !taken.is_empty(),
        "the other client took nothing: nothing was shared"
    );
    let overlap = handled.iter().filter(|event| taken.contains(event)).count();
    assert_eq!(
        overlap, 0,
        "the bus handled {overlap} of the other client's messages again"
    );
    assert_eq!(
        consumer.info().await.unwrap().created,
        created,
        "the shared durable was made again"
    );
}
