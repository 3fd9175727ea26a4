//! Fault injection against a real nats-server: the server killed and restarted, the consuming
//! process killed, a handler slower than `ack_wait`.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{Envelope, HandlerContext, SubscribeOptions};
use eventbus_nats::NatsBus;
use integration_tests::{
    BrokerAction, DEADLINE, Recorder, assert_first_handlings_in_order,
    assert_replays_are_in_order_suffixes, eventually, nats_config, nats_settings,
    pipelined_publishes_across_a_broker_restart, read_handled, spawn_consumer,
};
use test_brokers::NatsServer;
use tokio::sync::mpsc;

fn envelope(aggregate: usize, version: i64) -> Envelope {
    Envelope::new(
        format!("agg-{aggregate}"),
        "Changed",
        version,
        &serde_json::json!({"aggregate": aggregate, "version": version}),
    )
    .unwrap()
}

/// Publishes until the server confirms; the same event ID makes a retry safe (the server drops
/// the duplicate). The pause between tries is the publisher's backoff, not a wait in the test.
async fn publish_until_confirmed(bus: &NatsBus, topic: &str, envelope: &Envelope) {
    loop {
        match bus.publish_envelope(topic, envelope).await {
            Ok(()) => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_and_restarted_mid_stream_loses_no_envelope_and_keeps_order() {
    let mut server = NatsServer::start();
    let (settings, mut config) = (nats_settings("restart"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_secs(1);
    config.consumer.ack_wait = Duration::from_secs(3);
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "faults.restart";
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let (aggregates, versions) = (20usize, 50i64);
    for version in 1..=versions / 2 {
        for aggregate in 0..aggregates {
            publish_until_confirmed(&bus, topic, &envelope(aggregate, version)).await;
        }
    }
    handled.wait_for("some handled", |e| e.len() >= 150).await;

    tokio::task::block_in_place(|| server.kill());
    eventually("the bus to notice the lost connection", || {
        let bus = bus.clone();
        async move { !bus.health().await.is_healthy() }
    })
    .await;
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for version in versions / 2 + 1..=versions {
                for aggregate in 0..aggregates {
                    publish_until_confirmed(&bus, topic, &envelope(aggregate, version)).await;
                }
            }
        })
    };
    tokio::task::block_in_place(|| server.start_again());
    publisher.await.unwrap();

    let total = aggregates * versions as usize;
    let events = handled
        .wait_for("every envelope after the restart", |e| {
            e.iter().collect::<HashSet<_>>().len() == total
        })
        .await;
    let duplicates = assert_first_handlings_in_order(&events, aggregates, versions);
    eprintln!("restart: {total} envelopes, {duplicates} handled twice");
    assert!(
        bus.health().await.is_healthy(),
        "the bus recovered on its own"
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_process_killed_mid_stream_loses_nothing_and_replays_in_order() {
    let server = NatsServer::start();
    let publisher = eventbus_nats::connect(nats_settings("publisher"), nats_config(&server.url()))
        .await
        .unwrap();
    let topic = "faults.sigkill";
    let (aggregates, versions) = (20usize, 50i64);
    let publish = |from: i64, to: i64| {
        let publisher = &publisher;
        async move {
            for version in from..=to {
                for aggregate in 0..aggregates {
                    publisher
                        .publish_envelope(topic, &envelope(aggregate, version))
                        .await
                        .unwrap();
                }
            }
        }
    };
    publish(1, versions / 2).await;
    let total = aggregates * versions as usize;

    let (sender, mut lines) = mpsc::unbounded_channel();
    let mut first = spawn_consumer(
        env!("CARGO_BIN_EXE_consumer"),
        ["nats", &server.url(), topic, "killed"],
        sender.clone(),
    );
    let mut handled = Vec::new();
    read_handled(&mut lines, &mut handled, 300).await;
    // SIGKILL: no close, no acks of what it held.
    first.kill().unwrap();
    first.wait().unwrap();
    let before_kill = handled.len();
    // New events arrive while the messages the dead process held wait for their ack_wait: the
    // restarted consumer must still handle each aggregate's events in order.
    publish(versions / 2 + 1, versions).await;

    let mut second = spawn_consumer(
        env!("CARGO_BIN_EXE_consumer"),
        ["nats", &server.url(), topic, "killed"],
        sender,
    );
    read_handled(&mut lines, &mut handled, total).await;
    second.kill().unwrap();
    second.wait().unwrap();

    let duplicates = assert_first_handlings_in_order(&handled, aggregates, versions);
    eprintln!(
        "sigkill: {before_kill} handled before the kill, {total} in all, {duplicates} handled twice"
    );
    publisher.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_ack_wait_is_not_redelivered_while_it_runs() {
    let server = NatsServer::start();
    let (settings, mut config) = (nats_settings("slow"), nats_config(&server.url()));
    config.consumer.ack_wait = Duration::from_secs(1);
    let bus = eventbus_nats::connect(settings.clone(), config)
        .await
        .unwrap();
    let topic = "faults.slow";
    let calls = Arc::new(Mutex::new(HashMap::<(String, i64), usize>::new()));
    let done = Recorder::<(String, i64)>::new();
    let (c, d) = (calls.clone(), done.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (c, d) = (c.clone(), d.clone());
            async move {
                let id = (envelope.aggregate_id.clone(), envelope.event_version);
                *c.lock().unwrap().entry(id.clone()).or_default() += 1;
                if envelope.aggregate_id == "agg-0" && envelope.event_version == 1 {
                    // Three and a half ack_waits.
                    tokio::time::sleep(Duration::from_millis(3500)).await;
                }
                d.push(id);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for version in 1..=2 {
        for aggregate in 0..5 {
            bus.publish_envelope(topic, &envelope(aggregate, version))
                .await
                .unwrap();
        }
    }
    let events = done.wait_for("all ten envelopes", |e| e.len() == 10).await;
    assert_eq!(
        events.last().unwrap(),
        &("agg-0".to_owned(), 2),
        "agg-0 version 2 waited for the slow version 1"
    );
    for (id, count) in calls.lock().unwrap().iter() {
        assert_eq!(*count, 1, "{id:?} was handled {count} times");
    }

    let stats = bus.transport().stats();
    assert_eq!(
        (stats.redeliveries, stats.redeliveries_dropped),
        (0, 0),
        "the server redelivered a message while it was held"
    );
    assert!(
        stats.progress_acks > 0,
        "held messages got in-progress acks"
    );

    // The server agrees: nothing is left unacknowledged.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.stream_by_subject(topic).await.unwrap();
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_consumer_from_stream(bus.transport().durable_name(topic, 1), stream)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if consumer.info().await.unwrap().num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "acks did not reach the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_the_server_is_down_fails_with_a_typed_error_in_time() {
    let mut server = NatsServer::start();
    let (settings, mut config) = (nats_settings("down"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_millis(500);
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "faults.down";
    bus.publish_envelope(topic, &envelope(0, 1)).await.unwrap();
    tokio::task::block_in_place(|| server.kill());
    eventually("the bus to notice the lost connection", || {
        let bus = bus.clone();
        async move { !bus.health().await.is_healthy() }
    })
    .await;
    let started = tokio::time::Instant::now();
    let error = bus
        .publish_envelope(topic, &envelope(0, 2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.kind(),
            eventbus_core::ErrorKind::Timeout | eventbus_core::ErrorKind::Broker
        ),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{error}");
    tokio::task::block_in_place(|| server.start_again());
    // Back without user action: the same envelope goes through (and the server keeps one copy).
    publish_until_confirmed(&bus, topic, &envelope(0, 2)).await;
    bus.close().await.unwrap();
}

/// The server is SIGKILLed while messages are in flight and restarted on the same store, which
/// may come back with an older view of the durable (acks it had not yet written): once
/// everything is handled, waiting well past `ack_wait` shows no stale redelivery of an event
/// after newer events of its aggregate; what is handled again is an in-order suffix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_never_redelivers_an_event_after_newer_ones_of_its_aggregate() {
    let mut server = NatsServer::start();
    let ack_wait = Duration::from_secs(2);
    let (settings, mut config) = (nats_settings("crash"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_secs(1);
    config.consumer.ack_wait = ack_wait;
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "faults.crash";
    let (aggregates, versions) = (20usize, 150i64);
    for version in 1..=versions {
        for aggregate in 0..aggregates {
            publish_until_confirmed(&bus, topic, &envelope(aggregate, version)).await;
        }
    }
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    handled
        .wait_for("a third handled", |e| e.len() >= 1000)
        .await;
    tokio::task::block_in_place(|| server.start_again());

    let total = aggregates * versions as usize;
    handled
        .wait_for("every envelope after the crash", |e| {
            e.iter().collect::<HashSet<_>>().len() == total
        })
        .await;
    // Quiet for three ack_waits in a row: a stale redelivery would have come by then.
    let mut seen = handled.events().len();
    let mut quiet_since = tokio::time::Instant::now();
    eventually("three ack_waits without a handling", || {
        let now = handled.events().len();
        if now != seen {
            seen = now;
            quiet_since = tokio::time::Instant::now();
        }
        let quiet = quiet_since.elapsed() >= ack_wait * 3;
        async move { quiet }
    })
    .await;
    let events = handled.events();
    assert_first_handlings_in_order(&events, aggregates, versions);
    assert_replays_are_in_order_suffixes(&events);
    eprintln!(
        "crash: {total} envelopes, {} handlings, stats {:?}",
        events.len(),
        bus.transport().stats()
    );
    bus.close().await.unwrap();
}

/// Pipelined publishes with the server killed while they are in flight, more started while it
/// is down, more once it is back: each settles once, in its `PendingPublish` and on the results
/// stream, what was confirmed is consumed, and no aggregate's stored events go backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_across_a_server_restart_settle_once_and_keep_each_aggregates_order() {
    let mut server = NatsServer::start();
    let (settings, mut config) = (
        nats_settings("pipelined-restart"),
        nats_config(&server.url()),
    );
    config.publish_timeout = Duration::from_secs(1);
    let bus = Arc::new(eventbus_nats::connect(settings, config).await.unwrap());
    let (confirmed, failed, refused) =
        pipelined_publishes_across_a_broker_restart(bus, "faults.pipelined", &mut |action| {
            match action {
                BrokerAction::Kill => server.kill(),
                BrokerAction::StartAgain => server.start_again(),
            }
        })
        .await;
    eprintln!(
        "pipelined restart: {confirmed} confirmed, {failed} failed, {refused} not handed over"
    );
    assert!(confirmed > 0, "nothing was confirmed");
}

/// A pull request open when the connection is lost dies with it: the subscription sends a new
/// one as soon as the client is connected again, rather than waiting for the dead request to
/// expire (60 s here, three times the test's deadline) before it takes what was published
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_lost_with_the_connection_is_not_waited_for() {
    let mut server = NatsServer::start();
    let (mut settings, mut config) = (nats_settings("lostrequest"), nats_config(&server.url()));
    // `close` reads the open request to its end, up to the drain timeout: kept short.
    settings.drain_timeout = Duration::from_secs(1);
    config.consumer.fetch_expires = Duration::from_secs(60);
    config.scale_out.pinned_ttl = Duration::from_secs(120);
    let bus = eventbus_nats::connect(settings, config).await.unwrap();
    let topic = "faults.lostrequest";
    let handled = Recorder::<(String, i64)>::new();
    bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    publish_until_confirmed(&bus, topic, &envelope(1, 1)).await;
    handled.wait_for("v1", |events| events.len() == 1).await;
    // The subscription's request now waits on the server that goes away.
    tokio::task::block_in_place(|| server.start_again());
    publish_until_confirmed(&bus, topic, &envelope(1, 2)).await;
    handled
        .wait_for("v2, published after the restart", |events| {
            events.iter().any(|(_, version)| *version == 2)
        })
        .await;
    bus.close().await.unwrap();
}

/// The durable is made again (here: deleted and re-created by another client, as a cluster
/// that lost it would have it made again) and its very first delivery goes to a request this
/// bus never reads (a request that died with its connection, here another client's that is
/// gone once served). The bus numbers the new durable's deliveries from what it had delivered
/// when it was read, so the next delivery shows the gap: the lost event is replayed before the
/// later one of its aggregate, not handled after it once `ack_wait` runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_delivery_of_a_durable_made_again_lost_on_the_way_is_replayed_in_order() {
    use futures::StreamExt;
    integration_tests::capture_logs();
    let server = NatsServer::start();
    let mut config = nats_config(&server.url());
    config.consumer.ack_wait = Duration::from_secs(2);
    let bus = eventbus_nats::connect(nats_settings("firstlost"), config)
        .await
        .unwrap();
    let topic = "faults.firstlost";
    let handled = Recorder::<(String, i64)>::new();
    bus.subscribe_envelope(topic, handled.envelope_handler(), SubscribeOptions::new())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let stream = js
        .get_stream(js.stream_by_subject(topic).await.unwrap())
        .await
        .unwrap();
    let durable = bus.transport().durable_name(topic, 1);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&durable).await.unwrap();
    let config = consumer.info().await.unwrap().config.clone();
    stream.delete_consumer(&durable).await.unwrap();
    stream.create_consumer(config).await.unwrap();
    let made_again: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer(&durable).await.unwrap();
    // Waiting before the bus's next request (it backs off after its request was ended by the
    // deletion), so the server serves it first.
    let mut lost = made_again
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .unwrap();
    // The bus found the durable made again and pulls from it too, behind that request.
    let watched = made_again.clone();
    eventually("the bus pulling from the durable made again", || {
        let mut watched = watched.clone();
        async move { watched.info().await.is_ok_and(|info| info.num_waiting == 2) }
    })
    .await;
    publish_until_confirmed(&bus, topic, &envelope(1, 1)).await;
    let taken = lost.next().await.unwrap().unwrap();
    assert_eq!(
        taken.info().unwrap().consumer_sequence,
        1,
        "the made-again durable's first delivery went to the request the bus does not read"
    );
    drop(lost);
    publish_until_confirmed(&bus, topic, &envelope(1, 2)).await;
    let events = handled
        .wait_for("versions 1 and 2", |events| {
            events
                .iter()
                .map(|(_, version)| *version)
                .collect::<HashSet<_>>()
                .len()
                == 2
        })
        .await;
    assert_eq!(
        events.first().map(|(_, version)| *version),
        Some(1),
        "version 2 handled before version 1: {events:?}"
    );
    bus.close().await.unwrap();
}
