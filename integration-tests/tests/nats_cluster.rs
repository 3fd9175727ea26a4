//! The NATS backend on a 3-node JetStream cluster (`test_brokers::NatsCluster`, three
//! nats-servers joined by routes on loopback): replicated streams from the bus's own
//! configuration, and streams made outside it kept as they are.

#![allow(
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use async_nats::jetstream;
use eventbus_core::{Envelope, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_nats::{NatsConfig, StreamDefinition, TopicOptions};
use futures::StreamExt;
use integration_tests::{Poisoned, eventually, nats_config, nats_settings};
use test_brokers::NatsCluster;

/// A configuration naming every node of `cluster`.
fn cluster_config(cluster: &NatsCluster) -> NatsConfig {
    let urls = cluster.urls();
    let mut config = nats_config(&urls[0]);
    config.urls = urls;
    config
}

fn envelope(aggregate: &str, version: i64) -> Envelope {
    Envelope::new(
        aggregate,
        "Changed",
        version,
        &serde_json::json!({"version": version}),
    )
    .unwrap()
}

/// The replicas of every stream on the cluster, by name.
async fn replicas(js: &jetstream::Context) -> Vec<(String, usize)> {
    let mut names = js.stream_names();
    let mut all = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.unwrap();
        let mut stream = js.get_stream(&name).await.unwrap();
        let replicas = stream.info().await.unwrap().config.num_replicas;
        all.push((name, replicas));
    }
    all.sort();
    all
}

/// With `replicas = 3`, every stream the bus makes is R3: a topic's stream, its dead-letter
/// stream, a partitioned topic's stream with the scale-out group's bucket, the stream-lock
/// bucket (taken to add the partitions' subjects) and a declared stream made at connect. A
/// topic's own `replicas` wins over the bus-wide setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_the_bus_makes_has_the_configured_replicas() {
    let mut cluster = NatsCluster::start(3);
    let mut config = cluster_config(&cluster);
    config.replicas = 3;
    config.streams.push(StreamDefinition::new(
        "DECLARED",
        vec!["declared.>".to_owned()],
    ));
    config.topics.insert(
        "scaled.orders".to_owned(),
        TopicOptions {
            partitions: Some(2),
            ..TopicOptions::default()
        },
    );
    config.topics.insert(
        "single.audit".to_owned(),
        TopicOptions {
            replicas: Some(1),
            ..TopicOptions::default()
        },
    );
    let mut settings = nats_settings("replicated");
    settings.pool.retry.max_attempts = 1;
    let bus = eventbus_nats::connect(settings, config).await.unwrap();
    let failing = std::sync::Arc::new(|_ctx: HandlerContext, _envelope: Envelope| async {
        Err::<(), HandlerError>(HandlerError::permanent("fails for good"))
    });
    let _orders = bus
        .subscribe_envelope("plain.orders", failing, SubscribeOptions::new())
        .await
        .unwrap();
    bus.publish_envelope("plain.orders", &envelope("o-1", 1))
        .await
        .unwrap();
    bus.publish_envelope("scaled.orders", &envelope("o-2", 1))
        .await
        .unwrap();
    let handled = integration_tests::Recorder::<(String, i64)>::new();
    let _scaled = bus
        .subscribe_envelope(
            "scaled.orders",
            handled.envelope_handler(),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    bus.publish_envelope("single.audit", &envelope("a-1", 1))
        .await
        .unwrap();
    let js = jetstream::new(async_nats::connect(cluster.node(0).url()).await.unwrap());
    eventually("the dead letter and the group's bucket", || async {
        let names: Vec<String> = replicas(&js).await.into_iter().map(|(n, _)| n).collect();
        names.iter().any(|n| n == "STREAM_plain_orders_DLQ")
            && names
                .iter()
                .any(|n| n.starts_with("KV_eventbus_replicated"))
    })
    .await;
    let all = replicas(&js).await;
    let expected = [
        "DECLARED",
        "KV_eventbus_replicated_scaled_orders",
        "KV_eventbus_stream_updates",
        "STREAM_plain_orders",
        "STREAM_plain_orders_DLQ",
        "STREAM_scaled_orders",
    ];
    for name in expected {
        let found = all.iter().find(|(n, _)| n == name);
        assert_eq!(
            found.map(|(_, r)| *r),
            Some(3),
            "{name} is R3 (streams: {all:?})"
        );
    }
    let single = all.iter().find(|(n, _)| n == "STREAM_single_audit");
    assert_eq!(single.map(|(_, r)| *r), Some(1), "streams: {all:?}");
    bus.close().await.unwrap();
}

