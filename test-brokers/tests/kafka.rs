//! The test harness's Kafka broker: it starts on loopback, answers the Kafka protocol, comes back
//! after a SIGKILL with its data, and is gone when dropped.

// Test code: a failed unwrap is a failed check.
#![allow(clippy::unwrap_used)]

use test_brokers::KafkaBroker;

fn port_of(bootstrap: &str) -> u16 {
    bootstrap.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn a_kafka_broker_starts_on_loopback_restarts_after_a_kill_and_stops_when_dropped() {
    let started = std::time::Instant::now();
    let mut broker = KafkaBroker::start();
    eprintln!(
        "Kafka broker ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(broker.answers());
    assert!(broker.bootstrap().starts_with("127.0.0.1:"));
    let port = port_of(&broker.bootstrap());

    broker.kill();
    assert!(!broker.answers(), "killed");
    broker.start_again();
    assert!(broker.answers(), "answers again on the same port");
    assert_eq!(port_of(&broker.bootstrap()), port);

    drop(broker);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "stopped on drop"
    );
}
