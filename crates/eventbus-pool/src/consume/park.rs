//! Parking (`SubscribeOptions::with_park_on_dead_letter`): an aggregate whose envelope was
//! dead-lettered has its later envelopes dead-lettered too, marked parked, until a replay brings
//! the failed one and its parked successors back in order.
//!
//! Per aggregate: not parked → (a dead letter) → parked → (the replay's first message of the
//! aggregate, `X-Replay-Head`) → replaying, where only replayed messages run → (the replay's
//! last message of the aggregate, `X-Replay-Last`, handled) → not parked. A dead letter while
//! replaying parks it again, so a replayed event that fails again holds its successors back
//! too.
//!
//! A replay holds what the dead-letter topic held when it was made. Parked events that are not
//! in it keep the aggregate parked after its last message, for the next replay:
//! - a live event parked while replaying, always;
//! - a live event parked before the replay's first message came but after the replay was made
//!   (a reader behind the log reads it before the replayed copies), told apart by its version:
//!   above the replay's last one. The same goes for the events a restarted reader finds parked
//!   in the dead-letter topic.
//!
//! And a replay's first message is refused (parked) while an event of the aggregate with a lower
//! version waits in the dead-letter topic because it failed again after that replay was made.
//! Versions are compared only when they rise per aggregate; with repeated versions these two
//! cases are not told apart. Every check and change happens in the aggregate's lane, so they
//! follow its order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use eventbus_core::{
    AggregateId, HEADER_REPLAY_HEAD, HEADER_REPLAY_LAST, HEADER_REPLAYED, Headers,
};

/// A parked aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Park {
    /// Its replay's first message has run, and its last not yet.
    replaying: bool,
    /// A live event was parked while replaying.
    live_while_replaying: bool,
    /// The newest version of the events parked since it was parked (live ones, and those a
    /// restarted reader found in the dead-letter topic).
    newest_parked: Option<i64>,
    /// The version of the event whose failure parked it.
    failed: Option<i64>,
}

impl Park {
    fn parked(&mut self, version: i64) {
        self.newest_parked = Some(
            self.newest_parked
                .map_or(version, |newest| newest.max(version)),
        );
    }

    fn failed(version: i64) -> Self {
        Self {
            failed: Some(version),
            ..Self::default()
        }
    }
}

/// The parked aggregates of one subscription.
#[derive(Default)]
pub(crate) struct Parking(Mutex<HashMap<AggregateId, Park>>);

impl Parking {
    fn lock(&self) -> MutexGuard<'_, HashMap<AggregateId, Park>> {
        // Nothing panics while holding this lock.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks `key` behind its dead letter of `version` (a subscription restoring what its
    /// dead-letter topic still holds, in the topic's order): `failed` for an event that failed,
    /// not for one parked behind it.
    pub(crate) fn park(&self, key: AggregateId, version: i64, failed: bool) {
        let mut parked = self.lock();
        let park = parked.entry(key).or_default();
        if failed && park.failed.is_none_or(|first| version < first) {
            park.failed = Some(version);
        }
        park.parked(version);
    }

    /// Aggregates parked or replaying now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// What a replay marked on a message.
#[derive(Debug, Clone, Copy, Default)]
struct Replay {
    replayed: bool,
    head: bool,
    last: bool,
}

/// One message of a parking subscription: its aggregate and event version, and how a replay
/// marked it.
#[derive(Clone)]
pub(crate) struct ParkCheck {
    parking: Arc<Parking>,
    key: AggregateId,
    version: i64,
    replay: Replay,
}

impl ParkCheck {
    pub(crate) fn new(
        parking: Arc<Parking>,
        key: AggregateId,
        version: i64,
        headers: &Headers,
    ) -> Self {
        Self {
            parking,
            key,
            version,
            replay: Replay {
                replayed: headers.contains(HEADER_REPLAYED),
                head: headers.contains(HEADER_REPLAY_HEAD),
                last: headers.contains(HEADER_REPLAY_LAST),
            },
        }
    }