/// A stream made R3 outside the bus and listed in `[[nats.streams]]` stays R3 when a bus with
/// the default `replicas` (1) connects, publishes and subscribes through it; a declared stream
/// with `update_limits` and `replicas = 3` raises an R1 stream to R3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_stream_is_never_downgraded_and_raised_only_when_told() {
    let mut cluster = NatsCluster::start(3);
    let js = jetstream::new(async_nats::connect(cluster.node(0).url()).await.unwrap());
    for (name, subjects, replicas) in [
        ("BUSINESS_STREAM", "business.>", 3),
        ("RAISED", "raised.>", 1),
    ] {
        js.create_stream(jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![subjects.to_owned()],
            num_replicas: replicas,
            ..jetstream::stream::Config::default()
        })
        .await
        .unwrap();
        eventually(&format!("{name} with a leader"), || async {
            let mut stream = js.get_stream(name).await.unwrap();
            let info = stream.info().await.unwrap();
            info.cluster
                .as_ref()
                .is_some_and(|cluster| cluster.leader.is_some())
        })
        .await;
    }
    let mut config = cluster_config(&cluster);
    config.streams.push(StreamDefinition::new(
        "BUSINESS_STREAM",
        vec!["business.>".to_owned()],
    ));
    let mut raised = StreamDefinition::new("RAISED", vec!["raised.>".to_owned()]);
    raised.replicas = Some(3);
    raised.update_limits = true;
    config.streams.push(raised);
    let bus = eventbus_nats::connect(nats_settings("bound"), config)
        .await
        .unwrap();
    let handled = integration_tests::Recorder::<(String, i64)>::new();
    let _subscription = bus
        .subscribe_envelope(
            "business.orders",
            handled.envelope_handler(),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
    bus.publish_envelope("business.orders", &envelope("o-1", 1))
        .await
        .unwrap();
    handled
        .wait_for("the event", |events| events.len() == 1)
        .await;
    let all = replicas(&js).await;
    let of = |name: &str| all.iter().find(|(n, _)| n == name).map(|(_, r)| *r);
    assert_eq!(of("BUSINESS_STREAM"), Some(3), "streams: {all:?}");
    assert_eq!(of("RAISED"), Some(3), "streams: {all:?}");
    bus.close().await.unwrap();
}

/// What a failover test's subscriber handled, in order, and the distinct events among them.
#[derive(Default)]
struct Handled {
    all: Vec<(String, i64)>,
    distinct: std::collections::HashSet<(String, i64)>,
    /// When each handling ended.
    times: Vec<std::time::Instant>,
    /// The aggregates being handled now.
    running: std::collections::HashSet<String>,
    /// Handlings begun while another of their aggregate ran.
    overlaps: Vec<(String, i64)>,
    /// Each handling ended: instance, aggregate, version, stream position, delivery attempt,
    /// and when (printed for an aggregate whose order breaks).
    log: Vec<(usize, String, i64, String, u32, std::time::Instant)>,
}

