//! Real brokers for the tests of the workspace: each test starts its own on free loopback
//! ports, and it is stopped when dropped. A broker binary that is missing fails the test that
//! asked for it, loudly; nothing is skipped.
//!
//! - [`NatsServer`]: nats-server with JetStream, from `NATS_SERVER_BIN` (set by
//!   `cargo xtask test-matrix`, installed by `cargo xtask brokers install`).

// A broker that cannot start is a failed test, with the reason in the panic.
#![allow(clippy::panic, clippy::expect_used)]

mod nats;

pub use nats::NatsServer;
