//! Real brokers for the tests of the workspace: each test starts its own on free loopback
//! ports, and it is stopped when dropped. A broker binary that is missing fails the test that
//! asked for it, loudly; nothing is skipped.
//!
//! - [`NatsServer`]: nats-server with JetStream, from `NATS_SERVER_BIN` (set by
//!   `cargo xtask test-matrix`, installed by `cargo xtask brokers install`).
//! - [`KafkaBroker`]: Apache Kafka (KRaft, one node), run by `java` from the jars in
//!   `KAFKA_LIBS` (set by `cargo xtask test-matrix`, fetched from Maven Central by
//!   `cargo xtask brokers install`).

// A broker that cannot start is a failed test, with the reason in the panic.
#![allow(clippy::panic, clippy::expect_used)]

mod kafka;
mod nats;

pub use kafka::{KafkaBroker, kafka_bootstrap, kafka_libs};
pub use nats::NatsServer;
