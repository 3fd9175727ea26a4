//! Per-partition commit tracking: out-of-order completions turned into a commit position.

use std::collections::VecDeque;

/// Tracks one partition's dispatched and completed offsets and answers what may be committed.
///
/// The committable offset is one past the contiguous completed prefix of the dispatched offsets:
/// the smallest dispatched offset still outstanding, or, when none is, one past the last
/// dispatched offset. Offsets never dispatched (gaps left by compaction or transaction markers)
/// do not stall it. Only the outstanding offsets are kept, in dispatch (so offset) order: a
/// completed offset behind an outstanding one needs no entry, so memory follows the unfinished
/// records, not the records finished behind a hung one. Recording a dispatch is O(1) (amortised,
/// no allocation once the queue has grown); a completion finds its offset by binary search and
/// removes it, moving the shorter side of the queue: O(1) for the oldest offsets and for those
/// just behind a hung one, the usual cases.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommitTracker {
    /// Dispatched offsets not completed yet, increasing.
    outstanding: VecDeque<i64>,
    after_last: Option<i64>,
    /// The offset last sent to the broker, not answered yet.
    requested: Option<i64>,
    /// The highest offset the broker confirmed.
    confirmed: Option<i64>,
}

impl CommitTracker {
    /// An empty tracker.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed to the engine. Offsets must increase; a smaller or
    /// repeated one (or `i64::MAX`) is ignored and `false` returned.
    pub(crate) fn dispatched(&mut self, offset: i64) -> bool {
        let Some(next) = offset.checked_add(1) else {
            return false;
        };
        if self.after_last.is_some_and(|after| offset < after) {
            return false;
        }
        self.outstanding.push_back(offset);
        self.after_last = Some(next);
        true
    }

    /// Records that `offset` finished (acknowledged or dead-lettered). Returns `false` when it
    /// was not outstanding.
    pub(crate) fn completed(&mut self, offset: i64) -> bool {
        match self.outstanding.binary_search(&offset) {
            Ok(at) => self.outstanding.remove(at).is_some(),
            Err(_) => false,
        }
    }

    /// The offset to commit: the next one a new consumer should read. `None` before the first
    /// dispatch.
    pub(crate) fn committable(&self) -> Option<i64> {
        match self.outstanding.front() {
            Some(offset) => Some(*offset),
            None => self.after_last,
        }
    }

    /// The committable offset to send in a periodic commit: `None` when the broker has
    /// confirmed it already or a request for it is still unanswered. It counts as committed
    /// only once [`commit_confirmed`](Self::commit_confirmed) says so; until then (a failed
    /// request, one never answered) the next call returns it again.
    pub(crate) fn take_commit(&mut self) -> Option<i64> {
        let committable = self.committable()?;
        if self.confirmed == Some(committable) || self.requested == Some(committable) {
            return None;
        }
        self.requested = Some(committable);
        Some(committable)
    }

    /// The broker confirmed a commit of `offset`.
    pub(crate) fn commit_confirmed(&mut self, offset: i64) {
        if self.confirmed.is_none_or(|confirmed| confirmed < offset) {
            self.confirmed = Some(offset);
        }
        if self.requested.is_some_and(|requested| requested <= offset) {
            self.requested = None;
        }
    }

    /// A commit of `offset` failed: the next [`take_commit`](Self::take_commit) sends it again.
    pub(crate) fn commit_failed(&mut self, offset: i64) {
        if self.requested == Some(offset) {
            self.requested = None;
        }
    }

    /// The highest offset the broker confirmed as committed, if any.
    pub(crate) fn confirmed(&self) -> Option<i64> {
        self.confirmed
    }

