//! The runtime's publish pipeline, with acknowledgements the test controls: the window bounds
//! what is in flight, results settle in the order publishes started, a start dropped while it
//! waits for room leaves nothing behind, close waits for what is in flight, and a reader that
//! falls behind is told what it missed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbus_core::{
    Envelope, Error, ErrorKind, OutboundMessage, PendingPublish, Position, PublishResult,
    ResultsError, async_trait,
};
use eventbus_pool::BusSettings;
use eventbus_pool::consume::Runtime;
use eventbus_pool::transport::{DeadLetterWriter, Outgoing};
use futures::FutureExt;
use tokio::sync::oneshot;

struct NoDeadLetters;

#[async_trait]
impl DeadLetterWriter for NoDeadLetters {
    async fn publish_dead_letter(&self, _: Outgoing<'_>) -> Result<(), Error> {
        Ok(())
    }
}

fn runtime(max_in_flight: usize) -> Runtime {
    Runtime::new(
        BusSettings {
            publish_max_in_flight: max_in_flight,
            drain_timeout: Duration::from_secs(5),
            ..BusSettings::new("memory", "pipeline")
        },
        Arc::new(NoDeadLetters),
    )
    .unwrap()
}

fn envelope(version: i64) -> Envelope {
    Envelope::new("order-1", "Changed", version, &version).unwrap()
}

/// The broker's side of one publish: the test acknowledges it when it likes.
type Ack = oneshot::Sender<Result<Position, Error>>;

/// Starts publishing `envelope`; returns the pending publish and the sender that acknowledges
/// it. `sent` counts the messages handed to the "client".
async fn start(
    runtime: &Runtime,
    envelope: &Envelope,
    sent: &AtomicUsize,
) -> Result<(PendingPublish, Ack), Error> {
    let (ack, acknowledged) = oneshot::channel::<Result<Position, Error>>();
    let pending = runtime
        .start_publish_envelope("orders", envelope, |_message| async move {
            sent.fetch_add(1, Ordering::SeqCst);
            Ok(acknowledged.map(|ack| ack.unwrap_or(Err(Error::Closed))))
        })
        .await?;
    Ok((pending, ack))
}

#[tokio::test]
async fn a_publish_waits_for_room_while_the_window_is_full() {
    let runtime = runtime(2);
    let sent = AtomicUsize::new(0);
    let (first, first_ack) = start(&runtime, &envelope(1), &sent).await.unwrap();
    let (_second, _second_ack) = start(&runtime, &envelope(2), &sent).await.unwrap();
    let third_envelope = envelope(3);
    let third = start(&runtime, &third_envelope, &sent);
    tokio::pin!(third);
    assert!(
        (&mut third).now_or_never().is_none(),
        "a third publish started while two wait for their acknowledgement"
    );
    assert_eq!(sent.load(Ordering::SeqCst), 2);
    first_ack.send(Ok(Position::Sequence(1))).unwrap();
    assert_eq!(first.await.unwrap(), Position::Sequence(1));
    let (_third, _third_ack) = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third publish starts once the first is acknowledged")
        .unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn results_settle_in_the_order_publishes_started_whatever_order_the_acks_come_in() {
    let runtime = runtime(10);
    let mut results = runtime.publish_results();
    let sent = AtomicUsize::new(0);
    let mut started = Vec::new();
    for version in 1..=3 {
        let envelope = envelope(version);
        let (pending, ack) = start(&runtime, &envelope, &sent).await.unwrap();
        started.push((envelope, pending, ack));
    }
    let mut pending = Vec::new();
    let mut acks = Vec::new();
    for (envelope, publish, ack) in started {
        pending.push((envelope, publish));
        acks.push(ack);
    }
    // The broker acknowledges the last first and fails the second.
    let third = acks.pop().unwrap();
    let second = acks.pop().unwrap();
    let first = acks.pop().unwrap();
    third.send(Ok(Position::Sequence(3))).unwrap();
    second
        .send(Err(Error::Broker {
            message: "stream full".into(),
            source: None,
        }))
        .unwrap();
    // The clock is paused: it moves on only once every task is idle, so the timeout fires only
    // after the driver has done all it would do with the two acknowledgements.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), results.recv())
            .await
            .is_err(),
        "a result was settled before the first publish's"
    );
    first.send(Ok(Position::Sequence(1))).unwrap();
    let mut outcomes = Vec::new();
    for (envelope, publish) in pending {
        let result = results.recv().await.unwrap();
        assert_names(&result, &envelope);
        outcomes.push((result.outcome.clone(), publish.await.map_err(|e| e.kind())));
    }
    assert_eq!(
        outcomes[0],
        (Ok(Position::Sequence(1)), Ok(Position::Sequence(1)))
    );
    assert_eq!(outcomes[1].1, Err(ErrorKind::Broker));
    let failure = outcomes[1].0.clone().unwrap_err();
    assert_eq!(
        (failure.kind, failure.message.as_str()),
        (ErrorKind::Broker, "broker error: stream full")
    );
    assert_eq!(
        outcomes[2],
        (Ok(Position::Sequence(3)), Ok(Position::Sequence(3)))
    );
}

