//! The example Grafana dashboard and Prometheus alert rules against a real Prometheus.
//!
//! `promtool check rules` accepts examples/prometheus-alerts.yml. Then, while a workload like
//! `eventbus demo`'s (handlers that take a while, fail and are retried, dead letters) runs on a
//! memory, a NATS and a Kafka bus serving `/metrics` through `eventbus::serve_metrics`, a
//! `prometheus` process scraping it every second returns data for every query of every panel of
//! examples/grafana-dashboard.json, on each backend the query applies to, and evaluates every
//! alert rule without error, on series that exist.
//!
//! The binaries are `prometheus` and `promtool` from `PATH` (Debian's `prometheus` package),
//! or `PROMETHEUS_BIN` and `PROMTOOL_BIN`; a missing one fails the test, nothing is skipped.

// Test code: a failed unwrap, index or panic is a failed check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod metric_docs;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventbus_core::Backoff;
use eventbus_core::{Envelope, EventBus, HandlerContext, HandlerError, SubscribeOptions};
use eventbus_pool::BusSettings;
use integration_tests::{kafka_config, nats_config};
use metric_docs::{
    Documented, documented, http_get, metric_names_after, repository_file, repository_path,
};
use serde_json::Value;
use test_brokers::{NatsServer, free_port, kafka_bootstrap};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The `client_id` of every bus here: their namespaces are `{backend}_eventbus_billing`, the
/// ones the example alert rules name and the dashboard's `namespace` variable defaults to.
const CLIENT_ID: &str = "billing";

/// The backends the workload runs on.
const BACKENDS: [&str; 3] = ["memory", "nats", "kafka"];

/// How long a query may stay empty while the workload runs. The slowest are the consumer lag
/// (NATS and Kafka report it every 5 s, Kafka once the group has assigned the partitions) and
/// every `rate` (two scrapes, 1 s apart).
const QUERY_DEADLINE: Duration = Duration::from_secs(90);

/// How often a pending query is asked again.
const POLL: Duration = Duration::from_millis(250);

