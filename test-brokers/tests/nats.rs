//! The test harness's nats-server: it starts with JetStream on loopback and is gone when dropped.

use test_brokers::NatsServer;

#[test]
fn a_nats_server_with_jetstream_starts_on_loopback_and_stops_when_dropped() {
    let server = NatsServer::start();
    assert!(server.healthy(), "JetStream is enabled");
    assert!(server.url().starts_with("nats://127.0.0.1:"));
    let second = NatsServer::start();
    assert_ne!(server.url(), second.url(), "each test gets its own server");
    let probe = NatsServer::start();
    drop(server);
    drop(second);
    assert!(probe.accepts_clients());
    let url = probe.url();
    drop(probe);
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "stopped on drop"
    );
}

/// Ports come from below the kernel's ephemeral range, where no client's outbound connection
/// can take them between the choice and the server's bind.
#[test]
fn servers_listen_below_the_ephemeral_port_range() {
    let server = NatsServer::start();
    let port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    assert!((20_000..32_000).contains(&port), "port {port}");
}

/// A server that exits while starting is started again on other ports, and one that never
/// starts fails the test with the reason, after its attempts.
#[test]
fn a_server_that_cannot_start_fails_loudly_after_its_attempts() {
    let started = std::panic::catch_unwind(|| NatsServer::start_with(&["--no-such-flag"]));
    let panic = started.err().expect("no server with an unknown flag");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("nats-server exited") && message.contains("5 times"),
        "{message}"
    );
}
