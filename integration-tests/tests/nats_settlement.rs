//! Settlement under pressure, against a real nats-server: unsubscribe with a full lane, a
//! dead-letter write cut off at the drain deadline, a stalled aggregate across a server restart,
//! a dropped unsubscribe, and dead letters after a stream's sequences started over. Each test
//! names the rule of `docs/semantics.md` it holds the bus to.

// Test code: a failed unwrap or expect is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use eventbus_core::{DeadLetter, Envelope, HandlerContext, HandlerError, SubscribeOptions};
use integration_tests::{Recorder, eventually, nats_config, nats_settings};
use test_brokers::NatsServer;

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(aggregate, "Changed", version, &version).unwrap()
}

/// Polls `check` for up to `limit`; true when it held (no panic when it did not).
async fn within<F>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> bool,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A handler recording (aggregate, version) of every envelope and succeeding.
fn recording(recorder: &Arc<Recorder<(String, i64)>>) -> Arc<dyn eventbus_core::EnvelopeHandler> {
    let r = recorder.clone();
    Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
        let r = r.clone();
        async move {
            r.push((envelope.aggregate_id.clone(), envelope.event_version));
            Ok(())
        }
    })
}

/// Rule: "Unsubscribe ... running messages finish, up to the drain timeout (then they are
/// cancelled and given back). It returns when that is done."
///
/// One aggregate's handler runs until cancelled; its lane (inbox 1) is full, so the fetcher
/// waits in `submit` for the third message. `unsubscribe` must still return about one drain
/// timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_is_bounded_by_the_drain_timeout_when_the_fetcher_waits_for_a_full_lane() {
    let server = NatsServer::start();
    let (mut settings, config) = (nats_settings("fulllane"), nats_config(&server.url()));
    settings.pool.pool_size = 2;
    settings.pool.inbox_size = 1;
    settings.drain_timeout = Duration::from_secs(1);
    let bus = eventbus_nats::connect(settings.clone(), config)
        .await
        .unwrap();
    let topic = "review.fulllane";
    // Published first, so that the first pull request brings all four at once.
    for version in 1..=4 {
        bus.publish_envelope(topic, &envelope("k", version))
            .await
            .unwrap();
    }
    let started = Recorder::<i64>::new();
    let s = started.clone();
    let subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
                let s = s.clone();
                async move {
                    s.push(envelope.event_version);
                    // A handler that honours cancellation, and is slow otherwise.
                    ctx.cancellation().cancelled().await;
                    Err(HandlerError::transient("cancelled"))
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    started.wait_for("v1 running", |e| e.contains(&1)).await;
    eventually("v2 queued behind v1", || async {
        bus.pool_stats().queued >= 1
    })
    .await;
    let began = std::time::Instant::now();
    let unsubscribed =
        tokio::time::timeout(Duration::from_secs(8), subscription.unsubscribe()).await;
    assert!(
        unsubscribed.is_ok(),
        "unsubscribe had not returned after {:?} with a 1 s drain timeout (pool {:?}, handler starts {:?})",
        began.elapsed(),
        bus.pool_stats(),
        started.events()
    );
    bus.close().await.unwrap();
}

