//! Settling one message in its lane: ack, give back, or dead-letter then terminate.

use std::sync::Arc;

use eventbus_core::{
    DeliveryClass, HEADER_DEAD_LETTERED_BY, HEADER_PARKED, Message, Outcome, Position, Settlement,
    dead_letter_message, replayed_dead_letter,
};

use futures::FutureExt;

use super::Shared;
use super::consumer::MessageJob;
use super::park::ParkedBehind;
use super::stats::{Consumption, Counters, Stat};
use crate::transport::{Outgoing, Receipt};

/// What settling does with a message.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Acknowledged: handled, or (plain) failed.
    Ack { handled: bool },
    /// Not handled here (its subscription closed before it ran, or the deadline passed).
    GiveBack,
    DeadLetter {
        reason: String,
        attempts: u32,
        /// Parked behind an earlier dead letter of its aggregate: it never ran.
        parked: bool,
    },
    /// Undecodable with nowhere to send it: left to the broker.
    Abandon,
}

impl Verdict {
    /// The delivery contract for a message of `class` that ended with `outcome`.
    pub(crate) fn of(
        outcome: &Outcome,
        class: DeliveryClass,
        undecodable: Option<String>,
        dead_letters: bool,
    ) -> Self {
        match (outcome.settlement(class), undecodable) {
            (Settlement::Redeliver, _) => Verdict::GiveBack,
            (_, Some(reason)) if dead_letters => Verdict::DeadLetter {
                reason,
                attempts: 0,
                parked: false,
            },
            (_, Some(_)) => Verdict::Abandon,
            (Settlement::Ack, None) => Verdict::Ack {
                handled: outcome.is_success(),
            },
            // Without a dead-letter topic an envelope retries without limit, so it only gets
            // here with one.
            (Settlement::DeadLetter, None) if dead_letters => {
                let parked = matches!(
                    outcome,
                    Outcome::Failed { error, .. } if error.cause().downcast_ref::<ParkedBehind>().is_some()
                );
                Verdict::DeadLetter {
                    reason: outcome.failure_reason(),
                    attempts: if parked { 0 } else { outcome.attempts() },
                    parked,
                }
            }
            (Settlement::DeadLetter, None) => Verdict::Abandon,
        }
    }
}

/// Settles one message while its lane is held. Acks and terminates are retried with the
/// engine's backoff while they fail; a dead letter is retried until the broker accepts it (the
/// aggregate's later messages wait). When the subscription's drain deadline cuts this short,
/// the message is given back before the lane is released, so the broker delivers it again ahead
/// of the aggregate's later messages.
pub(super) async fn settle(settling: Box<MessageJob>, verdict: Verdict) {
    let Some(runtime) = settling.subscription.runtime.upgrade() else {
        return;
    };
    let receipt = settling
        .guard
        .latest_receipt()
        .unwrap_or_else(|| settling.receipt.clone());
    let may_cut_short = !matches!(verdict, Verdict::GiveBack | Verdict::Abandon);
    {
        let work = settle_now(&runtime, &settling, &receipt, verdict);
        tokio::pin!(work);
        // Most settlements finish at the first poll (an ack handed to the client): only one that
        // waits is raced against the deadline, sparing the token's waiter list per message.
        if (&mut work).now_or_never().is_none() {
            // A job cancelled while it ran (its token had fired by now) settles as it must;
            // only a settlement the deadline interrupts is cut short. (Checked here, not for
            // every message: the token's check takes a lock shared by the whole subscription.)
            if may_cut_short && !settling.subscription.cancel.is_cancelled() {
                tokio::select! {
                    biased;
                    () = &mut work => {}
                    () = settling.subscription.cancel.cancelled() => {
                        tracing::warn!(subscription = %settling.subscription.name, "settling cut short at the drain deadline; the message is given back");
                        // Boxed, as the rare path: settling's own state stays small.
                        Box::pin(give_back(&runtime, &settling, &receipt)).await;
                    }
                }
            } else {
                work.await;
            }
        }
    }
    drop(settling.guard);
}

/// Counts how a message ended, on its span and in `consumed_total`.
fn ended(settling: &MessageJob, outcome: Consumption) {
    settling.subscription.consumed.count(outcome);
    settling.span.record("outcome", outcome.label());
}

