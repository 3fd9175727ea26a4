//! The pool: lanes per routing key served by a fixed set of actors.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use eventbus_core::{AggregateId, CancellationToken, DeliveryClass, Error, HandlerError, Outcome};
use futures::FutureExt;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::WaitForCancellationFutureOwned;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::PoolConfig;
use crate::job::{Job, JobContext, JobHandle};
use crate::lane::{LaneId, Lanes};
use crate::metrics::PoolMetrics;

/// The ordering engine.
///
/// Jobs with the same key run one at a time, in submission order, retries included; jobs with
/// different keys never wait for each other except for a free actor. See the crate docs.
pub struct Pool {
    shared: Arc<Shared>,
}

/// A snapshot of the pool's counters (exact, taken under its lock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Jobs waiting in lanes or in the unkeyed queue (bounded by the capacity).
    pub queued: usize,
    /// Jobs whose handler is running now.
    pub running: usize,
    /// Jobs between a failed attempt and their next attempt.
    pub retrying: usize,
    /// Lanes alive (keys with queued, running or retrying jobs).
    pub lanes: usize,
}

impl std::fmt::Display for PoolStats {
    /// `3 queued, 2 running, 0 retrying, 4 lanes`: the engine's line in health reports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} queued, {} running, {} retrying, {} lanes",
            self.queued, self.running, self.retrying, self.lanes
        )
    }
}

/// What [`Pool::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every job settled before the drain deadline.
    pub drained: bool,
    /// Jobs settled as [`Outcome::Cancelled`] at the deadline.
    pub cancelled: usize,
}

struct Shared {
    config: PoolConfig,
    capacity: usize,
    state: Mutex<State>,
    /// Ready work was added.
    work: Notify,
    /// A queued job left the pool's queues while a submitter was waiting for room.
    space: Notify,
    /// The pool has no job left.
    drained: Notify,
    /// Actors stop waiting for work (shutdown).
    stop: CancellationToken,
    /// Running attempts are dropped (drain deadline passed, or the pool was dropped). Shared
    /// behind an `Arc` with the jobs' contexts: cloning the token itself takes a lock.
    cancel: Arc<CancellationToken>,
    tasks: TaskTracker,
    metrics: PoolMetrics,
}

#[derive(Default)]
struct State {
    lanes: Lanes<Entry>,
    /// Jobs not started yet, in arrival order, with their lane (none for unkeyed jobs).
    arrivals: VecDeque<(Option<LaneId>, Entry)>,
    /// Work that comes before the arrivals: lanes whose parked or retried job may start, and
    /// unkeyed jobs back from a retry backoff.
    ready: VecDeque<Ready>,
    queued: usize,
    running: usize,
    retrying: usize,
    /// Submitters waiting for room (only then is `space` notified).
    waiting: usize,
    /// Actors waiting for work.
    sleeping: usize,
    /// A wake-up is on its way to a sleeping actor.
    waking: bool,
    closed: bool,
    cancelled: bool,
}

/// Work ready for an actor ahead of the arrivals.
enum Ready {
    /// The lane's next job: its retry first, then its oldest parked job.
    Lane(LaneId),
    /// An unkeyed job back from its retry backoff.
    Retry(Entry),
}

struct Entry {
    job: Job,
    attempts: u32,
    panics: u32,
    settle: oneshot::Sender<Outcome>,
}

impl Entry {
    /// An entry for `job` and the handle its submitter awaits (made outside the lock).
    fn new(job: Job) -> (Self, JobHandle) {
        let (settle, outcome) = oneshot::channel();
        let entry = Entry {
            job,
            attempts: 0,
            panics: 0,
            settle,
        };
        (entry, JobHandle { outcome })
    }
}

/// Why a job could not be queued right now.
enum Blocked {
    Closed,
    /// The lane or the pool (named) is full.
    Full(&'static str),
}

/// Counts a submitter as waiting for room while it exists (also when its future is dropped).
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// A job an actor takes: its lane (none for unkeyed jobs) and its entry.
type Next = (Option<LaneId>, Entry);

/// Where a settling job comes from.
#[derive(Clone, Copy)]
enum Stage {
    Running,
    Retrying,
}

/// How one attempt ended.
enum Attempt {
    Succeeded,
    Failed(HandlerError),
    Panicked(String),
    Cancelled,
}

impl State {
    fn pending(&self) -> usize {
        self.queued + self.running + self.retrying
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            queued: self.queued,
            running: self.running,
            retrying: self.retrying,
            lanes: self.lanes.len(),
        }
    }
}