    /// Whether the message may run now (called at each attempt, in the aggregate's lane); a
    /// replay's first message of a parked aggregate starts its replay. A live message refused
    /// here is parked.
    pub(crate) fn admits(&self) -> bool {
        let mut parked = self.parking.lock();
        let Some(park) = parked.get_mut(&self.key) else {
            return true;
        };
        if self.replay.replayed && park.replaying {
            return true;
        }
        // A replay made before its aggregate's failed event failed again would overtake it.
        let behind_a_failure = park.failed.is_some_and(|failed| self.version > failed);
        if self.replay.head && !behind_a_failure {
            park.replaying = true;
            return true;
        }
        if park.replaying {
            park.live_while_replaying = true;
        }
        if !self.replay.replayed {
            park.parked(self.version);
        }
        false
    }

    /// The message was dead-lettered for failing: its aggregate is parked behind it (the next
    /// replay holds it and whatever was parked before it).
    pub(crate) fn dead_lettered(&self) {
        self.parking
            .lock()
            .insert(self.key.clone(), Park::failed(self.version));
        tracing::warn!(aggregate = %self.key, "aggregate parked behind its dead letter");
    }

    /// The message was handled: the replay's last message of its aggregate ends the parking,
    /// unless events not in the replay were parked meanwhile.
    pub(crate) fn handled(&self) {
        if !self.replay.last {
            return;
        }
        let mut parked = self.parking.lock();
        let Some(park) = parked.get_mut(&self.key) else {
            return;
        };
        if !park.replaying {
            return;
        }
        let newer_parked = park
            .newest_parked
            .is_some_and(|newest| newest > self.version);
        if park.live_while_replaying || newer_parked {
            // They wait in the dead-letter topic, in order, for the next replay.
            *park = Park {
                newest_parked: park.newest_parked,
                ..Park::default()
            };
            tracing::warn!(aggregate = %self.key, "aggregate replayed; events parked that the replay does not hold wait for the next one");
        } else {
            parked.remove(&self.key);
            tracing::info!(aggregate = %self.key, "aggregate replayed and no longer parked");
        }
    }
}

/// The failure of an envelope parked behind an earlier dead letter of its aggregate.
#[derive(Debug)]
pub(crate) struct ParkedBehind;

impl std::fmt::Display for ParkedBehind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("parked behind an earlier dead letter of its aggregate")
    }
}

impl std::error::Error for ParkedBehind {}

#[cfg(test)]
mod tests {
    use super::*;

    const REPLAYED: &str = HEADER_REPLAYED;
    const HEAD: &str = HEADER_REPLAY_HEAD;
    const LAST: &str = HEADER_REPLAY_LAST;

    fn message(parking: &Arc<Parking>, version: i64, marks: &[&str]) -> ParkCheck {
        let mut headers = Headers::new();
        for mark in marks {
            headers.insert(*mark, "true");
        }
        let key = AggregateId::new("order-1").unwrap_or_else(|_| unreachable!());
        ParkCheck::new(parking.clone(), key, version, &headers)
    }

    #[test]
    fn a_parked_aggregate_runs_only_its_replay_and_a_new_failure_parks_it_again() {
        let parking = Arc::new(Parking::default());
        let failed = message(&parking, 1, &[]);
        assert!(failed.admits(), "nothing parked yet");
        failed.dead_lettered();
        assert!(
            !message(&parking, 2, &[]).admits(),
            "later live events are parked"
        );
        // The replay holds v1 and the parked v2.
        let head = message(&parking, 1, &[REPLAYED, HEAD]);
        let last = message(&parking, 2, &[REPLAYED, LAST]);
        assert!(!last.admits(), "a replay starts with its head");
        assert!(head.admits());
        assert!(last.admits(), "replaying: replayed events run");
        // The head fails again: its replayed successors wait behind it once more.
        head.dead_lettered();
        assert!(!last.admits());
        // The next replay.
        assert!(head.admits());
        assert!(last.admits());
        head.handled();
        assert_eq!(parking.len(), 1, "only the last one ends the parking");
        last.handled();
        assert_eq!(parking.len(), 0);
        assert!(message(&parking, 3, &[]).admits());
    }