/// Rule: "dead-letter write fails: not acknowledged ... the lane stays blocked", with
/// "Unsubscribe / Close ... running messages finish, up to the drain timeout (then they are
/// cancelled and given back)" in lane order, and "a redelivery replays a suffix in order".
///
/// v1 of an aggregate is refused, its dead-letter topic is held by a memory stream (refused for
/// ever), v2 waits in the lane. At the drain deadline v1 must be given back before v2, so the
/// next reader of the durable handles v1 first.
async fn dead_letter_write_cut_off_at_the_deadline(close_the_bus: bool) {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    // Someone's wildcard stream, in memory, covers the dead-letter topic: writes are refused.
    js.create_stream(jetstream::stream::Config {
        name: "WILD".into(),
        subjects: vec!["wild.>".into()],
        storage: StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut settings, mut config) = (nats_settings("cutoff"), nats_config(&server.url()));
    settings.drain_timeout = Duration::from_secs(1);
    // Long enough that the test sees what is nak'd at once apart from what waits for it.
    config.consumer.ack_wait = Duration::from_secs(5);
    let topic = "review.cutoff";
    let first_bus = eventbus_nats::connect(settings.clone(), config.clone())
        .await
        .unwrap();
    let first = Recorder::<i64>::new();
    let f = first.clone();
    let subscription = first_bus
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let f = f.clone();
                async move {
                    f.push(envelope.event_version);
                    if envelope.event_version == 1 {
                        return Err(HandlerError::permanent("refused"));
                    }
                    Ok(())
                }
            }),
            SubscribeOptions::new().with_dead_letter(DeadLetter::Topic("wild.cutoff".into())),
        )
        .await
        .unwrap();
    for version in 1..=2 {
        first_bus
            .publish_envelope(topic, &envelope("c-1", version))
            .await
            .unwrap();
    }
    eventually("the dead-letter write of v1 to fail", || async {
        first_bus.transport().stats().dead_letter_failures >= 1
    })
    .await;
    assert_eq!(first.events(), [1], "v2 ran before v1 was settled");

    let second_bus = if close_the_bus {
        first_bus.close().await.unwrap();
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap()
    } else {
        subscription.unsubscribe().await.unwrap();
        first_bus
    };
    let second = Recorder::<(String, i64)>::new();
    second_bus
        .subscribe_envelope(topic, recording(&second), SubscribeOptions::new())
        .await
        .unwrap();
    let events = second
        .wait_for("v1 and v2 on the next subscription", |e| {
            e.iter().any(|(_, v)| *v == 1) && e.iter().any(|(_, v)| *v == 2)
        })
        .await;
    let versions: Vec<i64> = events.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        versions[0], 1,
        "the next subscription of the durable handled {versions:?}: v2 was given back while v1 \
         (cut off at the drain deadline during its dead-letter write) was left unsettled"
    );
    integration_tests::assert_replays_are_in_order_suffixes(&events);
    second_bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_gives_back_a_message_cut_off_in_its_dead_letter_write_before_later_ones() {
    dead_letter_write_cut_off_at_the_deadline(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_gives_back_a_message_cut_off_in_its_dead_letter_write_before_later_ones() {
    dead_letter_write_cut_off_at_the_deadline(true).await;
}

/// Rule: "a stalled key holds one actor and its own lane, nothing else" (engine) and
/// "DeadLetter::Disabled: the aggregate waits" — only that aggregate.
///
/// With dead-lettering disabled one aggregate is stalled (retried for ever); the server is
/// killed and restarted on the same store. Other aggregates must still be consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_aggregate_does_not_stop_the_subscription_after_a_server_restart() {
    consumed_after_a_server_restart(true).await;
}

/// Control for the test above: the same restart without a stalled aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_the_subscription_resumes_after_a_server_restart_without_a_stall() {
    consumed_after_a_server_restart(false).await;
}

async fn consumed_after_a_server_restart(stall: bool) {
    let mut server = NatsServer::start();
    let (mut settings, mut config) = (nats_settings("stalled"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_secs(1);
    settings.drain_timeout = Duration::from_secs(1);
    settings.pool.retry.max_attempts = 2;
    settings.pool.retry.initial_backoff = Duration::from_millis(10);
    settings.pool.retry.max_backoff = Duration::from_millis(100);
    settings.settlement =
        eventbus_core::Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "review.stalled";
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.aggregate_id == "stuck" {
                    return Err(HandlerError::permanent("never succeeds"));
                }
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok(())
            }
        }),
        SubscribeOptions::new().with_dead_letter(DeadLetter::Disabled),
    )
    .await
    .unwrap();
    if stall {
        bus.publish_envelope(topic, &envelope("stuck", 1))
            .await
            .unwrap();
    }
    bus.publish_envelope(topic, &envelope("before", 1))
        .await
        .unwrap();
    handled
        .wait_for("the other aggregate before the restart", |e| {
            e.contains(&("before".to_owned(), 1))
        })
        .await;
    eventually("the stuck aggregate to stall", || async {
        bus.pool_stats().stalled == usize::from(stall)
    })
    .await;

    tokio::task::block_in_place(|| server.start_again());
    let publisher = bus.clone();
    eventually("a publish after the restart", || {
        let publisher = publisher.clone();
        async move {
            publisher
                .publish_envelope(topic, &envelope("after", 1))
                .await
                .is_ok()
        }
    })
    .await;
    let consumed = within(Duration::from_secs(20), || {
        handled.events().contains(&("after".to_owned(), 1))
    })
    .await;
    assert!(
        consumed,
        "an aggregate published after the restart was never handled while another one is \
         stalled: handled {:?}, pool {:?}, stats {:?}",
        handled.events(),
        bus.pool_stats(),
        bus.transport().stats()
    );
    bus.close().await.unwrap();
}

