//! Side by side with the Go services on NATS JetStream: a Go service running the Go SDK itself
//! (jxt-core v1.7.5 through `interop/go/cmd/peer`: its YAML start-up path, which makes
//! `BUSINESS_STREAM` over `business.>`; `PublishEnvelope`, `SubscribeEnvelope` on its durable
//! `business-consumer-unified_{topic}`, `Close`) and this SDK publish to and consume from the
//! same subjects of a real nats-server.

// Test code: a failed unwrap or expect is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use eventbus::{HeartbeatOptions, Heartbeats};
use eventbus_core::{
    DeadLetter, Envelope, ErrorKind, EventBus, HEARTBEAT_TOPIC, HandlerContext, HandlerError,
    StartPosition, SubscribeOptions,
};
use eventbus_nats::StreamDefinition;
use integration_tests::go_peer::{
    GoHandled, GoService, HandledAt, assert_handled_by_go_as_sent, assert_handled_here_as_sent,
    heartbeat_sources, interop_envelopes as envelopes, record_envelopes, record_with_time,
};
use integration_tests::{
    Recorder, assert_first_handlings_in_order, collect, eventually, nats_config, nats_settings,
};
use test_brokers::NatsServer;

/// The durable a YAML-configured Go service reads `topic` with: `business-consumer-unified_`
/// and the topic with `.` as `_` (nats.go, subscribeJetStreamWithStorage).
fn go_durable(topic: &str) -> String {
    format!("business-consumer-unified_{}", topic.replace('.', "_"))
}

/// The stream a Go service configured with the default `BUSINESS_STREAM` ensures when it
/// subscribes to `topic` outside that stream: `BUSINESS_STREAM_{suffix}` over the topic alone.
fn go_named_stream(topic: &str) -> StreamDefinition {
    StreamDefinition::new(
        format!("BUSINESS_STREAM_{}", topic.replace('.', "_")),
        vec![topic.into()],
    )
}

/// The Go service publishes into `BUSINESS_STREAM` (`business.>`, made at its start-up); an
/// ordered envelope subscription here binds to that stream and handles every event, each
/// aggregate's in version order, with the payload bytes exactly as the Go service sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_the_go_service_publishes_are_handled_here_in_order_with_identical_payloads() {
    let server = NatsServer::start();
    let topic = "business.go-to-rust";
    let sent = envelopes("g2r", 40, 25);
    let url = server.url();
    tokio::task::block_in_place(|| GoService::nats(&url).publish(topic, &sent));

    let bus = eventbus_nats::connect(nats_settings("interop-rust"), nats_config(&url))
        .await
        .unwrap();
    let handled = record_envelopes(&bus, topic).await;
    assert_handled_here_as_sent(&handled, &sent, 40, 25).await;
    bus.close().await.unwrap();
}

/// This SDK publishes; the Go service (`SubscribeEnvelope`: a pull subscription on its durable,
/// its actor pool) handles every event with the same fields, each aggregate's in version order.
/// The topic lies outside `BUSINESS_STREAM`, so the Go SDK's subscribe ensures the dedicated
/// stream `BUSINESS_STREAM_{suffix}`: this SDK made the topic's stream under that name
/// (`[[nats.streams]]`, the deploy advice of docs/migration.md), and the Go service finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_published_here_are_handled_by_the_go_service_with_equal_fields() {
    let server = NatsServer::start();
    let topic = "interop.rust-to-go";
    let sent = envelopes("r2g", 40, 25);
    let url = server.url();
    let mut config = nats_config(&url);
    config.streams = vec![go_named_stream(topic)];
    let bus = eventbus_nats::connect(nats_settings("interop-rust"), config)
        .await
        .unwrap();
    for envelope in &sent {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }

    let mut go = GoService::nats(&url).subscribe(topic, Some(sent.len()));
    let mut handled: Vec<GoHandled> = Vec::new();
    go.read_until("every event published here", &mut handled, |h| {
        h.len() >= sent.len()
    })
    .await;
    assert_handled_by_go_as_sent(&handled, &sent, 40, 25);
    bus.close().await.unwrap();
}

/// Why the deploy advice exists: with this SDK's default stream name (`STREAM_{topic}`), a Go
/// service that subscribes to the topic later cannot start its subscription: its dedicated
/// `BUSINESS_STREAM_{suffix}` would cover the same subject, and JetStream refuses overlapping
/// streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_this_sdks_default_stream_name_a_go_service_cannot_subscribe_later() {
    let server = NatsServer::start();
    let topic = "interop.default-name";
    let url = server.url();
    let bus = eventbus_nats::connect(nats_settings("interop-rust"), nats_config(&url))
        .await
        .unwrap();
    bus.publish_envelope(topic, &envelopes("dn", 1, 1)[0])
        .await
        .unwrap();
    let failure = tokio::task::block_in_place(|| GoService::nats(&url).failure("subscribe", topic));
    assert!(
        failure.contains("BUSINESS_STREAM_interop_default-name") && failure.contains("overlap"),
        "{failure}"
    );
    bus.close().await.unwrap();
}

