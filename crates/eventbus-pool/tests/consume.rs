//! The consume runtime with a recording transport: settlement in the lane, dead letters that
//! fail, held messages, closing a subscription, and the cancel-safety notes.

// Test code: a failed unwrap or index is a failed check.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbus_core::{Backoff, RetryDecision, RetryPolicy};
use eventbus_core::{
    DeliveryMeta, Envelope, Error, HandlerContext, HandlerError, Message, Position, async_trait,
};
use eventbus_pool::consume::{Delivered, Runtime, SubscriptionSpec};
use eventbus_pool::transport::{DeadLetterWriter, Delivery, Handler, Outgoing, Receipt};
use eventbus_pool::{BusSettings, PoolConfig};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tokio::sync::Semaphore;

/// What the transport and the receipts were told, in order.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<String>>,
    /// Dead-letter writes that fail before one succeeds.
    failing_writes: AtomicUsize,
}

impl Log {
    fn push(&self, event: String) {
        self.events.lock().unwrap().push(event);
    }

    fn events(&self) -> Vec<String> {
        self.events.lock().unwrap().clone()
    }
}

struct Broker(Arc<Log>);

#[async_trait]
impl DeadLetterWriter for Broker {
    async fn publish_dead_letter(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        let (topic, letter, dedup_id) = (outgoing.topic, outgoing.message, outgoing.dedup_id);
        let failing = &self.0.failing_writes;
        if failing
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.0.push("dead letter refused".into());
            return Err(Error::Broker {
                message: "stream unavailable".into(),
                source: None,
            });
        }
        let reason = letter
            .headers
            .get_str("X-Error-Message")
            .unwrap_or_default();
        self.0.push(format!(
            "dead letter to {topic} ({reason}) id {}",
            dedup_id.unwrap_or("-")
        ));
        Ok(())
    }
}

/// The receipt of message `name`.
struct Named(Arc<Log>, String);

#[async_trait]
impl Receipt for Named {
    async fn ack(&self) -> Result<(), Error> {
        self.0.push(format!("ack {}", self.1));
        Ok(())
    }

    async fn give_back(&self) -> Result<(), Error> {
        self.0.push(format!("give back {}", self.1));
        Ok(())
    }

    async fn terminate(&self) -> Result<(), Error> {
        self.0.push(format!("terminate {}", self.1));
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), Error> {
        self.0.push(format!("in progress {}", self.1));
        Ok(())
    }
}

fn runtime(pool_size: usize, log: &Arc<Log>) -> Runtime {
    Runtime::new(
        BusSettings {
            pool: PoolConfig {
                pool_size,
                inbox_size: 10,
                retry: RetryPolicy::new()
                    .with_max_attempts(2)
                    .with_backoff(Duration::from_millis(5), Duration::from_millis(20)),
                ..PoolConfig::default()
            },
            settlement: Backoff::new(Duration::from_millis(5), Duration::from_millis(20)),
            ..BusSettings::new("test", "t")
        },
        Arc::new(Broker(log.clone())),
    )
    .unwrap()
}

/// Envelope `aggregate` v`version` as delivered at stream sequence `sequence`.
fn delivery(log: &Arc<Log>, aggregate: &str, version: i64, sequence: u64) -> Delivery {
    let envelope = Envelope::new(aggregate, "Changed", version, &version).unwrap();
    let mut message = Message::new("orders", envelope.to_bytes().unwrap());
    message.meta = DeliveryMeta {
        position: Position::Sequence(sequence),
        delivery_attempt: 1,
        timestamp: None,
    };
    Delivery {
        message,
        receipt: Arc::new(Named(log.clone(), format!("{aggregate}/{version}"))),
        held_id: Some(sequence),
    }
}