/// Rule: "On NATS a new subscription of the same topic (same durable) waits for an unsubscribe
/// in progress, so it reads the given-back messages before anything newer" and "handlers of one
/// aggregate ... never overlap and start in publish order" (issue 9 defect 1: reorder on
/// re-subscribe).
///
/// Same as defect 1, with the unsubscribe wrapped in a timeout (a caller's shutdown budget): v1
/// runs, v2 is queued behind it, the unsubscribe future is dropped, the topic is subscribed
/// again and v3 published. v3 must not be handled before v2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_unsubscribe_does_not_let_a_new_subscription_overtake_its_queue() {
    let server = NatsServer::start();
    let (mut settings, config) = (nats_settings("dropped"), nats_config(&server.url()));
    settings.drain_timeout = Duration::from_secs(20);
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "review.dropped";
    let handled = Recorder::<(&'static str, i64)>::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, g) = (handled.clone(), gate.clone());
    let subscription = bus
        .subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (h, g) = (h.clone(), g.clone());
                async move {
                    h.push(("old", envelope.event_version));
                    if envelope.event_version == 1 {
                        g.acquire().await.unwrap().forget();
                    }
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    for version in 1..=2 {
        bus.publish_envelope(topic, &envelope("k", version))
            .await
            .unwrap();
    }
    handled
        .wait_for("v1 running", |e| e.contains(&("old", 1)))
        .await;
    eventually("v2 queued behind v1", || async {
        bus.pool_stats().queued >= 1
    })
    .await;
    let dropped =
        tokio::time::timeout(Duration::from_millis(300), subscription.unsubscribe()).await;
    assert!(dropped.is_err(), "unsubscribe returned while v1 still ran");

    let resubscribing = {
        let (bus, h) = (bus.clone(), handled.clone());
        tokio::spawn(async move {
            bus.subscribe_envelope(
                topic,
                Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                    let h = h.clone();
                    async move {
                        h.push(("new", envelope.event_version));
                        Ok(())
                    }
                }),
                SubscribeOptions::new(),
            )
            .await
            .unwrap()
        })
    };
    bus.publish_envelope(topic, &envelope("k", 3))
        .await
        .unwrap();
    // Give a wrongly ordered handling of v3 the chance to happen while v1 still runs.
    let overtaken = within(Duration::from_secs(3), || {
        handled.events().iter().any(|(_, v)| *v == 3)
    })
    .await;
    gate.add_permits(1);
    let events = handled
        .wait_for("v2 and v3", |e| {
            e.iter().any(|(_, v)| *v == 2) && e.iter().any(|(_, v)| *v == 3)
        })
        .await;
    let _subscription = resubscribing.await.unwrap();
    let first = |version: i64| events.iter().position(|(_, v)| *v == version).unwrap();
    assert!(
        !overtaken && first(2) < first(3),
        "v3 was handled while v1 still ran, before v2: {events:?}"
    );
    bus.close().await.unwrap();
}

/// Rule: "Each dead letter is its own message ... gets the idempotency key
/// `dlq:{subscription}:{topic}:{position}` ... so a retried write is stored once and two
/// subscriptions each store theirs" — and nothing terminated is lost.
///
/// The topic lives in a memory stream (someone's wildcard stream); the server restarts, the
/// stream is made again and its sequences start over at 1. The next dead-lettered event has the
/// same position, hence the same `Nats-Msg-Id`, as the first one: the dead-letter stream must
/// still store it (the original is `term`'d, so a dropped dead letter is a lost message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_after_the_topics_sequences_restarted_is_not_dropped_as_a_duplicate() {
    let mut server = NatsServer::start();
    {
        let client = async_nats::connect(server.url()).await.unwrap();
        jetstream::new(client)
            .create_stream(jetstream::stream::Config {
                name: "MEM".into(),
                subjects: vec!["mem.>".into()],
                storage: StorageType::Memory,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (mut settings, mut config) = (nats_settings("seqdup"), nats_config(&server.url()));
    config.publish_timeout = Duration::from_secs(1);
    settings.drain_timeout = Duration::from_secs(1);
    let bus = Arc::new(
        eventbus_nats::connect(settings.clone(), config)
            .await
            .unwrap(),
    );
    let topic = "mem.orders";
    let dead_letter_topic = "review.seqdup";
    let handled = Recorder::<String>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push(envelope.event_id.clone());
                Err(HandlerError::permanent("refused"))
            }
        }),
        SubscribeOptions::new().with_dead_letter(DeadLetter::Topic(dead_letter_topic.into())),
    )
    .await
    .unwrap();
    let first = envelope("s-1", 1);
    bus.publish_envelope(topic, &first).await.unwrap();
    eventually("the first dead letter", || async {
        bus.transport().stats().dead_lettered >= 1
    })
    .await;

    tokio::task::block_in_place(|| server.start_again());
    let second = envelope("s-2", 1);
    let publisher = bus.clone();
    let published = second.clone();
    eventually("a publish after the restart", || {
        let (publisher, published) = (publisher.clone(), published.clone());
        async move { publisher.publish_envelope(topic, &published).await.is_ok() }
    })
    .await;
    handled
        .wait_for("the second event handled", |e| e.contains(&second.event_id))
        .await;
    eventually("the second dead letter written", || async {
        bus.transport().stats().dead_lettered >= 2
    })
    .await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let stream = js.stream_by_subject(dead_letter_topic).await.unwrap();
    let info = js
        .get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        info.state.messages,
        2,
        "both events were dead-lettered and terminated, the dead-letter stream holds {} \
         (stats {:?})",
        info.state.messages,
        bus.transport().stats()
    );
    bus.close().await.unwrap();
}