/// The name of the node leading consumer `durable` of `stream`, once there is one.
async fn consumer_leader(js: &jetstream::Context, stream: &str, durable: &str) -> String {
    let mut leader = None;
    eventually(&format!("a leader of consumer {durable}"), || async {
        let Ok(stream) = js.get_stream(stream).await else {
            return false;
        };
        let Ok(mut consumer) = stream
            .get_consumer::<jetstream::consumer::pull::Config>(durable)
            .await
        else {
            return false;
        };
        let Ok(info) = consumer.info().await else {
            return false;
        };
        info.cluster
            .as_ref()
            .and_then(|cluster| cluster.leader.clone())
            .is_some()
    })
    .await;
    let stream = js.get_stream(stream).await.unwrap();
    let mut consumer = stream
        .get_consumer::<jetstream::consumer::pull::Config>(durable)
        .await
        .unwrap();
    if let Some(cluster) = consumer.info().await.unwrap().cluster.clone() {
        leader = cluster.leader;
    }
    leader.unwrap()
}

/// On an R3 stream, the node leading the subscription's consumer is killed while 10,000
/// envelopes over 200 aggregates are published (each aggregate's in order, a failed publish
/// retried) and consumed: every envelope is handled, the first handlings of each aggregate in
/// version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_leader_killed_mid_stream_loses_nothing_and_keeps_order() {
    failover(Fault::Kill).await;
}

/// As above, the node staying down longer than `ack_wait` (15 s, `ack_wait` 10 s) before it
/// is started again on its store: nothing the subscriber held is redelivered out of order, and
/// nothing acknowledged is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_leader_down_longer_than_ack_wait_loses_nothing_and_keeps_order() {
    failover(Fault::DownFor(std::time::Duration::from_secs(15))).await;
}

/// As above, the consumer's leader paused (SIGSTOP) for longer than `ack_wait`: its sockets
/// stay open and answer nothing (a node cut off by the network without its connections
/// closing), then it goes on (SIGCONT) with an older view of the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_leader_paused_longer_than_ack_wait_loses_nothing_and_keeps_order() {
    failover(Fault::Paused(std::time::Duration::from_secs(15))).await;
}

/// As above, every node of the cluster restarted in turn (killed, started again on its store,
/// the next one once it is current with the cluster), as an upgrade does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_nothing_and_keeps_order() {
    failover(Fault::RollingRestart).await;
}

/// As above, on a topic split into 4 partitions read by two instances of one service: the
/// scale-out group's claims (in its R3 bucket) survive every node's restart, no aggregate is
/// handled on both instances at once, and every subject is read again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_keeps_the_scale_out_groups_claims_and_loses_nothing() {
    failover_read_by(Fault::RollingRestart, Readers::TwoInstancesOf(4)).await;
}

/// What a failover test does to the cluster once a fifth of the envelopes were handled.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Kills the consumer's leader.
    Kill,
    /// Kills the consumer's leader and starts it again after this long.
    DownFor(std::time::Duration),
    /// Pauses the consumer's leader (SIGSTOP) for this long, then lets it go on.
    Paused(std::time::Duration),
    /// Kills and starts again every node in turn.
    RollingRestart,
}

/// Publishes and consumes 10,000 envelopes over 200 aggregates on an R3 stream, doing `fault`
/// to the cluster mid-stream; checks that every envelope was handled and each aggregate's
/// first handlings are in version order. Two aggregates are refused for good ([`Poisoned`]),
/// one before the fault and one after, with parking on: each one's refused event and every later
/// one end in the dead-letter stream (R3 too), the later ones marked parked and never handled.
async fn failover(fault: Fault) {
    failover_read_by(fault, Readers::One).await;
}

/// Who reads a failover test's topic.
#[derive(Debug, Clone, Copy)]
enum Readers {
    /// One subscriber reads the whole topic through one durable.
    One,
    /// The topic is split into this many partitions, read by two instances of one service
    /// sharing them through the scale-out group's bucket (R3 too).
    TwoInstancesOf(u16),
}

