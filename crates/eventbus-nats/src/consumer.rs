//! The durable pull consumer of a subscription: created, updated, or replayed from its ack floor.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, consumer::pull};
use eventbus_core::{Error, OffsetDateTime, StartPosition};

use crate::connection::{LEADER_RETRIES, leader_away};
use crate::publish::Broker;
use crate::streams::{Kind, stream_spec};

/// The priority group every instance of a service pulls a partition's pinned consumer with.
pub(crate) const PRIORITY_GROUP: &str = "eventbus";

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
    /// Re-create it to start at this stream sequence (the bus's own position: its lowest held
    /// message, or the one after the last it took), so the server replays exactly what the bus
    /// has not settled, in order.
    ResetTo(Position),
    /// Keep it; create it, when it is missing (deleted under a live subscription, lost with a
    /// memory stream), to start at this stream sequence instead of the stream's beginning.
    MissingFrom(Position),
}

/// The bus's position in a stream: the sequence to start at, and when the last message it took
/// was stored (a stream created after that is a new stream whose sequences started over).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) start: u64,
    pub(crate) last_stored: OffsetDateTime,
}

/// The durable consumer a subscription reads with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DurableSpec<'a> {
    /// Its name.
    pub(crate) name: &'a str,
    /// Named by the subscription (`SubscribeOptions::durable`), not by the bus.
    pub(crate) explicit: bool,
    /// Where it starts when this bus makes it.
    pub(crate) start: StartPosition,
    /// A partition's: how long its group's pins live (the group's bucket's `max_age`), its
    /// `priority_timeout` when this bus makes it. `None` for a topic read whole.
    pub(crate) pin_lifetime: Option<Duration>,
}

/// The deliver policy of a durable made to start at `start`.
fn deliver_policy(start: StartPosition) -> jetstream::consumer::DeliverPolicy {
    use jetstream::consumer::DeliverPolicy;
    match start {
        StartPosition::New => DeliverPolicy::New,
        StartPosition::FromTime(start_time) => DeliverPolicy::ByStartTime { start_time },
        StartPosition::FromSequence(start_sequence) => {
            DeliverPolicy::ByStartSequence { start_sequence }
        }
        // `StartPosition` is non-exhaustive; `All` and anything added later read everything.
        _ => DeliverPolicy::All,
    }
}

