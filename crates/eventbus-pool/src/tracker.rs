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
    taken: Option<i64>,
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

    /// The committable offset if it moved since the last call, for periodic commits.
    pub fn take_commit(&mut self) -> Option<i64> {
        let committable = self.committable()?;
        if self.taken == Some(committable) {
            return None;
        }
        self.taken = Some(committable);
        Some(committable)
    }

    /// Dispatched offsets not yet completed.
    pub fn in_flight(&self) -> usize {
        self.outstanding
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
    fn take_commit_reports_each_advance_once() {
        let mut tracker = CommitTracker::new();
        assert_eq!(tracker.take_commit(), None);
        tracker.dispatched(0);
        assert_eq!(tracker.take_commit(), Some(0));
        assert_eq!(tracker.take_commit(), None);
        tracker.completed(0);
        assert_eq!(tracker.take_commit(), Some(1));
        assert_eq!(tracker.take_commit(), None);
    }
}