/// Gives a message back to the broker (once: a failure leaves it to the broker's timeout).
async fn give_back(runtime: &Shared, settling: &MessageJob, receipt: &Arc<dyn Receipt>) {
    runtime.counters.add(Stat::GivenBack, 1);
    ended(settling, Consumption::GivenBack);
    if let Err(error) = receipt.give_back().await {
        runtime.counters.add(Stat::SettleFailures, 1);
        tracing::warn!(subscription = %settling.subscription.name, %error, "message not given back; the broker redelivers it after its timeout");
    }
}

async fn settle_now(
    runtime: &Shared,
    settling: &MessageJob,
    receipt: &Arc<dyn Receipt>,
    verdict: Verdict,
) {
    match verdict {
        Verdict::Ack { handled } => {
            if handled && let Some(park) = &settling.park {
                park.handled();
            }
            if handled {
                remove_replayed_dead_letter(runtime, settling).await;
            }
            retried(runtime, "ack", || receipt.ack()).await;
            ended(
                settling,
                if handled {
                    Consumption::Handled
                } else {
                    Consumption::Failed
                },
            );
        }
        Verdict::GiveBack => give_back(runtime, settling, receipt).await,
        Verdict::Abandon => {
            runtime.counters.add(Stat::Undeliverable, 1);
            tracing::error!(
                subscription = %settling.subscription.name,
                topic = %settling.message.topic,
                "undecodable envelope with dead-lettering disabled: left to the broker"
            );
            receipt.abandon();
            ended(settling, Consumption::Abandoned);
        }
        Verdict::DeadLetter {
            reason,
            attempts,
            parked,
        } => {
            let Some(topic) = &settling.subscription.dead_letter else {
                return;
            };
            // Boxed: the write is the largest state of settling and the rare path, so every
            // other settlement stays small.
            Box::pin(write_dead_letter(
                runtime, settling, topic, &reason, attempts, parked,
            ))
            .await;
            if !parked && let Some(park) = &settling.park {
                park.dead_lettered();
            }
            remove_replayed_dead_letter(runtime, settling).await;
            retried(runtime, "terminate", || receipt.terminate()).await;
            ended(settling, Consumption::DeadLettered);
        }
    }
}

/// How many times removing a replayed copy's dead letter is tried before the copy is settled
/// without it (the dead letter then stays listed: the safe side).
const REMOVAL_ATTEMPTS: u32 = 5;

/// A replayed copy (`X-Replay-Of`) was handled or dead-lettered again: removes the dead letter
/// it copies, before the copy is settled. Until then the dead letter stays, so a parking
/// reader that starts meanwhile (a restart, a rebalance, a replay made while the service was
/// stopped) finds its aggregate parked and does not run a live event ahead of the replayed
/// ones.
///
/// Only this subscription's own dead letters: the header must name its dead-letter topic, and
/// the letter found there must be this copy's (same topic and bytes) and written by this
/// subscription (`X-Dead-Lettered-By`, when it says), so that a forged or stale header, or
/// another service's copy, removes nothing. A failure is tried again a few times with backoff;
/// one that persists (a stream that denies deletes, missing permissions, a position of the
/// wrong kind) is logged and counted, and the copy settles anyway: the dead letter stays
/// listed, and a copy never holds its aggregate for good.
async fn remove_replayed_dead_letter(runtime: &Shared, settling: &MessageJob) {
    let Some((topic, position)) = replayed_dead_letter(&settling.message.headers) else {
        return;
    };
    let subscription = &settling.subscription;
    if subscription.dead_letter.as_deref() != Some(topic) {
        tracing::debug!(subscription = %subscription.name, topic, "a replayed copy of another dead-letter topic's letter: not removed here");
        return;
    }
    // Boxed, as the rare path.
    Box::pin(async {
        let Some(store) = runtime.dead_letters.store() else {
            return;
        };
        let mut failures = 0u32;
        loop {
            let removed = async {
                let Some(letter) = store.dead_letter_at(topic, position).await? else {
                    return Ok(());
                };
                if !letter.is_dead_letter_of(
                    &subscription.topic,
                    &settling.message.payload,
                    &subscription.owner,
                ) {
                    tracing::warn!(subscription = %subscription.name, topic, %position, "X-Replay-Of names a dead letter that is not this copy's, or another subscription's: not removed");
                    return Ok(());
                }
                store.remove_dead_letter(&letter).await
            }
            .await;
            let Err(error) = removed else {
                return;
            };
            failures += 1;
            runtime.counters.add(Stat::SettleFailures, 1);
            if error.kind() == eventbus_core::ErrorKind::Config || failures >= REMOVAL_ATTEMPTS {
                tracing::error!(subscription = %subscription.name, topic, %position, %error, failures, "the replayed copy's dead letter was not removed; it stays listed");
                return;
            }
            tracing::warn!(subscription = %subscription.name, topic, %position, %error, failures, "removing the replayed copy's dead letter failed; retrying");
            tokio::time::sleep(runtime.settlement.delay(failures)).await;
        }
    })
    .await;
}

