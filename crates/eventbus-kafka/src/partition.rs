//! One assigned partition: its commit tracker, the runtime consumers of its subscriptions, and
//! the task that hands its records to them in offset order.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::tracker::CommitTracker;
use eventbus_core::{Error, Message};
use eventbus_pool::consume::Consumer;
use eventbus_pool::transport::{Delivery, Receipt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One subscription's consumer of one assigned partition.
pub(crate) struct Reader {
    /// The subscription's ID within the bus.
    pub(crate) subscription: u64,
    pub(crate) consumer: Arc<Consumer>,
    /// Set when the subscription unsubscribes while others keep the topic: what it gives back
    /// is finished for it (nobody reads it for this subscription again).
    pub(crate) leaving: Arc<AtomicBool>,
    /// The subscription takes plain messages (at-most-once).
    pub(crate) plain: bool,
}

/// A partition assigned to this bus, for one assignment generation.
pub(crate) struct Assigned {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) generation: u64,
    pub(crate) tracker: Mutex<CommitTracker>,
    pub(crate) readers: Mutex<Vec<Arc<Reader>>>,
    /// Paused because too many of its records are unfinished.
    pub(crate) paused: AtomicBool,
    /// Revoked: its records go nowhere and its offsets are not committed any more.
    pub(crate) revoked: AtomicBool,
    /// One past the last offset taken; -1 before the first.
    next: AtomicI64,
    /// Records taken since the last [`flush`](Self::flush): the poll thread hands them to the
    /// dispatcher in one batch (one wake-up of its task, not one per record).
    pending: Mutex<Vec<Message>>,
    records: mpsc::UnboundedSender<Vec<Message>>,
    dispatcher: Mutex<Option<JoinHandle<()>>>,
}

impl Assigned {
    /// A partition with `readers`, its dispatcher running on `runtime`.
    pub(crate) fn start(
        topic: &str,
        partition: i32,
        generation: u64,
        readers: Vec<Arc<Reader>>,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let (records, receiver) = mpsc::unbounded_channel();
        let assigned = Arc::new(Self {
            topic: topic.to_owned(),
            partition,
            generation,
            tracker: Mutex::new(CommitTracker::new()),
            readers: Mutex::new(readers),
            paused: AtomicBool::new(false),
            revoked: AtomicBool::new(false),
            next: AtomicI64::new(-1),
            pending: Mutex::new(Vec::new()),
            records,
            dispatcher: Mutex::new(None),
        });
        let task = runtime.spawn(dispatch(Arc::downgrade(&assigned), receiver));
        *lock(&assigned.dispatcher) = Some(task);
        assigned
    }

    /// Takes a polled record: tracked, then kept for the dispatcher until the next
    /// [`flush`](Self::flush). Returns `false` for an offset at or below one already taken in
    /// this generation (not handed over twice).
    pub(crate) fn take(&self, offset: i64, message: Message) -> bool {
        if !lock(&self.tracker).dispatched(offset) {
            return false;
        }
        self.next.store(offset + 1, Ordering::SeqCst);
        lock(&self.pending).push(message);
        true
    }

    /// Hands the records taken since the last call to the dispatcher, in offset order. Records
    /// never flushed (the partition was revoked first) stay unfinished: the commit stays below
    /// them and the partition's next owner reads them.
    pub(crate) fn flush(&self) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        if !batch.is_empty() {
            // The dispatcher ends only when this partition is revoked.
            let _ = self.records.send(batch);
        }
    }

    /// Whether this is `partition` of `topic`.
    pub(crate) fn is(&self, topic: &str, partition: i32) -> bool {
        self.partition == partition && self.topic == topic
    }

    /// One past the last offset taken, if any was.
    pub(crate) fn next_offset(&self) -> Option<i64> {
        Some(self.next.load(Ordering::SeqCst)).filter(|next| *next >= 0)
    }

    /// Unfinished records.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.tracker).in_flight()
    }

    /// The offset to commit now (`None` before the first record or once revoked).
    pub(crate) fn committable(&self) -> Option<i64> {
        if self.revoked.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.tracker).committable()
    }

    /// The committable offset to ask the broker for, unless it confirmed it already or a
    /// request for it is unanswered (see [`CommitTracker::take_commit`]).
    pub(crate) fn take_commit(&self) -> Option<i64> {
        if self.revoked.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.tracker).take_commit()
    }

    /// The broker confirmed a commit of `offset`.
    pub(crate) fn commit_confirmed(&self, offset: i64) {
        lock(&self.tracker).commit_confirmed(offset);
    }

    /// A commit of `offset` failed: it is asked for again.
    pub(crate) fn commit_failed(&self, offset: i64) {
        lock(&self.tracker).commit_failed(offset);
    }

    /// The highest offset the broker confirmed as committed.
    pub(crate) fn confirmed(&self) -> Option<i64> {
        lock(&self.tracker).confirmed()
    }

    /// Stops the dispatcher: records not handed over yet stay unfinished.
    pub(crate) fn stop_dispatch(&self) {
        if let Some(task) = lock(&self.dispatcher).take() {
            task.abort();
        }
    }

    fn completed(&self, offset: i64) {
        lock(&self.tracker).completed(offset);
    }
}

