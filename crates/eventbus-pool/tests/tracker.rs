//! The commit tracker against a reference model: random dispatch with gaps, random completion
//! order.

use std::collections::BTreeSet;

use eventbus_pool::CommitTracker;
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
