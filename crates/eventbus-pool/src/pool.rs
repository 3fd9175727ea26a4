//! The pool: lanes per routing key served by a fixed set of actors.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::scope::{Scope, ScopeReport, ScopeState, UNSCOPED};

tokio::task_local! {
    /// The pool whose actor runs the current task (its `Shared` address), so that a job
    /// submitted from inside one of the pool's own jobs is recognised.
    static ACTOR_OF: usize;
}

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
    /// Jobs retrying past `max_attempts` ([`Job::with_unlimited_attempts`]): aggregates that
    /// wait on a message with nowhere to go.
    pub stalled: usize,
}

impl std::fmt::Display for PoolStats {
    /// `3 queued, 2 running, 0 retrying, 4 lanes, 0 stalled`: the engine's line in health
    /// reports.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} queued, {} running, {} retrying, {} lanes, {} stalled",
            self.queued, self.running, self.retrying, self.lanes, self.stalled
        )
    }
}

/// How long the aggregates' current jobs have been going: [`Pool::lane_ages`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneAges {
    /// The age of the oldest job running, retrying or finishing in a lane (since its first
    /// attempt started); `None` when no lane has one.
    pub oldest: Option<Duration>,
    /// Lanes whose current job has been going for longer than the threshold asked for: blocked
    /// aggregates (a hung handler, a message retried past its attempts, a dead letter that
    /// cannot be written).
    pub blocked: usize,
}

/// What [`Pool::shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every job settled before the drain deadline.
    pub drained: bool,
    /// Jobs settled as [`Outcome::Cancelled`] after the deadline: running, retrying and queued.
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
    /// Jobs settled as cancelled so far.
    cancelled_jobs: std::sync::atomic::AtomicUsize,
    /// Where hand-back tasks are spawned (also from `Drop`).
    runtime: tokio::runtime::Handle,
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
    /// Cancelled jobs whose finishing steps a hand-back task is running.
    settling: usize,
    /// Jobs retrying past `max_attempts`.
    stalled: usize,
    /// Open scopes and scopes closing.
    scopes: HashMap<u64, ScopeState, foldhash::fast::RandomState>,
    next_scope: u64,
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
    /// Counted in `State::stalled`.
    stalled: bool,
    /// The submitter's handle, when it asked for one.
    settle: Option<oneshot::Sender<Outcome>>,
}

impl Entry {
    /// An entry for `job` and the handle its submitter awaits (made outside the lock).
    fn new(job: Job) -> (Self, JobHandle) {
        let (settle, outcome) = oneshot::channel();
        let mut entry = Entry::detached(job);
        entry.settle = Some(settle);
        (entry, JobHandle { outcome })
    }

    /// An entry whose outcome nobody awaits (its finishing step is what settles it).
    fn detached(job: Job) -> Self {
        Entry {
            job,
            attempts: 0,
            panics: 0,
            stalled: false,
            settle: None,
        }
    }

