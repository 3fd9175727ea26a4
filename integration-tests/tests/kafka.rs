//! The conformance suite against Apache Kafka: one broker for this test binary, a consumer group
//! and topics of its own for each test.

// A factory that cannot build its bus fails the test that asked for it.
#![allow(clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use eventbus_core::EventBus;
use eventbus_kafka::KafkaBus;
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
        match KafkaBus::connect(settings.bus_settings("kafka"), config).await {
            Ok(bus) => Arc::new(bus),
            Err(error) => panic!("Kafka bus: {error}"),
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("conformance.{}.{name}", self.run)
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                integration_tests::capture_logs();
                integration_tests::$name(&Kafka::new()).await;
            }
        )*
    };
}

conformance!(
    per_aggregate_order_with_many_aggregates,
    retry_then_success_keeps_order,
    exhausted_retries_go_to_the_dead_letter_topic,
    undecodable_envelopes_are_dead_lettered_without_retries,
    panics_are_caught_for_both_classes,
    plain_messages_are_at_most_once,
    unsubscribe_stops_delivery,
    close_drains_in_flight_work,
    resubscribing_keeps_each_aggregates_order,
    a_multi_line_failure_reason_is_dead_lettered_and_the_aggregate_moves_on,
    two_subscriptions_dead_lettering_one_message_both_write_it,
    a_handler_publishing_on_its_own_bus_does_not_deadlock,
    a_dropped_publish_does_not_hang_close,
    close_after_unsubscribe_leaves_no_task_running,
    dead_lettering_disabled_keeps_an_exhausted_envelope_in_its_lane,
);