/// The takeover after a Go service was killed: it consumed part of a stream with its durable
/// (`business-consumer-unified_{suffix}`) and died without its `Close`, so the durable is still
/// there; a service on this SDK subscribes with `SubscribeOptions::with_durable` naming it and
/// goes on where the Go service stopped: nothing lost, nothing handled again but what the Go
/// service had not acknowledged (the durable's pending acks when it died), each aggregate's
/// events in version order on the merged Go-then-Rust timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_here_adopts_a_killed_go_services_durable_and_goes_on_where_it_stopped() {
    let server = NatsServer::start();
    let topic = "business.takeover";
    let durable = go_durable(topic);
    let sent = envelopes("take", 20, 30);
    let url = server.url();
    let go_service = GoService::nats(&url);
    tokio::task::block_in_place(|| go_service.publish(topic, &sent));
    let mut go = go_service.subscribe(topic, None);
    let mut go_handled: Vec<GoHandled> = Vec::new();
    go.read_until("the Go service's first 200", &mut go_handled, |h| {
        h.len() >= 200
    })
    .await;
    tokio::task::block_in_place(|| go.kill());
    go.read_available(&mut go_handled);
    let unacknowledged = pending_acks(&server, "BUSINESS_STREAM", &durable).await;

    let bus = eventbus_nats::connect(nats_settings("interop-takeover"), nats_config(&url))
        .await
        .unwrap();
    let handled = Recorder::<HandledAt>::new();
    bus.subscribe_envelope(
        topic,
        record_with_time(&handled),
        SubscribeOptions::new().with_durable(&durable),
    )
    .await
    .unwrap();
    let go_ids: BTreeSet<&str> = go_handled.iter().map(|g| g.event_id.as_str()).collect();
    let rest: BTreeSet<&str> = sent
        .iter()
        .map(|e| e.event_id.as_str())
        .filter(|id| !go_ids.contains(id))
        .collect();
    let events = handled
        .wait_for("what the Go service did not handle", |e| {
            let ids: BTreeSet<&str> = e.iter().map(|(_, _, id, _)| id.as_str()).collect();
            rest.is_subset(&ids)
        })
        .await;
    let again: BTreeSet<&str> = events
        .iter()
        .map(|(_, _, id, _)| id.as_str())
        .filter(|id| go_ids.contains(id))
        .collect();
    eprintln!(
        "the Go service handled {}, had {unacknowledged} unacknowledged when killed; {} handled \
         again here",
        go_ids.len(),
        again.len()
    );
    assert!(
        again.len() <= unacknowledged,
        "handled again: {} of what the Go service handled, more than the {unacknowledged} it had \
         not acknowledged",
        again.len()
    );
    let timeline: Vec<(String, i64)> = go_handled
        .iter()
        .map(|g| (g.aggregate_id.clone(), g.event_version))
        .chain(events.iter().map(|(a, v, ..)| (a.clone(), *v)))
        .collect();
    assert_first_handlings_in_order(&timeline, 20, 30);
    bus.close().await.unwrap();
}

/// How many messages the Go SDK fetches at a time (nats.go, processUnifiedPullMessages:
/// `sub.Fetch(500, …)`): what it holds unacknowledged at most, and so the takeover's window.
const GO_FETCH_BATCH: usize = 500;

/// How a Go service is stopped in a takeover test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoStop {
    /// SIGTERM: the Go service calls the SDK's `Close`, which deletes its durables.
    Graceful,
    /// SIGKILL: its durable stays, read by nobody.
    Killed,
    /// SIGTERM, started again at once (its durable made again, read from the stream's
    /// beginning), then SIGTERM again.
    Restarted,
}

/// The Go service's handlings as (began, aggregate, version), merged with this service's, sorted
/// by time; and a check that no Go handling of an aggregate began after this service's first
/// handling of it (the two never ran one aggregate at once, nor the Go service after this one).
fn merged_timeline(go_handled: &[GoHandled], here: &[HandledAt]) -> Vec<(String, i64)> {
    let mut first_here: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for (aggregate, _, _, at) in here {
        let first = first_here.entry(aggregate.as_str()).or_insert(*at);
        *first = (*first).min(*at);
    }
    let late: Vec<(&str, i64)> = go_handled
        .iter()
        .filter(|g| {
            first_here
                .get(g.aggregate_id.as_str())
                .is_some_and(|first| g.handled_at_ns > *first)
        })
        .map(|g| (g.aggregate_id.as_str(), g.event_version))
        .collect();
    assert!(
        late.is_empty(),
        "the Go service handled these after this service began their aggregates: {late:?}"
    );
    let mut timeline: Vec<(i64, String, i64)> = go_handled
        .iter()
        .map(|g| (g.handled_at_ns, g.aggregate_id.clone(), g.event_version))
        .chain(here.iter().map(|(a, v, _, at)| (*at, a.clone(), *v)))
        .collect();
    timeline.sort_by_key(|(at, ..)| *at);
    timeline.into_iter().map(|(_, a, v)| (a, v)).collect()
}