    /// Tells the submitter, if it waits, how the job ended.
    fn report(&mut self, outcome: Outcome) {
        if let Some(settle) = self.settle.take() {
            // The submitter may have dropped its handle; the outcome is then not wanted.
            let _ = settle.send(outcome);
        }
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

/// A job an actor takes: its lane (none for unkeyed jobs), its entry, and when it was taken
/// (one clock reading serves as the lane's `since` and as the attempt's start).
type Next = (Option<LaneId>, Entry, Instant);

/// How one attempt ended.
enum Attempt {
    Succeeded,
    Failed(HandlerError),
    Panicked(String),
    Cancelled,
}

impl State {
    fn pending(&self) -> usize {
        self.queued + self.running + self.retrying + self.settling
    }

    fn stats(&self) -> PoolStats {
        PoolStats {
            queued: self.queued,
            running: self.running,
            retrying: self.retrying,
            lanes: self.lanes.len(),
            stalled: self.stalled,
        }
    }

    /// True when jobs of `scope` must be handed back instead of started.
    fn hands_back(&self, scope: u64) -> bool {
        self.cancelled
            || (scope != UNSCOPED && self.scopes.get(&scope).is_none_or(|state| state.closed))
    }

    /// A job of `scope` left the pool for good. True when that emptied a closing scope (which
    /// is then forgotten), so its closer must be woken.
    fn scope_done(&mut self, scope: u64) -> bool {
        if scope == UNSCOPED {
            return false;
        }
        let Some(state) = self.scopes.get_mut(&scope) else {
            return false;
        };
        state.pending -= 1;
        if state.pending == 0 && state.closed {
            self.scopes.remove(&scope);
            return true;
        }
        false
    }

    /// Forgets a settling entry's marks; true when a closing scope emptied.
    fn forget(&mut self, entry: &Entry) -> bool {
        if entry.stalled {
            self.stalled -= 1;
        }
        self.scope_done(entry.job.scope_id())
    }

    /// Takes out every job not started yet of the scopes `filter` accepts (all when `None`),
    /// in lane order, for handing back: the queued jobs and retries of idle lanes, and unkeyed
    /// ones. A busy lane keeps its queued jobs until its running job settles (they are handed
    /// back then, after it, so a lane's jobs are given back in order).
    fn take_for_hand_back(&mut self, filter: Option<u64>) -> Vec<Entry> {
        let matches = |scope: u64| filter.is_none_or(|wanted| wanted == scope);
        let mut taken = Vec::new();
        for (lane, entry) in std::mem::take(&mut self.arrivals) {
            if !matches(entry.job.scope_id()) {
                self.arrivals.push_back((lane, entry));
                continue;
            }
            match lane.and_then(|id| self.lanes.get_mut(id)) {
                // Behind the lane's parked jobs, which are older.
                Some(lane) => lane.parked.push_back(entry),
                None => {
                    self.queued -= 1;
                    taken.push(entry);
                }
            }
        }
        let mut removed = HashSet::new();
        for id in self.lanes.ids(filter) {
            let Some(lane) = self.lanes.get_mut(id) else {
                continue;
            };
            if lane.busy {
                continue;
            }
            if let Some(entry) = lane.retry.take() {
                self.retrying -= 1;
                taken.push(entry);
            }
            let parked = lane.parked.len();
            taken.extend(lane.parked.drain(..));
            lane.queued -= parked;
            self.queued -= parked;
            self.lanes.remove(id);
            removed.insert(id);
        }
        let mut ready = VecDeque::with_capacity(self.ready.len());
        for item in std::mem::take(&mut self.ready) {
            match item {
                Ready::Lane(id) if removed.contains(&id) => {}
                Ready::Retry(entry) if matches(entry.job.scope_id()) => {
                    self.retrying -= 1;
                    taken.push(entry);
                }
                other => ready.push_back(other),
            }
        }
        self.ready = ready;
        self.settling += taken.len();
        taken
    }
}

impl Pool {
    /// Starts a pool of `config.pool_size` actors on the current tokio runtime, its metrics
    /// under the namespace `eventbus`.
    ///
    /// Install a `metrics` recorder before this call if the pool's metrics should be recorded.
    pub fn new(config: PoolConfig) -> Result<Self, Error> {
        Self::with_metrics_namespace(config, "eventbus")
    }

    /// Like [`new`](Self::new), with metric names under `{namespace}_actor_pool_` (a bus's
    /// namespace comes from `eventbus_core::metric_namespace`). Fails with a `Config` error
    /// naming `metrics_namespace` when it is not a Prometheus name prefix.
    pub fn with_metrics_namespace(config: PoolConfig, namespace: &str) -> Result<Self, Error> {
        config.validate()?;
        crate::config::validate_namespace(namespace)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::config("runtime", "a Pool must be created inside a tokio runtime")
        })?;
        let shared = Arc::new(Shared {
            runtime: runtime.clone(),
            cancelled_jobs: std::sync::atomic::AtomicUsize::new(0),
            capacity: config.capacity(),
            metrics: PoolMetrics::new(namespace),
            config,
            state: Mutex::new(State::default()),
            work: Notify::new(),
            space: Notify::new(),
            drained: Notify::new(),
            stop: CancellationToken::new(),
            cancel: Arc::new(CancellationToken::new()),
            tasks: TaskTracker::new(),
        });
        let identity = Arc::as_ptr(&shared) as usize;
        for actor in 0..shared.config.pool_size {
            let span = tracing::debug_span!("actor", actor);
            shared.tasks.spawn_on(
                ACTOR_OF.scope(identity, actor_loop(shared.clone()).instrument(span)),
                &runtime,
            );
        }
        Ok(Self { shared })
    }