/// An envelope handler that records versions, fails `failing` permanently, and waits for a
/// permit on version 1.
fn handler(seen: &Arc<Log>, gate: &Arc<Semaphore>, failing: i64) -> Handler {
    let (seen, gate) = (seen.clone(), gate.clone());
    Handler::Envelope(Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
        let (seen, gate) = (seen.clone(), gate.clone());
        async move {
            seen.push(format!(
                "run {}/{}",
                envelope.aggregate_id, envelope.event_version
            ));
            if envelope.event_version == 1 {
                gate.acquire().await.unwrap().forget();
            }
            if envelope.event_version == failing {
                return Err(HandlerError::permanent("broken"));
            }
            Ok(())
        }
    }))
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Settling backs off by the bus's settlement backoff (5 to 20 ms here), whatever the handlers'
/// retry policy says (10 minutes between attempts here, on the bus and on the subscription): the
/// refused dead-letter write is tried again within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_dead_letter_write_backs_off_by_the_settlement_backoff_not_the_retry_policy() {
    let log = Arc::new(Log::default());
    log.failing_writes.store(3, Ordering::SeqCst);
    let slow = RetryPolicy::new()
        .with_max_attempts(2)
        .with_backoff(Duration::from_secs(600), Duration::from_secs(600));
    let settings = BusSettings {
        pool: PoolConfig {
            retry: slow.clone(),
            ..PoolConfig::default()
        },
        ..runtime(4, &log).settings().clone()
    };
    let runtime = Runtime::new(settings, Arc::new(Broker(log.clone()))).unwrap();
    let gate = Arc::new(Semaphore::new(10));
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-settle", handler(&log, &gate, 1))
                .with_retry(Some(slow)),
        )
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
    wait_until("the dead letter written after three refusals", || {
        log.events().contains(&"terminate k/1".to_owned())
    })
    .await;
    assert_eq!(runtime.stats().dead_letter_failures, 3);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

/// A subscription's policy replaces the bus's: 4 attempts where the bus allows 2, a handler's
/// own delay before the next attempt (here 300 ms, where the policy's backoff is 5 to 20 ms),
/// and a decision that gives up at once on the error it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriptions_retry_policy_replaces_the_buses() {
    let log = Arc::new(Log::default());
    let runtime = runtime(4, &log);
    let attempts = Arc::new(Mutex::new(Vec::<(String, u32, std::time::Instant)>::new()));
    let a = attempts.clone();
    let handler = Handler::Envelope(Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
        let a = a.clone();
        async move {
            let aggregate = envelope.aggregate_id.clone();
            a.lock()
                .unwrap()
                .push((aggregate.clone(), ctx.attempt(), std::time::Instant::now()));
            match aggregate.as_str() {
                "busy" if ctx.attempt() < 4 => Err(HandlerError::transient("busy")),
                "later" if ctx.attempt() == 1 => {
                    Err(HandlerError::transient("limited")
                        .with_retry_after(Duration::from_millis(300)))
                }
                "conflict" => Err(HandlerError::transient("conflict")),
                _ => Ok(()),
            }
        }
    }));
    let policy = RetryPolicy::new()
        .with_max_attempts(4)
        .with_backoff(Duration::from_millis(5), Duration::from_millis(20))
        .with_decision(|error, _| {
            if error.to_string() == "conflict" {
                RetryDecision::GiveUp
            } else {
                RetryDecision::Retry
            }
        });
    let consumer = runtime
        .subscribe(SubscriptionSpec::new("orders", "sub-policy", handler).with_retry(Some(policy)))
        .unwrap();
    for (sequence, aggregate) in ["busy", "later", "conflict"].into_iter().enumerate() {
        consumer
            .deliver(delivery(&log, aggregate, 1, sequence as u64 + 1))
            .await
            .unwrap();
    }
    wait_until("all three settled", || {
        let events = log.events();
        ["ack busy/1", "ack later/1", "terminate conflict/1"]
            .iter()
            .all(|settled| events.contains(&(*settled).to_owned()))
    })
    .await;
    let attempts = attempts.lock().unwrap().clone();
    let of = |name: &str| -> Vec<(u32, std::time::Instant)> {
        attempts
            .iter()
            .filter(|(aggregate, ..)| aggregate == name)
            .map(|(_, attempt, at)| (*attempt, *at))
            .collect()
    };
    assert_eq!(
        of("busy").len(),
        4,
        "the subscription's 4 attempts, not the bus's 2"
    );
    assert_eq!(of("conflict").len(), 1, "given up at once");
    let later = of("later");
    assert_eq!(later.len(), 2);
    assert!(later[1].1.duration_since(later[0].1) >= Duration::from_millis(300));
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