/// Checks what this service handled of `sent` after the Go service handled `go_handled`:
/// nothing lost, at most [`GO_FETCH_BATCH`] handled again, and per aggregate no overlap and
/// first handlings in version order (`aggregates` × `versions`). Returns how many were handled
/// again.
async fn assert_taken_over(
    what: &str,
    sent: &[Envelope],
    go_handled: &[GoHandled],
    handled: &Recorder<HandledAt>,
    aggregates: usize,
    versions: i64,
) -> usize {
    let everything: BTreeSet<&str> = sent.iter().map(|e| e.event_id.as_str()).collect();
    let go_ids: BTreeSet<&str> = go_handled.iter().map(|g| g.event_id.as_str()).collect();
    let events = handled
        .wait_for(what, |e| {
            let mut ids = go_ids.clone();
            ids.extend(e.iter().map(|(_, _, id, _)| id.as_str()));
            ids == everything
        })
        .await;
    let again = events
        .iter()
        .map(|(_, _, id, _)| id.as_str())
        .filter(|id| go_ids.contains(id))
        .collect::<BTreeSet<_>>()
        .len();
    assert!(
        again <= GO_FETCH_BATCH,
        "{what}: handled again {again} of what the Go service handled, more than one fetch of the Go SDK"
    );
    let order = merged_timeline(go_handled, &events);
    assert_first_handlings_in_order(&order, aggregates, versions);
    again
}