impl Pool {
    /// Starts a pool of `config.pool_size` actors on the current tokio runtime.
    ///
    /// Install a `metrics` recorder before this call if the pool's metrics should be recorded.
    pub fn new(config: PoolConfig) -> Result<Self, Error> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("runtime", "a Pool must be created inside a tokio runtime")
        })?;
        let shared = Arc::new(Shared {
            capacity: config.capacity(),
            metrics: PoolMetrics::new(&config.metrics_namespace),
            config,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            space: Notify::new(),
            drained: Notify::new(),
            stop: CancellationToken::new(),
            cancel: Arc::new(CancellationToken::new()),
            tasks: TaskTracker::new(),
        });
        for actor in 0..shared.config.pool_size {
            let span = tracing::debug_span!("actor", actor);
            shared
                .tasks
                .spawn_on(actor_loop(shared.clone()).instrument(span), &runtime);
        }
        Ok(Self { shared })
    }

    /// Submits a job, waiting while its lane or the pool is full.
    ///
    /// Fails with [`Error::Closed`] once shutdown has begun.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the returned future is dropped before it completes, the job was not
    /// submitted (it is dropped with the future) and nothing of it stays in the pool.
    pub async fn submit(&self, job: Job) -> Result<JobHandle, Error> {
        let shared = &*self.shared;
        let (mut entry, handle) = Entry::new(job);
        loop {
            let notified = shared.space.notified();
            tokio::pin!(notified);
            let waiting = {
                let mut state = shared.lock();
                match shared.enqueue(&mut state, entry) {
                    Ok(()) => return Ok(handle),
                    Err((Blocked::Closed, _)) => return Err(Error::Closed),
                    Err((Blocked::Full(_), returned)) => entry = returned,
                }
                // Registered for the wake-up before the lock is released, so none is missed.
                notified.as_mut().enable();
                state.waiting += 1;
                Waiting(shared)
            };
            notified.await;
            drop(waiting);
        }
    }

    /// Submits a job if its lane and the pool have room, without waiting.
    ///
    /// Fails with [`Error::Full`] (`what` is `lane` or `pool`) or [`Error::Closed`]; the job is
    /// dropped then.
    pub fn try_submit(&self, job: Job) -> Result<JobHandle, Error> {
        let (entry, handle) = Entry::new(job);
        let mut state = self.shared.lock();
        match self.shared.enqueue(&mut state, entry) {
            Ok(()) => Ok(handle),
            Err((Blocked::Closed, _)) => Err(Error::Closed),
            Err((Blocked::Full(what), _)) => Err(Error::Full { what }),
        }
    }

    /// Exact counters, taken under the pool's lock.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats()
    }

    /// Tasks of this pool still alive (actors and retry timers).
    pub fn live_tasks(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Counts a dead-lettered message in `actor_pool_dead_letters_total` (the backends write
    /// dead letters; the pool counts them with its other metrics).
    pub fn record_dead_letter(&self) {
        self.shared.metrics.dead_letters.increment(1);
    }

    /// Stops intake, lets queued, running and retrying jobs finish until `drain` has passed,
    /// then cancels the rest (they settle as [`Outcome::Cancelled`]). Returns when no task of the
    /// pool is left. Calling it again only waits for that.
    ///
    /// # Cancel safety
    ///
    /// Intake stops at the first poll. If the future is dropped during the drain, the pool keeps
    /// draining; dropping the `Pool` then cancels what is left.
    pub async fn shutdown(&self, drain: Duration) -> ShutdownReport {
        let shared = &self.shared;
        {
            let mut state = shared.lock();
            state.closed = true;
            // Submitters waiting for room learn that the pool is closed.
            shared.space.notify_waiters();
        }
        let drained = async {
            loop {
                let notified = shared.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if shared.lock().pending() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let drained = tokio::time::timeout(drain, drained).await.is_ok();
        let cancelled = if drained { 0 } else { shared.cancel_all() };
        shared.stop.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
        tracing::debug!(drained, cancelled, "pool shut down");
        ShutdownReport { drained, cancelled }
    }
}

impl Drop for Pool {
    /// Dropping the pool cancels everything still in it (settled as [`Outcome::Cancelled`])
    /// and lets its tasks end on their own; use [`Pool::shutdown`] to drain first and wait.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.cancel_all();
        self.shared.stop.cancel();
        self.shared.tasks.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Handlers never run under the lock, so a poisoned lock still holds consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_gauges(&self, state: &State) {
        self.metrics.depth.set(state.queued as f64);
        self.metrics
            .utilization
            .set(state.queued as f64 / self.capacity as f64);
        self.metrics.lanes.set(state.lanes.len() as f64);
        self.metrics.in_flight.set(state.running as f64);
    }

    /// Queues `entry`, or says why it cannot be queued now (and gives it back).
    fn enqueue(&self, state: &mut State, entry: Entry) -> Result<(), (Blocked, Entry)> {
        if state.closed {
            return Err((Blocked::Closed, entry));
        }
        if state.queued >= self.capacity {
            return Err((Blocked::Full("pool"), entry));
        }
        let lane = match &entry.job.key {
            None => None,
            Some(key) => {
                // A full lane exists already, so this never creates a lane it then refuses.
                let (id, lane) = state.lanes.get_or_insert(key);
                if lane.queued >= self.config.inbox_size {
                    return Err((Blocked::Full("lane"), entry));
                }
                lane.queued += 1;
                Some(id)
            }
        };
        state.arrivals.push_back((lane, entry));
        state.queued += 1;
        self.wake_one(state);
        self.metrics.sent.increment(1);
        self.publish_gauges(state);
        Ok(())
    }

    /// Adds ready work and makes sure an actor will look for it.
    fn make_ready(&self, state: &mut State, ready: Ready) {
        state.ready.push_back(ready);
        self.wake_one(state);
    }

    /// Wakes one sleeping actor unless a wake-up is already on its way. The woken actor wakes the
    /// next one if work is left, so a burst wakes actors one after the other, not once per job.
    fn wake_one(&self, state: &mut State) {
        if state.sleeping > 0 && !state.waking {
            state.waking = true;
            self.work.notify_one();
        }
    }

    /// Takes the next job to run, marking its lane busy: ready lanes and retries first, then the
    /// oldest arrival whose key is free (arrivals whose key is busy are parked in their lane).
    fn take_ready(&self, state: &mut State) -> Option<Next> {
        let taken = self
            .take_from_ready(state)
            .or_else(|| self.take_arrival(state))?;
        state.running += 1;
        if !state.ready.is_empty() || !state.arrivals.is_empty() {
            self.wake_one(state);
        }
        self.publish_gauges(state);
        Some(taken)
    }

    fn take_from_ready(&self, state: &mut State) -> Option<Next> {
        while let Some(ready) = state.ready.pop_front() {
            let id = match ready {
                Ready::Retry(entry) => {
                    state.retrying -= 1;
                    return Some((None, entry));
                }
                Ready::Lane(id) => id,
            };
            let Some(lane) = state.lanes.get_mut(id) else {
                continue;
            };
            lane.in_ready = false;
            if let Some(entry) = lane.retry.take() {
                lane.busy = true;
                state.retrying -= 1;
                return Some((Some(id), entry));
            }
            if let Some(entry) = lane.parked.pop_front() {
                lane.busy = true;
                lane.queued -= 1;
                state.queued -= 1;
                self.room_freed(state);
                return Some((Some(id), entry));
            }
        }
        None
    }

    fn take_arrival(&self, state: &mut State) -> Option<Next> {
        while let Some((lane, entry)) = state.arrivals.pop_front() {
            if let Some(id) = lane {
                let Some(lane) = state.lanes.get_mut(id) else {
                    continue;
                };
                if lane.must_park() {
                    lane.parked.push_back(entry);
                    continue;
                }
                lane.busy = true;
                lane.queued -= 1;
            }
            state.queued -= 1;
            self.room_freed(state);
            return Some((lane, entry));
        }
        None
    }

    /// A queued job left the queues: wake the submitters waiting for room, if any.
    fn room_freed(&self, state: &State) {
        if state.waiting > 0 {
            self.space.notify_waiters();
        }
    }

    /// Lane `id` is free again: schedule its parked or retried job, or drop the lane when it is
    /// idle. (Jobs of the key still among the arrivals run when they reach the head.)
    fn release_lane(&self, state: &mut State, id: LaneId) {
        let Some(lane) = state.lanes.get_mut(id) else {
            return;
        };
        lane.busy = false;
        if lane.retry.is_some() || !lane.parked.is_empty() {
            lane.in_ready = true;
            self.make_ready(state, Ready::Lane(id));
        } else if lane.is_idle() {
            state.lanes.remove(id);
        }
    }

    /// Settles a job for good. An actor settling its job asks for the next one in the same
    /// critical section (`take_next`).
    fn settle(
        &self,
        lane: Option<LaneId>,
        entry: Entry,
        outcome: Outcome,
        from: Stage,
        take_next: bool,
    ) -> Option<Next> {
        let mut state = self.lock();
        match from {
            Stage::Running => state.running -= 1,
            Stage::Retrying => state.retrying -= 1,
        }
        if let Some(id) = lane {
            self.release_lane(&mut state, id);
        }
        let next = if take_next && !state.cancelled {
            self.take_ready(&mut state)
        } else {
            None
        };
        self.publish_gauges(&state);
        let idle = state.pending() == 0;
        drop(state);
        if idle {
            self.drained.notify_waiters();
        }
        match &outcome {
            Outcome::Succeeded { .. } => self.metrics.succeeded.increment(1),
            Outcome::Cancelled { .. } => {}
            _ => self.metrics.failed.increment(1),
        }
        // The submitter may have dropped its handle; the outcome is then not wanted.
        let _ = entry.settle.send(outcome);
        next
    }

    /// Cancels every job not running: queued, waiting for a retry, or ready. Running attempts
    /// are dropped by their actors when `cancel` fires, and retry timers settle their own jobs.
    /// Returns how many were cancelled here.
    fn cancel_all(&self) -> usize {
        let mut state = self.lock();
        if state.cancelled {
            return 0;
        }
        state.cancelled = true;
        let mut entries: Vec<Entry> = state.arrivals.drain(..).map(|(_, entry)| entry).collect();
        for ready in state.ready.drain(..) {
            if let Ready::Retry(entry) = ready {
                entries.push(entry);
            }
        }
        for lane in state.lanes.drain() {
            entries.extend(lane.parked);
            entries.extend(lane.retry);
        }
        // Queued entries never ran; the others came back from a retry backoff.
        let retried = entries.iter().filter(|entry| entry.attempts > 0).count();
        state.retrying -= retried;
        state.queued = 0;
        self.publish_gauges(&state);
        let idle = state.pending() == 0;
        drop(state);
        self.cancel.cancel();
        let cancelled = entries.len();
        for entry in entries {
            let attempts = entry.attempts;
            let _ = entry.settle.send(Outcome::Cancelled { attempts });
        }
        if idle {
            self.drained.notify_waiters();
        }
        cancelled
    }

    /// Puts a job back in line after its retry backoff.
    fn requeue(&self, lane: Option<LaneId>, entry: Entry) {
        let mut state = self.lock();
        if state.cancelled {
            drop(state);
            let attempts = entry.attempts;
            let outcome = Outcome::Cancelled { attempts };
            self.settle(lane, entry, outcome, Stage::Retrying, false);
            return;
        }
        match lane {
            None => self.make_ready(&mut state, Ready::Retry(entry)),
            Some(id) => {
                // The lane stays while its job waits for a retry; only a cancel removes it, and
                // that case was handled above.
                if let Some(lane) = state.lanes.get_mut(id) {
                    lane.retry = Some(entry);
                    lane.busy = false;
                    lane.in_ready = true;
                    self.make_ready(&mut state, Ready::Lane(id));
                }
            }
        }
    }

    /// Runs one attempt of `entry`, settles it or schedules its retry, and returns the next job
    /// for this actor. `cancelled` is the actor's own registration on the cancel token, kept for
    /// its whole life rather than made per job.
    async fn run(
        self: &Arc<Self>,
        lane: Option<LaneId>,
        mut entry: Entry,
        mut cancelled: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Option<Next> {
        entry.attempts += 1;
        let attempt = entry.attempts;
        let ctx = JobContext {
            attempt,
            cancellation: self.cancel.clone(),
        };
        let started = Instant::now();
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| (entry.job.run)(ctx))) {
            Err(panic) => Attempt::Panicked(panic_message(panic.as_ref())),
            Ok(future) => {
                tokio::select! {
                    biased;
                    () = cancelled.as_mut() => Attempt::Cancelled,
                    result = AssertUnwindSafe(future).catch_unwind() => match result {
                        Ok(Ok(())) => Attempt::Succeeded,
                        Ok(Err(error)) => Attempt::Failed(error),
                        Err(panic) => Attempt::Panicked(panic_message(panic.as_ref())),
                    },
                }
            }
        };
        self.metrics.latency.record(started.elapsed().as_secs_f64());

        let class = entry.job.class;
        let may_retry =
            class == DeliveryClass::AtLeastOnce && attempt < self.config.retry.max_attempts;
        let outcome = match result {
            Attempt::Succeeded => Outcome::Succeeded { attempts: attempt },
            Attempt::Cancelled => Outcome::Cancelled { attempts: attempt },
            Attempt::Failed(error) if error.is_permanent() || !may_retry => {
                tracing::warn!(attempts = attempt, %error, permanent = error.is_permanent(), "job failed");
                Outcome::Failed {
                    attempts: attempt,
                    error,
                }
            }
            Attempt::Failed(error) => {
                tracing::debug!(attempt, %error, "attempt failed; retrying in its lane");
                return self.retry_later(lane, entry);
            }
            Attempt::Panicked(message) => {
                entry.panics += 1;
                self.metrics.restarted.increment(1);
                if may_retry && entry.panics < self.config.max_restarts {
                    tracing::warn!(attempt, panic = %message, "handler panicked; retrying in its lane");
                    return self.retry_later(lane, entry);
                }
                tracing::error!(attempts = attempt, panics = entry.panics, panic = %message, "handler panicked; not run again");
                Outcome::Panicked {
                    attempts: attempt,
                    panics: entry.panics,
                    message,
                }
            }
        };
        if let Some(finish) = entry.job.finish.take()
            && !matches!(outcome, Outcome::Cancelled { .. })
        {
            finish_job(finish, &outcome, cancelled).await;
        }
        self.settle(lane, entry, outcome, Stage::Running, true)
    }

    /// Frees the actor and schedules the next attempt after the backoff; the lane stays busy.
    /// Returns the next job for this actor.
    fn retry_later(self: &Arc<Self>, lane: Option<LaneId>, entry: Entry) -> Option<Next> {
        self.metrics.retries.increment(1);
        // The job counts as retrying before its timer exists, so the timer can never requeue a
        // job the counters do not know about.
        let next = {
            let mut state = self.lock();
            state.running -= 1;
            state.retrying += 1;
            let next = if state.cancelled {
                None
            } else {
                self.take_ready(&mut state)
            };
            self.publish_gauges(&state);
            next
        };
        let delay = self.config.retry.backoff(entry.attempts);
        let shared = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared.cancel.cancelled() => {}
            }
            shared.requeue(lane, entry);
        });
        next
    }

    /// Waits until there is a job for this actor, or `None` when the actor should end.
    async fn wait_for_work(&self) -> Option<Next> {
        let mut slept = false;
        loop {
            // Registered before the state is read, so work made ready meanwhile wakes us; dropped
            // when work is found, so a wake-up meant for a sleeping actor is passed on.
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if slept {
                    state.sleeping -= 1;
                    state.waking = false;
                }
                if state.cancelled {
                    return None;
                }
                if let Some(next) = self.take_ready(&mut state) {
                    return Some(next);
                }
                if state.closed && state.pending() == 0 {
                    return None;
                }
                state.sleeping += 1;
            }
            slept = true;
            tokio::select! {
                () = &mut notified => {}
                () = self.stop.cancelled() => {}
            }
        }
    }
}