/// A retry decision is the service's code: one that panics gives its message up (dead-lettered,
/// with the handler's error), the actor lives on, and the aggregate's next event runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_decision_that_panics_dead_letters_its_message_and_the_aggregate_moves_on() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let handler = Handler::Envelope(Arc::new(
        |_ctx: HandlerContext, envelope: Envelope| async move {
            if envelope.event_version == 1 {
                return Err(HandlerError::transient("busy"));
            }
            Ok(())
        },
    ));
    let policy = RetryPolicy::new()
        .with_max_attempts(5)
        .with_decision(|_, _| panic!("a decision that unwraps what is not there"));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new("orders", "sub-panics", handler).with_retry(Some(policy)))
        .unwrap();
    for version in 1..=2 {
        consumer
            .deliver(delivery(&log, "k", version, version as u64))
            .await
            .unwrap();
    }
    wait_until("v1 dead-lettered and v2 acknowledged", || {
        let events = log.events();
        events.contains(&"terminate k/1".to_owned()) && events.contains(&"ack k/2".to_owned())
    })
    .await;
    assert!(
        log.events()
            .iter()
            .any(|event| event.starts_with("dead letter to orders.DLQ (busy)"))
    );
    let report = runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    assert!(report.drained);
}

/// A subscription without a dead-letter topic still follows its policy's decision while
/// attempts are left: its 10 ms, not the 10 minutes of the policy's backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_without_dead_letters_waits_its_decisions_delay_while_attempts_are_left() {
    let log = Arc::new(Log::default());
    let runtime = runtime(2, &log);
    let handler = Handler::Envelope(Arc::new(
        |ctx: HandlerContext, _envelope: Envelope| async move {
            if ctx.attempt() < 3 {
                return Err(HandlerError::transient("busy"));
            }
            Ok(())
        },
    ));
    let policy = RetryPolicy::new()
        .with_max_attempts(5)
        .with_backoff(Duration::from_secs(600), Duration::from_secs(600))
        .with_decision(|_, _| RetryDecision::RetryAfter(Duration::from_millis(10)));
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-no-dlq", handler)
                .with_dead_letter(None)
                .with_retry(Some(policy)),
        )
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
    wait_until("k/1 acknowledged at its third attempt", || {
        log.events().contains(&"ack k/1".to_owned())
    })
    .await;
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dead_letter_write_is_retried_while_the_aggregate_waits() {
    let log = Arc::new(Log::default());
    log.failing_writes.store(3, Ordering::SeqCst);
    let runtime = runtime(4, &log);
    let gate = Arc::new(Semaphore::new(10));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-a",
            handler(&log, &gate, 1),
        ))
        .unwrap();
    for version in 1..=2 {
        consumer
            .deliver(delivery(&log, "k", version, version as u64))
            .await
            .unwrap();
    }
    wait_until("v2 acknowledged", || {
        log.events().contains(&"ack k/2".to_owned())
    })
    .await;
    let events: Vec<String> = log
        .events()
        .into_iter()
        .filter(|e| !e.starts_with("in progress"))
        .collect();
    assert_eq!(
        events,
        [
            "run k/1",
            "dead letter refused",
            "dead letter refused",
            "dead letter refused",
            "dead letter to orders.DLQ (broken) id dlq:sub-a:orders:1:0",
            "terminate k/1",
            "run k/2",
            "ack k/2",
        ]
    );
    let stats = runtime.stats();
    assert_eq!((stats.dead_lettered, stats.dead_letter_failures), (1, 3));
    assert_eq!(stats.dead_letters_waiting, 0);
    assert_eq!(consumer.held(), 0);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_copy_of_a_held_message_is_dropped() {
    let log = Arc::new(Log::default());
    let runtime = runtime(2, &log);
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-b",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 7)).await.unwrap();
    wait_until("v1 running", || {
        log.events().contains(&"run k/1".to_owned())
    })
    .await;
    assert_eq!(
        consumer.deliver(delivery(&log, "k", 1, 7)).await.unwrap(),
        Delivered::Duplicate
    );
    gate.add_permits(1);
    wait_until("v1 acknowledged", || consumer.held() == 0).await;
    assert_eq!(log.events(), ["run k/1", "ack k/1"]);
    assert_eq!(runtime.stats().redeliveries_dropped, 1);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_subscription_gives_back_its_queue_in_lane_order_after_the_running_message() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-c",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    let other = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-d",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    for version in 1..=3 {
        consumer
            .deliver(delivery(&log, "k", version, version as u64))
            .await
            .unwrap();
    }
    wait_until("v1 running", || {
        log.events().contains(&"run k/1".to_owned())
    })
    .await;
    let closing = {
        let consumer = consumer.clone();
        tokio::spawn(async move { consumer.close(Duration::from_secs(5)).await })
    };
    wait_until("closing", || consumer.is_closed()).await;
    let refused = consumer.deliver(delivery(&log, "k", 4, 4)).await;
    assert!(matches!(refused, Err(Error::Closed)));
    gate.add_permits(1);
    let report = closing.await.unwrap();
    assert!(report.drained);
    assert_eq!(
        log.events(),
        ["run k/1", "ack k/1", "give back k/2", "give back k/3"]
    );
    assert_eq!(runtime.stats().given_back, 2);
    assert_eq!(runtime.subscriptions(), 1);
    // The other subscription still works.
    other.deliver(delivery(&log, "k", 2, 2)).await.unwrap();
    wait_until("the other subscription", || other.held() == 0).await;
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(start_paused = true)]
async fn held_messages_get_in_progress_signals_until_they_settle() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-e", handler(&log, &gate, 0))
                .with_progress_interval(Some(Duration::from_secs(1))),
        )
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
    consumer.deliver(delivery(&log, "k", 2, 2)).await.unwrap();
    let signals = |name: &str| {
        log.events()
            .iter()
            .filter(|e| *e == &format!("in progress {name}"))
            .count()
    };
    // The running message and the one queued behind it are both kept alive.
    wait_until("two signals for each held message", || {
        signals("k/1") >= 2 && signals("k/2") >= 2
    })
    .await;
    gate.add_permits(1);
    wait_until("both settled", || consumer.held() == 0).await;
    let after = log.events().len();
    // Five progress intervals on the paused clock: none may bring a signal.
    tokio::time::advance(Duration::from_secs(5)).await;
    tokio::task::yield_now().await;
    assert_eq!(log.events().len(), after, "no signal once nothing is held");
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