    /// Submits a job, waiting while its lane or the pool is full.
    ///
    /// A job submitted from inside one of this pool's own jobs (a handler that publishes on its
    /// own in-process bus) never waits: it is queued over the bounds, since the actor it would
    /// wait for may be the one running it. Work spawned onto other tasks is not recognised.
    ///
    /// Fails with [`Error::Closed`] once shutdown has begun, or when the job's scope is closed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if the returned future is dropped before it completes, the job was not
    /// submitted (it is dropped with the future) and nothing of it stays in the pool.
    pub async fn submit(&self, job: Job) -> Result<JobHandle, Error> {
        self.submit_until(job, std::future::pending()).await
    }

    /// Like [`submit`](Self::submit), but once `overflow` completes the job stops waiting for
    /// room and is queued over the bounds. A transport that stops a subscription uses it: the
    /// messages it already took (at most one fetch) join their lanes at once, so that the
    /// subscription's close gives them back in lane order instead of waiting for room that only
    /// the close itself would make.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`submit`](Self::submit).
    pub async fn submit_until(
        &self,
        job: Job,
        overflow: impl std::future::Future<Output = ()>,
    ) -> Result<JobHandle, Error> {
        let (entry, handle) = Entry::new(job);
        self.queue(entry, overflow).await?;
        Ok(handle)
    }

    /// Like [`submit_until`](Self::submit_until) for a job whose outcome only its finishing
    /// step needs (the consume runtime's): no handle, so no channel is made for it.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`submit`](Self::submit) (tested through `Consumer::deliver`, which
    /// submits this way: `a_dropped_delivery_leaves_nothing_held`).
    pub(crate) async fn submit_detached_until(
        &self,
        job: Job,
        overflow: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        self.queue(Entry::detached(job), overflow).await
    }

    /// Queues `entry`, waiting for room until `overflow` completes (then over the bounds).
    async fn queue(
        &self,
        mut entry: Entry,
        overflow: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        let shared = &*self.shared;
        let mut bounded = !self.runs_current_task();
        // Most submissions find room at once: no wake-up registration for them.
        match shared.enqueue(&mut shared.lock(), entry, bounded) {
            Ok(()) => return Ok(()),
            Err((Blocked::Closed, _)) => return Err(Error::Closed),
            Err((Blocked::Full(_), returned)) => entry = returned,
        }
        tokio::pin!(overflow);
        loop {
            let notified = shared.space.notified();
            tokio::pin!(notified);
            let waiting = {
                let mut state = shared.lock();
                match shared.enqueue(&mut state, entry, bounded) {
                    Ok(()) => return Ok(()),
                    Err((Blocked::Closed, _)) => return Err(Error::Closed),
                    Err((Blocked::Full(_), returned)) => entry = returned,
                }
                // Registered for the wake-up before the lock is released, so none is missed.
                notified.as_mut().enable();
                state.waiting += 1;
                Waiting(shared)
            };
            tokio::select! {
                () = &mut notified => {}
                () = &mut overflow, if bounded => bounded = false,
            }
            drop(waiting);
        }
    }