/// [`failover`] with the topic read by `readers`. Besides order, no aggregate is ever handled
/// by two handlers at once, on one instance or across two.
async fn failover_read_by(fault: Fault, readers: Readers) {
    integration_tests::capture_logs();
    // One failover at a time: two 3-node clusters moving 10,000 envelopes each would share the
    // 2 cores of the test machine, and each would measure the other.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut cluster = NatsCluster::start(3);
    let topic = "failover.orders";
    let mut config = cluster_config(&cluster);
    config.replicas = 3;
    config.consumer.ack_wait = std::time::Duration::from_secs(10);
    let instances = match readers {
        Readers::One => 1,
        Readers::TwoInstancesOf(partitions) => {
            config.topics.insert(
                topic.to_owned(),
                TopicOptions {
                    partitions: Some(partitions),
                    ..TopicOptions::default()
                },
            );
            2
        }
    };
    let (aggregates, versions) = (200usize, 50i64);
    let poisoned = Poisoned::new(versions);
    let handled = std::sync::Arc::new(std::sync::Mutex::new(Handled::default()));
    let options = SubscribeOptions::new().with_park_on_dead_letter(true);
    let dead_letter_topic = options.dead_letter_topic(topic).unwrap().unwrap();
    let mut subscribers = Vec::new();
    for instance in 0..instances {
        let subscriber = eventbus_nats::connect(nats_settings("failover"), config.clone())
            .await
            .unwrap();
        let recorder = handled.clone();
        subscriber
            .subscribe_envelope(
                topic,
                std::sync::Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
                    let recorder = recorder.clone();
                    async move {
                        let pair = (envelope.aggregate_id.clone(), envelope.event_version);
                        if !recorder
                            .lock()
                            .unwrap()
                            .running
                            .insert(envelope.aggregate_id.clone())
                        {
                            recorder.lock().unwrap().overlaps.push(pair.clone());
                        }
                        let result = if poisoned.refuses(&envelope) {
                            Err(HandlerError::permanent("poisoned"))
                        } else {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                            Ok(())
                        };
                        let mut handled = recorder.lock().unwrap();
                        handled.running.remove(&envelope.aggregate_id);
                        if result.is_ok() {
                            handled.log.push((
                                instance,
                                envelope.aggregate_id.clone(),
                                envelope.event_version,
                                format!("{:?}", ctx.meta().position),
                                ctx.attempt(),
                                std::time::Instant::now(),
                            ));
                            handled.distinct.insert(pair.clone());
                            handled.all.push(pair);
                            handled.times.push(std::time::Instant::now());
                        }
                        result
                    }
                }),
                options.clone(),
            )
            .await
            .unwrap();
        subscribers.push(subscriber);
    }
    let publisher = std::sync::Arc::new(
        eventbus_nats::connect(nats_settings("failover-publisher"), config)
            .await
            .unwrap(),
    );
    let failed_publishes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (publisher_all, failed_all) = (publisher.clone(), failed_publishes.clone());
    let publishing = futures::stream::iter(0..aggregates)
        .map(move |aggregate| {
            let (publisher, failed_publishes) = (&publisher_all, &failed_all);
            let (publisher, failed) = (publisher.clone(), failed_publishes.clone());
            async move {
                for version in 1..=versions {
                    let envelope = envelope(&format!("agg-{aggregate}"), version);
                    while let Err(error) = publisher.publish_envelope(topic, &envelope).await {
                        let failures = failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        assert!(
                            failures < 20_000,
                            "publishes keep failing: {}",
                            error.report()
                        );
                        eprintln!("publish failed, retried: {}", error.report());
                        // A leader is being elected: the next try comes a little later.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .buffer_unordered(aggregates)
        .collect::<Vec<()>>();
    let publishing = tokio::spawn(publishing);
    eventually("a fifth handled", || async {
        handled.lock().unwrap().distinct.len() >= aggregates * 10
    })
    .await;
    // The node leading the subscription's consumer, for a fault done to that node.
    let index = if let (Readers::One, Fault::Kill | Fault::DownFor(_) | Fault::Paused(_)) =
        (readers, fault)
    {
        let servers: Vec<async_nats::ServerAddr> = cluster
            .urls()
            .iter()
            .map(|url| url.parse().unwrap())
            .collect();
        let js = jetstream::new(async_nats::connect(servers).await.unwrap());
        let durable = subscribers[0].transport().durable_name(topic, 1);
        let leader = consumer_leader(&js, "STREAM_failover_orders", &durable).await;
        eprintln!("{fault:?}: node {leader} leads consumer {durable}");
        NatsCluster::index_of(&leader).unwrap()
    } else {
        assert!(
            matches!(fault, Fault::RollingRestart),
            "{fault:?} is done to one consumer's leader: read by one subscriber"
        );
        0
    };
    let fault_began = std::time::Instant::now();
    match fault {
        Fault::Kill => cluster.node(index).kill(),
        Fault::DownFor(down_for) => {
            cluster.node(index).kill();
            // The fault itself lasts this long: the node is down, whatever else happens.
            tokio::time::sleep(down_for).await;
            tokio::task::block_in_place(|| cluster.node(index).start_again());
        }
        Fault::Paused(paused_for) => {
            cluster.node(index).freeze();
            tokio::time::sleep(paused_for).await;
            cluster.node(index).thaw();
        }
        Fault::RollingRestart => {
            for node in 0..cluster.len() {
                tokio::task::block_in_place(|| {
                    cluster.node(node).start_again();
                    cluster.wait_for_meta_quorum();
                });
                eprintln!("node n{node} restarted");
            }
        }
    }
    tokio::time::timeout(std::time::Duration::from_secs(120), publishing)
        .await
        .expect("every envelope published within two minutes of the kill")
        .unwrap();
    let total = aggregates * usize::try_from(versions).unwrap() - poisoned.unhandled();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    while handled.lock().unwrap().distinct.len() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {total} handled two minutes after the kill",
            handled.lock().unwrap().distinct.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let overlaps = handled.lock().unwrap().overlaps.clone();
    assert!(
        overlaps.is_empty(),
        "handled while another handling of its aggregate ran: {overlaps:?}"
    );
    if let Readers::TwoInstancesOf(partitions) = readers {
        // Every subject (the partitions and the bare topic) is claimed by one instance again.
        eventually("every subject read by one instance", || async {
            let reading: usize = subscribers
                .iter()
                .map(|subscriber| subscriber.transport().partitions_reading(topic).len())
                .sum();
            reading == usize::from(partitions) + 1
        })
        .await;
    }
    let all = handled.lock().unwrap().all.clone();
    let checked = std::panic::catch_unwind(|| {
        integration_tests::assert_first_handlings_in_order_until(&all, aggregates, |aggregate| {
            poisoned.last_handled(aggregate)
        })
    });
    let duplicates = checked.unwrap_or_else(|failure| {
        // The history of the aggregate out of order, to tell how its events came back.
        let message = failure
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        let aggregate = message.split(':').next().unwrap_or_default();
        for (instance, id, version, position, attempt, at) in &handled.lock().unwrap().log {
            if id == aggregate {
                eprintln!(
                    "{id} v{version} handled by instance {instance} from {position} (attempt {attempt}) {:?} after the fault began",
                    at.checked_duration_since(fault_began)
                );
            }
        }
        std::panic::resume_unwind(failure)
    });
    poisoned
        .wait_dead_lettered(&subscribers[0], &dead_letter_topic)
        .await;
    let pause = integration_tests::longest_pause_after(&handled.lock().unwrap().times, fault_began);
    eprintln!(
        "{fault:?} ({readers:?}): {total} envelopes, {duplicates} handled twice, {} publishes failed and retried, longest pause in handling after the fault began {pause:?}",
        failed_publishes.load(std::sync::atomic::Ordering::SeqCst)
    );
    for subscriber in subscribers {
        subscriber.close().await.unwrap();
    }
    publisher.close().await.unwrap();
}