/// `result` names `envelope`: its event ID, aggregate, type and tenant, and its topic.
fn assert_names(result: &PublishResult, envelope: &Envelope) {
    assert_eq!(result.event_id.as_ref(), Some(&envelope.event_id));
    assert_eq!(result.aggregate_id.as_ref(), Some(&envelope.aggregate_id));
    assert_eq!(result.event_type.as_ref(), Some(&envelope.event_type));
    assert_eq!(result.tenant_id, envelope.tenant_id);
    assert_eq!(result.topic, "orders");
}

#[tokio::test]
async fn a_start_dropped_while_it_waits_for_room_sends_nothing_and_keeps_no_place() {
    let runtime = runtime(1);
    let sent = AtomicUsize::new(0);
    let (first, first_ack) = start(&runtime, &envelope(1), &sent).await.unwrap();
    {
        let waiting_envelope = envelope(2);
        let waiting = start(&runtime, &waiting_envelope, &sent);
        tokio::pin!(waiting);
        assert!((&mut waiting).now_or_never().is_none());
    }
    assert_eq!(
        sent.load(Ordering::SeqCst),
        1,
        "the dropped start sent nothing"
    );
    first_ack.send(Ok(Position::Sequence(1))).unwrap();
    first.await.unwrap();
    // The window's one place is free again: the dropped start did not keep it.
    let (next, next_ack) =
        tokio::time::timeout(Duration::from_secs(5), start(&runtime, &envelope(3), &sent))
            .await
            .expect("the window has room")
            .unwrap();
    next_ack.send(Ok(Position::Sequence(2))).unwrap();
    assert_eq!(next.await.unwrap(), Position::Sequence(2));
}

#[tokio::test]
async fn a_send_that_fails_is_returned_reports_no_result_and_frees_its_place() {
    let runtime = runtime(1);
    let mut results = runtime.publish_results();
    let failed = runtime
        .start_publish_envelope("orders", &envelope(1), |_message| async {
            Err::<std::future::Ready<Result<Position, Error>>, _>(Error::Broker {
                message: "not connected".into(),
                source: None,
            })
        })
        .await;
    assert_eq!(failed.unwrap_err().kind(), ErrorKind::Broker);
    assert!(results.try_recv().is_none());
    let stored = runtime
        .start_publish(
            "orders",
            OutboundMessage::new(&b"x"[..]),
            |_message| async { Ok(std::future::ready(Ok(Position::Sequence(5)))) },
        )
        .await
        .unwrap()
        .await;
    assert_eq!(stored.unwrap(), Position::Sequence(5));
    let result = results.recv().await.unwrap();
    assert_eq!(
        (result.event_id, result.outcome),
        (None, Ok(Position::Sequence(5)))
    );
}