    #[test]
    fn a_live_event_parked_during_a_replay_keeps_the_aggregate_parked_for_the_next() {
        let parking = Arc::new(Parking::default());
        message(&parking, 1, &[]).dead_lettered();
        let replay = message(&parking, 1, &[REPLAYED, HEAD, LAST]);
        assert!(replay.admits());
        let live = message(&parking, 2, &[]);
        assert!(!live.admits(), "replaying: live events are parked");
        replay.handled();
        assert!(
            !live.admits(),
            "still parked: the live one waits for the next replay"
        );
        let next = message(&parking, 2, &[REPLAYED, HEAD, LAST]);
        assert!(next.admits());
        next.handled();
        assert!(message(&parking, 3, &[]).admits());
    }

    /// A reader behind the log reads a live event published before the replay's copies but
    /// after the replay was made: it is parked before the replay's head comes, and is not in
    /// the replay.
    #[test]
    fn a_live_event_parked_before_the_replay_came_but_newer_than_it_keeps_the_aggregate_parked() {
        let parking = Arc::new(Parking::default());
        message(&parking, 1, &[]).dead_lettered();
        assert!(!message(&parking, 2, &[]).admits());
        let replay = message(&parking, 1, &[REPLAYED, HEAD, LAST]);
        assert!(replay.admits());
        replay.handled();
        assert!(
            !message(&parking, 3, &[]).admits(),
            "v2 waits in the dead-letter topic: v3 must not run before it"
        );
    }

    #[test]
    fn a_live_event_parked_during_a_replay_keeps_parking_whatever_its_version() {
        let parking = Arc::new(Parking::default());
        message(&parking, 1, &[]).dead_lettered();
        let replay = message(&parking, 1, &[REPLAYED, HEAD, LAST]);
        assert!(replay.admits());
        assert!(!message(&parking, 1, &[]).admits());
        replay.handled();
        assert!(
            !message(&parking, 1, &[]).admits(),
            "the live event parked during the replay waits in the dead-letter topic"
        );
    }

    /// A reader started after a replay of v1 was made, with v2 parked in the dead-letter topic
    /// (not in that replay): the replay's copy of v1 must not end the parking.
    #[test]
    fn a_restored_parked_event_newer_than_the_replay_keeps_the_aggregate_parked() {
        let parking = Arc::new(Parking::default());
        let key = AggregateId::new("order-1").unwrap_or_else(|_| unreachable!());
        parking.park(key, 2, false);
        let replay = message(&parking, 1, &[REPLAYED, HEAD, LAST]);
        assert!(replay.admits());
        replay.handled();
        assert!(
            !message(&parking, 3, &[]).admits(),
            "v2 waits in the dead-letter topic: v3 must not run before it"
        );
    }

    /// v1 fails; a replay of v1 is made; v2 is parked (a reader behind the log); a replay of
    /// v2 is made; v1's copy fails again. v2's copy must not run before v1.
    #[test]
    fn a_replay_made_before_a_copy_failed_again_does_not_overtake_it() {
        let parking = Arc::new(Parking::default());
        message(&parking, 1, &[]).dead_lettered();
        assert!(!message(&parking, 2, &[]).admits());
        let first = message(&parking, 1, &[REPLAYED, HEAD, LAST]);
        assert!(first.admits());
        first.dead_lettered();
        assert!(
            !message(&parking, 2, &[REPLAYED, HEAD, LAST]).admits(),
            "v1 waits in the dead-letter topic: v2 must not run before it"
        );
        // The next replay holds v1 and v2, in order.
        let head = message(&parking, 1, &[REPLAYED, HEAD]);
        let last = message(&parking, 2, &[REPLAYED, LAST]);
        assert!(head.admits());
        assert!(last.admits());
        last.handled();
        assert_eq!(parking.len(), 0);
    }

    #[test]
    fn a_live_event_parked_before_the_replay_was_made_is_in_it_and_holds_nothing_after() {
        let parking = Arc::new(Parking::default());
        message(&parking, 1, &[]).dead_lettered();
        assert!(!message(&parking, 2, &[]).admits());
        let head = message(&parking, 1, &[REPLAYED, HEAD]);
        let last = message(&parking, 2, &[REPLAYED, LAST]);
        assert!(head.admits());
        assert!(last.admits());
        last.handled();
        assert_eq!(parking.len(), 0);
        assert!(message(&parking, 3, &[]).admits());
    }
}
