//! Lanes: the queue of one routing key, and the table that holds them.

use std::collections::{HashMap, VecDeque};

use eventbus_core::AggregateId;

/// Where a lane sits in the table; stable while the lane lives.
pub(crate) type LaneId = usize;

/// Emptied queues kept for reuse, so that a key coming back does not allocate.
const SPARE_QUEUES: usize = 1024;

/// The state of one key.
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
    pub(crate) in_ready: bool,
    key: AggregateId,
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

/// Lanes by key, stored in a slab so that the ready queue and the actors refer to a lane by its
/// [`LaneId`] without hashing the key again. Hashing uses a per-table random seed, so keys taken
/// from messages cannot be chosen to collide.
pub(crate) struct Lanes<E> {
    index: HashMap<AggregateId, LaneId, foldhash::fast::RandomState>,
    slots: Vec<Option<Lane<E>>>,
    free: Vec<LaneId>,
    spare: Vec<VecDeque<E>>,
}

impl<E> Default for Lanes<E> {
    fn default() -> Self {
        Self {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
        }
    }
}

impl<E> Lanes<E> {
    /// Lanes alive.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The lane of `key`, created when missing.
    pub(crate) fn get_or_insert(&mut self, key: &AggregateId) -> (LaneId, &mut Lane<E>) {
        let id = match self.index.get(key) {
            Some(&id) => id,
            None => {
                let lane = Lane {
                    queued: 0,
                    parked: self.spare.pop().unwrap_or_default(),
                    retry: None,
                    busy: false,
                    in_ready: false,
                    key: key.clone(),
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
                id
            }
        };
        let lane = self
            .slots
            .get_mut(id)
            .and_then(Option::as_mut)
            .unwrap_or_else(|| unreachable!("the index only names live slots"));
        (id, lane)
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
        self.index.remove(&lane.key);
        self.free.push(id);
        if self.spare.len() < SPARE_QUEUES && lane.parked.is_empty() && lane.parked.capacity() > 0 {
            self.spare.push(lane.parked);
        }
    }

    /// Removes every lane, returning them.
    pub(crate) fn drain(&mut self) -> Vec<Lane<E>> {
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
        let (a, lane) = lanes.get_or_insert(&key("a"));
        lane.parked.push_back(1);
        lane.queued = 1;
        let (b, _) = lanes.get_or_insert(&key("b"));
        assert_ne!(a, b);
        let (again, lane) = lanes.get_or_insert(&key("a"));
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
        let (c, lane) = lanes.get_or_insert(&key("c"));
        assert_eq!(c, a);
        assert!(lane.parked.capacity() >= 1);
        assert_eq!(lanes.drain().len(), 2);
        assert_eq!(lanes.len(), 0);
    }
}