/// Hands each record, in offset order, to every reader of the partition. A record no reader
/// took (all closing) stays unfinished, so the commit never passes it.
async fn dispatch(assigned: Weak<Assigned>, mut records: mpsc::UnboundedReceiver<Vec<Message>>) {
    // Reused for every record: the partition's readers when the record came.
    let mut readers: Vec<Arc<Reader>> = Vec::new();
    while let Some(batch) = records.recv().await {
        for message in batch {
            if !dispatch_one(&assigned, &mut readers, message).await {
                return;
            }
        }
    }
}

/// Hands one record to every reader of the partition (none once the partition is gone).
/// Returns `false` once the partition is gone.
async fn dispatch_one(
    assigned: &Weak<Assigned>,
    readers: &mut Vec<Arc<Reader>>,
    message: Message,
) -> bool {
    let Some(partition) = assigned.upgrade() else {
        return false;
    };
    let offset = match message.meta.position {
        eventbus_core::Position::Partition { offset, .. } => offset,
        _ => return true,
    };
    readers.extend(lock(&partition.readers).iter().cloned());
    let record = Arc::new(Record {
        offset,
        // The dispatcher's own hold, released below once every reader has it.
        remaining: AtomicUsize::new(1),
        partition: Arc::downgrade(&partition),
    });
    drop(partition);
    let mut taken = 0;
    // Every reader but the last gets a copy; the last one the record itself.
    let mut message = Some(message);
    let last = readers.len().saturating_sub(1);
    for (index, reader) in readers.drain(..).enumerate() {
        let message = if index == last {
            message.take()
        } else {
            message.clone()
        };
        let Some(message) = message else {
            break;
        };
        record.remaining.fetch_add(1, Ordering::SeqCst);
        let receipt = Arc::new(KafkaReceipt {
            record: record.clone(),
            leaving: reader.leaving.clone(),
            plain: reader.plain,
        });
        let delivery = Delivery {
            message,
            receipt,
            held_id: None,
        };
        match reader.consumer.deliver(delivery).await {
            Ok(_) => taken += 1,
            Err(error) => {
                // Closing: the record is not this reader's any more.
                record.remaining.fetch_sub(1, Ordering::SeqCst);
                // Finished for a subscription that left for good, and for a plain one
                // (dropped: at-most-once, see `KafkaReceipt::give_back`).
                if reader.plain || reader.leaving.load(Ordering::SeqCst) {
                    taken += 1;
                } else {
                    tracing::debug!(%error, offset, "record not taken by a closing reader");
                }
            }
        }
    }
    if taken > 0 {
        record.finish_one();
    }
    true
}

/// One record handed to one or more readers; finished when every reader has finished it.
struct Record {
    offset: i64,
    remaining: AtomicUsize,
    partition: Weak<Assigned>,
}

impl Record {
    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(partition) = self.partition.upgrade()
        {
            partition.completed(self.offset);
        }
    }
}

/// How the runtime settles a Kafka record: finishing it lets the commit pass it.
struct KafkaReceipt {
    record: Arc<Record>,
    leaving: Arc<AtomicBool>,
    plain: bool,
}

#[eventbus_core::async_trait]
impl Receipt for KafkaReceipt {
    async fn ack(&self) -> Result<(), Error> {
        self.record.finish_one();
        Ok(())
    }

    /// An envelope is not finished: the commit stays below it and the partition's next owner
    /// (or this bus after a restart) reads it again. A plain message is finished unhandled
    /// (dropped): a commit can only stop at an offset, so reading it again would run every later
    /// record of the partition again too, and plain messages are at-most-once. A subscription
    /// that unsubscribed while others keep the topic is done with it either way.
    async fn give_back(&self) -> Result<(), Error> {
        if self.plain || self.leaving.load(Ordering::SeqCst) {
            self.record.finish_one();
        }
        Ok(())
    }

    /// Its dead letter is written (acknowledged by the broker): finished.
    async fn terminate(&self) -> Result<(), Error> {
        self.record.finish_one();
        Ok(())
    }
}