/// The takeover of `docs/migration.md`: a Go service reads `business.handover` (with handlers
/// that work 20 ms) and `business.handover-b` with its durables; a service on this SDK is
/// deployed beside it, configured by `eventbus config convert --take-over business.handover
/// --take-over business.handover-b` (`take_over_from` naming those durables, `BUSINESS_STREAM`
/// bound; shorter `nats.take_over` waits), and its `subscribe` waits (a call dropped while it
/// waits makes nothing); a second Go service publishes throughout; the Go subscribers are
/// stopped (`stop`). The service here subscribes to one topic, then to the other, and starts
/// each durable right after the Go durable's last ack floor: nothing lost, handled again at most
/// one fetch of the Go SDK ([`GO_FETCH_BATCH`]), no Go handling of an aggregate after this
/// service began it, and every aggregate's first handlings in version order on the merged
/// Go-then-Rust timeline.
async fn take_over_from_a_go_service(stop: GoStop) {
    let server = NatsServer::start();
    let url = server.url();
    let (topic, other) = ("business.handover", "business.handover-b");
    let durable = go_durable(topic);
    let all = envelopes("over", 20, 60);
    let (before, during) = all.split_at(600);
    let others = envelopes("other", 10, 10);
    let go_service = GoService::nats(&url);
    tokio::task::block_in_place(|| {
        go_service.publish(topic, before);
        go_service.publish(other, &others);
    });
    let mut go = go_service.subscribe_working(topic, None, Duration::from_millis(20));
    let mut go_other = go_service.subscribe(other, None);
    let mut go_handled: Vec<GoHandled> = Vec::new();
    let mut go_other_handled: Vec<GoHandled> = Vec::new();
    go.read_until("the Go service handling", &mut go_handled, |h| {
        h.len() >= 100
    })
    .await;
    go_other
        .read_until(
            "the Go service handling the other topic",
            &mut go_other_handled,
            |h| h.len() >= 50,
        )
        .await;
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = js.get_stream("BUSINESS_STREAM").await.unwrap();

    // The service here runs what `eventbus config convert --take-over …` wrote for the Go
    // service's YAML (the CLI's tests check the fixture is that output), with shorter waits.
    let converted = eventbus::Config::from_toml_str(include_str!(
        "../../crates/eventbus-cli/tests/fixtures/go-service.toml"
    ))
    .unwrap();
    let mut config = converted.nats;
    config.urls = vec![url.clone()];
    // A restart must come within the grace period: the Go service's Close and start-up take
    // a few seconds here.
    let grace = if stop == GoStop::Restarted { 10 } else { 5 };
    config.take_over = eventbus_nats::TakeOverSettings {
        idle: Duration::from_secs(5),
        grace: Duration::from_secs(grace),
    };
    assert_eq!(
        config.topic(topic).take_over_from.as_deref(),
        Some(durable.as_str())
    );
    let bus = Arc::new(
        eventbus_nats::connect(nats_settings(&converted.client_id), config)
            .await
            .unwrap(),
    );
    let handled = Recorder::<HandledAt>::new();
    let handled_other = Recorder::<HandledAt>::new();
    // Cancel safety: a subscribe dropped while it waits for the Go service made nothing.
    let waited = tokio::time::timeout(
        Duration::from_secs(1),
        bus.subscribe_envelope(topic, record_with_time(&handled), SubscribeOptions::new()),
    )
    .await;
    assert!(
        waited.is_err(),
        "subscribe returned while the Go service still reads its durable"
    );
    let ours = bus.transport().durable_name(topic, 1);
    assert!(
        stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&ours)
            .await
            .is_err(),
        "a dropped subscribe made durable {ours}"
    );
    // The service subscribes to one topic, then to the other.
    let subscribing = tokio::spawn({
        let bus = bus.clone();
        let (first, second) = (record_with_time(&handled), record_with_time(&handled_other));
        async move {
            let one = bus
                .subscribe_envelope(topic, first, SubscribeOptions::new())
                .await?;
            let two = bus
                .subscribe_envelope(other, second, SubscribeOptions::new())
                .await?;
            Ok::<_, eventbus_core::Error>((one, two))
        }
    });
    let publisher = {
        let publisher = GoService::nats(&url).with_name("go-publisher");
        let during = during.to_vec();
        std::thread::spawn(move || publisher.publish(topic, &during))
    };
    let published_meanwhile: BTreeSet<&str> = during.iter().map(|e| e.event_id.as_str()).collect();
    go.read_until(
        "the Go service handling what was published meanwhile",
        &mut go_handled,
        |h| {
            h.iter()
                .filter(|g| published_meanwhile.contains(g.event_id.as_str()))
                .count()
                >= 100
        },
    )
    .await;
    assert!(
        !subscribing.is_finished() && handled.events().is_empty(),
        "this service read before the Go service stopped"
    );
    tokio::task::block_in_place(|| match stop {
        GoStop::Graceful => {
            go.stop();
            go_other.stop();
        }
        GoStop::Killed => {
            go.kill();
            go_other.kill();
        }
        GoStop::Restarted => go.stop(),
    });
    if stop == GoStop::Restarted {
        go.read_available(&mut go_handled);
        let mut again = go_service.subscribe_working(topic, None, Duration::from_millis(20));
        tokio::task::block_in_place(|| go_other.stop());
        let mut rerun: Vec<GoHandled> = Vec::new();
        // 700 handlings of 20 ms each: longer than the grace period since the first stop.
        again
            .read_until("the restarted Go service handling", &mut rerun, |h| {
                h.len() >= 700
            })
            .await;
        assert!(
            !subscribing.is_finished() && handled.events().is_empty(),
            "this service read while the restarted Go service ran"
        );
        tokio::task::block_in_place(|| again.stop());
        again.read_available(&mut rerun);
        go_handled.extend(rerun);
    }
    go.read_available(&mut go_handled);
    go_other.read_available(&mut go_other_handled);
    // The Go SDK's Close deletes the durable it read with; a killed service leaves it.
    let left = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&durable)
        .await
        .is_ok();
    assert_eq!(
        left,
        stop == GoStop::Killed,
        "{stop:?}: the Go durable left: {left}"
    );
    let _subscriptions = tokio::time::timeout(Duration::from_secs(60), subscribing)
        .await
        .expect("subscribe returns once the Go service stopped")
        .unwrap()
        .unwrap();
    tokio::task::block_in_place(|| publisher.join().unwrap());
    let again = assert_taken_over(
        "everything the Go service did not handle",
        &all,
        &go_handled,
        &handled,
        20,
        60,
    )
    .await;
    let again_other = assert_taken_over(
        "everything of the other topic the Go service did not handle",
        &others,
        &go_other_handled,
        &handled_other,
        10,
        10,
    )
    .await;
    eprintln!(
        "{stop:?}: the Go service handled {} of {}, this service {} ({again} again); other topic: \
         {} of {}, {again_other} again",
        go_handled.len(),
        all.len(),
        handled.events().len(),
        go_other_handled.len(),
        others.len()
    );
    bus.close().await.unwrap();
}

/// The NATS migration survives the ordinary, graceful shutdown of the Go service (whose `Close`
/// deletes its durable): see [`take_over_from_a_go_service`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_here_takes_over_from_a_go_service_stopped_the_ordinary_way_and_loses_nothing() {
    take_over_from_a_go_service(GoStop::Graceful).await;
}

