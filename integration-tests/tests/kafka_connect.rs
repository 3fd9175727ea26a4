//! `eventbus_kafka::connect` asks the brokers before it starts anything: its cancel-safety note.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use eventbus_pool::BusSettings;
use integration_tests::{eventually, kafka_config};

/// The librdkafka clients of this process, by their threads (`rdk:main` is one per client).
fn librdkafka_clients() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.trim() == "rdk:main")
        })
        .count()
}

/// The cancel-safety note of `connect`: a call dropped while it waits for the brokers' answer
/// leaves no client of librdkafka running (its check's client ends with its last request, and
/// nothing else was started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_dropped_while_it_waits_for_the_brokers_leaves_no_client_running() {
    // A port that takes connections and never answers: the check waits on it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    assert_eq!(librdkafka_clients(), 0);
    let connect =
        eventbus_kafka::connect(BusSettings::new("kafka", "dropped"), kafka_config(&address));
    assert!(
        tokio::time::timeout(Duration::from_millis(800), connect)
            .await
            .is_err(),
        "connect finished against a port that never answers"
    );
    eventually("no librdkafka client left", || async {
        librdkafka_clients() == 0
    })
    .await;
}
