//! Metric names and values, recorded under the caller's namespace.

use std::time::Duration;

use eventbus_core::{AggregateId, DeliveryClass, HandlerError};
use eventbus_pool::{Job, Pool, PoolConfig};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[test]
fn the_pool_records_go_sdk_names_under_its_namespace_without_aggregate_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let pool = Pool::with_metrics_namespace(
                PoolConfig {
                    pool_size: 2,
                    retry: eventbus_core::RetryPolicy::new()
                        .with_max_attempts(2)
                        .with_backoff(Duration::ZERO, Duration::ZERO),
                    ..PoolConfig::default()
                },
                "memory_eventbus_svc_a",
            )
            .unwrap();
            let ok = Job::new(
                Some(AggregateId::new("order-1").unwrap()),
                DeliveryClass::AtLeastOnce,
                |_| async { Ok(()) },
            );
            let bad = Job::new(
                Some(AggregateId::new("order-2").unwrap()),
                DeliveryClass::AtLeastOnce,
                |_| async { Err(HandlerError::transient("no")) },
            );
            assert!(pool.submit(ok).await.unwrap().await.is_success());
            assert!(!pool.submit(bad).await.unwrap().await.is_success());
            pool.shutdown(Duration::from_secs(1)).await;
        });
    });

    let snapshot = snapshotter.snapshot().into_vec();
    let value = |name: &str, labels: &[(&str, &str)]| {
        snapshot
            .iter()
            .find(|(key, ..)| {
                let key = key.key();
                key.name() == format!("memory_eventbus_svc_a_actor_pool_{name}")
                    && key
                        .labels()
                        .map(|l| (l.key(), l.value()))
                        .eq(labels.iter().copied())
            })
            .map(|(.., value)| value)
            .unwrap_or_else(|| panic!("metric {name} {labels:?} missing"))
    };
    assert_eq!(value("messages_sent_total", &[]), &DebugValue::Counter(2));
    assert_eq!(
        value("messages_processed_total", &[("success", "true")]),
        &DebugValue::Counter(1)
    );
    assert_eq!(
        value("messages_processed_total", &[("success", "false")]),
        &DebugValue::Counter(1)
    );
    assert_eq!(value("retries_total", &[]), &DebugValue::Counter(1));
    assert_eq!(value("actor_restarted_total", &[]), &DebugValue::Counter(0));
    assert!(
        matches!(value("message_latency_seconds", &[]), DebugValue::Histogram(h) if h.len() == 3)
    );
    for gauge in [
        "inbox_depth",
        "inbox_utilization",
        "lanes_active",
        "in_flight",
    ] {
        assert!(
            matches!(value(gauge, &[]), DebugValue::Gauge(g) if g.into_inner() == 0.0),
            "{gauge}"
        );
    }
    for (key, ..) in &snapshot {
        for label in key.key().labels() {
            assert!(
                !label.value().contains("order-"),
                "aggregate ID used as a label"
            );
        }
    }
}

#[tokio::test]
async fn inbox_depth_is_exact() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let pool = metrics::with_local_recorder(&recorder, || {
        Pool::with_metrics_namespace(
            PoolConfig {
                pool_size: 1,
                inbox_size: 10,
                ..PoolConfig::default()
            },
            "t",
        )
    })
    .unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let mut handles = Vec::new();
    for _ in 0..7 {
        let gate = gate.clone();
        handles.push(
            pool.submit(Job::new(
                Some(AggregateId::new("k").unwrap()),
                DeliveryClass::AtLeastOnce,
                move |_| {
                    let gate = gate.clone();
                    async move {
                        gate.acquire().await.unwrap().forget();
                        Ok(())
                    }
                },
            ))
            .await
            .unwrap(),
        );
    }
    while pool.stats().running == 0 {
        tokio::task::yield_now().await;
    }
    let depth = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == "t_actor_pool_inbox_depth")
        .map(|(.., value)| value)
        .unwrap();
    assert_eq!(depth, DebugValue::Gauge(6.0.into()));
    assert_eq!(pool.stats().queued, 6);
    gate.add_permits(7);
    for handle in handles {
        assert!(handle.await.is_success());
    }
    pool.shutdown(Duration::from_secs(1)).await;
}