/// The same takeover when the Go service is killed: its durable stays, and once nobody pulls
/// from it and nothing is acknowledged for `nats.take_over.idle`, this service starts after its
/// ack floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_here_takes_over_from_a_killed_go_service_once_its_durable_lies_idle() {
    take_over_from_a_go_service(GoStop::Killed).await;
}

/// A Go service stopped and started again while this service waits (a restart, not a
/// retirement): its durable, deleted by the first `Close`, is made again within the grace period
/// and read from the stream's beginning; this service waits on, and takes over only after the
/// second stop, after the highest ack floor it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_service_restarted_while_this_one_waits_is_waited_for_again() {
    take_over_from_a_go_service(GoStop::Restarted).await;
}

/// Taking over from a durable that is not there (the Go service already stopped, its `Close`
/// deleted the durable) is refused with a configuration error that says so, rather than
/// starting somewhere the user did not choose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taking_over_from_a_durable_that_is_gone_is_a_configuration_error() {
    let server = NatsServer::start();
    let topic = "business.gone";
    let mut config = nats_config(&server.url());
    config.topics.insert(
        topic.into(),
        eventbus_nats::TopicOptions {
            take_over_from: Some(go_durable(topic)),
            ..eventbus_nats::TopicOptions::default()
        },
    );
    let bus = eventbus_nats::connect(nats_settings("gone"), config)
        .await
        .unwrap();
    let refused = bus
        .subscribe_envelope(topic, noop(), SubscribeOptions::new())
        .await
        .expect_err("nothing to take over from");
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(
        refused.to_string().contains("take_over_from")
            && refused.to_string().contains("cannot be read"),
        "{refused}"
    );
    // The takeover is the bus's own durable's: a subscription naming another is refused, not
    // silently started elsewhere.
    let named = bus
        .subscribe_envelope(topic, noop(), SubscribeOptions::new().with_durable("mine"))
        .await
        .expect_err("a named durable cannot take over");
    assert_eq!(named.kind(), ErrorKind::Config, "{named}");
    assert!(named.to_string().contains("take_over_from"), "{named}");
    bus.close().await.unwrap();
}

/// How many messages durable `durable` of `stream` has delivered and not had acknowledged.
async fn pending_acks(server: &NatsServer, stream: &str, durable: &str) -> usize {
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    consumer.info().await.unwrap().num_ack_pending
}

/// A durable named by a subscription that filters another subject is not adopted: it belongs to
/// something else, and reading it would move or mix its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_that_filters_another_subject_is_refused() {
    let server = NatsServer::start();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "ADOPT".into(),
            subjects: vec!["adopt.a".into(), "adopt.b".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("theirs".into()),
            filter_subject: "adopt.b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let bus = eventbus_nats::connect(nats_settings("adopt"), nats_config(&server.url()))
        .await
        .unwrap();
    let refused = bus
        .subscribe_envelope(
            "adopt.a",
            Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
                Ok::<(), HandlerError>(())
            }),
            SubscribeOptions::new().with_durable("theirs"),
        )
        .await
        .expect_err("a durable of another subject");
    assert_eq!(refused.kind(), ErrorKind::Config, "{refused}");
    assert!(refused.to_string().contains("durable"), "{refused}");
    assert!(refused.to_string().contains("adopt.b"), "{refused}");
    bus.close().await.unwrap();
}

/// Where a durable made by a subscription starts: `New` skips what the stream held,
/// `FromSequence` starts at that sequence, `All` (the default) reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_durable_starts_where_the_subscription_says() {
    let server = NatsServer::start();
    let topic = "interop.start";
    let bus = eventbus_nats::connect(nats_settings("start"), nats_config(&server.url()))
        .await
        .unwrap();
    let before = envelopes("before", 1, 5);
    for envelope in &before {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }
    let mut recorders = Vec::new();
    for (durable, start) in [
        ("start-all", StartPosition::All),
        ("start-new", StartPosition::New),
        ("start-seq", StartPosition::FromSequence(4)),
    ] {
        let handled = Recorder::<i64>::new();
        let h = handled.clone();
        bus.subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let h = h.clone();
                let version = envelope.event_version;
                async move {
                    h.push(version);
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new()
                .with_durable(durable)
                .with_start(start),
        )
        .await
        .unwrap();
        recorders.push(handled);
    }
    let after: Vec<Envelope> = (6..=8)
        .map(|version| {
            Envelope::new(
                "before-0",
                "Interop.Changed",
                version,
                &serde_json::json!({}),
            )
            .unwrap()
        })
        .collect();
    for envelope in &after {
        bus.publish_envelope(topic, envelope).await.unwrap();
    }
    let all = recorders[0].wait_for("all", |e| e.len() >= 8).await;
    assert_eq!(all, [1, 2, 3, 4, 5, 6, 7, 8]);
    let new = recorders[1].wait_for("new only", |e| e.len() >= 3).await;
    assert_eq!(new, [6, 7, 8]);
    let from = recorders[2]
        .wait_for("from sequence 4", |e| e.len() >= 5)
        .await;
    assert_eq!(from, [4, 5, 6, 7, 8]);
    bus.close().await.unwrap();
}

