//! The metric reference in docs/operations.md against what `/metrics` serves: every metric a
//! memory, a NATS and a Kafka bus serve is documented, every documented metric is served with
//! the type the reference gives it (a histogram as a Prometheus histogram with `_bucket` series,
//! never as a summary), and the example alert rules and Grafana dashboard use only served names.

// Test code: a failed unwrap or index is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod metric_docs;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eventbus_core::{
    Envelope, EventBus, HandlerContext, HandlerError, Message, OutboundMessage, SubscribeOptions,
};
use eventbus_pool::BusSettings;
use integration_tests::{Recorder, eventually, kafka_config, nats_config};
use metric_docs::{Documented, documented, metric_names_after, repository_file};
use test_brokers::{NatsServer, kafka_bootstrap};

/// The metric name prefixes of the three buses.
const NAMESPACES: [&str; 3] = [
    "memory_eventbus_reference",
    "nats_eventbus_reference",
    "kafka_eventbus_reference",
];

fn settings(backend: &str) -> BusSettings {
    BusSettings {
        handler_timeout: Some(Duration::from_millis(100)),
        ..BusSettings::new(backend, "reference")
    }
}

/// Runs what every metric counts: a handler timing out (ignoring its token once, so it is
/// dropped), a dead letter, a handled envelope, a plain message, a failed publish.
async fn exercise(bus: &dyn EventBus, topic: &str) {
    let handled = Recorder::<i64>::new();
    let h = handled.clone();
    bus.subscribe_envelope(
        topic,
        Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
            let h = h.clone();
            async move {
                if envelope.event_version == 1 {
                    if ctx.attempt() == 1 {
                        std::future::pending::<()>().await;
                    }
                    return Err(HandlerError::permanent("poison"));
                }
                h.push(envelope.event_version);
                Ok(())
            }
        }),
        SubscribeOptions::new(),
    )
    .await
    .unwrap();
    let plain = format!("{topic}.plain");
    let seen = integration_tests::collect(bus, &plain).await;
    for version in 1..=2 {
        let envelope = Envelope::new("agg-ref", "Referenced", version, &version).unwrap();
        bus.publish_envelope(topic, &envelope).await.unwrap();
    }
    bus.publish(
        &plain,
        OutboundMessage::new(&b"plain"[..]).with_key(&b"k"[..]),
    )
    .await
    .unwrap();
    assert!(
        bus.publish("", OutboundMessage::new(&b"x"[..]))
            .await
            .is_err()
    );
    handled.wait_for("v2 handled", |e| e == [2]).await;
    seen.wait_for("the plain message", |e: &[Message]| !e.is_empty())
        .await;
}

fn scrape(listen: SocketAddr) -> Option<String> {
    metric_docs::http_get(listen, "/metrics").map(|(_, body)| body)
}

/// The `# TYPE` of each metric served under `namespace`, by its name without the namespace:
/// `consumed_total` → `counter`, ...
fn served_types(body: &str, namespace: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter_map(|(name, kind)| {
            let name = name.strip_prefix(namespace)?.strip_prefix('_')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

/// The metric names served under `namespace`, without it: `consumed_total`, ... (a
/// histogram's `_bucket`, `_sum` and `_count` series count as the histogram; a summary's `_sum`
/// and `_count` do not, they are names of their own).
fn served_under(body: &str, namespace: &str) -> BTreeSet<String> {
    let histograms: BTreeSet<&str> = body
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| kind.trim() == "histogram")
        .map(|(name, _)| name)
        .collect();
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| histograms.contains(base))
                })
                .unwrap_or(name)
        })
        .filter_map(|name| name.strip_prefix(&format!("{namespace}_")))
        .map(str::to_owned)
        .collect()
}

/// The metric names served under any of our namespaces.
fn served(body: &str) -> BTreeSet<String> {
    NAMESPACES
        .iter()
        .flat_map(|namespace| served_under(body, namespace))
        .collect()
}