/// The cancel-safety note of `Consumer::deliver`: a dropped call leaves nothing held and never
/// uses the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_leaves_nothing_held() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-f",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
    wait_until("v1 running", || {
        log.events().contains(&"run k/1".to_owned())
    })
    .await;
    // Fill the lane (10) so the next delivery waits for room, then drop it.
    for version in 2..=11 {
        consumer
            .deliver(delivery(&log, "k", version, version as u64))
            .await
            .unwrap();
    }
    let waiting = tokio::time::timeout(
        Duration::from_millis(50),
        consumer.deliver(delivery(&log, "k", 12, 12)),
    )
    .await;
    assert!(
        waiting.is_err(),
        "the lane was full, so the delivery waited"
    );
    assert_eq!(consumer.held(), 11, "the dropped delivery is not held");
    gate.add_permits(1);
    wait_until("all settled", || consumer.held() == 0).await;
    assert!(!log.events().iter().any(|e| e.ends_with("k/12")));
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

/// The cancel-safety note of `Consumer::close`: dropped after its first poll, the subscription
/// is closed, its queue given back, and its running message still settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_close_still_gives_back_the_queue_and_settles_the_running_message() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-g",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
    consumer.deliver(delivery(&log, "j", 2, 2)).await.unwrap();
    wait_until("v1 running", || {
        log.events().contains(&"run k/1".to_owned())
    })
    .await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(50),
        consumer.close(Duration::from_secs(30)),
    )
    .await;
    assert!(dropped.is_err());
    assert!(consumer.is_closed());
    gate.add_permits(1);
    wait_until("all settled", || consumer.held() == 0).await;
    assert_eq!(log.events(), ["run k/1", "give back j/2", "ack k/1"]);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[test]
