//! The conformance suite against NATS JetStream, each test on its own nats-server.

// A factory that cannot build its bus fails the test that asked for it.
#![allow(clippy::panic)]

use std::sync::Arc;

use async_trait::async_trait;
use eventbus_core::EventBus;
use integration_tests::{BusFactory, Settings};
use test_brokers::NatsServer;

struct Nats {
    server: NatsServer,
}

#[async_trait]
impl BusFactory for Nats {
    async fn bus(&self, settings: Settings) -> Arc<dyn EventBus> {
        let mut config = integration_tests::nats_config(&self.server.url());
        config.streams.push(shared_stream("conformance"));
        match eventbus_nats::connect(settings.bus_settings("nats"), config).await {
            Ok(bus) => Arc::new(bus),
            Err(error) => panic!("NATS bus: {error}"),
        }
    }

    fn topic(&self, name: &str) -> String {
        format!("conformance.{name}")
    }
}

/// A stream over `{prefix}.shared.>`: the suite's topics `shared.a` and `shared.b` live in one
/// stream, as a Go service's `business.>` stream holds many topics.
fn shared_stream(prefix: &str) -> eventbus_nats::StreamDefinition {
    eventbus_nats::StreamDefinition::new(
        format!("{}_SHARED", prefix.to_uppercase()),
        vec![format!("{prefix}.shared.>")],
    )
}

/// The same contract on partitioned topics: every topic of the suite split into 4 partitions,
/// read through the group (pinned consumers, claims), by one instance.
struct PartitionedNats {
    server: NatsServer,
}

/// The topics the suite uses (`factory.topic(name)`); each is partitioned.
const SUITE_TOPICS: [&str; 27] = [
    "order",
    "retry",
    "exhaust",
    "poison",
    "panic",
    "panic-plain",
    "plain",
    "unsub",
    "drain",
    "resubscribe",
    "multiline",
    "twice",
    "chain.a",
    "chain.b",
    "dropped",
    "tasks",
    "nodlq",
    "timeout",
    "trace",
    "traced",
    "traceplain",
    "pipelined",
    "pipelined-plain",
    "shared.a",
    "shared.b",
    "policy",
    "routed",
];

#[async_trait]
impl BusFactory for PartitionedNats {
    async fn bus(&self, settings: Settings) -> Arc<dyn EventBus> {
        let mut config = integration_tests::nats_config(&self.server.url());
        for name in SUITE_TOPICS {
            config.topics.insert(
                format!("partitioned.{name}"),
                eventbus_nats::TopicOptions {
                    partitions: Some(4),
                    ..eventbus_nats::TopicOptions::default()
                },
            );
        }
        config.streams.push(shared_stream("partitioned"));
        config.scale_out.pinned_ttl = std::time::Duration::from_secs(2);
        match eventbus_nats::connect(settings.bus_settings("nats"), config).await {
            Ok(bus) => Arc::new(bus),
            Err(error) => panic!("NATS bus: {error}"),
        }
    }

    fn topic(&self, name: &str) -> String {
        // A topic the list lacks would run unpartitioned without a word.
        assert!(
            SUITE_TOPICS.contains(&name),
            "add {name:?} to SUITE_TOPICS so that it is partitioned"
        );
        format!("partitioned.{name}")
    }
}

integration_tests::conformance_suite!(Nats {
    server: NatsServer::start()
});

/// NATS: the lag is the consumer's pending count as of its latest delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_shows_the_backlog_and_falls_to_zero_once_handled() {
    integration_tests::capture_logs();
    integration_tests::consumer_lag_shows_the_backlog_and_falls_to_zero_once_handled(&Nats {
        server: NatsServer::start(),
    })
    .await;
}

/// The whole suite on partitioned topics (docs/nats.md, "Scaling out").
mod partitioned {
    use super::*;

    integration_tests::conformance_suite!(PartitionedNats {
        server: NatsServer::start()
    });
}
