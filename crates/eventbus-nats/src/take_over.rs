//! Taking over from the durable consumer of the service this one replaces
//! (`nats.topics."T".take_over_from`): where the bus's own durable of a topic starts when it is
//! made.
//!
//! The Go SDK's `Close` deletes the durables it made, so after an ordinary shutdown of a Go
//! service there is nothing left to adopt, and its position is lost with it. The bus therefore
//! watches every such durable from `connect` on (a service subscribes to its topics one after
//! another, while the Go service's `Close` deletes all of its durables at once), keeping the
//! highest ack floor it saw. A topic's watch ends when the durable is deleted and still gone after
//! [`TakeOverSettings::grace`] (the Go SDK deletes first and then still handles what it had
//! fetched until its `Close` returns), or when it lies idle for [`TakeOverSettings::idle`] (a
//! killed service: nobody pulling, nothing acknowledged). The bus's durable then starts right
//! after that floor. Handled again are what the other service handled and had not acknowledged
//! when the bus last looked (every [`POLL`]).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use eventbus_core::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{NatsConfig, TakeOverSettings};

/// How often the watched durable's ack floor is read.
const POLL: Duration = Duration::from_millis(100);

/// Consecutive failed reads of a durable after which each further failure is a warning.
const QUIET_FAILURES: u32 = 50;

/// How a topic's watch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The bus's durable starts at this stream sequence.
    Start(u64),
    /// Nothing to take over from: a configuration error for `subscribe` to report.
    Refused(String),
}

/// The watches of a bus's topics that take over from another durable, started at `connect`.
pub(crate) struct TakeOvers {
    watches: HashMap<String, (watch::Receiver<Option<Outcome>>, JoinHandle<()>)>,
}

impl TakeOvers {
    /// Starts watching the durable of every topic of `config` with `take_over_from`.
    pub(crate) fn start(js: &jetstream::Context, config: &NatsConfig) -> Self {
        let watches = config
            .topics
            .iter()
            .filter_map(|(topic, options)| {
                let from = options.take_over_from.clone()?;
                let (sender, receiver) = watch::channel(None);
                let task = tokio::spawn(watch_durable(
                    js.clone(),
                    topic.clone(),
                    from,
                    config.take_over,
                    sender,
                ));
                Some((topic.clone(), (receiver, task)))
            })
            .collect();
        Self { watches }
    }

    /// The stream sequence the bus's own durable of `topic` starts at: waits until the watch
    /// of its `take_over_from` durable ends.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only waits for the watch, which goes on; a later call gets its outcome.
    pub(crate) async fn start_of(&self, topic: &str) -> Result<u64, Error> {
        let Some((receiver, _)) = self.watches.get(topic) else {
            return Err(Error::config(
                "nats.topics.take_over_from",
                format!("{topic}: no takeover was watched since connect"),
            ));
        };
        let mut receiver = receiver.clone();
        let outcome = receiver
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Closed)?
            .clone();
        match outcome {
            Some(Outcome::Start(start)) => Ok(start),
            Some(Outcome::Refused(reason)) => {
                Err(Error::config("nats.topics.take_over_from", reason))
            }
            None => Err(Error::Closed),
        }
    }

    /// Stops every watch (the bus closes).
    pub(crate) fn stop(&self) {
        for (_, task) in self.watches.values() {
            task.abort();
        }
    }
}

impl Drop for TakeOvers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Watches durable `from` of the stream that holds `topic` until its service stopped, and
/// sends where the bus's durable starts.
async fn watch_durable(
    js: jetstream::Context,
    topic: String,
    from: String,
    settings: TakeOverSettings,
    outcome: watch::Sender<Option<Outcome>>,
) {
    let ended = watch_until_stopped(&js, &topic, &from, settings).await;
    outcome.send_replace(Some(ended));
}

async fn watch_until_stopped(
    js: &jetstream::Context,
    topic: &str,
    from: &str,
    settings: TakeOverSettings,
) -> Outcome {
    let refused = |why: String| {
        tracing::debug!(durable = %from, topic, %why, "nothing to take over from");
        Outcome::Refused(format!(
            "{topic}: {why}: the service it belonged to stopped before this one connected (a Go service's \
             Close deletes its durables), or never ran; deploy this service while the other still runs, or \
             drop take_over_from and choose where to start (docs/migration.md)"
        ))
    };
    // The durable as it is at `connect`, asked again a few times while the server does not
    // answer (a leader election).
    let mut attempts = 0;
    let (stream, consumer) = loop {
        let found = match js.stream_by_subject(topic).await {
            Ok(stream) => js
                .get_consumer_from_stream::<pull::Config, _, _>(from, &stream)
                .await
                .map(|consumer| (stream.clone(), consumer))
                .map_err(|error| {
                    format!(
                        "the durable consumer {from} of stream {stream} cannot be read ({error})"
                    )
                }),
            Err(error) => Err(format!("no stream holding the topic can be read ({error})")),
        };
        match found {
            Ok(found) => break found,
            Err(why) if attempts >= 20 => return refused(why),
            Err(_) => {
                attempts += 1;
                tokio::time::sleep(POLL).await;
            }
        }
    };
    // The highest ack floor seen (where the bus starts), and the last one (whether it moves: a
    // durable made again counts up from the stream's beginning).
    let mut floor = 0;
    let mut last_seen = None;
    let mut idle_since: Option<Instant> = None;
    let mut deleted_since: Option<Instant> = None;
    let mut failures = 0;
    tracing::info!(durable = %from, topic, %stream, "watching the durable to take over from");
    loop {
        match consumer.get_info().await {
            Ok(info) => {
                failures = 0;
                if info.config.filter_subject != topic {
                    return Outcome::Refused(format!(
                        "{topic}: the durable consumer {from} filters {:?}, not this topic",
                        info.config.filter_subject
                    ));
                }
                if deleted_since.take().is_some() {
                    tracing::warn!(
                        durable = %from,
                        topic,
                        "the durable was made again (its service restarted?); watching it again"
                    );
                }
                let seen = info.ack_floor.stream_sequence;
                let moved = last_seen.is_some_and(|last| last != seen);
                last_seen = Some(seen);
                floor = floor.max(seen);
                if moved || info.num_waiting > 0 {
                    idle_since = None;
                } else {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= settings.idle {
                        tracing::info!(
                            durable = %from,
                            topic,
                            start = floor + 1,
                            unacknowledged = info.num_ack_pending,
                            "the durable is abandoned (nobody pulling, nothing acknowledged); taking over after its ack floor"
                        );
                        return Outcome::Start(floor + 1);
                    }
                }
            }
            Err(error) if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
                failures = 0;
                idle_since = None;
                last_seen = None;
                let since = *deleted_since.get_or_insert_with(|| {
                    tracing::info!(
                        durable = %from,
                        topic,
                        start = floor + 1,
                        grace = ?settings.grace,
                        "the durable was deleted (its service is stopping); taking over at this stream sequence \
                         after the grace period (should this process stop before, start the subscription there)"
                    );
                    Instant::now()
                });
                if since.elapsed() >= settings.grace {
                    tracing::info!(durable = %from, topic, start = floor + 1, "taking over after the durable's last ack floor");
                    return Outcome::Start(floor + 1);
                }
            }
            Err(error) => {
                failures += 1;
                if failures >= QUIET_FAILURES {
                    tracing::warn!(durable = %from, topic, %error, failures, "cannot read the durable to take over from; asking again");
                } else {
                    tracing::debug!(durable = %from, topic, %error, failures, "cannot read the durable; asking again");
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}