fn dead_letters_are_counted_under_the_go_sdk_name() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        tokio.block_on(async {
            let log = Arc::new(Log::default());
            let runtime = runtime(1, &log);
            let gate = Arc::new(Semaphore::new(1));
            let consumer = runtime
                .subscribe(SubscriptionSpec::new(
                    "orders",
                    "sub-h",
                    handler(&log, &gate, 1),
                ))
                .unwrap();
            consumer.deliver(delivery(&log, "k", 1, 1)).await.unwrap();
            wait_until("dead-lettered", || consumer.held() == 0).await;
            runtime
                .close(tokio::time::Instant::now() + Duration::from_secs(5))
                .await;
        });
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let dead_letters = snapshot
        .iter()
        .find(|(key, ..)| key.key().name() == "test_eventbus_t_actor_pool_dead_letters_total")
        .map(|(.., value)| value);
    assert_eq!(dead_letters, Some(&DebugValue::Counter(1)));
}

/// An envelope handler that records each run and its attempt, and, for version `stuck`, waits
/// forever: until its cancellation token fires when `cooperative`, regardless otherwise.
fn stuck_handler(seen: &Arc<Log>, stuck: i64, cooperative: bool) -> Handler {
    let seen = seen.clone();
    Handler::Envelope(Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
        let seen = seen.clone();
        async move {
            let run = format!("{}/{}", envelope.aggregate_id, envelope.event_version);
            seen.push(format!("run {run} attempt {}", ctx.attempt()));
            if envelope.event_version == stuck {
                if cooperative {
                    ctx.cancellation().cancelled().await;
                    seen.push(format!("cancelled {run}"));
                    return Err(HandlerError::transient("stopped"));
                }
                std::future::pending::<()>().await;
            }
            Ok(())
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_timeout_sees_its_token_fire_and_is_retried_then_dead_lettered() {
    let log = Arc::new(Log::default());
    let runtime = runtime(4, &log);
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-timeout", stuck_handler(&log, 1, true))
                .with_handler_timeout(Some(Duration::from_millis(50))),
        )
        .unwrap();
    consumer.deliver(delivery(&log, "a", 1, 1)).await.unwrap();
    consumer.deliver(delivery(&log, "a", 2, 2)).await.unwrap();
    wait_until("a/2 acked", || log.events().contains(&"ack a/2".into())).await;
    let events = log.events();
    assert_eq!(
        events,
        [
            "run a/1 attempt 1",
            "cancelled a/1",
            "run a/1 attempt 2",
            "cancelled a/1",
            "dead letter to orders.DLQ (handler timed out after 50ms) id dlq:sub-timeout:orders:1:0",
            "terminate a/1",
            "run a/2 attempt 1",
            "ack a/2",
        ]
    );
    let stats = runtime.stats();
    assert_eq!((stats.handler_timeouts, stats.handlers_dropped), (2, 0));
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_ignoring_its_token_is_dropped_after_the_grace_period_and_counted() {
    let log = Arc::new(Log::default());
    let settings = BusSettings {
        handler_timeout: Some(Duration::from_millis(50)),
        ..runtime(4, &log).settings().clone()
    };
    let runtime = Runtime::new(settings, Arc::new(Broker(log.clone()))).unwrap();
    // The subscription sets no timeout: the bus's applies.
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-ignores",
            stuck_handler(&log, 1, false),
        ))
        .unwrap();
    consumer.deliver(delivery(&log, "a", 1, 1)).await.unwrap();
    consumer.deliver(delivery(&log, "b", 1, 2)).await.unwrap();
    wait_until("both dead-lettered", || {
        log.events()
            .iter()
            .filter(|event| event.starts_with("terminate"))
            .count()
            == 2
    })
    .await;
    // The drop is counted, and the lane freed, as the attempt ends: after the dead letter's
    // write may have begun.
    wait_until(
        "every attempt timed out and dropped, no handler holding a lane",
        || {
            let stats = runtime.stats();
            (stats.handler_timeouts, stats.handlers_dropped) == (4, 4)
                && runtime.pool_stats().running == 0
        },
    )
    .await;
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_handler_timeout_is_refused_with_the_field_named() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let Err(error) = runtime.subscribe(
        SubscriptionSpec::new("orders", "sub", stuck_handler(&log, 1, true))
            .with_handler_timeout(Some(Duration::ZERO)),
    ) else {
        panic!("a zero handler timeout was accepted");
    };
    assert!(error.to_string().contains("handler_timeout"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_held_past_lane_blocked_after_is_counted_blocked_and_degrades_the_engine() {
    let log = Arc::new(Log::default());
    let settings = BusSettings {
        lane_blocked_after: Duration::from_millis(100),
        ..runtime(4, &log).settings().clone()
    };
    let runtime = Runtime::new(settings, Arc::new(Broker(log.clone()))).unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let consumer = runtime
        .subscribe(SubscriptionSpec::new(
            "orders",
            "sub-b",
            handler(&log, &gate, 0),
        ))
        .unwrap();
    let engine = |runtime: &Runtime| {
        let report = runtime.add_health(eventbus_core::HealthReport::new("test"));
        report.components[0].clone()
    };
    assert_eq!(runtime.lane_ages().oldest, None);
    consumer.deliver(delivery(&log, "a", 1, 1)).await.unwrap();
    consumer.deliver(delivery(&log, "b", 2, 2)).await.unwrap();
    wait_until("b/2 acked", || log.events().contains(&"ack b/2".into())).await;
    // a/1 waits on the gate: young at first, blocked once past 100 ms.
    wait_until("a's lane blocked", || runtime.lane_ages().blocked == 1).await;
    let ages = runtime.lane_ages();
    assert!(
        ages.oldest.unwrap() > Duration::from_millis(100),
        "{ages:?}"
    );
    let component = engine(&runtime);
    assert_eq!(component.status, eventbus_core::HealthStatus::Degraded);
    assert!(
        component
            .detail
            .unwrap()
            .contains("1 lanes blocked longer than 100ms"),
    );
    gate.add_permits(1);
    wait_until("a/1 acked", || log.events().contains(&"ack a/1".into())).await;
    assert_eq!(runtime.lane_ages(), eventbus_pool::LaneAges::default());
    assert_eq!(
        engine(&runtime).status,
        eventbus_core::HealthStatus::Healthy
    );
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_returning_ok_once_its_token_fired_is_still_retried() {
    let log = Arc::new(Log::default());
    let runtime = runtime(4, &log);
    let seen = log.clone();
    let handler = Handler::Envelope(Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
        let seen = seen.clone();
        async move {
            seen.push(format!("run {}", envelope.event_version));
            // Returns Ok when asked to stop, whether or not its work is done.
            ctx.cancellation().cancelled().await;
            Ok(())
        }
    }));
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-finish", handler)
                .with_handler_timeout(Some(Duration::from_millis(50))),
        )
        .unwrap();
    consumer.deliver(delivery(&log, "a", 1, 1)).await.unwrap();
    wait_until("a/1 settled", || {
        log.events().contains(&"terminate a/1".into())
    })
    .await;
    // Asked to stop, it may not have done its work: never acknowledged as handled.
    assert_eq!(
        log.events(),
        [
            "run 1",
            "run 1",
            "dead letter to orders.DLQ (handler timed out after 50ms) id dlq:sub-finish:orders:1:0",
            "terminate a/1"
        ]
    );
    assert_eq!(runtime.stats().handler_timeouts, 2);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_without_envelopes_or_a_dead_letter_topic_is_refused() {
    let log = Arc::new(Log::default());
    let runtime = runtime(1, &log);
    let plain = Handler::Plain(Arc::new(|_ctx: HandlerContext, _message: Message| async {
        Ok(())
    }));
    for spec in [
        SubscriptionSpec::new("orders", "plain", plain).with_park_on_dead_letter(true),
        SubscriptionSpec::new("orders", "no-dlq", stuck_handler(&log, 1, true))
            .with_dead_letter(None)
            .with_park_on_dead_letter(true),
    ] {
        let Err(error) = runtime.subscribe(spec) else {
            panic!("parking accepted where it cannot work");
        };
        assert!(error.to_string().contains("park_on_dead_letter"), "{error}");
    }
}

/// A transport whose dead-letter topic holds `k` v1 (failed), and answers the read only once
/// its gate opens: a parking subscription restoring its parked aggregates meanwhile.
struct SlowDeadLetters {
    log: Arc<Log>,
    gate: Arc<Semaphore>,
}

#[async_trait]
impl DeadLetterWriter for SlowDeadLetters {
    fn store(&self) -> Option<&dyn eventbus_core::DeadLetterStore> {
        Some(self)
    }

    async fn publish_dead_letter(&self, outgoing: Outgoing<'_>) -> Result<(), Error> {
        let (topic, letter) = (outgoing.topic, outgoing.message);
        let parked = letter.headers.contains(eventbus_core::HEADER_PARKED);
        self.log
            .push(format!("dead letter to {topic} (parked: {parked})"));
        Ok(())
    }
}

#[async_trait]
impl eventbus_core::DeadLetterStore for SlowDeadLetters {
    async fn dead_letter_at(
        &self,
        _topic: &str,
        _position: Position,
    ) -> Result<Option<eventbus_core::StoredDeadLetter>, Error> {
        Ok(None)
    }

    async fn remove_dead_letter(
        &self,
        _letter: &eventbus_core::StoredDeadLetter,
    ) -> Result<(), Error> {
        Ok(())
    }

    async fn dead_letters(
        &self,
        topic: &str,
    ) -> Result<Vec<eventbus_core::StoredDeadLetter>, Error> {
        self.gate.acquire().await.unwrap().forget();
        let envelope = Envelope::new("k", "Changed", 1, &1).unwrap();
        let failed = Message::new("orders", envelope.to_bytes().unwrap());
        let written = eventbus_core::dead_letter_message(&failed, "broken", 1);
        let mut stored = Message::new(topic, written.payload);
        stored.headers = written.headers;
        stored.meta.position = Position::Sequence(1);
        Ok(vec![eventbus_core::StoredDeadLetter { message: stored }])
    }
}

/// The cancel-safety note of `Consumer::deliver`, while a parking subscription still reads
/// which aggregates are parked: a delivery dropped then leaves nothing held and its receipt
/// unused; delivered again once the parked set is known, `k` v2 is parked behind `k` v1's dead
/// letter (never run), and another aggregate runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_while_the_parked_aggregates_are_read_leaves_nothing_held() {
    let log = Arc::new(Log::default());
    let gate = Arc::new(Semaphore::new(0));
    let runtime = Runtime::new(
        BusSettings::new("test", "t"),
        Arc::new(SlowDeadLetters {
            log: log.clone(),
            gate: gate.clone(),
        }),
    )
    .unwrap();
    let handlers = Arc::new(Semaphore::new(100));
    let consumer = runtime
        .subscribe(
            SubscriptionSpec::new("orders", "sub-p", handler(&log, &handlers, 0))
                .with_park_on_dead_letter(true),
        )
        .unwrap();
    let waiting = tokio::time::timeout(
        Duration::from_millis(50),
        consumer.deliver(delivery(&log, "k", 2, 2)),
    )
    .await;
    assert!(waiting.is_err(), "the delivery waited for the parked set");
    assert_eq!(consumer.held(), 0, "the dropped delivery is not held");
    assert!(log.events().is_empty(), "{:?}", log.events());
    gate.add_permits(1);
    assert_eq!(
        consumer.deliver(delivery(&log, "k", 2, 2)).await.unwrap(),
        Delivered::Queued
    );
    consumer.deliver(delivery(&log, "j", 2, 3)).await.unwrap();
    wait_until("both settled", || consumer.held() == 0).await;
    let events = log.events();
    assert!(!events.contains(&"run k/2".to_owned()), "{events:?}");
    assert!(
        events.contains(&"dead letter to orders.DLQ (parked: true)".to_owned())
            && events.contains(&"terminate k/2".to_owned()),
        "{events:?}"
    );
    assert!(
        events.contains(&"run j/2".to_owned()) && events.contains(&"ack j/2".to_owned()),
        "{events:?}"
    );
    assert_eq!(consumer.parked_aggregates(), 1);
    runtime
        .close(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
}