#[tokio::test]
async fn close_waits_for_the_publishes_in_flight_refuses_new_ones_and_ends_the_results_streams() {
    let runtime = Arc::new(runtime(4));
    let mut results = runtime.publish_results();
    let sent = AtomicUsize::new(0);
    let (pending, ack) = start(&runtime, &envelope(1), &sent).await.unwrap();
    let closing = {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            runtime
                .close(tokio::time::Instant::now() + Duration::from_secs(30))
                .await
        })
    };
    // Closing refuses new publishes before anything else. (The probe's send fails, so the
    // probes themselves put nothing in flight.)
    wait_until(|| {
        runtime
            .start_publish(
                "orders",
                OutboundMessage::new(&b"probe"[..]),
                |_message| async {
                    Err::<std::future::Ready<Result<Position, Error>>, _>(Error::Broker {
                        message: "probe".into(),
                        source: None,
                    })
                },
            )
            .now_or_never()
            .is_some_and(|started| matches!(started, Err(Error::Closed)))
    })
    .await;
    assert!(
        !closing.is_finished(),
        "close returned with a publish in flight"
    );
    ack.send(Ok(Position::Sequence(1))).unwrap();
    // Done once the last acknowledgement is in, long before its 30 s deadline.
    tokio::time::timeout(Duration::from_secs(10), closing)
        .await
        .expect("close returns once nothing is in flight")
        .unwrap();
    assert_eq!(pending.await.unwrap(), Position::Sequence(1));
    // The stream gives what was settled, then ends; one made after the close ends at once.
    assert_eq!(
        results.recv().await.unwrap().outcome,
        Ok(Position::Sequence(1))
    );
    assert_eq!(results.recv().await.unwrap_err(), ResultsError::Closed);
    assert_eq!(
        runtime.publish_results().recv().await.unwrap_err(),
        ResultsError::Closed
    );
}

#[tokio::test]
async fn close_settles_what_is_still_in_flight_at_its_deadline_as_closed_results_included() {
    let runtime = runtime(4);
    let mut results = runtime.publish_results();
    let sent = AtomicUsize::new(0);
    let (pending, _ack_never_sent) = start(&runtime, &envelope(1), &sent).await.unwrap();
    runtime
        .close(tokio::time::Instant::now() + Duration::from_millis(50))
        .await;
    assert!(matches!(pending.await, Err(Error::Closed)));
    let result = results.recv().await.unwrap();
    assert_eq!(result.outcome.unwrap_err().kind, ErrorKind::Closed);
    assert_eq!(results.recv().await.unwrap_err(), ResultsError::Closed);
}

#[tokio::test]
async fn a_reader_that_falls_behind_is_told_how_many_results_it_missed() {
    let runtime = runtime(2);
    let mut behind = runtime.publish_results();
    for sequence in 1..=5 {
        runtime
            .start_publish(
                "orders",
                OutboundMessage::new(&b"x"[..]),
                |_message| async move { Ok(std::future::ready(Ok(Position::Sequence(sequence)))) },
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // The stream holds as many results as the window: the oldest three are gone.
    assert_eq!(behind.recv().await.unwrap_err(), ResultsError::Lagged(3));
    assert_eq!(
        behind.recv().await.unwrap().outcome,
        Ok(Position::Sequence(4))
    );
}

/// Polls `check` every 10 ms until it holds; fails after 10 s.
async fn wait_until(mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_results_stream_reports_the_publishes_started_after_it_was_made() {
    let runtime = runtime(4);
    let sent = AtomicUsize::new(0);
    let (before, before_ack) = start(&runtime, &envelope(1), &sent).await.unwrap();
    let mut results = runtime.publish_results();
    let after_envelope = envelope(2);
    let (after, after_ack) = start(&runtime, &after_envelope, &sent).await.unwrap();
    before_ack.send(Ok(Position::Sequence(1))).unwrap();
    after_ack.send(Ok(Position::Sequence(2))).unwrap();
    assert_eq!(before.await.unwrap(), Position::Sequence(1));
    assert_eq!(after.await.unwrap(), Position::Sequence(2));
    let result = results.recv().await.unwrap();
    assert_names(&result, &after_envelope);
    assert_eq!(result.outcome, Ok(Position::Sequence(2)));
    assert!(results.try_recv().is_none());
}