/// Runs a job's finishing step while its lane is still held, until it ends or the pool cancels.
async fn finish_job(
    finish: crate::job::Finish,
    outcome: &Outcome,
    cancelled: Pin<&mut WaitForCancellationFutureOwned>,
) {
    let future = match std::panic::catch_unwind(AssertUnwindSafe(|| finish(outcome))) {
        Ok(future) => future,
        Err(panic) => {
            tracing::error!(panic = %panic_message(panic.as_ref()), "finishing step panicked");
            return;
        }
    };
    tokio::select! {
        biased;
        () = cancelled => tracing::debug!("finishing step dropped at the drain deadline"),
        result = AssertUnwindSafe(future).catch_unwind() => {
            if let Err(panic) = result {
                tracing::error!(panic = %panic_message(panic.as_ref()), "finishing step panicked");
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// One actor: runs jobs until the pool stops.
async fn actor_loop(shared: Arc<Shared>) {
    let cancelled = CancellationToken::clone(&shared.cancel).cancelled_owned();
    tokio::pin!(cancelled);
    let mut next = None;
    loop {
        let (lane, entry) = match next.take() {
            Some(job) => job,
            None => match shared.wait_for_work().await {
                Some(job) => job,
                None => return,
            },
        };
        let span = tracing::debug_span!(
            "job",
            key = entry.job.key.as_ref().map(AggregateId::as_str),
            attempt = entry.attempts + 1
        );
        next = shared
            .run(lane, entry, cancelled.as_mut())
            .instrument(span)
            .await;
    }
}
