//! The durable pull consumer of a subscription: created, updated, or replayed from its ack floor.

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use eventbus_core::Error;

use crate::bus::{Shared, storage_for};
use crate::subscription::{Handler, Sub};

/// The durable consumer of `sub`, created, or updated when its configuration changed.
///
/// With `resume` (the first subscribe of this bus to the durable), a durable left with
/// unacknowledged messages by a previous run that is gone (no pull request of another client
/// waiting) is re-created from its ack floor,
/// so that the messages the dead run held come back first and in stream order: a crash replays
/// a suffix in order instead of redelivering the held messages after newer ones once their
/// `ack_wait` runs out.
pub(crate) async fn ensure_consumer(
    shared: &Shared,
    sub: &Sub,
    resume: bool,
) -> Result<PullConsumer, Error> {
    let settings = &shared.config.consumer;
    let envelopes = matches!(sub.handler, Handler::Envelope(_));
    let storage = storage_for(&shared.config, &sub.topic, envelopes);
    let stream_name = shared
        .streams
        .ensure(&shared.js, &sub.topic, storage)
        .await?;
    let stream = shared
        .js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|error| Error::broker(format!("cannot open stream {stream_name}"), error))?;
    let mut wanted = pull::Config {
        durable_name: Some(sub.durable.clone()),
        filter_subject: sub.topic.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        backoff: settings.backoff.clone(),
        ..pull::Config::default()
    };
    if let Ok(mut existing) = stream.get_consumer::<pull::Config>(&sub.durable).await
        && let Ok(info) = existing.info().await
    {
        let current = &info.config;
        if resume && info.num_ack_pending > 0 && info.num_waiting == 0 {
            let start = info.ack_floor.stream_sequence + 1;
            tracing::info!(
                durable = %sub.durable,
                unacknowledged = info.num_ack_pending,
                start,
                "a previous run left messages unacknowledged; replaying from the ack floor in order"
            );
            stream
                .delete_consumer(&sub.durable)
                .await
                .map_err(|error| {
                    Error::broker(format!("cannot reset consumer {}", sub.durable), error)
                })?;
            wanted.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
        } else {
            if resume && info.num_ack_pending > 0 {
                tracing::warn!(
                    durable = %sub.durable,
                    unacknowledged = info.num_ack_pending,
                    "another client is pulling from this durable consumer; messages it holds keep their place"
                );
            }
            // The start position cannot change on an existing consumer.
            wanted.deliver_policy = current.deliver_policy;
            if current.ack_wait != wanted.ack_wait
                || current.max_deliver != wanted.max_deliver
                || current.max_ack_pending != wanted.max_ack_pending
                || current.backoff != wanted.backoff
                || current.filter_subject != wanted.filter_subject
            {
                tracing::info!(
                    durable = %sub.durable,
                    ack_wait = ?wanted.ack_wait,
                    max_deliver = wanted.max_deliver,
                    max_ack_pending = wanted.max_ack_pending,
                    backoff = ?wanted.backoff,
                    "consumer configuration changed; updating the durable consumer"
                );
            }
        }
    }
    stream
        .create_consumer(wanted)
        .await
        .map_err(|error| Error::broker(format!("cannot create consumer {}", sub.durable), error))
}
