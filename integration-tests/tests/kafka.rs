//! The conformance suite against Apache Kafka: one broker for this test binary, a consumer group
//! and topics of its own for each test.

// A factory that cannot build its bus fails the test that asked for it.
#![allow(clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use eventbus_core::EventBus;
use integration_tests::{BusFactory, Settings, kafka_config};
use test_brokers::kafka_bootstrap;

struct Kafka {
    /// This test's name prefix: its group and topics.
    run: String,
}

impl Kafka {
    fn new() -> Self {
        static RUNS: AtomicU64 = AtomicU64::new(0);
        Self {
            run: format!("c{}", RUNS.fetch_add(1, Ordering::SeqCst)),
        }
    }
}

#[async_trait]
impl BusFactory for Kafka {
    async fn bus(&self, settings: Settings) -> Arc<dyn EventBus> {
        let config = eventbus_kafka::KafkaConfig {
            group_id: Some(format!("conformance-{}", self.run)),
            ..kafka_config(&kafka_bootstrap())
        };
        match eventbus_kafka::connect(settings.bus_settings("kafka"), config).await {
            Ok(bus) => Arc::new(bus),
            Err(error) => panic!("Kafka bus: {error}"),
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("conformance.{}.{name}", self.run)
    }
}

integration_tests::conformance_suite!(Kafka::new());

/// Kafka: the lag is each partition's end offset minus its committed offset, from librdkafka's
/// statistics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_shows_the_backlog_and_falls_to_zero_once_handled() {
    integration_tests::capture_logs();
    integration_tests::consumer_lag_shows_the_backlog_and_falls_to_zero_once_handled(&Kafka::new())
        .await;
}