/// The configuration of stream `name`, as the server reports it.
async fn stream_config(server: &NatsServer, name: &str) -> async_nats::jetstream::stream::Config {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().config.clone()
}

/// A Go service owns a wildcard stream (`BUSINESS_STREAM`, `business.>`, made at its start-up,
/// keeping at most 10,000 messages / 100 MiB / 24 h and discarding the oldest). This SDK binds
/// to it without changing it, and dead letters, given a topic outside the wildcard, go to a file
/// stream of their own (the default `{topic}.DLQ` would fall under the Go service's stream,
/// where the oldest are discarded beyond its limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_sdk_binds_to_a_go_services_wildcard_stream_and_keeps_dead_letters_apart() {
    let server = NatsServer::start();
    let url = server.url();
    let topic = "business.orders";
    let sent = envelopes("wild", 5, 4);
    tokio::task::block_in_place(|| GoService::nats(&url).publish(topic, &sent));
    let before = stream_config(&server, "BUSINESS_STREAM").await;
    assert_eq!(before.subjects, ["business.>"]);
    assert_eq!(
        (before.max_messages, before.max_bytes, before.max_age),
        (10_000, 100 << 20, Duration::from_secs(24 * 3600)),
        "the Go SDK's stream limits (convertJetStreamConfig)"
    );
    assert_eq!(
        before.discard,
        async_nats::jetstream::stream::DiscardPolicy::Old
    );
    assert_eq!(
        before.storage,
        async_nats::jetstream::stream::StorageType::File
    );

    let bus = eventbus_nats::connect(nats_settings("wild"), nats_config(&url))
        .await
        .unwrap();
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.aggregate_id == "wild-0" && envelope.event_version == 2 {
                    return Err(HandlerError::permanent("refused"));
                }
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok(())
            }
        }),
        SubscribeOptions::new()
            .with_dead_letter(DeadLetter::Topic("dead-letters.business.orders".into())),
    )
    .await
    .unwrap();
    handled
        .wait_for("every event but the refused one", |e| {
            e.len() == sent.len() - 1
        })
        .await;
    let dead = collect(&bus, "dead-letters.business.orders").await;
    let letters = dead.wait_for("the dead letter", |e| !e.is_empty()).await;
    let letter = Envelope::from_bytes(&letters[0].payload).unwrap();
    assert_eq!(
        (letter.aggregate_id.as_str(), letter.event_version),
        ("wild-0", 2)
    );

    let after = stream_config(&server, "BUSINESS_STREAM").await;
    assert_eq!(
        after.subjects, before.subjects,
        "the Go service's stream changed"
    );
    assert_eq!(
        (
            after.storage,
            after.max_messages,
            after.max_bytes,
            after.max_age
        ),
        (
            before.storage,
            before.max_messages,
            before.max_bytes,
            before.max_age
        ),
        "the Go service's stream changed"
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dead_stream = js
        .stream_by_subject("dead-letters.business.orders")
        .await
        .unwrap();
    assert_ne!(dead_stream, "BUSINESS_STREAM");
    assert_eq!(
        stream_config(&server, &dead_stream).await.storage,
        async_nats::jetstream::stream::StorageType::File,
        "dead letters are kept on disk"
    );
    bus.close().await.unwrap();
}

/// This SDK first. By default it makes a stream per topic (`STREAM_business_orders`), and a Go
/// service, whose start-up makes `BUSINESS_STREAM` over `business.>`, then cannot start
/// (JetStream refuses overlapping subjects). Configured with the Go service's stream
/// (`[[nats.streams]]`, the same name and subjects, what `eventbus config convert` writes), this
/// SDK makes that stream instead, and the Go service starts, finds it and publishes into it;
/// this SDK handles what it publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_go_services_stream_configured_here_a_go_service_can_start_later() {
    let go_startup =
        |url: &str, topic: &str, sent: &[Envelope]| GoService::nats(url).try_publish(topic, sent);
    let sent = envelopes("first", 5, 4);

    // Default naming: the Go service does not start.
    let server = NatsServer::start();
    let url = server.url();
    let bus = eventbus_nats::connect(nats_settings("first"), nats_config(&url))
        .await
        .unwrap();
    bus.publish_envelope("business.orders", &sent[0])
        .await
        .unwrap();
    let refused = tokio::task::block_in_place(|| go_startup(&url, "business.orders", &sent));
    let failure = refused.expect_err("overlapping subjects");
    assert!(failure.contains("overlap"), "{failure}");
    bus.close().await.unwrap();

    // The Go service's stream configured here: it starts.
    let server = NatsServer::start();
    let url = server.url();
    let mut config = nats_config(&url);
    config.streams = vec![StreamDefinition::new(
        "BUSINESS_STREAM",
        vec!["business.>".into()],
    )];
    let bus = eventbus_nats::connect(nats_settings("first"), config)
        .await
        .unwrap();
    let handled = Recorder::<(String, i64)>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        "business.orders",
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                h.push((envelope.aggregate_id.clone(), envelope.event_version));
                Ok::<(), HandlerError>(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    tokio::task::block_in_place(|| go_startup(&url, "business.orders", &sent)).unwrap();
    let events = handled
        .wait_for("what the Go service published", |e| e.len() == sent.len())
        .await;
    assert_first_handlings_in_order(&events, 5, 4);
    bus.close().await.unwrap();
}

