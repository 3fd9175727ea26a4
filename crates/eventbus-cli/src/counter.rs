//! A count that can be waited on.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// Counts events and wakes whoever waits for the count to reach a number.
#[derive(Default)]
pub(crate) struct Counter {
    count: AtomicU64,
    changed: Notify,
}

impl Counter {
    /// Counts one more.
    pub(crate) fn add_one(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// The count so far.
    pub(crate) fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count reaches `target`.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is consumed; wrap it in a timeout for a deadline.
    pub(crate) async fn wait_for(&self, target: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.get() >= target {
                return;
            }
            notified.await;
        }
    }
}
