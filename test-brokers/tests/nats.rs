//! The test harness's nats-server: it starts with JetStream on loopback and is gone when dropped.

use test_brokers::{NatsCluster, NatsServer};

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

/// Three nodes join one JetStream cluster (a meta group of three), a killed node is started
/// again on its ports and store and rejoins, and the cluster's nodes are gone when dropped.
#[test]
fn a_three_node_cluster_forms_survives_a_node_restart_and_stops_when_dropped() {
    let mut cluster = NatsCluster::start(3);
    assert_eq!(cluster.urls().len(), 3);
    let meta_of_three = |node: &mut test_brokers::NatsServer| {
        node.monitor("/jsz")
            .is_some_and(|(status, body)| status == 200 && body.contains("\"cluster_size\": 3"))
    };
    for index in 0..3 {
        assert!(
            meta_of_three(cluster.node(index)),
            "node {index} in a meta group of 3"
        );
    }
    cluster.node(1).kill();
    assert!(!cluster.node(1).accepts_clients());
    cluster.node(1).start_again();
    assert!(
        cluster.node(1).healthy(),
        "the restarted node is current again"
    );
    assert!(meta_of_three(cluster.node(1)));
    let urls = cluster.urls();
    drop(cluster);
    for url in urls {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{url} stopped on drop"
        );
    }
}