/// One health view for a mixed fleet: a Go service's health-check message (the Go SDK's own
/// health-check publisher: its JSON, published with `Publish` on `jxt-core-health-check`, a
/// subject the SDK appends to `BUSINESS_STREAM`) is seen by this SDK's watcher, and this SDK's
/// heartbeat passes the Go SDK's parser (required fields, age, bus type) in a Go service reading
/// the topic with `Subscribe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_rust_services_see_each_others_health_check_heartbeats() {
    let server = NatsServer::start();
    let url = server.url();
    // The deploy advice (docs/migration.md, what `config convert` writes): streams this SDK
    // makes are named as the Go SDK's subscribe names a topic's own stream, so a Go service
    // that subscribes to the heartbeat topic later finds this one instead of failing on
    // overlapping subjects.
    let mut config = nats_config(&url);
    config.stream_prefix = "BUSINESS_STREAM_".into();
    let bus: Arc<dyn EventBus> = Arc::new(
        eventbus_nats::connect(nats_settings("rust-billing"), config)
            .await
            .unwrap(),
    );
    let watcher = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("rust-billing", "nats").with_publishing(false),
    )
    .await
    .unwrap();
    tokio::task::block_in_place(|| GoService::nats(&url).health_publish(HEARTBEAT_TOPIC));
    eventually("the Go heartbeat counted", || async {
        watcher.status().received > 0
    })
    .await;
    let seen = watcher.status().last.unwrap();
    // Every Go service's health checker on NATS names itself `nats-eventbus`
    // (nats.go, StartHealthCheckPublisher).
    assert_eq!(
        (seen.source.as_str(), seen.event_bus_type.as_str()),
        ("nats-eventbus", "nats")
    );

    let sender = Heartbeats::start(
        bus.clone(),
        HeartbeatOptions::new("rust-billing", "nats").with_monitoring(false),
    )
    .await
    .unwrap();
    let mut go = GoService::nats(&url).health_read(HEARTBEAT_TOPIC, 2);
    let mut lines = Vec::new();
    go.read_lines_until("the Go service reading both heartbeats", &mut lines, |l| {
        l.len() >= 2
    })
    .await;
    let sources = heartbeat_sources(&lines);
    assert!(sources.contains("rust-billing"), "{lines:?}");
    sender.stop().await.unwrap();
    watcher.stop().await.unwrap();
    bus.close().await.unwrap();
}

fn noop() -> Arc<dyn eventbus_core::EnvelopeHandler> {
    Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async { Ok::<(), HandlerError>(()) })
}

/// No two live subscriptions of one bus read one durable (they would share it as a work queue
/// and run an aggregate's events at once): not two that name it at the same time, and not a
/// named one and one whose durable the bus names the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_subscriptions_of_a_bus_never_read_one_durable() {
    let server = NatsServer::start();
    let bus = eventbus_nats::connect(nats_settings("svc"), nats_config(&server.url()))
        .await
        .unwrap();
    let (first, second) = tokio::join!(
        bus.subscribe_envelope(
            "durables.a",
            noop(),
            SubscribeOptions::new().with_durable("shared")
        ),
        bus.subscribe_envelope(
            "durables.a",
            noop(),
            SubscribeOptions::new().with_durable("shared")
        ),
    );
    let refused = [&first, &second]
        .iter()
        .filter(|result| {
            result
                .as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::Config)
        })
        .count();
    assert_eq!(
        (refused, first.is_ok() || second.is_ok()),
        (1, true),
        "{first:?} {second:?}"
    );
    // The bus names the first subscription of `durables.b` `svc_durables_b`.
    assert_eq!(
        bus.transport().durable_name("durables.b", 1),
        "svc_durables_b"
    );
    bus.subscribe_envelope(
        "durables.b",
        noop(),
        SubscribeOptions::new().with_durable("svc_durables_b"),
    )
    .await
    .unwrap();
    let clash = bus
        .subscribe_envelope("durables.b", noop(), SubscribeOptions::new())
        .await
        .expect_err("the bus's own name is read already");
    assert_eq!(clash.kind(), ErrorKind::Config, "{clash}");
    bus.close().await.unwrap();
}

