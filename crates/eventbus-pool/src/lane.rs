//! Lanes: the queue of one routing key in one scope, and the table that holds them.

use std::collections::{HashMap, VecDeque};

use eventbus_core::AggregateId;

/// Where a lane sits in the table; stable while the lane lives.
pub(crate) type LaneId = usize;

/// Emptied queues kept for reuse, so that a key coming back does not allocate.
const SPARE_QUEUES: usize = 1024;

/// The state of one key in one scope.
///
/// The key's jobs wait in the pool's arrival-order queue; a job that reaches the head of that
/// queue while its key is busy (or has older jobs parked) is parked here, behind them.
///
/// Invariant (kept by the pool): a lane is in the ready queue exactly when it is not busy and has
/// a parked job or a job back from its retry backoff.
pub(crate) struct Lane<E> {
    /// Jobs of this key not started yet: in the arrival queue or parked (the inbox bound).
    pub(crate) queued: usize,
    /// Jobs that reached the head of the arrival queue while the key was busy, oldest first.
    pub(crate) parked: VecDeque<E>,
    /// A job back from its retry backoff; it runs before the parked ones.
    pub(crate) retry: Option<E>,
    /// A job of this key is running or waiting out a retry backoff.
    pub(crate) busy: bool,
    /// When the key's current job first started (kept through its retries and its finishing
    /// step); `None` while no job of the key has started.
    pub(crate) since: Option<std::time::Instant>,
    pub(crate) in_ready: bool,
    /// The scope the lane belongs to ([`UNSCOPED`](crate::scope::UNSCOPED) for plain jobs).
    pub(crate) scope: u64,
    key: AggregateId,
    /// The next lane of the same key in another scope (lanes of one key form a chain).
    next_of_key: Option<LaneId>,
}

impl<E> Lane<E> {
    /// True when the lane has nothing queued, parked, running or retrying.
    pub(crate) fn is_idle(&self) -> bool {
        !self.busy && self.retry.is_none() && self.queued == 0
    }

    /// True when a job of this key reaching the head of the arrival queue must wait.
    pub(crate) fn must_park(&self) -> bool {
        self.busy || self.in_ready || self.retry.is_some() || !self.parked.is_empty()
    }
}

/// Lanes by (scope, key), stored in a slab so that the ready queue and the actors refer to a lane
/// by its [`LaneId`] without hashing the key again. Hashing uses a per-table random seed, so keys
/// taken from messages cannot be chosen to collide. The index maps a key to the first of its
/// lanes; lanes of the same key in other scopes follow it in a chain (usually of one).
pub(crate) struct Lanes<E> {
    index: HashMap<AggregateId, LaneId, foldhash::fast::RandomState>,
    slots: Vec<Option<Lane<E>>>,
    free: Vec<LaneId>,
    spare: Vec<VecDeque<E>>,
    count: usize,
}

impl<E> Default for Lanes<E> {
    fn default() -> Self {
        Self {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            count: 0,
        }
    }
}