/// Checks that what `namespace` (a bus of `backend`) serves has the types the reference gives:
/// every documented metric it serves has that `# TYPE`, and every histogram documented for
/// `backend` is served as a Prometheus histogram, with `_bucket` series up to `le="+Inf"`,
/// `_sum` and `_count`. A summary (quantiles, no buckets) fails: it cannot be summed over
/// instances, and the dashboard's `histogram_quantile(… _bucket …)` finds nothing in it.
fn assert_served_as_documented(
    body: &str,
    namespace: &str,
    backend: &str,
    documented: &BTreeMap<String, Documented>,
) {
    let types = served_types(body, namespace);
    for (name, doc) in documented {
        let served = types.get(name);
        if let Some(kind) = served {
            assert_eq!(
                *kind, doc.kind,
                "{namespace}_{name} is served as a {kind}; docs/operations.md says {}",
                doc.kind
            );
        }
        if doc.kind != "histogram" || !doc.served_by(backend) {
            continue;
        }
        assert_eq!(
            served.map(String::as_str),
            Some("histogram"),
            "{namespace}_{name}: no `# TYPE {namespace}_{name} histogram` line"
        );
        let buckets: Vec<&str> = body
            .lines()
            .filter(|line| line.starts_with(&format!("{namespace}_{name}_bucket{{")))
            .collect();
        assert!(
            buckets.len() >= 2 && buckets.iter().any(|line| line.contains("le=\"+Inf\"")),
            "{namespace}_{name} is served without its buckets: {buckets:?}"
        );
        for suffix in ["_sum", "_count"] {
            assert!(
                body.lines()
                    .any(|line| line.starts_with(&format!("{namespace}_{name}{suffix}"))),
                "{namespace}_{name} is served without {suffix}"
            );
        }
    }
}

/// The metric names an example uses after `marker`: `${namespace}_` (the dashboard's variable)
/// or a namespace such as `kafka_eventbus_billing_`.
fn used_by(example: &str, marker: &str) -> BTreeSet<String> {
    metric_names_after(&repository_file(example), marker)
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metric_reference_lists_what_metrics_serves_and_the_examples_use_only_served_names() {
    integration_tests::capture_logs();
    let listen: SocketAddr = format!("127.0.0.1:{}", test_brokers::free_port())
        .parse()
        .unwrap();
    eventbus::serve_metrics(listen).unwrap();

    let memory = eventbus_memory::start(settings("memory")).unwrap();
    exercise(&memory, "reference.memory").await;
    let server = NatsServer::start();
    let nats = eventbus_nats::connect(settings("nats"), nats_config(&server.url()))
        .await
        .unwrap();
    exercise(&nats, "reference.nats").await;
    let kafka = eventbus_kafka::connect(
        settings("kafka"),
        eventbus_kafka::KafkaConfig {
            group_id: Some("metrics-reference".into()),
            ..kafka_config(&kafka_bootstrap())
        },
    )
    .await
    .unwrap();
    exercise(&kafka, "reference.kafka").await;

    // The sampled ones come with the monitor's next tick, the lag with the backends' next
    // report (NATS every 5 s, Kafka with librdkafka's statistics).
    let reference = documented();
    let documented: BTreeSet<String> = reference.keys().cloned().collect();
    let mut last = BTreeSet::new();
    eventually("every documented metric served", || {
        let body = scrape(listen).unwrap_or_default();
        last = served(&body);
        // Kafka's lag comes with librdkafka's statistics, every 5 s once assigned.
        let complete = documented.is_subset(&last)
            && served_under(&body, "kafka_eventbus_reference").contains("consumer_lag");
        async move { complete }
    })
    .await;
    let body = scrape(listen).unwrap();
    for namespace in NAMESPACES {
        let backend = namespace.split('_').next().unwrap();
        assert_served_as_documented(&body, namespace, backend, &reference);
    }
    let undocumented: Vec<&String> = last.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the reference of docs/operations.md: {undocumented:?}"
    );
    // The dashboard's `${namespace}` may be any backend's; the alert rules name one each, and
    // must use what a bus of that backend serves.
    for (example, marker, serving) in [
        (
            "examples/grafana-dashboard.json",
            "${namespace}_",
            last.clone(),
        ),
        (
            "examples/prometheus-alerts.yml",
            "kafka_eventbus_billing_",
            served_under(&body, "kafka_eventbus_reference"),
        ),
        (
            "examples/prometheus-alerts.yml",
            "nats_eventbus_billing_",
            served_under(&body, "nats_eventbus_reference"),
        ),
    ] {
        let used = used_by(example, marker);
        assert!(!used.is_empty(), "{example} uses no {marker} metric");
        let unknown: Vec<&String> = used.difference(&serving).collect();
        assert!(
            unknown.is_empty(),
            "{example} uses {marker} metrics that backend never serves: {unknown:?}"
        );
    }
    for bus in [&memory as &dyn EventBus, &nats, &kafka] {
        bus.close().await.unwrap();
    }
}
