//! Per-partition commit tracking for Kafka-style offsets.

use std::collections::VecDeque;

/// Tracks one partition's dispatched and completed offsets and answers what may be committed.
///
/// The committable offset is one past the contiguous completed prefix of the dispatched offsets:
/// the smallest dispatched offset still outstanding, or, when none is, one past the last
/// dispatched offset. Offsets never dispatched (gaps left by compaction or transaction markers)
/// do not stall it. Offsets are kept in dispatch order, so recording a dispatch is O(1)
/// (amortised, no allocation once the queue has grown) and a completion O(log n) in the offsets
/// dispatched since the oldest outstanding one.
///
/// ```
/// use eventbus_pool::CommitTracker;
///
/// let mut tracker = CommitTracker::new();
/// for offset in [10, 11, 13] {          // 12 was compacted away
///     tracker.dispatched(offset);
/// }
/// tracker.completed(11);
/// assert_eq!(tracker.committable(), Some(10)); // 10 still runs
/// tracker.completed(10);
/// assert_eq!(tracker.committable(), Some(13));
/// tracker.completed(13);
/// assert_eq!(tracker.committable(), Some(14));
/// ```
#[derive(Debug, Clone, Default)]
pub struct CommitTracker {
    /// Dispatched offsets from the oldest outstanding one on, increasing, each with whether it
    /// completed; the front is always outstanding.
    dispatched: VecDeque<(i64, bool)>,
    /// How many of them are outstanding.
    outstanding: usize,
    after_last: Option<i64>,
    /// The offset last sent to the broker, not answered yet.
    requested: Option<i64>,
    /// The highest offset the broker confirmed.
    confirmed: Option<i64>,
}

impl CommitTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `offset` was handed to the engine. Offsets must increase; a smaller or
    /// repeated one (or `i64::MAX`) is ignored and `false` returned.
    pub fn dispatched(&mut self, offset: i64) -> bool {
        let Some(next) = offset.checked_add(1) else {
            return false;
        };
        if self.after_last.is_some_and(|after| offset < after) {
            return false;
        }
        self.dispatched.push_back((offset, false));
        self.outstanding += 1;
        self.after_last = Some(next);
        true
    }

    /// Records that `offset` finished (acknowledged or dead-lettered). Returns `false` when it
    /// was not outstanding.
    pub fn completed(&mut self, offset: i64) -> bool {
        let Ok(at) = self
            .dispatched
            .binary_search_by_key(&offset, |(dispatched, _)| *dispatched)
        else {
            return false;
        };
        match self.dispatched.get_mut(at) {
            Some((_, done)) if !*done => *done = true,
            _ => return false,
        }
        self.outstanding -= 1;
        while self.dispatched.front().is_some_and(|(_, done)| *done) {
            self.dispatched.pop_front();
        }
        true
    }

    /// The offset to commit: the next one a new consumer should read. `None` before the first
    /// dispatch.
    pub fn committable(&self) -> Option<i64> {
        match self.dispatched.front() {
            Some((offset, _)) => Some(*offset),
            None => self.after_last,
        }
    }

    /// The committable offset to send in a periodic commit: `None` when the broker has
    /// confirmed it already or a request for it is still unanswered. It counts as committed
    /// only once [`commit_confirmed`](Self::commit_confirmed) says so; until then (a failed
    /// request, one never answered) the next call returns it again.
    pub fn take_commit(&mut self) -> Option<i64> {
        let committable = self.committable()?;
        if self.confirmed == Some(committable) || self.requested == Some(committable) {
            return None;
        }
        self.requested = Some(committable);
        Some(committable)
    }

    /// The broker confirmed a commit of `offset`.
    pub fn commit_confirmed(&mut self, offset: i64) {
        if self.confirmed.is_none_or(|confirmed| confirmed < offset) {
            self.confirmed = Some(offset);
        }
        if self.requested.is_some_and(|requested| requested <= offset) {
            self.requested = None;
        }
    }

    /// A commit of `offset` failed: the next [`take_commit`](Self::take_commit) sends it again.
    pub fn commit_failed(&mut self, offset: i64) {
        if self.requested == Some(offset) {
            self.requested = None;
        }
    }

    /// The highest offset the broker confirmed as committed, if any.
    pub fn confirmed(&self) -> Option<i64> {
        self.confirmed
    }

    /// Dispatched offsets not yet completed.
    pub fn in_flight(&self) -> usize {
        self.outstanding
    }

    /// Dispatched offsets the committable offset has not passed yet: the unfinished ones and
    /// the finished ones behind the oldest unfinished one. What the tracker holds in memory
    /// (one entry each), and what a consumer bounds to bound it: a hung record makes this grow
    /// by one for every later record, while [`in_flight`](Self::in_flight) stays at one.
    pub fn uncommitted(&self) -> usize {
        self.dispatched.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn finished_offsets_behind_an_unfinished_one_count_as_uncommitted() {
        let mut tracker = CommitTracker::new();
        for offset in 0..10 {
            tracker.dispatched(offset);
        }
        for offset in 1..10 {
            tracker.completed(offset);
        }
        assert_eq!((tracker.in_flight(), tracker.uncommitted()), (1, 10));
        tracker.completed(0);
        assert_eq!((tracker.in_flight(), tracker.uncommitted()), (0, 0));
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
