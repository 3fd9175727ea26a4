//! The durable pull consumer of a subscription: created, updated, or replayed from its ack floor.

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use eventbus_core::Error;

use crate::publish::Broker;
use crate::streams::{Kind, stream_spec};

/// When [`ensure_consumer`] re-creates a durable from its ack floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Never: keep the durable's position.
    No,
    /// When it has unacknowledged messages and no other client is pulling (a dead run's).
    IfAbandoned,
    /// When it has unacknowledged messages: the caller holds none, so the server's view is
    /// stale (it came back from a crash with an older state).
    Always,
}

/// The durable consumer `durable` of `topic`, created, or updated when its configuration
/// changed. A durable of that name that filters another subject belongs to something else (or
/// to a name collision): that is an error, never a silent move of its filter.
///
/// With [`Resume::IfAbandoned`] (the first subscribe of this bus to the durable), a durable left
/// with unacknowledged messages by a previous run that is gone (no pull request of another
/// client waiting) is re-created from its ack floor, so that the messages the dead run held come
/// back first and in stream order: a crash replays a suffix in order instead of redelivering the
/// held messages after newer ones once their `ack_wait` runs out. [`Resume::Always`] does so
/// whenever messages are unacknowledged (the caller holds none: they are stale).
pub(crate) async fn ensure_consumer(
    broker: &Broker,
    topic: &str,
    durable: &str,
    envelopes: bool,
    resume: Resume,
) -> Result<PullConsumer, Error> {
    let settings = &broker.config.consumer;
    let kind = if envelopes {
        Kind::Envelopes
    } else {
        Kind::Plain
    };
    let stream_name = broker
        .streams
        .ensure(&broker.js, topic, stream_spec(&broker.config, topic, kind))
        .await?;
    let stream = broker
        .js
        .get_stream_no_info(&stream_name)
        .await
        .map_err(|error| Error::broker(format!("cannot open stream {stream_name}"), error))?;
    let mut wanted = pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject: topic.to_owned(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: settings.max_deliver,
        max_ack_pending: settings.max_ack_pending,
        backoff: settings.backoff.clone(),
        ..pull::Config::default()
    };
    if let Ok(mut existing) = stream.get_consumer::<pull::Config>(durable).await
        && let Ok(info) = existing.info().await
    {
        let current = &info.config;
        if current.filter_subject != topic {
            return Err(Error::config(
                "nats.client_id",
                format!(
                    "the durable consumer {durable} of stream {stream_name} filters {:?}, not {topic:?}: another subscriber owns this name",
                    current.filter_subject
                ),
            ));
        }
        let abandoned = match resume {
            Resume::No => false,
            Resume::IfAbandoned => info.num_ack_pending > 0 && info.num_waiting == 0,
            Resume::Always => info.num_ack_pending > 0,
        };
        if abandoned {
            let start = info.ack_floor.stream_sequence + 1;
            tracing::info!(
                durable = %durable,
                unacknowledged = info.num_ack_pending,
                start,
                "messages are unacknowledged that this bus does not hold; replaying from the ack floor in order"
            );
            stream.delete_consumer(durable).await.map_err(|error| {
                Error::broker(format!("cannot reset consumer {}", durable), error)
            })?;
            wanted.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
        } else {
            if resume != Resume::No && info.num_ack_pending > 0 {
                tracing::warn!(
                    durable = %durable,
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
            {
                tracing::info!(
                    durable = %durable,
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
        .map_err(|error| Error::broker(format!("cannot create consumer {}", durable), error))
}