/// Runs `operation` until it succeeds, backing off between failures.
async fn retried<F, Fut>(runtime: &Shared, what: &'static str, mut operation: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), eventbus_core::Error>>,
{
    let mut failures = 0u32;
    while let Err(error) = operation().await {
        failures = failures.saturating_add(1);
        runtime.counters.add(Stat::SettleFailures, 1);
        tracing::warn!(%error, failures, what, "settling failed; retrying (the aggregate's later messages wait)");
        // Boxed, as the rare path: the timer would otherwise be part of every settlement.
        Box::pin(tokio::time::sleep(runtime.settlement.delay(failures))).await;
    }
}

/// The idempotency key of a dead letter: the subscription, the topic, the message's position and
/// the time the broker stored it. The same for every retry of one write; different for another
/// subscription, and for another message at the same position after the broker's positions
/// started over (a stream lost and made again).
fn dedup_id(subscription: &str, message: &Message) -> Option<String> {
    let position = match message.meta.position {
        Position::Sequence(sequence) => sequence.to_string(),
        Position::Partition { partition, offset } => format!("{partition}-{offset}"),
        _ => return None,
    };
    let stored = message
        .meta
        .timestamp
        .map_or(0, |time| time.unix_timestamp_nanos());
    Some(format!(
        "dlq:{subscription}:{}:{position}:{stored}",
        message.topic
    ))
}

/// Writes a dead letter, retrying with the settlement backoff (up to its longest) until the
/// broker accepts it.
async fn write_dead_letter(
    runtime: &Shared,
    settling: &MessageJob,
    topic: &str,
    reason: &str,
    attempts: u32,
    parked: bool,
) {
    let full = settling.receipt.full_message(&settling.message);
    let mut letter = dead_letter_message(&full, reason, attempts);
    if parked {
        letter.headers.insert(HEADER_PARKED, "true");
    }
    letter.headers.insert(
        HEADER_DEAD_LETTERED_BY,
        settling.subscription.owner.to_string(),
    );
    let id = dedup_id(&settling.subscription.name, &full);
    let mut failures = 0u32;
    // Counts the message as waiting on its dead letter while the write fails, until it is
    // written or the deadline cuts the loop short.
    let mut waiting = None;
    loop {
        match runtime
            .dead_letters
            .publish_dead_letter(Outgoing::new(topic, letter.clone()).with_dedup_id(id.as_deref()))
            .await
        {
            Ok(()) => {
                drop(waiting);
                runtime.counters.add(Stat::DeadLettered, 1);
                tracing::warn!(subscription = %settling.subscription.name, topic = %full.topic, dead_letter_topic = topic, reason, attempts, "dead-lettered");
                return;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                waiting.get_or_insert_with(|| Waiting::new(&runtime.counters));
                runtime.counters.add(Stat::DeadLetterFailures, 1);
                tracing::error!(
                    subscription = %settling.subscription.name,
                    dead_letter_topic = topic,
                    %error,
                    failures,
                    "dead letter not written; retrying (the aggregate's later messages wait)"
                );
                tokio::time::sleep(runtime.settlement.delay(failures)).await;
            }
        }
    }
}

/// A message counted as waiting on its dead-letter write while this lives.
struct Waiting<'a>(&'a Counters);

impl<'a> Waiting<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.dead_letter_waiting(true);
        Self(counters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dead_letter_waiting(false);
    }
}
