//! Parking (`SubscribeOptions::with_park_on_dead_letter`): an aggregate whose envelope was
//! dead-lettered has its later envelopes dead-lettered too, marked parked, until a replay brings
//! the failed one and its parked successors back in order.
//!
//! Per aggregate: not parked → (a dead letter) → parked → (the replay's first message of the
//! aggregate, `X-Replay-Head`) → replaying, where only replayed messages run → (the replay's
//! last message of the aggregate, `X-Replay-Last`, handled) → not parked. A dead letter while
//! replaying parks it again, so a replayed event that fails again holds its successors back
//! too; a live event parked while replaying keeps the aggregate parked after the replay's last
//! (it is in the dead-letter topic, behind the replayed ones, for the next replay). Every check
//! and change happens in the aggregate's lane, so they follow its order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use eventbus_core::{
    AggregateId, HEADER_REPLAY_HEAD, HEADER_REPLAY_LAST, HEADER_REPLAYED, Headers,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    Parked,
    /// Replaying; `true` once a live event was parked meanwhile.
    Replaying(bool),
}

/// The parked aggregates of one subscription.
#[derive(Default)]
pub(crate) struct Parking(Mutex<HashMap<AggregateId, Park>>);

impl Parking {
    fn lock(&self) -> MutexGuard<'_, HashMap<AggregateId, Park>> {
        // Nothing panics while holding this lock.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Parks `key` unless it is parked or replaying already (a subscription restoring what its
    /// dead-letter topic still holds).
    pub(crate) fn park(&self, key: AggregateId) {
        self.lock().entry(key).or_insert(Park::Parked);
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

/// One message of a parking subscription: its aggregate, and how a replay marked it.
#[derive(Clone)]
pub(crate) struct ParkCheck {
    parking: Arc<Parking>,
    key: AggregateId,
    replay: Replay,
}

impl ParkCheck {
    pub(crate) fn new(parking: Arc<Parking>, key: AggregateId, headers: &Headers) -> Self {
        Self {
            parking,
            key,
            replay: Replay {
                replayed: headers.contains(HEADER_REPLAYED),
                head: headers.contains(HEADER_REPLAY_HEAD),
                last: headers.contains(HEADER_REPLAY_LAST),
            },
        }
    }

    /// Whether the message may run now (called at each attempt, in the aggregate's lane); a
    /// replay's first message of a parked aggregate starts its replay.
    pub(crate) fn admits(&self) -> bool {
        let mut parked = self.parking.lock();
        match parked.get(&self.key).copied() {
            None => true,
            Some(Park::Parked) if self.replay.head => {
                parked.insert(self.key.clone(), Park::Replaying(false));
                true
            }
            Some(Park::Parked) => false,
            Some(Park::Replaying(_)) if self.replay.replayed => true,
            Some(Park::Replaying(_)) => {
                parked.insert(self.key.clone(), Park::Replaying(true));
                false
            }
        }
    }

    /// The message was dead-lettered for failing: its aggregate is parked behind it.
    pub(crate) fn dead_lettered(&self) {
        self.parking.lock().insert(self.key.clone(), Park::Parked);
        tracing::warn!(aggregate = %self.key, "aggregate parked behind its dead letter");
    }

    /// The message was handled: the replay's last message of its aggregate ends the parking.
    pub(crate) fn handled(&self) {
        if !self.replay.last {
            return;
        }
        let mut parked = self.parking.lock();
        match parked.get(&self.key) {
            Some(Park::Replaying(false)) => {
                parked.remove(&self.key);
                tracing::info!(aggregate = %self.key, "aggregate replayed and no longer parked");
            }
            Some(Park::Replaying(true)) => {
                // Its live events of the meantime wait in the dead-letter topic, in order.
                parked.insert(self.key.clone(), Park::Parked);
                tracing::warn!(aggregate = %self.key, "aggregate replayed; events parked during the replay wait for the next one");
            }
            _ => {}
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

    fn message(parking: &Arc<Parking>, marks: &[&str]) -> ParkCheck {
        let mut headers = Headers::new();
        for mark in marks {
            headers.insert(*mark, "true");
        }
        let key = AggregateId::new("order-1").unwrap_or_else(|_| unreachable!());
        ParkCheck::new(parking.clone(), key, &headers)
    }

    #[test]
    fn a_parked_aggregate_runs_only_its_replay_and_a_new_failure_parks_it_again() {
        let parking = Arc::new(Parking::default());
        let live = message(&parking, &[]);
        assert!(live.admits(), "nothing parked yet");
        live.dead_lettered();
        assert!(!live.admits(), "later live events are parked");
        let middle = message(&parking, &[HEADER_REPLAYED]);
        assert!(!middle.admits(), "a replay starts with its head");
        let head = message(&parking, &[HEADER_REPLAYED, HEADER_REPLAY_HEAD]);
        assert!(head.admits());
        assert!(middle.admits(), "replaying: replayed events run");
        // The head fails again: its replayed successors wait behind it once more.
        head.dead_lettered();
        assert!(!middle.admits());
        let again = message(&parking, &[HEADER_REPLAYED, HEADER_REPLAY_HEAD]);
        assert!(again.admits());
        let last = message(&parking, &[HEADER_REPLAYED, HEADER_REPLAY_LAST]);
        assert!(last.admits());
        middle.handled();
        assert_eq!(parking.len(), 1, "only the last one ends the parking");
        last.handled();
        assert_eq!(parking.len(), 0);
        assert!(live.admits());
    }

    #[test]
    fn a_live_event_parked_during_a_replay_keeps_the_aggregate_parked_for_the_next() {
        let parking = Arc::new(Parking::default());
        let live = message(&parking, &[]);
        live.dead_lettered();
        let head = message(&parking, &[HEADER_REPLAYED, HEADER_REPLAY_HEAD]);
        assert!(head.admits());
        assert!(!live.admits(), "replaying: live events are parked");
        let last = message(&parking, &[HEADER_REPLAYED, HEADER_REPLAY_LAST]);
        assert!(last.admits());
        last.handled();
        assert!(
            !live.admits(),
            "still parked: the live one waits for the next replay"
        );
        assert!(head.admits());
        last.handled();
        assert!(live.admits());
    }
}