impl<E> Lanes<E> {
    /// Lanes alive.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The lane of `key` in `scope`, created when missing.
    pub(crate) fn get_or_insert(
        &mut self,
        scope: u64,
        key: &AggregateId,
    ) -> (LaneId, &mut Lane<E>) {
        let head = self.index.get(key).copied();
        let mut cursor = head;
        while let Some(id) = cursor {
            let lane = self.live(id);
            if lane.scope == scope {
                return (id, self.live(id));
            }
            cursor = lane.next_of_key;
        }
        let lane = Lane {
            queued: 0,
            parked: self.spare.pop().unwrap_or_default(),
            retry: None,
            busy: false,
            since: None,
            in_ready: false,
            scope,
            key: key.clone(),
            next_of_key: head,
        };
        let id = match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.slots.get_mut(id) {
                    *slot = Some(lane);
                }
                id
            }
            None => {
                self.slots.push(Some(lane));
                self.slots.len() - 1
            }
        };
        self.index.insert(key.clone(), id);
        self.count += 1;
        (id, self.live(id))
    }

    fn live(&mut self, id: LaneId) -> &mut Lane<E> {
        self.slots
            .get_mut(id)
            .and_then(Option::as_mut)
            .unwrap_or_else(|| unreachable!("the index and chains only name live slots"))
    }

    /// The lanes of `scope`, or every lane.
    pub(crate) fn ids(&self, scope: Option<u64>) -> Vec<LaneId> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(id, slot)| {
                slot.as_ref()
                    .filter(|lane| scope.is_none_or(|scope| lane.scope == scope))
                    .map(|_| id)
            })
            .collect()
    }

    /// The live lanes.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Lane<E>> {
        self.slots.iter().flatten()
    }

    /// The lane at `id`, if it lives.
    pub(crate) fn get_mut(&mut self, id: LaneId) -> Option<&mut Lane<E>> {
        self.slots.get_mut(id)?.as_mut()
    }

    /// Removes the lane at `id`, keeping its (empty) parking queue for reuse.
    pub(crate) fn remove(&mut self, id: LaneId) {
        let Some(lane) = self.slots.get_mut(id).and_then(Option::take) else {
            return;
        };
        // Unlink it from its key's chain.
        if self.index.get(&lane.key) == Some(&id) {
            match lane.next_of_key {
                Some(next) => {
                    self.index.insert(lane.key.clone(), next);
                }
                None => {
                    self.index.remove(&lane.key);
                }
            }
        } else {
            let mut cursor = self.index.get(&lane.key).copied();
            while let Some(at) = cursor {
                let before = self.live(at);
                if before.next_of_key == Some(id) {
                    before.next_of_key = lane.next_of_key;
                    break;
                }
                cursor = before.next_of_key;
            }
        }
        self.count -= 1;
        self.free.push(id);
        if self.spare.len() < SPARE_QUEUES && lane.parked.is_empty() && lane.parked.capacity() > 0 {
            self.spare.push(lane.parked);
        }
    }

    /// Removes every lane, returning them.
    #[cfg(test)]
    pub(crate) fn drain(&mut self) -> Vec<Lane<E>> {
        self.count = 0;
        self.index.clear();
        self.free.clear();
        self.slots.drain(..).flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> AggregateId {
        AggregateId::new(name).unwrap()
    }

    #[test]
    fn lanes_are_found_by_key_and_by_id_and_slots_are_reused() {
        let mut lanes: Lanes<u32> = Lanes::default();
        let (a, lane) = lanes.get_or_insert(0, &key("a"));
        lane.parked.push_back(1);
        lane.queued = 1;
        let (b, _) = lanes.get_or_insert(0, &key("b"));
        assert_ne!(a, b);
        let (again, lane) = lanes.get_or_insert(0, &key("a"));
        assert_eq!(again, a);
        assert_eq!(lane.parked.len(), 1);
        assert!(lane.must_park());
        assert_eq!(lanes.len(), 2);

        let lane = lanes.get_mut(a).unwrap();
        lane.parked.clear();
        lane.queued = 0;
        assert!(lane.is_idle() && !lane.must_park());
        lanes.remove(a);
        assert!(lanes.get_mut(a).is_none());
        assert_eq!(lanes.len(), 1);
        // The freed slot and the emptied parking queue serve the next key.
        let (c, lane) = lanes.get_or_insert(0, &key("c"));
        assert_eq!(c, a);
        assert!(lane.parked.capacity() >= 1);
        assert_eq!(lanes.drain().len(), 2);
        assert_eq!(lanes.len(), 0);
    }

    #[test]
    fn one_key_has_a_lane_per_scope_and_removing_one_keeps_the_others() {
        let mut lanes: Lanes<u32> = Lanes::default();
        let (a1, _) = lanes.get_or_insert(1, &key("k"));
        let (a2, _) = lanes.get_or_insert(2, &key("k"));
        let (a3, _) = lanes.get_or_insert(3, &key("k"));
        assert!(a1 != a2 && a2 != a3 && a1 != a3);
        assert_eq!(lanes.len(), 3);
        assert_eq!(lanes.ids(Some(2)), [a2]);
        assert_eq!(lanes.ids(None).len(), 3);
        // The chain is 3 -> 2 -> 1: remove its middle, then its head, then its last lane.
        lanes.remove(a2);
        assert_eq!(lanes.get_or_insert(1, &key("k")).0, a1);
        assert_eq!(lanes.get_or_insert(3, &key("k")).0, a3);
        lanes.remove(a3);
        assert_eq!(lanes.get_or_insert(1, &key("k")).0, a1);
        lanes.remove(a1);
        assert_eq!(lanes.len(), 0);
        let (again, _) = lanes.get_or_insert(2, &key("k"));
        assert_eq!(lanes.get_or_insert(2, &key("k")).0, again);
        assert_eq!(lanes.len(), 1);
    }
}