/// Where `consumer` stands: its first unacknowledged stream sequence, with its stream's creation
/// time as the `last_stored` of the [`Position`] (a stream made later is another stream, read from
/// its beginning). `None` when the server does not answer.
pub(crate) async fn origin_of(broker: &Broker, consumer: &mut PullConsumer) -> Option<Position> {
    let start = consumer.info().await.ok()?.ack_floor.stream_sequence + 1;
    let stream = consumer.cached_info().stream_name.clone();
    let created = broker
        .js
        .get_stream(&stream)
        .await
        .ok()?
        .cached_info()
        .created;
    Some(Position {
        start,
        last_stored: created,
    })
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
    spec: DurableSpec<'_>,
    envelopes: bool,
    resume: Resume,
) -> Result<PullConsumer, Error> {
    let durable = spec.name;
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
    if broker.config.partitioned(topic).is_some() {
        // One instance reads a partition at a time: the server delivers only to the client it
        // pinned, until that one stops pulling for `pinned_ttl` or unpins.
        wanted.priority_policy = jetstream::consumer::PriorityPolicy::PinnedClient;
        wanted.priority_groups = vec![PRIORITY_GROUP.to_owned()];
        wanted.priority_timeout = spec
            .pin_lifetime
            .unwrap_or(broker.config.scale_out.pinned_ttl);
    }
    // Only a consumer the server says is missing is made anew: one it could not be asked about
    // (a timeout while a cluster elects the consumer's leader) is an error, or it would be
    // re-created with this instance's settings and without the replay from its ack floor.
    let mut failures = 0;
    let found = loop {
        let found = broker
            .js
            .get_consumer_from_stream::<pull::Config, _, _>(durable, &stream_name)
            .await;
        match found {
            // A stream made a moment ago on a cluster may have no leader yet: asked again.
            Err(error) if failures < LEADER_RETRIES && leader_away(&error) => {
                failures += 1;
                tracing::debug!(durable, %error, failures, "the stream has no leader yet; asking again");
                tokio::time::sleep(Duration::from_millis(100 << failures)).await;
            }
            found => break found,
        }
    };
    let existing = match found {
        Ok(existing) => Some(existing),
        Err(error)
            if matches!(
                error.kind(),
                jetstream::stream::ConsumerErrorKind::JetStream(error)
                    if error.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
            ) =>
        {
            None
        }
        Err(error) => {
            return Err(Error::broker(
                format!("cannot read consumer {durable}"),
                error,
            ));
        }
    };
    if let Some(mut existing) = existing {
        let info = existing
            .info()
            .await
            .map_err(|error| Error::broker(format!("cannot read consumer {durable}"), error))?;
        let current = &info.config;
        if current.filter_subject != topic {
            let (field, owner) = if spec.explicit {
                ("durable", "it is not a durable of this topic")
            } else {
                ("nats.client_id", "another subscriber owns this name")
            };
            return Err(Error::config(
                field,
                format!(
                    "the durable consumer {durable} of stream {stream_name} filters {:?}, not {topic:?}: {owner}",
                    current.filter_subject
                ),
            ));
        }
        if wanted.priority_policy == jetstream::consumer::PriorityPolicy::PinnedClient
            && current.priority_policy == wanted.priority_policy
            && current.priority_timeout != wanted.priority_timeout
        {
            // The group's pins live as long as its durables say, whichever instance made them
            // (as its bucket's claims do): an instance with another `pinned_ttl` binds them
            // as they are rather than shortening the running instances' pins.
            // The group's bucket warned once already (`open_bucket`).
            tracing::debug!(
                durable = %durable,
                group = ?current.priority_timeout,
                configured = ?wanted.priority_timeout,
                "nats.scale_out.pinned_ttl differs from the group's; keeping the group's"
            );
            wanted.priority_timeout = current.priority_timeout;
        }
        let reset_to = match resume {
            Resume::No | Resume::MissingFrom(_) => None,
            Resume::IfAbandoned => (info.num_ack_pending > 0 && info.num_waiting == 0)
                .then_some(info.ack_floor.stream_sequence + 1),
            Resume::Always => {
                (info.num_ack_pending > 0).then_some(info.ack_floor.stream_sequence + 1)
            }
            Resume::ResetTo(position) => Some(position.start),
        };
        if let Some(start) = reset_to {
            tracing::info!(
                durable = %durable,
                unacknowledged = info.num_ack_pending,
                start,
                "messages are unacknowledged that this bus does not hold; replaying in order from the bus's position"
            );
            stream.delete_consumer(durable).await.map_err(|error| {
                Error::broker(format!("cannot reset consumer {}", durable), error)
            })?;
            wanted.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
        } else {
            // Said only when another client is pulling: after a failed pull or a lost
            // consumer (`MissingFrom`), the unacknowledged messages are this bus's own.
            if resume == Resume::IfAbandoned && info.num_ack_pending > 0 && info.num_waiting > 0 {
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
                || current.priority_policy != wanted.priority_policy
                || current.priority_timeout != wanted.priority_timeout
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
    } else if let Resume::MissingFrom(position) | Resume::ResetTo(position) = resume {
        let start = position.start;
        // A stream made again (a memory stream lost with a restart) starts its sequences over:
        // the bus's position then means nothing, and the new stream is read from its beginning.
        let read = |error: String| Error::Broker {
            message: format!("cannot read stream {stream_name}: {error}"),
            source: None,
        };
        let mut info = broker
            .js
            .get_stream(&stream_name)
            .await
            .map_err(|error| read(error.to_string()))?;
        let created = info
            .info()
            .await
            .map_err(|error| read(error.to_string()))?
            .created;
        if created <= position.last_stored {
            tracing::info!(durable = %durable, start, "durable consumer missing; made again from the bus's position");
            wanted.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            };
        } else {
            tracing::info!(durable = %durable, start, "durable consumer and its stream made again; reading the new stream from its beginning");
        }
    } else if broker.config.topic(topic).take_over_from.is_some() {
        if spec.explicit {
            return Err(Error::config(
                "nats.topics.take_over_from",
                format!(
                    "{topic}: takes over with the bus's own durable; a subscription naming its durable ({durable}) cannot"
                ),
            ));
        }
        let start_sequence = broker.take_overs.start_of(topic).await?;
        wanted.deliver_policy =
            jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence };
    } else {
        wanted.deliver_policy = deliver_policy(spec.start);
    }
    stream
        .create_consumer(wanted)
        .await
        .map_err(|error| Error::broker(format!("cannot create consumer {}", durable), error))
}