/// The path of the tool `variable` names, else `default` (found on `PATH`).
fn tool(variable: &str, default: &str) -> String {
    std::env::var(variable)
        .ok()
        .filter(|path| !path.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `PROMETHEUS_BIN`, else `prometheus`.
fn prometheus_bin() -> String {
    tool("PROMETHEUS_BIN", "prometheus")
}

/// `PROMTOOL_BIN`, else `promtool`.
fn promtool_bin() -> String {
    tool("PROMTOOL_BIN", "promtool")
}

/// The panic of a tool that does not run: say how to get it.
fn missing(program: &str, variable: &str, error: &std::io::Error) -> ! {
    panic!(
        "cannot run {program}: {error}. Install Debian's `prometheus` package (it has \
         `prometheus` and `promtool`; .ci/run installs it), or set {variable} to the binary"
    )
}

/// A `prometheus` process scraping one `/metrics` endpoint every second and evaluating the
/// example alert rules every second, on a free loopback port with its own storage in a
/// directory of its own. Killed (by its PID) and its directory removed when dropped.
struct Prometheus {
    child: Child,
    address: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts it on a free port, scraping `target`, and waits until it is ready.
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "eventbus-prometheus-dashboard-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = repository_path("examples/prometheus-alerts.yml")
            .canonicalize()
            .unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules:?}\n\
                 scrape_configs:\n  - job_name: eventbus\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n",
                rules = rules.display().to_string()
            ),
        )
        .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let program = prometheus_bin();
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| {
                let _ = std::fs::remove_dir_all(&dir);
                missing(&program, "PROMETHEUS_BIN", &error)
            });
        let mut prometheus = Self {
            child,
            address,
            dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while http_get(address, "/-/ready").is_none_or(|(status, _)| status != 200) {
            if let Some(status) = prometheus.child.try_wait().unwrap() {
                panic!("{program} exited with {status}:\n{}", prometheus.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{program} not ready on {address} within 60 s:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        prometheus
    }

    /// What it logged (warnings and errors).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/{path}`: the answer's JSON, or `None` while it does not answer.
    async fn api(&self, path: String) -> Option<Value> {
        let address = self.address;
        let (_, body) = tokio::task::spawn_blocking(move || http_get(address, &path))
            .await
            .unwrap()?;
        serde_json::from_str(&body).ok()
    }

    /// The instant vector `query` evaluates to now: `Ok` with its samples, or `Err` with the
    /// error Prometheus reports (a query it cannot parse or evaluate).
    async fn query(&self, query: &str) -> Result<Vec<Value>, String> {
        let answer = self
            .api(format!("/api/v1/query?query={}", url_encoded(query)))
            .await
            .ok_or_else(|| format!("no answer from prometheus on {}", self.address))?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        match &answer["data"]["result"] {
            Value::Array(samples) => Ok(samples.clone()),
            // A scalar or a string: one value.
            other => Ok(vec![serde_json::json!({ "value": other })]),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Already ended (it failed to start) is fine.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` percent-encoded for a URL's query string.
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Whether `samples` hold data a panel can draw: at least one sample whose value is a number
/// (a `histogram_quantile` over buckets that did not move is `NaN`).
fn has_data(samples: &[Value]) -> bool {
    samples.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(|value| !value.is_nan())
    })
}

/// The metric names `expression` reads under `namespace`, without it (a histogram's
/// `_bucket`, `_sum` and `_count` series as the histogram).
fn metrics_read(expression: &str, namespace: &str) -> Vec<String> {
    metric_names_after(expression, &format!("{namespace}_"))
}

/// One query of one panel of the dashboard.
struct PanelQuery {
    panel: String,
    expression: String,
}

/// Every query of every panel of the dashboard (rows' panels included).
fn dashboard_queries() -> Vec<PanelQuery> {
    fn collect(panels: &Value, queries: &mut Vec<PanelQuery>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("(untitled)");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expression) = target["expr"].as_str() {
                    queries.push(PanelQuery {
                        panel: title.to_owned(),
                        expression: expression.to_owned(),
                    });
                }
            }
            collect(&panel["panels"], queries);
        }
    }
    let dashboard: Value =
        serde_json::from_str(&repository_file("examples/grafana-dashboard.json")).unwrap();
    let mut queries = Vec::new();
    collect(&dashboard["panels"], &mut queries);
    assert!(
        !queries.is_empty(),
        "examples/grafana-dashboard.json has no queries"
    );
    queries
}

/// `expression` for the bus whose metrics are under `namespace`: the dashboard's Grafana
/// variables replaced by values. Its only variable is `namespace`; one the test does not know
/// fails, naming the panel.
fn concrete(query: &PanelQuery, namespace: &str) -> String {
    let expression = query
        .expression
        .replace("${namespace}", namespace)
        .replace("$namespace", namespace)
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m");
    assert!(
        !expression.contains('$'),
        "panel {:?}: a Grafana variable this test does not replace: {expression}",
        query.panel
    );
    expression
}

/// Whether a bus of `backend` serves every metric `expression` reads under `namespace`, by the
/// backends column of the metric reference; a name the reference does not have fails, and so
/// do the `_bucket` series of a metric it does not call a histogram.
fn applies_to(
    query: &PanelQuery,
    expression: &str,
    namespace: &str,
    backend: &str,
    reference: &BTreeMap<String, Documented>,
) -> bool {
    let read = metrics_read(expression, namespace);
    assert!(
        !read.is_empty(),
        "panel {:?} reads no metric of the namespace: {}",
        query.panel,
        query.expression
    );
    read.iter().all(|name| {
        let doc = reference.get(name).unwrap_or_else(|| {
            panic!(
                "panel {:?} reads {name}, which the metric reference of docs/operations.md \
                 does not list",
                query.panel
            )
        });
        if expression.contains(&format!("{namespace}_{name}_bucket")) {
            assert_eq!(
                doc.kind, "histogram",
                "panel {:?} reads the buckets of {name}, which the metric reference calls a {}",
                query.panel, doc.kind
            );
        }
        doc.served_by(backend)
    })
}

/// One bus under a workload like `eventbus demo`'s, published to until stopped.
struct Workload {
    bus: Arc<dyn EventBus>,
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<Result<u64, eventbus_core::Error>>,
}

/// The settings of the bus of `backend`: named [`CLIENT_ID`], retries after 10 ms doubling up
/// to 200 ms (the demo's), otherwise the defaults.
fn settings(backend: &str) -> BusSettings {
    let mut settings = BusSettings::new(backend, CLIENT_ID);
    settings.pool.retry = settings
        .pool
        .retry
        .with_backoff(Duration::from_millis(10), Duration::from_millis(200));
    settings.settlement = Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
    settings
}

impl Workload {
    /// Subscribes to `topic` and its dead-letter topic on `bus` and publishes one version of
    /// each of 20 aggregates every 50 ms: each handler attempt takes 1 ms, the first attempt of
    /// every 10th version fails (retried), and every 25th version of `order-0` fails for good
    /// (dead-lettered).
    async fn start(bus: Arc<dyn EventBus>, topic: &str) -> Self {
        bus.subscribe_envelope(
            topic,
            Arc::new(|ctx: HandlerContext, envelope: Envelope| async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if envelope.aggregate_id == "order-0" && envelope.event_version % 25 == 0 {
                    return Err(HandlerError::permanent("the demo's poison event"));
                }
                if envelope.event_version % 10 == 0 && ctx.attempt() == 1 {
                    return Err(HandlerError::transient("the demo's injected failure"));
                }
                Ok(())
            }),
            SubscribeOptions::new(),
        )
        .await
        .unwrap();
        let _dead_letters = integration_tests::collect(&*bus, &format!("{topic}.DLQ")).await;
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s, topic) = (bus.clone(), stop.clone(), topic.to_owned());
        let publisher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut version = 0;
            while !s.load(Ordering::SeqCst) {
                tick.tick().await;
                version += 1;
                let envelopes = (0..20)
                    .map(|aggregate| {
                        Envelope::new(format!("order-{aggregate}"), "OrderUpdated", version, &0)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                futures::future::try_join_all(
                    envelopes
                        .iter()
                        .map(|envelope| b.publish_envelope(&topic, envelope)),
                )
                .await?;
            }
            Ok(u64::try_from(version).unwrap_or(0))
        });
        Self {
            bus,
            stop,
            publisher,
        }
    }

    /// Stops publishing (every publish having succeeded) and closes the bus.
    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let versions = self.publisher.await.unwrap().unwrap();
        assert!(versions > 0, "nothing was published");
        self.bus.close().await.unwrap();
    }
}

#[test]
fn promtool_accepts_the_example_alert_rules() {
    let program = promtool_bin();
    let rules = repository_path("examples/prometheus-alerts.yml");
    let output: Output = Command::new(&program)
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap_or_else(|error| missing(&program, "PROMTOOL_BIN", &error));
    assert!(
        output.status.success(),
        "{program} check rules {}: {}\n{}{}",
        rules.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_alert_rule_has_data_in_a_real_prometheus_on_memory_nats_and_kafka()
 {
    integration_tests::capture_logs();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    eventbus::serve_metrics(listen).unwrap();
    let prometheus = tokio::task::block_in_place(|| Prometheus::start(listen));

    // Fresh topics and group on a broker other tests may share.
    let run = format!("{}-{}", std::process::id(), free_port());
    let server = NatsServer::start();
    let memory: Arc<dyn EventBus> = Arc::new(eventbus_memory::start(settings("memory")).unwrap());
    let nats: Arc<dyn EventBus> = Arc::new(
        eventbus_nats::connect(settings("nats"), nats_config(&server.url()))
            .await
            .unwrap(),
    );
    let kafka: Arc<dyn EventBus> = Arc::new(
        eventbus_kafka::connect(
            settings("kafka"),
            eventbus_kafka::KafkaConfig {
                group_id: Some(format!("prometheus-dashboard-{run}")),
                ..kafka_config(&kafka_bootstrap())
            },
        )
        .await
        .unwrap(),
    );
    let mut workloads = Vec::new();
    for (backend, bus) in BACKENDS.into_iter().zip([memory, nats, kafka]) {
        workloads.push(Workload::start(bus, &format!("dashboard.{backend}.{run}")).await);
    }

    // Every panel's queries, on every backend serving all the metrics a query reads (the
    // metric reference's backends column): "Consumer lag" on NATS and Kafka; of "Broker (NATS
    // connection, Kafka group)", `connected` and `connection_events_total` on NATS,
    // `rebalances_total`, `partitions_paused` and `commit_failures_total` on Kafka; every other
    // query on all three.
    let reference = documented();
    let mut pending: Vec<(String, &str, String)> = Vec::new();
    for query in &dashboard_queries() {
        for backend in BACKENDS {
            let namespace = eventbus_core::metric_namespace(backend, CLIENT_ID);
            let expression = concrete(query, &namespace);
            if applies_to(query, &expression, &namespace, backend, &reference) {
                pending.push((query.panel.clone(), backend, expression));
            }
        }
    }
    let deadline = Instant::now() + QUERY_DEADLINE;
    loop {
        let mut still = Vec::new();
        for (panel, backend, expression) in pending {
            match prometheus.query(&expression).await {
                Ok(samples) if has_data(&samples) => {}
                Ok(samples) => still.push((panel, backend, expression, format!("{samples:?}"))),
                Err(error) => panic!("panel {panel:?} on {backend}: `{expression}`: {error}"),
            }
        }
        if still.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dashboard panels without data after {QUERY_DEADLINE:?} of the workload:\n{}\n\
             prometheus log:\n{}",
            still
                .iter()
                .map(|(panel, backend, expression, last)| format!(
                    "  panel {panel:?} on {backend}: `{expression}` returned {last}"
                ))
                .collect::<Vec<_>>()
                .join("\n"),
            prometheus.log()
        );
        pending = still
            .into_iter()
            .map(|(panel, backend, expression, _)| (panel, backend, expression))
            .collect();
        tokio::time::sleep(POLL).await;
    }

    // The alert rules: Prometheus loaded every one and evaluated it without error, each
    // expression evaluates through the query API, and every series a rule reads exists (a rule
    // on a misspelt name would never fire, silently).
    let alerts = repository_file("examples/prometheus-alerts.yml")
        .lines()
        .filter(|line| line.trim_start().starts_with("- alert:"))
        .count();
    let rules = loop {
        let groups = prometheus.api("/api/v1/rules".to_owned()).await;
        let rules: Vec<Value> = groups
            .as_ref()
            .and_then(|answer| answer["data"]["groups"].as_array())
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules.len() == alerts && rules.iter().all(|rule| rule["health"] != "unknown") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus did not load and evaluate the {alerts} alert rules of \
             examples/prometheus-alerts.yml: {groups:?}\nprometheus log:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(POLL).await;
    };
    for rule in &rules {
        let (name, expression) = (&rule["name"], rule["query"].as_str().unwrap());
        assert_eq!(
            rule["health"], "ok",
            "alert {name} (`{expression}`): {}",
            rule["lastError"]
        );
        if let Err(error) = prometheus.query(expression).await {
            panic!("alert {name}: `{expression}`: {error}");
        }
        let mut read = 0;
        for backend in BACKENDS {
            let namespace = eventbus_core::metric_namespace(backend, CLIENT_ID);
            for metric in metrics_read(expression, &namespace) {
                read += 1;
                let series = format!("{namespace}_{metric}");
                let samples = prometheus.query(&series).await.unwrap();
                assert!(
                    has_data(&samples),
                    "alert {name} reads {series}, which a {backend} bus does not serve"
                );
            }
        }
        assert!(
            read > 0,
            "alert {name} reads no metric of a `{{backend}}_eventbus_{CLIENT_ID}` namespace: \
             {expression}"
        );
    }

    for workload in workloads {
        workload.stop().await;
    }
    drop(prometheus);
}