    /// Dispatched offsets not yet completed: what the tracker holds in memory.
    pub(crate) fn in_flight(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_compacted_away_do_not_stall_the_commit() {
        let mut tracker = CommitTracker::new();
        for offset in [10, 11, 13] {
            tracker.dispatched(offset);
        }
        tracker.completed(11);
        assert_eq!(tracker.committable(), Some(10));
        tracker.completed(10);
        assert_eq!(tracker.committable(), Some(13));
        tracker.completed(13);
        assert_eq!(tracker.committable(), Some(14));
    }

    #[test]
    fn out_of_order_completion_commits_only_the_contiguous_prefix() {
        let mut tracker = CommitTracker::new();
        assert_eq!(tracker.committable(), None);
        for offset in 0..5 {
            assert!(tracker.dispatched(offset));
        }
        assert!(tracker.completed(3));
        assert!(tracker.completed(1));
        assert_eq!(tracker.committable(), Some(0));
        assert!(tracker.completed(0));
        assert_eq!(tracker.committable(), Some(2));
        assert!(tracker.completed(2));
        assert_eq!(tracker.committable(), Some(4));
        assert!(!tracker.completed(2));
        assert_eq!(tracker.in_flight(), 1);
    }

    #[test]
    fn a_hung_offset_holds_the_commit_but_keeps_no_entry_for_what_finished_behind_it() {
        let mut tracker = CommitTracker::new();
        for offset in 0..100_000 {
            tracker.dispatched(offset);
        }
        for offset in 1..100_000 {
            tracker.completed(offset);
        }
        assert_eq!(tracker.committable(), Some(0));
        assert_eq!(tracker.in_flight(), 1, "one entry held, not 100,000");
        tracker.completed(0);
        assert_eq!(tracker.committable(), Some(100_000));
        assert_eq!(tracker.in_flight(), 0);
    }

    #[test]
    fn dispatch_must_move_forward() {
        let mut tracker = CommitTracker::new();
        assert!(tracker.dispatched(7));
        assert!(!tracker.dispatched(7));
        assert!(!tracker.dispatched(3));
        assert!(!tracker.dispatched(i64::MAX));
        assert!(tracker.dispatched(9));
        assert_eq!(tracker.in_flight(), 2);
    }

    #[test]
    fn take_commit_reports_each_advance_once_while_its_request_is_unanswered() {
        let mut tracker = CommitTracker::new();
        assert_eq!(tracker.take_commit(), None);
        tracker.dispatched(0);
        assert_eq!(tracker.take_commit(), Some(0));
        assert_eq!(tracker.take_commit(), None);
        tracker.completed(0);
        assert_eq!(tracker.take_commit(), Some(1));
        assert_eq!(tracker.take_commit(), None);
        tracker.commit_confirmed(1);
        assert_eq!(tracker.take_commit(), None);
        assert_eq!(tracker.confirmed(), Some(1));
    }

    #[test]
    fn a_failed_commit_is_sent_again_until_the_broker_confirms_it() {
        let mut tracker = CommitTracker::new();
        tracker.dispatched(0);
        tracker.completed(0);
        assert_eq!(tracker.take_commit(), Some(1));
        tracker.commit_failed(1);
        assert_eq!(tracker.take_commit(), Some(1), "sent again");
        tracker.commit_failed(1);
        assert_eq!(tracker.take_commit(), Some(1), "and again");
        tracker.commit_confirmed(1);
        assert_eq!(tracker.take_commit(), None);
        assert_eq!(tracker.confirmed(), Some(1));
        // An older request's failure after a newer confirmation changes nothing.
        tracker.commit_failed(0);
        assert_eq!(tracker.take_commit(), None);
    }
}

/// The commit tracker against a reference model: random dispatch with gaps, random completion
/// order.
#[cfg(test)]
mod model_tests {
    use std::collections::BTreeSet;

    use super::CommitTracker;
    use proptest::prelude::*;
    /// The obvious model: one past the contiguous completed prefix of the dispatched offsets.
    fn model(dispatched: &[i64], completed: &BTreeSet<i64>) -> Option<i64> {
        let last = *dispatched.last()?;
        Some(
            dispatched
                .iter()
                .find(|offset| !completed.contains(offset))
                .copied()
                .unwrap_or(last + 1),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn the_tracker_agrees_with_the_model(
            gaps in prop::collection::vec(1i64..4, 1..60),
            start in 0i64..1_000_000,
            order in any::<prop::sample::Index>(),
            interleave in prop::collection::vec(any::<bool>(), 1..120),
        ) {
            // Offsets with gaps (compaction, transaction markers).
            let offsets: Vec<i64> = gaps.iter().scan(start, |at, gap| { *at += gap; Some(*at) }).collect();
            // A random completion order.
            let mut pending = offsets.clone();
            let rotate = order.index(pending.len());
            pending.rotate_left(rotate);
            let mut tracker = CommitTracker::new();
            let mut dispatched = Vec::new();
            let mut completed = BTreeSet::new();
            let mut next = offsets.iter();
            let mut steps = interleave.iter().cycle();
            let mut last_commit = None;
            while !pending.is_empty() || dispatched.len() < offsets.len() {
                let dispatch = *steps.next().unwrap();
                if (dispatch || dispatched.len() == completed.len())
                    && let Some(&offset) = next.next()
                {
                    prop_assert!(tracker.dispatched(offset));
                    dispatched.push(offset);
                }
                let all_dispatched = dispatched.len() == offsets.len();
                if (!dispatch || all_dispatched)
                    && let Some(position) = pending.iter().position(|o| dispatched.contains(o))
                {
                    let offset = pending.remove(position);
                    prop_assert!(tracker.completed(offset));
                    completed.insert(offset);
                }
                prop_assert_eq!(tracker.committable(), model(&dispatched, &completed));
                prop_assert_eq!(tracker.in_flight(), dispatched.len() - completed.len());
                // Commits only ever move forward.
                if let Some(commit) = tracker.take_commit() {
                    prop_assert!(last_commit.is_none_or(|last| commit > last));
                    last_commit = Some(commit);
                }
            }
            prop_assert_eq!(tracker.committable(), Some(offsets.last().unwrap() + 1));
        }
    }
}
