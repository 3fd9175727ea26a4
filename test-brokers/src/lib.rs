//! Real brokers for the tests of the workspace: each test starts its own on free loopback
//! ports, and it is stopped when dropped. A broker binary that is missing fails the test that
//! asked for it, loudly; nothing is skipped.
//!
//! - [`NatsServer`]: nats-server with JetStream, from `NATS_SERVER_BIN` (set by
//!   `cargo xtask test-matrix`, installed by `cargo xtask brokers install`).
//! - [`KafkaBroker`]: Apache Kafka (KRaft, one node), run by `java` from the jars in
//!   `KAFKA_LIBS` (set by `cargo xtask test-matrix`, fetched from Maven Central by
//!   `cargo xtask brokers install`).
//! - [`TestCa`]: a certificate authority made at test time, for brokers run with TLS.

// A broker that cannot start is a failed test, with the reason in the panic.
#![allow(clippy::panic, clippy::expect_used)]
// A broker started again on other ports is told in the test's captured output.
#![allow(clippy::print_stderr)]

mod kafka;
mod nats;
mod tls;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port nothing listens on now, taken below the kernel's ephemeral range (32768 and
/// up on Linux): a port that `bind(0)` hands out lies in that range, where the outbound
/// connections of every client of the tests take their ports too, and one of them could take it
/// before the broker binds it. Each call of a process tries the next port of its own sequence
/// over 20000..32000; a broker that still cannot bind is started again on other ports.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        // 104,729 is prime, so the sequence visits every port of the span once.
        let port = FIRST + start.wrapping_add(step.wrapping_mul(104_729)) % SPAN;
        let port = u16::try_from(port).expect("below 32000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

pub use kafka::{KafkaBroker, KafkaCluster, kafka_bootstrap, kafka_libs};
pub use nats::{NatsCluster, NatsServer};
pub use tls::{Issued, TestCa};
