//! The loops of a subscription: pulling from JetStream or core NATS, and in-progress acks.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::{AckKind, Acker};
use eventbus_core::{DeliveryMeta, Error, Position};
use eventbus_pool::Pool;
use futures::StreamExt;

use crate::bus::Shared;
use crate::consumer::ensure_consumer;
use crate::delivery::{Delivery, dispatch, submit};
use crate::stats::Stat;
use crate::subscription::{Handler, Sub};

/// Fetches from the durable consumer until the subscription stops, submitting every message
/// to the engine without waiting for the ones before it.
pub(crate) async fn pull_loop(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    sub: Arc<Sub>,
    mut consumer: PullConsumer,
) {
    let settings = shared.config.consumer.clone();
    let mut failures = 0u32;
    // The next pull request, sent when the current one is half read, so that messages keep
    // flowing while the rest of the current batch is dispatched.
    let mut prefetched = None;
    // Closing takes one last batch without waiting, after the open requests: what was
    // published just before `close` is handled, and a long backlog is left for the next run.
    let mut last_batch_taken = false;
    'pulls: loop {
        let stopping = sub.stop.is_cancelled();
        let draining = stopping && sub.draining.load(Ordering::SeqCst);
        // Unsubscribed: nothing new is asked for (open requests were read to their end).
        if stopping && !draining && prefetched.is_none() {
            break;
        }
        if draining && prefetched.is_none() && last_batch_taken {
            break;
        }
        let batch = if let Some(batch) = prefetched.take() {
            Ok(batch)
        } else if draining {
            last_batch_taken = true;
            consumer
                .fetch()
                .max_messages(settings.fetch_batch)
                .messages()
                .await
        } else {
            // Not raced against `stop`: a pull request dropped half-sent could still be
            // answered, and what it brought would wait for `ack_wait`.
            consumer
                .batch()
                .max_messages(settings.fetch_batch)
                .expires(settings.fetch_expires)
                .messages()
                .await
        };
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                failures += 1;
                tracing::warn!(durable = %sub.durable, %error, failures, "pull request failed");
                shared.counters.add(Stat::FetchErrors, 1);
                if backoff(&sub, failures).await {
                    break;
                }
                // The stream or consumer may be gone (a memory stream after a server restart).
                shared.streams.forget(&sub.topic).await;
                match ensure_consumer(&shared, &sub, false).await {
                    Ok(fresh) => consumer = fresh,
                    Err(error) => {
                        tracing::warn!(durable = %sub.durable, %error, "consumer not ready")
                    }
                }
                continue;
            }
        };
        let mut received = 0usize;
        loop {
            // An open request is read to its end even when the subscription stops: what the
            // server sends to it would otherwise wait for `ack_wait`.
            let next = if sub.stop.is_cancelled() {
                batch.next().await
            } else {
                tokio::select! {
                    next = batch.next() => next,
                    () = sub.stop.cancelled() => continue,
                }
            };
            let Some(next) = next else { break };
            match next {
                Ok(message) if sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst) => {
                    // Unsubscribed: give it back at once for the durable's next reader.
                    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
                        tracing::debug!(durable = %sub.durable, %error, "nak not sent");
                    }
                }
                Ok(message) => {
                    failures = 0;
                    received += 1;
                    if received == settings.fetch_batch.div_ceil(2)
                        && prefetched.is_none()
                        && !sub.stop.is_cancelled()
                    {
                        // A failure here shows again, and is handled, at the next request.
                        prefetched = consumer
                            .batch()
                            .max_messages(settings.fetch_batch)
                            .expires(settings.fetch_expires)
                            .messages()
                            .await
                            .ok();
                    }
                    match dispatch(&shared, &pool, &sub, message).await {
                        Ok(()) => {}
                        // The engine has shut down (close gave up waiting): stop fetching.
                        Err(Error::Closed) => break 'pulls,
                        Err(error) => {
                            tracing::warn!(durable = %sub.durable, %error, "message not dispatched; the server redelivers it");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(durable = %sub.durable, %error, "pull request ended with an error");
                    break;
                }
            }
        }
    }
    tracing::debug!(durable = %sub.durable, "stopped fetching");
}

/// Waits before the next pull after `failures` failures in a row; true when the subscription
/// stopped meanwhile.
async fn backoff(sub: &Sub, failures: u32) -> bool {
    let delay = Duration::from_millis(50)
        .saturating_mul(2u32.saturating_pow(failures.min(6)))
        .min(Duration::from_secs(2));
    tokio::select! {
        () = tokio::time::sleep(delay) => sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst),
        () = sub.stop.cancelled() => !sub.draining.load(Ordering::SeqCst),
    }
}

/// Takes core NATS messages of an ephemeral topic until the subscription stops (at-most-once:
/// there is nothing to acknowledge).
pub(crate) async fn core_loop(
    shared: Arc<Shared>,
    pool: Arc<Pool>,
    sub: Arc<Sub>,
    mut subscriber: async_nats::Subscriber,
) {
    loop {
        let message = tokio::select! {
            message = subscriber.next() => message,
            () = sub.stop.cancelled() => None,
        };
        let Some(message) = message else { break };
        let meta = DeliveryMeta {
            position: Position::Unknown,
            delivery_attempt: 1,
            timestamp: None,
        };
        let delivery = Delivery::new(
            message,
            matches!(sub.handler, Handler::Plain(_)),
            meta,
            None,
        );
        if let Err(error) = submit(&shared, &pool, &sub, delivery).await {
            tracing::warn!(topic = %sub.topic, %error, "message not dispatched");
        }
    }
    let _ = subscriber.unsubscribe().await;
}

/// Sends an in-progress ack for every message held longer than the progress interval, so that
/// the server does not redeliver what is still queued, running or retrying here.
pub(crate) async fn progress_loop(shared: Arc<Shared>, sub: Arc<Sub>) {
    let interval = shared.config.consumer.progress_interval();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = sub.finished.cancelled() => break,
        }
        let due: Vec<Arc<Acker>> = sub
            .held()
            .values()
            .filter(|held| held.since.elapsed() >= interval)
            .map(|held| held.acker.clone())
            .collect();
        if sub.stop.is_cancelled() && !sub.draining.load(Ordering::SeqCst) && sub.held().is_empty()
        {
            break;
        }
        for acker in &due {
            if let Err(error) = acker.ack_with(AckKind::Progress).await {
                tracing::debug!(durable = %sub.durable, %error, "in-progress ack not sent");
            }
        }
        if !due.is_empty() {
            shared.counters.add(Stat::ProgressAcks, due.len() as u64);
        }
    }
}
