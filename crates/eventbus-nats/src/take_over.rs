//! Taking over from the durable consumer of the service this one replaces
//! (`nats.topics.take_over_from`): where the bus's own durable of a topic starts when it is made.
//!
//! The Go SDK's `Close` deletes the durables it made, so after an ordinary shutdown of a Go
//! service there is nothing left to adopt, and its position is lost with it. The bus therefore
//! watches the other durable while it is read, and takes its position as it goes: once the
//! durable is deleted (a graceful stop) or abandoned (a killed service: nobody pulling and
//! nothing acknowledged for [`TAKE_OVER_IDLE`]), the bus's durable starts right after the last
//! ack floor it saw. Handled again are at most what the other service acknowledged after that
//! last look ([`POLL`]) or above its ack floor (out of order), within its `max_ack_pending`.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use eventbus_core::Error;
use tokio::time::Instant;

/// How long a durable may go without a pull request waiting and without its ack floor moving
/// before the bus takes it for abandoned (its service killed). A live Go service pulls every
/// 100 ms and acknowledges what it handled, so only a handler running this long looks the same.
pub const TAKE_OVER_IDLE: Duration = Duration::from_secs(10);

/// How often the durable's ack floor is read while its service runs.
const POLL: Duration = Duration::from_millis(100);

/// Consecutive failed reads of the durable (a server away, a leader election) before giving up.
const FAILED_READS: u32 = 100;

/// The stream sequence the bus's own durable of `topic` starts at, taken over from durable
/// `from` of `stream`: right after its ack floor once it is deleted or abandoned. Waits while
/// another service reads it.
///
/// # Cancel safety
///
/// Cancel safe: it only reads the durable; dropping the future stops the watch and leaves the
/// server as it was (the caller makes its own durable only with the returned sequence).
pub(crate) async fn start_after(
    js: &jetstream::Context,
    stream: &str,
    from: &str,
    topic: &str,
) -> Result<u64, Error> {
    let consumer = match js
        .get_consumer_from_stream::<pull::Config, _, _>(from, stream)
        .await
    {
        Ok(consumer) => consumer,
        Err(error) if not_found(&error) => {
            return Err(Error::config(
                "nats.topics.take_over_from",
                format!(
                    "{topic}: the durable consumer {from} does not exist: the service it belonged to stopped before this \
                     one made its own durable (a Go service's Close deletes its durables), or never ran; deploy this \
                     service while the other still runs, or drop take_over_from and choose where to start \
                     (docs/migration.md)"
                ),
            ));
        }
        Err(error) => {
            return Err(Error::broker(format!("cannot read consumer {from}"), error));
        }
    };
    let info = consumer
        .get_info()
        .await
        .map_err(|error| Error::broker(format!("cannot read consumer {from}"), error))?;
    if info.config.filter_subject != topic {
        return Err(Error::config(
            "nats.topics.take_over_from",
            format!(
                "{topic}: the durable consumer {from} filters {:?}, not this topic",
                info.config.filter_subject
            ),
        ));
    }
    let mut floor = info.ack_floor.stream_sequence;
    let mut idle_since = (info.num_waiting == 0).then(Instant::now);
    tracing::info!(
        durable = %from,
        topic,
        floor,
        "waiting for the service reading this durable to stop before taking over"
    );
    let mut failures = 0;
    loop {
        tokio::time::sleep(POLL).await;
        match consumer.get_info().await {
            Ok(info) => {
                failures = 0;
                let moved = info.ack_floor.stream_sequence != floor;
                floor = info.ack_floor.stream_sequence;
                if moved || info.num_waiting > 0 {
                    idle_since = None;
                } else if let Some(since) = idle_since {
                    if since.elapsed() >= TAKE_OVER_IDLE {
                        tracing::info!(
                            durable = %from,
                            topic,
                            start = floor + 1,
                            unacknowledged = info.num_ack_pending,
                            "the durable is abandoned (nobody pulling, nothing acknowledged); taking over after its ack floor"
                        );
                        return Ok(floor + 1);
                    }
                } else {
                    idle_since = Some(Instant::now());
                }
            }
            Err(error) if consumer_deleted(&error) => {
                tracing::info!(
                    durable = %from,
                    topic,
                    start = floor + 1,
                    "the durable was deleted (its service stopped); taking over after its last ack floor"
                );
                return Ok(floor + 1);
            }
            Err(error) => {
                failures += 1;
                if failures >= FAILED_READS {
                    return Err(Error::broker(format!("cannot read consumer {from}"), error));
                }
                tracing::debug!(durable = %from, %error, failures, "cannot read the durable; asking again");
            }
        }
    }
}

/// Whether looking a consumer up failed because it does not exist.
fn not_found(error: &jetstream::stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        jetstream::stream::ConsumerErrorKind::JetStream(error)
            if error.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}

/// Whether reading a consumer's info failed because it was deleted.
fn consumer_deleted(error: &jetstream::context::ConsumerInfoError) -> bool {
    error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
}
