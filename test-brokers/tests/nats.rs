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
