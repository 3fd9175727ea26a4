//! Scopes: groups of lanes that are closed together.
//!
//! A lane is keyed by (scope, routing key). The consume runtime opens one scope per
//! subscription (and a Kafka backend one per partition assignment), so the same aggregate in
//! two subscriptions has two lanes that never wait for each other, and closing a subscription
//! finds exactly its own work.

use std::sync::Arc;

use eventbus_core::CancellationToken;

/// The scope of jobs submitted without one.
pub(crate) const UNSCOPED: u64 = 0;

/// A group of lanes of one [`Pool`](crate::Pool), opened with
/// [`Pool::open_scope`](crate::Pool::open_scope) and closed with
/// [`Pool::close_scope`](crate::Pool::close_scope). Jobs join it with
/// [`Job::in_scope`](crate::Job::in_scope).
///
/// Cloning is cheap; every clone names the same scope.
#[derive(Debug, Clone)]
pub struct Scope {
    pub(crate) id: u64,
    /// Fires when the scope's drain deadline passes (or the pool cancels): a child of the pool's
    /// own token.
    pub(crate) cancel: Arc<CancellationToken>,
}

impl Scope {
    /// The scope's number, unique within its pool (for logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Cancelled when the scope's jobs must stop: its drain deadline passed, or the pool's.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// What [`Pool::close_scope`](crate::Pool::close_scope) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeReport {
    /// Every running and retrying job of the scope settled before the deadline.
    pub drained: bool,
    /// Queued jobs handed back unstarted (settled as cancelled, in lane order).
    pub handed_back: usize,
}

/// The pool's bookkeeping of one open scope.
pub(crate) struct ScopeState {
    /// Jobs of the scope not settled yet (queued, running, retrying, being handed back).
    pub(crate) pending: usize,
    /// No job may join any more; queued ones are handed back.
    pub(crate) closed: bool,
}