/// A subscription that names its durable takes no numbered slot of the topic: the bus's own
/// durable of the topic keeps its name, and with it its position, whatever was subscribed
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_durable_leaves_the_buss_own_durable_where_it_was() {
    let server = NatsServer::start();
    let topic = "durables.kept";
    let first = eventbus_nats::connect(nats_settings("keeper"), nats_config(&server.url()))
        .await
        .unwrap();
    let handled = record_envelopes(&first, topic).await;
    let old = envelopes("kept", 2, 5);
    for envelope in &old {
        first.publish_envelope(topic, envelope).await.unwrap();
    }
    handled
        .wait_for("the first run", |e| e.len() == old.len())
        .await;
    first.close().await.unwrap();

    let next = eventbus_nats::connect(nats_settings("keeper"), nats_config(&server.url()))
        .await
        .unwrap();
    next.subscribe_envelope(topic, noop(), SubscribeOptions::new().with_durable("other"))
        .await
        .unwrap();
    let again = record_envelopes(&next, topic).await;
    let new = Envelope::new("kept-new", "Interop.Changed", 1, &serde_json::json!({})).unwrap();
    next.publish_envelope(topic, &new).await.unwrap();
    let events = again
        .wait_for("the new event", |e| e.iter().any(|(a, ..)| a == "kept-new"))
        .await;
    let replayed: Vec<&String> = events
        .iter()
        .map(|(aggregate, ..)| aggregate)
        .filter(|aggregate| aggregate.as_str() != "kept-new")
        .collect();
    assert!(replayed.is_empty(), "handled again: {replayed:?}");
    next.close().await.unwrap();
}

/// A partitioned topic whose publisher is still the Go service (which publishes to the bare
/// topic): the bare topic is one more subject of the group, read by one instance at a time, so
/// every Go event is handled, each aggregate's in order and all on one instance, while this
/// SDK's own events of the topic spread over the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_publisher_on_a_partitioned_topic_is_read_in_order_one_instance_at_a_time() {
    let server = NatsServer::start();
    let topic = "business.partitioned";
    let url = server.url();
    let go_sent = envelopes("go", 30, 10);
    let mut config = nats_config(&url);
    config.topics.insert(
        topic.into(),
        eventbus_nats::TopicOptions {
            partitions: Some(4),
            ..eventbus_nats::TopicOptions::default()
        },
    );
    config.scale_out.pinned_ttl = Duration::from_secs(2);
    // The Go service made its `business.>` stream: the partitions live in it too.
    tokio::task::block_in_place(|| GoService::nats(&url).publish(topic, &go_sent));
    let handled = Recorder::<(usize, String, i64)>::new();
    let mut instances = Vec::new();
    for instance in 0..2 {
        let bus = eventbus_nats::connect(nats_settings("partitioned"), config.clone())
            .await
            .unwrap();
        let h = handled.clone();
        bus.subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let h = h.clone();
                async move {
                    h.push((
                        instance,
                        envelope.aggregate_id.clone(),
                        envelope.event_version,
                    ));
                    Ok::<(), HandlerError>(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
        instances.push(bus);
    }
    let publisher = eventbus_nats::connect(nats_settings("partitioned-publisher"), config)
        .await
        .unwrap();
    let ours = envelopes("rust", 30, 10);
    for envelope in &ours {
        publisher.publish_envelope(topic, envelope).await.unwrap();
    }
    let total = go_sent.len() + ours.len();
    let events = handled
        .wait_for("every event of both publishers", |events| {
            events
                .iter()
                .map(|(_, aggregate, version)| (aggregate.clone(), *version))
                .collect::<std::collections::HashSet<_>>()
                .len()
                == total
        })
        .await;
    let order: Vec<(String, i64)> = events.iter().map(|(_, a, v)| (a.clone(), *v)).collect();
    assert_first_handlings_in_order(&order, 60, 10);
    let go_readers: std::collections::BTreeSet<usize> = events
        .iter()
        .filter(|(_, aggregate, _)| aggregate.starts_with("go"))
        .map(|(instance, ..)| *instance)
        .collect();
    let stream = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap())
        .stream_by_subject(format!("{topic}.0"))
        .await
        .unwrap();
    assert_eq!(
        stream, "BUSINESS_STREAM",
        "the partitions live in the Go service's stream"
    );
    eprintln!("Go events read by instance(s) {go_readers:?}");
    for bus in instances {
        bus.close().await.unwrap();
    }
    publisher.close().await.unwrap();
}
