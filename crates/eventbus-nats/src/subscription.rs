//! One subscription's state: its handler, its stop signals, and the messages it holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use async_nats::jetstream::message::Acker;
use eventbus_core::{CancellationToken, DeliveryClass, EnvelopeHandler, MessageHandler};

/// The handler of a subscription.
#[derive(Clone)]
pub(crate) enum Handler {
    Plain(Arc<dyn MessageHandler>),
    Envelope(Arc<dyn EnvelopeHandler>),
}

/// A message the bus holds: delivered and not yet settled.
pub(crate) struct Held {
    pub(crate) acker: Arc<Acker>,
    pub(crate) since: Instant,
}

/// One subscription's state, shared by its tasks and its jobs.
pub(crate) struct Sub {
    pub(crate) topic: String,
    /// The topic for handler contexts, shared rather than copied per attempt.
    pub(crate) topic_name: Arc<str>,
    pub(crate) durable: String,
    pub(crate) handler: Handler,
    pub(crate) subject_keys: bool,
    pub(crate) dead_letter: Option<String>,
    /// Stop fetching.
    pub(crate) stop: CancellationToken,
    /// Stop because the bus closes: take what the open pull request still brings first.
    pub(crate) draining: AtomicBool,
    /// Still delivering to the handler (false after unsubscribe).
    pub(crate) active: AtomicBool,
    /// Nothing is held any more (the engine has shut down): in-progress acks end.
    pub(crate) finished: CancellationToken,
    held: Mutex<HashMap<u64, Held>>,
}

impl Sub {
    pub(crate) fn new(
        topic: &str,
        durable: String,
        handler: Handler,
        subject_keys: bool,
        dead_letter: Option<String>,
    ) -> Self {
        Self {
            topic: topic.to_owned(),
            topic_name: Arc::from(topic),
            durable,
            handler,
            subject_keys,
            dead_letter,
            stop: CancellationToken::new(),
            draining: AtomicBool::new(false),
            active: AtomicBool::new(true),
            finished: CancellationToken::new(),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// Stops fetching; `drain` (close) first takes what the open pull request brings, otherwise
    /// (unsubscribe) the handler gets nothing more and queued messages are given back.
    pub(crate) fn stop(&self, drain: bool) {
        if drain {
            self.draining.store(true, Ordering::SeqCst);
        } else {
            self.active.store(false, Ordering::SeqCst);
        }
        self.stop.cancel();
    }

    /// The engine is done with this subscription's messages.
    pub(crate) fn finish(&self) {
        self.finished.cancel();
    }

    pub(crate) fn held(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        // Nothing panics while holding this lock.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn class(&self) -> DeliveryClass {
        match self.handler {
            Handler::Plain(_) => DeliveryClass::AtMostOnce,
            Handler::Envelope(_) => DeliveryClass::AtLeastOnce,
        }
    }
}
