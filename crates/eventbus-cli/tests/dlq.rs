//! `eventbus dlq list | show | replay` against real brokers: a service dead-letters two events,
//! the command lists them, replays one aggregate's back to its topic (the service handles it
//! this time), and lists what is left.

// Helpers run the binary; if it cannot be run or read, the test fails right there.
#![allow(
    clippy::expect_used,
    clippy::panic,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus::{Config, Envelope, HandlerContext, HandlerError, SubscribeOptions};
use test_brokers::{NatsServer, kafka_bootstrap};

// Each test binary uses a part of the shared helpers.
#[allow(dead_code)]
mod common;

use common::{Scratch, eventbus, text};

/// Runs `eventbus dlq {args[0]} --config {config} --topic {topic} {args[1..]}`: status, stdout,
/// stderr.
fn dlq(config: &Path, topic: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["dlq"];
    all.extend_from_slice(&args[..1]);
    all.extend([
        "--config",
        config.to_str().expect("UTF-8 path"),
        "--topic",
        topic,
    ]);
    all.extend_from_slice(&args[1..]);
    let output = tokio::task::block_in_place(|| eventbus(&all, ""));
    (
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

/// The data lines of `dlq list`'s output, split at its tabs.
fn listed(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .skip(1)
        .map(|line| line.split('\t').map(str::to_owned).collect())
        .collect()
}

async fn poll_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters_round_trip(config: &Path, topic: &str) {
    let bus = eventbus::connect(Config::load(Some(config)).unwrap())
        .await
        .unwrap();
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (b, h) = (broken.clone(), handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (b, h) = (b.clone(), h.clone());
            async move {
                if envelope.aggregate_id != "order-2" && b.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("inventory service refused"));
                }
                h.lock().unwrap().push(envelope.aggregate_id);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    for aggregate in ["order-1", "order-2", "order-3"] {
        let envelope = Envelope::new(aggregate, "Placed", 1, &aggregate).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    let dead_letter_topic = format!("{topic}.DLQ");
    poll_until("two dead letters stored", async || {
        bus.dead_letters(&dead_letter_topic)
            .await
            .is_ok_and(|letters| letters.len() == 2)
    })
    .await;

    let (status, stdout, stderr) = dlq(config, topic, &["list"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    let rows = listed(&stdout);
    let mut aggregates: Vec<&str> = rows.iter().map(|row| row[2].as_str()).collect();
    aggregates.sort_unstable();
    assert_eq!(aggregates, ["order-1", "order-3"], "{stdout}");
    assert!(
        rows.iter().all(|row| row[6] == "inventory service refused"),
        "{stdout}"
    );
    assert!(stderr.contains("2 of 2 dead letters"), "{stderr}");

    let (status, stdout, _) = dlq(
        config,
        topic,
        &["replay", "--aggregate", "order-1", "--dry-run"],
    );
    assert_eq!(status, Some(0));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let (status, _, stderr) = dlq(config, topic, &["replay"]);
    assert_eq!(status, Some(1), "a replay without a selection is refused");
    assert!(stderr.contains("--all"), "{stderr}");

    broken.store(false, Ordering::SeqCst);
    let (status, stdout, stderr) = dlq(config, topic, &["replay", "--aggregate", "order-1"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("replayed 1 of 1 selected"), "{stderr}");
    poll_until("order-1 handled after its replay", async || {
        handled.lock().unwrap().contains(&"order-1".to_owned())
    })
    .await;

    let (status, stdout, stderr) = dlq(config, topic, &["list"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    let rows = listed(&stdout);
    assert_eq!(rows.len(), 1, "{stdout}");
    assert_eq!(rows[0][2], "order-3");
    let (status, stdout, stderr) = dlq(config, topic, &["show", "--position", &rows[0][0]]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["original_topic"], topic);
    assert_eq!(shown["reason"], "inventory service refused");
    assert_eq!(shown["payload"]["aggregate_id"], "order-3");
    bus.close().await.unwrap();
}

/// A service whose handler fails `order-9` v1 while `broken`, recording what it handles, with
/// parking on.
async fn parking_service(
    config: &Path,
    topic: &str,
    broken: &Arc<AtomicBool>,
    handled: &Arc<Mutex<Vec<(String, i64)>>>,
) -> eventbus::Bus {
    let bus = eventbus::connect(Config::load(Some(config)).unwrap())
        .await
        .unwrap();
    let (b, h) = (broken.clone(), handled.clone());
    bus.subscribe_envelope(
        topic,
        Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
            let (b, h) = (b.clone(), h.clone());
            async move {
                if envelope.event_version == 1
                    && envelope.aggregate_id == "order-9"
                    && b.load(Ordering::SeqCst)
                {
                    return Err(HandlerError::permanent("price missing"));
                }
                h.lock()
                    .unwrap()
                    .push((envelope.aggregate_id, envelope.event_version));
                Ok(())
            }
        }),
        SubscribeOptions::new().with_park_on_dead_letter(true),
    )
    .await
    .unwrap();
    bus
}

/// With parking on, an aggregate's events after its dead letter are parked behind it, also
/// after the service restarted; a replay of the aggregate brings the failed event and its parked
/// successors back in their order, and the aggregate's new events are handled again afterwards.
async fn parked_events_come_back_in_order(config: &Path, topic: &str) {
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let bus = parking_service(config, topic, &broken, &handled).await;
    for (aggregate, version) in [
        ("order-9", 1),
        ("order-9", 2),
        ("order-8", 1),
        ("order-9", 3),
    ] {
        let envelope = Envelope::new(aggregate, "Changed", version, &version).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    let dead_letter_topic = format!("{topic}.DLQ");
    let stored = async |count: usize| {
        poll_until("the dead letters stored", async || {
            bus.dead_letters(&dead_letter_topic)
                .await
                .is_ok_and(|letters| letters.len() == count)
        })
        .await;
    };
    stored(3).await;
    let letters = bus.dead_letters(&dead_letter_topic).await.unwrap();
    let parked: Vec<(i64, bool)> = letters
        .iter()
        .map(|letter| (letter.envelope().unwrap().event_version, letter.is_parked()))
        .collect();
    assert_eq!(parked, [(1, false), (2, true), (3, true)]);
    assert_eq!(letters[0].reason(), Some("price missing"));
    poll_until("the other aggregate handled", async || {
        handled.lock().unwrap().contains(&("order-8".to_owned(), 1))
    })
    .await;
    bus.close().await.unwrap();
    drop(bus);

    // Restarted: the service reads which aggregates still wait and parks the next one too.
    let bus = parking_service(config, topic, &broken, &handled).await;
    let fourth = Envelope::new("order-9", "Changed", 4, &4).unwrap();
    bus.publish_envelope(topic, &fourth).await.unwrap();
    poll_until("v4 parked after the restart", async || {
        bus.dead_letters(&dead_letter_topic)
            .await
            .is_ok_and(|letters| letters.len() == 4)
    })
    .await;
    let versions = || -> Vec<i64> {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(aggregate, _)| aggregate == "order-9")
            .map(|(_, version)| *version)
            .collect()
    };
    assert!(
        versions().is_empty(),
        "no event of the parked aggregate ran"
    );

    broken.store(false, Ordering::SeqCst);
    let (status, stdout, stderr) = dlq(config, topic, &["replay", "--aggregate", "order-9"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("replayed 4 of 4 selected"), "{stderr}");
    poll_until("the replayed events handled", async || {
        versions().len() == 4
    })
    .await;
    assert_eq!(versions(), [1, 2, 3, 4], "in their original order");
    let next = Envelope::new("order-9", "Changed", 5, &5).unwrap();
    bus.publish_envelope(topic, &next).await.unwrap();
    poll_until("a new event handled after the replay", async || {
        versions().len() == 5
    })
    .await;
    assert_eq!(versions(), [1, 2, 3, 4, 5]);
    assert!(
        bus.dead_letters(&dead_letter_topic)
            .await
            .unwrap()
            .is_empty()
    );
    bus.close().await.unwrap();
}

/// One aggregate parked on two topics whose subscriptions share one dead-letter topic (the Go
/// SDK's single `deadLetterTopic`): one replay of the aggregate brings both topics' events back,
/// each topic's in order, and neither topic keeps the aggregate parked afterwards.
async fn an_aggregate_parked_on_two_topics_comes_back_on_both(config: &Path, prefix: &str) {
    let topics = [format!("{prefix}.orders"), format!("{prefix}.payments")];
    let dead_letter_topic = format!("{prefix}.failed");
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let bus = eventbus::connect(Config::load(Some(config)).unwrap())
        .await
        .unwrap();
    for topic in &topics {
        let (b, h, t) = (broken.clone(), handled.clone(), topic.clone());
        bus.subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let (b, h, t) = (b.clone(), h.clone(), t.clone());
                async move {
                    if envelope.event_version == 1 && b.load(Ordering::SeqCst) {
                        return Err(HandlerError::permanent("price missing"));
                    }
                    h.lock().unwrap().push((t, envelope.event_version));
                    Ok(())
                }
            }),
            SubscribeOptions::new()
                .with_park_on_dead_letter(true)
                .with_dead_letter(eventbus::DeadLetter::Topic(dead_letter_topic.clone())),
        )
        .await
        .unwrap();
    }
    for (topic, version) in [(&topics[0], 1), (&topics[1], 1), (&topics[0], 2)] {
        let envelope = Envelope::new("order-1", "Changed", version, &version).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    poll_until("the three dead letters stored", async || {
        bus.dead_letters(&dead_letter_topic)
            .await
            .is_ok_and(|letters| letters.len() == 3)
    })
    .await;
    broken.store(false, Ordering::SeqCst);
    let (status, stdout, stderr) = dlq(
        config,
        &topics[0],
        &[
            "replay",
            "--dead-letter-topic",
            &dead_letter_topic,
            "--aggregate",
            "order-1",
        ],
    );
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("replayed 3 of 3 selected"), "{stderr}");
    let of = |topic: &str| -> Vec<i64> {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(handled_on, _)| handled_on == topic)
            .map(|(_, version)| *version)
            .collect()
    };
    poll_until("every replayed event handled on its topic", async || {
        of(&topics[0]).len() == 2 && of(&topics[1]).len() == 1
    })
    .await;
    assert_eq!(of(&topics[0]), [1, 2]);
    for (topic, version) in [(&topics[0], 3), (&topics[1], 2)] {
        let envelope = Envelope::new("order-1", "Changed", version, &version).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    poll_until(
        "new events handled on both topics after the replay",
        async || of(&topics[0]).len() == 3 && of(&topics[1]).len() == 2,
    )
    .await;
    assert_eq!(
        (of(&topics[0]), of(&topics[1])),
        (vec![1, 2, 3], vec![1, 2])
    );
    assert!(
        bus.dead_letters(&dead_letter_topic)
            .await
            .unwrap()
            .is_empty(),
        "nothing parked again"
    );
    bus.close().await.unwrap();
}

/// The service is stopped with `order-9` parked (v1 failed, v2 parked); v3 is published while
/// it is down, and the aggregate replayed while it is down, so the replayed copies come after v3
/// in the topic. Started again, the service must not run v3 before them: the dead letters stay
/// until their copies are handled, so the restarted reader finds the aggregate parked, parks v3,
/// runs the copies, and keeps v3 for the next replay. Before, the replay removed the dead
/// letters at once and the service handled 3, 1, 2.
async fn a_replay_made_while_the_service_is_stopped_keeps_the_order(config: &Path, topic: &str) {
    let broken = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(Mutex::new(Vec::new()));
    let dead_letter_topic = format!("{topic}.DLQ");
    let versions = || -> Vec<i64> {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(aggregate, _)| aggregate == "order-9")
            .map(|(_, version)| *version)
            .collect()
    };
    let bus = parking_service(config, topic, &broken, &handled).await;
    for version in [1, 2] {
        let envelope = Envelope::new("order-9", "Changed", version, &version).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    poll_until("v1 dead-lettered and v2 parked", async || {
        bus.dead_letters(&dead_letter_topic)
            .await
            .is_ok_and(|letters| letters.len() == 2)
    })
    .await;
    bus.close().await.unwrap();
    drop(bus);

    // While the service is down: v3 is published, then the aggregate is replayed.
    let publisher = eventbus::connect(Config::load(Some(config)).unwrap())
        .await
        .unwrap();
    let third = Envelope::new("order-9", "Changed", 3, &3).unwrap();
    publisher.publish_envelope(topic, &third).await.unwrap();
    publisher.close().await.unwrap();
    drop(publisher);
    broken.store(false, Ordering::SeqCst);
    let (status, stdout, stderr) = dlq(config, topic, &["replay", "--aggregate", "order-9"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("replayed 2 of 2 selected"), "{stderr}");

    let bus = parking_service(config, topic, &broken, &handled).await;
    poll_until("the replayed events handled, v3 parked", async || {
        versions().len() >= 2
            && bus
                .dead_letters(&dead_letter_topic)
                .await
                .is_ok_and(|letters| {
                    letters
                        .iter()
                        .map(|letter| letter.envelope().map(|e| e.event_version))
                        .collect::<Vec<_>>()
                        == [Some(3)]
                })
    })
    .await;
    assert_eq!(versions(), [1, 2], "v3 never ran before the replayed ones");
    let (status, stdout, stderr) = dlq(config, topic, &["replay", "--aggregate", "order-9"]);
    assert_eq!(status, Some(0), "{stdout}{stderr}");
    poll_until("v3 handled after the next replay", async || {
        versions().len() == 3
    })
    .await;
    assert_eq!(versions(), [1, 2, 3]);
    bus.close().await.unwrap();
}

fn write_config(scratch: &Scratch, text: String) -> PathBuf {
    let path = scratch.file("bus.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

/// A NATS service configuration for `client` on `server`, one attempt per envelope.
fn nats_service(scratch: &Scratch, client: &str, server: &NatsServer) -> PathBuf {
    write_config(
        scratch,
        format!(
            "type = \"nats\"\nclient_id = \"{client}\"\n[retry]\nmax_attempts = 1\n[nats]\nurls = [\"{}\"]\n",
            server.url()
        ),
    )
}

/// A Kafka service configuration for `client` on the test broker, one attempt per envelope.
fn kafka_service(scratch: &Scratch, client: &str) -> PathBuf {
    write_config(
        scratch,
        format!(
            "type = \"kafka\"\nclient_id = \"{client}\"\n[retry]\nmax_attempts = 1\n[kafka]\nbootstrap_servers = [\"{}\"]\ncommit_interval = \"200ms\"\ntopic_defaults = {{ partitions = 3 }}\n",
            kafka_bootstrap()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_to_their_topic_and_removed_on_nats() {
    let server = NatsServer::start();
    let scratch = Scratch::new("dlq-nats");
    let config = nats_service(&scratch, "dlq", &server);
    dead_letters_round_trip(&config, "dlq.orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_replayed_to_their_topic_and_removed_on_kafka() {
    let scratch = Scratch::new("dlq-kafka");
    let config = kafka_service(&scratch, "dlq");
    dead_letters_round_trip(&config, "dlq.orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_replayed_in_their_order_on_nats() {
    let server = NatsServer::start();
    let scratch = Scratch::new("park-nats");
    let config = nats_service(&scratch, "park", &server);
    parked_events_come_back_in_order(&config, "park.orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_replayed_in_their_order_on_kafka() {
    let scratch = Scratch::new("park-kafka");
    let config = kafka_service(&scratch, "park");
    parked_events_come_back_in_order(&config, "park.orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_parked_on_two_topics_sharing_a_dead_letter_topic_is_replayed_on_both_on_nats()
{
    let server = NatsServer::start();
    let scratch = Scratch::new("park-two-nats");
    let config = nats_service(&scratch, "park2", &server);
    an_aggregate_parked_on_two_topics_comes_back_on_both(&config, "park2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_parked_on_two_topics_sharing_a_dead_letter_topic_is_replayed_on_both_on_kafka()
 {
    let scratch = Scratch::new("park-two-kafka");
    let config = kafka_service(&scratch, "park2");
    an_aggregate_parked_on_two_topics_comes_back_on_both(&config, "park2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_made_while_the_service_is_stopped_keeps_the_order_on_nats() {
    let server = NatsServer::start();
    let scratch = Scratch::new("park-stopped-nats");
    let config = nats_service(&scratch, "stopped", &server);
    a_replay_made_while_the_service_is_stopped_keeps_the_order(&config, "stopped.orders").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_made_while_the_service_is_stopped_keeps_the_order_on_kafka() {
    let scratch = Scratch::new("park-stopped-kafka");
    let config = kafka_service(&scratch, "stopped");
    a_replay_made_while_the_service_is_stopped_keeps_the_order(&config, "stopped.orders").await;
}