    /// True when the current task is one of this pool's actors: the caller is one of its own
    /// jobs, which must not wait for room the pool itself would have to make.
    pub(crate) fn runs_current_task(&self) -> bool {
        let identity = Arc::as_ptr(&self.shared) as usize;
        ACTOR_OF
            .try_with(|actor_of| *actor_of == identity)
            .unwrap_or(false)
    }

    /// Submits a job if its lane and the pool have room, without waiting.
    ///
    /// Fails with [`Error::Full`] (`what` is `lane` or `pool`) or [`Error::Closed`]; the job is
    /// dropped then.
    pub fn try_submit(&self, job: Job) -> Result<JobHandle, Error> {
        let (entry, handle) = Entry::new(job);
        let mut state = self.shared.lock();
        match self.shared.enqueue(&mut state, entry, true) {
            Ok(()) => Ok(handle),
            Err((Blocked::Closed, _)) => Err(Error::Closed),
            Err((Blocked::Full(what), _)) => Err(Error::Full { what }),
        }
    }

    /// Exact counters, taken under the pool's lock.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats()
    }

    /// How long the keyed jobs in progress have been going, and how many lanes have had theirs
    /// for longer than `blocked_after`. Visits every lane under the pool's lock: for a monitor
    /// that samples it now and then, not for every job.
    pub fn lane_ages(&self, blocked_after: Duration) -> LaneAges {
        let now = std::time::Instant::now();
        let state = self.shared.lock();
        let mut ages = LaneAges::default();
        for since in state.lanes.iter().filter_map(|lane| lane.since) {
            let age = now.saturating_duration_since(since);
            ages.oldest = ages.oldest.max(Some(age));
            if age > blocked_after {
                ages.blocked += 1;
            }
        }
        ages
    }

    /// Tasks of this pool still alive (actors and retry timers).
    pub fn live_tasks(&self) -> usize {
        self.shared.tasks.len()
    }

    /// Opens a scope: a group of lanes that jobs join with [`Job::in_scope`] and that
    /// [`close_scope`](Self::close_scope) closes. Fails with [`Error::Closed`] once shutdown has
    /// begun.
    pub fn open_scope(&self) -> Result<Scope, Error> {
        let mut state = self.shared.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        state.next_scope += 1;
        let id = state.next_scope;
        state.scopes.insert(
            id,
            ScopeState {
                pending: 0,
                closed: false,
            },
        );
        Ok(Scope {
            id,
            cancel: Arc::new(self.shared.cancel.child_token()),
        })
    }

    /// Jobs of `scope` not settled yet.
    pub fn scope_pending(&self, scope: &Scope) -> usize {
        self.shared
            .lock()
            .scopes
            .get(&scope.id)
            .map_or(0, |state| state.pending)
    }

    /// Closes `scope`: refuses new jobs for it, hands its queued jobs back unstarted (settled as
    /// [`Outcome::Cancelled`], their finishing steps run in lane order, a busy lane's after its
    /// running job), lets its running and retrying jobs finish until `drain` has passed, then
    /// cancels them through the scope's token. Returns when no job of the scope is left. Other
    /// scopes are not touched. Calling it again only waits.
    ///
    /// # Cancel safety
    ///
    /// The scope is closed and its queued jobs handed back at the first poll. If the future is
    /// dropped later, its running jobs go on (the deadline no longer applies) and settle as
    /// usual.
    pub async fn close_scope(&self, scope: &Scope, drain: Duration) -> ScopeReport {
        let shared = &self.shared;
        let handed_back = {
            let mut state = shared.lock();
            let opening_close = match state.scopes.get_mut(&scope.id) {
                None => false,
                Some(scope_state) => !std::mem::replace(&mut scope_state.closed, true),
            };
            let taken = if opening_close {
                state.take_for_hand_back(Some(scope.id))
            } else {
                Vec::new()
            };
            if state
                .scopes
                .get(&scope.id)
                .is_some_and(|scope_state| scope_state.pending == 0)
            {
                state.scopes.remove(&scope.id);
            }
            shared.publish_gauges(&state);
            // Submitters waiting for room in this scope learn that it is closed.
            shared.space.notify_waiters();
            taken
        };
        let count = handed_back.len();
        shared.hand_back(handed_back);
        let drained = tokio::time::timeout(drain, shared.scope_idle(scope.id))
            .await
            .is_ok();
        if !drained {
            scope.cancel.cancel();
            shared.scope_idle(scope.id).await;
        }
        tracing::debug!(
            scope = scope.id,
            drained,
            handed_back = count,
            "scope closed"
        );
        ScopeReport {
            drained,
            handed_back: count,
        }
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
        let before = shared
            .cancelled_jobs
            .load(std::sync::atomic::Ordering::SeqCst);
        if !drained {
            shared.cancel_all();
        }
        shared.stop.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
        let cancelled = shared
            .cancelled_jobs
            .load(std::sync::atomic::Ordering::SeqCst)
            - before;
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
        self.metrics.stalled.set(state.stalled as f64);
    }

    /// Waits until no job of `scope` is left.
    async fn scope_idle(&self, scope: u64) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().scopes.contains_key(&scope) {
                return;
            }
            notified.await;
        }
    }

    /// Finishes handed-back entries as cancelled, one after the other (so a lane's entries are
    /// given back in order), on a task of the pool.
    fn hand_back(self: &Arc<Self>, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        let shared = self.clone();
        let task = async move {
            for mut entry in entries {
                let outcome = Outcome::Cancelled {
                    attempts: entry.attempts,
                };
                finish_job(entry.job.take_finish(), &outcome, std::future::pending()).await;
                let wake = {
                    let mut state = shared.lock();
                    state.settling -= 1;
                    let emptied = state.forget(&entry);
                    shared.publish_gauges(&state);
                    emptied || state.pending() == 0
                };
                if wake {
                    shared.drained.notify_waiters();
                }
                shared
                    .cancelled_jobs
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                entry.report(outcome);
            }
        };
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// The token that cancels `entry`: its scope's, or the pool's.
    fn token_of(&self, entry: &Entry) -> Arc<CancellationToken> {
        match &entry.job.scope {
            Some(scope) => scope.cancel.clone(),
            None => self.cancel.clone(),
        }
    }

    /// Queues `entry`, or says why it cannot be queued now (and gives it back). `bounded`
    /// false queues it over the lane and pool bounds.
    fn enqueue(
        &self,
        state: &mut State,
        entry: Entry,
        bounded: bool,
    ) -> Result<(), (Blocked, Entry)> {
        let scope = entry.job.scope_id();
        if state.closed || (scope != UNSCOPED && state.hands_back(scope)) {
            return Err((Blocked::Closed, entry));
        }
        if bounded && state.queued >= self.capacity {
            return Err((Blocked::Full("pool"), entry));
        }
        let lane = match &entry.job.key {
            None => None,
            Some(key) => {
                // A full lane exists already, so this never creates a lane it then refuses.
                let (id, lane) = state.lanes.get_or_insert(scope, key);
                if bounded && lane.queued >= self.config.inbox_size {
                    return Err((Blocked::Full("lane"), entry));
                }
                lane.queued += 1;
                Some(id)
            }
        };
        if scope != UNSCOPED
            && let Some(scope_state) = state.scopes.get_mut(&scope)
        {
            scope_state.pending += 1;
        }
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
        if state.ready.is_empty() && state.arrivals.is_empty() {
            return None;
        }
        let now = Instant::now();
        let taken = self
            .take_from_ready(state, now)
            .or_else(|| self.take_arrival(state, now))?;
        state.running += 1;
        if !state.ready.is_empty() || !state.arrivals.is_empty() {
            self.wake_one(state);
        }
        Some(taken)
    }

    fn take_from_ready(&self, state: &mut State, now: Instant) -> Option<Next> {
        while let Some(ready) = state.ready.pop_front() {
            let id = match ready {
                Ready::Retry(entry) => {
                    state.retrying -= 1;
                    return Some((None, entry, now));
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
                return Some((Some(id), entry, now));
            }
            if let Some(entry) = lane.parked.pop_front() {
                lane.busy = true;
                lane.since = Some(now);
                lane.queued -= 1;
                state.queued -= 1;
                self.room_freed(state);
                return Some((Some(id), entry, now));
            }
        }
        None
    }

    fn take_arrival(&self, state: &mut State, now: Instant) -> Option<Next> {
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
                lane.since = Some(now);
                lane.queued -= 1;
            }
            state.queued -= 1;
            self.room_freed(state);
            return Some((lane, entry, now));
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
    /// idle. (Jobs of the key still among the arrivals run when they reach the head.) In a scope
    /// that hands back, the lane's queued jobs are returned for handing back instead.
    fn release_lane(&self, state: &mut State, id: LaneId) -> Vec<Entry> {
        let Some(lane) = state.lanes.get_mut(id) else {
            return Vec::new();
        };
        lane.busy = false;
        lane.since = None;
        let scope = lane.scope;
        if state.hands_back(scope) {
            let Some(lane) = state.lanes.get_mut(id) else {
                return Vec::new();
            };
            // Its jobs left the arrivals when the scope closed: all are parked here.
            let taken: Vec<Entry> = lane.parked.drain(..).collect();
            lane.queued -= taken.len();
            state.queued -= taken.len();
            state.settling += taken.len();
            state.lanes.remove(id);
            return taken;
        }
        let Some(lane) = state.lanes.get_mut(id) else {
            return Vec::new();
        };
        if lane.retry.is_some() || !lane.parked.is_empty() {
            lane.in_ready = true;
            self.make_ready(state, Ready::Lane(id));
        } else if lane.is_idle() {
            state.lanes.remove(id);
        }
        Vec::new()
    }

    /// Settles a running job for good. An actor settling its job asks for the next one in the same
    /// critical section (`take_next`).
    fn settle(
        self: &Arc<Self>,
        lane: Option<LaneId>,
        mut entry: Entry,
        outcome: Outcome,
        take_next: bool,
    ) -> Option<Next> {
        let mut state = self.lock();
        state.running -= 1;
        let emptied = state.forget(&entry);
        let handed_back = match lane {
            Some(id) => self.release_lane(&mut state, id),
            None => Vec::new(),
        };
        let next = if take_next && !state.cancelled {
            self.take_ready(&mut state)
        } else {
            None
        };
        self.publish_gauges(&state);
        let idle = state.pending() == 0;
        drop(state);
        if idle || emptied {
            self.drained.notify_waiters();
        }
        match &outcome {
            Outcome::Succeeded { .. } => self.metrics.succeeded.increment(1),
            Outcome::Cancelled { .. } => {
                self.cancelled_jobs
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            _ => self.metrics.failed.increment(1),
        }
        entry.report(outcome);
        self.hand_back(handed_back);
        next
    }

    /// Cancels every job not running: queued, waiting for a retry, or ready, handed back in lane
    /// order (a busy lane's after its running job). Running attempts are dropped by their actors
    /// when `cancel` fires, and retry timers settle their own jobs.
    fn cancel_all(self: &Arc<Self>) {
        let mut state = self.lock();
        if state.cancelled {
            return;
        }
        state.cancelled = true;
        let taken = state.take_for_hand_back(None);
        self.publish_gauges(&state);
        drop(state);
        self.cancel.cancel();
        self.hand_back(taken);
        self.drained.notify_waiters();
    }

    /// Puts a job back in line after its retry backoff, or hands it back (with its lane's queued
    /// jobs, in order) when its deadline has passed.
    fn requeue(self: &Arc<Self>, lane: Option<LaneId>, entry: Entry) {
        let mut state = self.lock();
        if self.token_of(&entry).is_cancelled() {
            state.retrying -= 1;
            state.settling += 1;
            let mut taken = vec![entry];
            if let Some(id) = lane
                && let Some(lane) = state.lanes.get_mut(id)
            {
                let parked: Vec<Entry> = lane.parked.drain(..).collect();
                lane.queued -= parked.len();
                state.queued -= parked.len();
                state.settling += parked.len();
                taken.extend(parked);
                state.lanes.remove(id);
            }
            self.publish_gauges(&state);
            drop(state);
            self.hand_back(taken);
            return;
        }
        match lane {
            None => self.make_ready(&mut state, Ready::Retry(entry)),
            Some(id) => {
                // The lane stays while its job waits for a retry; only a hand-back removes it,
                // and that case was handled above.
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
        started: Instant,
        mut cancelled: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Option<Next> {
        // A scoped job watches its scope's token (a child of the pool's); an unscoped one the
        // actor's own registration on the pool's token, made once per actor.
        let scope = entry.job.scope.as_ref().map(|scope| scope.cancel.clone());
        let fired = match &scope {
            Some(token) => token.is_cancelled(),
            None => self.cancel.is_cancelled(),
        };
        if fired {
            // Its deadline passed while it waited in the ready queue (the attempt is then not
            // started: `run_attempt` polls it once before it watches the token).
            let outcome = Outcome::Cancelled {
                attempts: entry.attempts,
            };
            finish_job(entry.job.take_finish(), &outcome, std::future::pending()).await;
            return self.settle(lane, entry, outcome, true);
        }
        entry.attempts += 1;
        let attempt = entry.attempts;
        let ctx = JobContext {
            attempt,
            cancellation: scope.clone().unwrap_or_else(|| self.cancel.clone()),
        };
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| entry.job.attempt(ctx))) {
            Err(panic) => Attempt::Panicked(panic_message(panic.as_ref())),
            Ok(future) => match &scope {
                Some(token) => run_attempt(future, token.cancelled()).await,
                None => run_attempt(future, cancelled.as_mut()).await,
            },
        };
        self.metrics.latency.record(started.elapsed().as_secs_f64());

        let class = entry.job.class;
        let at_least_once = class == DeliveryClass::AtLeastOnce;
        let unlimited = entry.job.unlimited && at_least_once;
        let policy = entry.job.retry.as_deref().unwrap_or(&self.config.retry);
        let outcome = match result {
            Attempt::Succeeded => Outcome::Succeeded { attempts: attempt },
            Attempt::Cancelled => Outcome::Cancelled { attempts: attempt },
            Attempt::Failed(error) => {
                let next = if at_least_once {
                    // The policy's decision is the service's code: a panic in it gives the
                    // message up (or, with nowhere to send it, backs off), and the actor lives.
                    let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        policy.next_attempt(&error, attempt)
                    }))
                    .unwrap_or_else(|panic| {
                        tracing::error!(attempt, %error, panic = %panic_message(panic.as_ref()), "the retry policy's decision panicked: not retried by it");
                        None
                    });
                    // A job with nowhere to go keeps trying at the policy's backoff once the
                    // policy gives up (permanent errors included).
                    decided.or_else(|| unlimited.then(|| policy.backoff(attempt)))
                } else {
                    None
                };
                if let Some(delay) = next {
                    tracing::debug!(attempt, %error, ?delay, "attempt failed; retrying in its lane");
                    return self.retry_later(lane, entry, delay);
                }
                tracing::warn!(attempts = attempt, %error, permanent = error.is_permanent(), "job failed");
                Outcome::Failed {
                    attempts: attempt,
                    error,
                }
            }
            Attempt::Panicked(message) => {
                entry.panics = entry.panics.saturating_add(1);
                self.metrics.restarted.increment(1);
                let may_retry = at_least_once && (unlimited || attempt < policy.max_attempts);
                if may_retry && (unlimited || entry.panics < self.config.max_restarts) {
                    tracing::warn!(attempt, panic = %message, "handler panicked; retrying in its lane");
                    let delay = policy.backoff(attempt);
                    return self.retry_later(lane, entry, delay);
                }
                tracing::error!(attempts = attempt, panics = entry.panics, panic = %message, "handler panicked; not run again");
                Outcome::Panicked {
                    attempts: attempt,
                    panics: entry.panics,
                    message,
                }
            }
        };
        let finish = entry.job.take_finish();
        match (&outcome, &scope) {
            // Handing back is quick and must happen: not raced against the deadline.
            (Outcome::Cancelled { .. }, _) => {
                finish_job(finish, &outcome, std::future::pending()).await;
            }
            // A scoped job's owner (the consume runtime) watches the scope's token in its step
            // and gives the message back when it is cut short.
            (_, Some(_)) => finish_job(finish, &outcome, std::future::pending()).await,
            (_, None) => finish_job(finish, &outcome, cancelled).await,
        }
        self.settle(lane, entry, outcome, true)
    }

    /// Frees the actor and schedules the next attempt after `delay`; the lane stays busy.
    /// Returns the next job for this actor.
    fn retry_later(
        self: &Arc<Self>,
        lane: Option<LaneId>,
        mut entry: Entry,
        delay: Duration,
    ) -> Option<Next> {
        self.metrics.retries.increment(1);
        let max_attempts = entry
            .job
            .retry
            .as_deref()
            .unwrap_or(&self.config.retry)
            .max_attempts;
        let stalls = !entry.stalled && entry.attempts >= max_attempts;
        if stalls {
            entry.stalled = true;
            tracing::error!(
                attempts = entry.attempts,
                "job retried past max_attempts: nowhere to send it, so its lane waits"
            );
        }
        // The job counts as retrying before its timer exists, so the timer can never requeue a
        // job the counters do not know about.
        let next = {
            let mut state = self.lock();
            state.running -= 1;
            state.retrying += 1;
            if stalls {
                state.stalled += 1;
            }
            let next = if state.cancelled {
                None
            } else {
                self.take_ready(&mut state)
            };
            self.publish_gauges(&state);
            next
        };
        let token = self.token_of(&entry);
        let shared = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = token.cancelled() => {}
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
                    self.publish_gauges(&state);
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

/// Runs one attempt until it ends or `cancelled` fires, catching a panic.
///
/// The attempt is polled once before the token is watched: most handlers finish at their first
/// poll, and watching a token registers on its waiter list under a lock shared by every job of
/// the scope. (The caller has checked that the token had not fired before the attempt started.)
async fn run_attempt(
    future: crate::job::AttemptFuture,
    cancelled: impl std::future::Future<Output = ()>,
) -> Attempt {
    let ended =
        |result: Result<Result<(), HandlerError>, Box<dyn std::any::Any + Send>>| match result {
            Ok(Ok(())) => Attempt::Succeeded,
            Ok(Err(error)) => Attempt::Failed(error),
            Err(panic) => Attempt::Panicked(panic_message(panic.as_ref())),
        };
    let mut attempt = AssertUnwindSafe(future).catch_unwind();
    if let Some(result) = (&mut attempt).now_or_never() {
        return ended(result);
    }
    tokio::select! {
        biased;
        () = cancelled => Attempt::Cancelled,
        result = attempt => ended(result),
    }
}

/// Runs a job's finishing step (from [`Job::take_finish`]) while its lane is still held, until
/// it ends or `cancelled` fires.
async fn finish_job(
    finish: impl FnOnce(&Outcome) -> Option<crate::job::FinishFuture>,
    outcome: &Outcome,
    cancelled: impl std::future::Future<Output = ()>,
) {
    let future = match std::panic::catch_unwind(AssertUnwindSafe(|| finish(outcome))) {
        Ok(Some(future)) => future,
        Ok(None) => return,
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
        let (lane, entry, taken) = match next.take() {
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
            .run(lane, entry, taken, cancelled.as_mut())
            .instrument(span)
            .await;
    }
}
