//! Jobs: what is submitted, what a run sees, and how the submitter learns the outcome.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use eventbus_core::{
    AggregateId, CancellationToken, DeliveryClass, HandlerError, Outcome, RetryPolicy,
};
use tokio::sync::oneshot;

use crate::scope::{Scope, UNSCOPED};

/// The future of one attempt.
pub(crate) type AttemptFuture =
    Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// The future of a job's finishing step.
pub(crate) type FinishFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

pub(crate) type Finish = Box<dyn FnOnce(&Outcome) -> FinishFuture + Send + 'static>;

/// What a job does, as one object: starts each of its attempts and, once the job has its
/// outcome, gives its finishing step. The consume runtime keeps a message and everything its
/// attempts and its settling need in one of these (one allocation per message); [`Job::new`]
/// wraps its closure in [`Closures`], and [`Job::with_finish`] wraps the work in [`WithFinish`].
pub(crate) trait Work: Send + 'static {
    /// Starts attempt `ctx.attempt()`.
    fn attempt(&mut self, ctx: JobContext) -> AttemptFuture;

    /// The finishing step for `outcome`, if the job has one.
    fn finish(self: Box<Self>, outcome: &Outcome) -> Option<FinishFuture>;
}

/// The work of [`Job::new`]: its attempt function, and no finishing step.
struct Closures<F>(F);

impl<F> Work for Closures<F>
where
    F: FnMut(JobContext) -> AttemptFuture + Send + 'static,
{
    fn attempt(&mut self, ctx: JobContext) -> AttemptFuture {
        (self.0)(ctx)
    }

    fn finish(self: Box<Self>, _outcome: &Outcome) -> Option<FinishFuture> {
        None
    }
}

/// A job's work with a finishing step added by [`Job::with_finish`]: the work's own step runs
/// first, if it has one, then the added one.
struct WithFinish {
    work: Box<dyn Work>,
    finish: Finish,
}

impl Work for WithFinish {
    fn attempt(&mut self, ctx: JobContext) -> AttemptFuture {
        self.work.attempt(ctx)
    }

    fn finish(self: Box<Self>, outcome: &Outcome) -> Option<FinishFuture> {
        let earlier = self.work.finish(outcome);
        let added = (self.finish)(outcome);
        match earlier {
            None => Some(added),
            Some(earlier) => Some(Box::pin(async move {
                earlier.await;
                added.await;
            })),
        }
    }
}

/// What is left of a job's work once its finishing step was taken (no allocation: it has no
/// size). The pool starts no attempt after that.
struct Finished;

impl Work for Finished {
    fn attempt(&mut self, _ctx: JobContext) -> AttemptFuture {
        debug_assert!(false, "an attempt started after the job's finishing step");
        Box::pin(std::future::ready(Err(HandlerError::permanent(
            "the job was already finished",
        ))))
    }

    fn finish(self: Box<Self>, _outcome: &Outcome) -> Option<FinishFuture> {
        None
    }
}

/// A unit of work: an optional routing key, a delivery class, what starts one attempt (called
/// again for each retry), and an optional finishing step.
pub struct Job {
    pub(crate) key: Option<AggregateId>,
    pub(crate) class: DeliveryClass,
    work: Box<dyn Work>,
    pub(crate) scope: Option<Scope>,
    pub(crate) unlimited: bool,
    /// Its own retry policy; `None`: the pool's.
    pub(crate) retry: Option<Arc<RetryPolicy>>,
}

impl Job {
    /// A job. Jobs with the same `key` run one at a time in submission order; jobs without a key
    /// run on any free actor. `run` is called once per attempt.
    pub fn new<F, Fut>(key: Option<AggregateId>, class: DeliveryClass, mut run: F) -> Self
    where
        F: FnMut(JobContext) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let run = move |ctx| -> AttemptFuture { Box::pin(run(ctx)) };
        Self::from_work(key, class, Box::new(Closures(run)))
    }

    /// A job doing `work` (its attempts and its finishing step in one object).
    pub(crate) fn from_work(
        key: Option<AggregateId>,
        class: DeliveryClass,
        work: Box<dyn Work>,
    ) -> Self {
        Self {
            key,
            class,
            work,
            scope: None,
            unlimited: false,
            retry: None,
        }
    }

    /// Starts the job's next attempt.
    pub(crate) fn attempt(&mut self, ctx: JobContext) -> AttemptFuture {
        self.work.attempt(ctx)
    }

    /// Takes the job's finishing step, to be called once with its outcome (it gives `None`
    /// when the job has no finishing step). The job starts no attempt after this.
    pub(crate) fn take_finish(&mut self) -> impl FnOnce(&Outcome) -> Option<FinishFuture> + use<> {
        let work = std::mem::replace(&mut self.work, Box::new(Finished));
        move |outcome| work.finish(outcome)
    }

    /// Puts the job in `scope`: its lane is (scope, key), so it never waits for jobs of the same
    /// key in other scopes, and [`Pool::close_scope`](crate::Pool::close_scope) finds it.
    /// Submitting into a closed scope fails with `Closed`.
    pub fn in_scope(mut self, scope: &Scope) -> Self {
        self.scope = Some(scope.clone());
        self
    }

    /// Retries an at-least-once job past `max_attempts` (at the backoff of its last attempt,
    /// capped by `max_backoff`), permanent errors and panics included, until it succeeds or is
    /// cancelled: for a message that has nowhere to go when it fails, so its aggregate waits
    /// instead of losing its order. Such a job counts as *stalled* ([`PoolStats::stalled`])
    /// while it retries past `max_attempts`.
    ///
    /// [`PoolStats::stalled`]: crate::PoolStats::stalled
    pub fn with_unlimited_attempts(mut self) -> Self {
        self.unlimited = true;
        self
    }

    /// Retries the job by `policy` instead of the pool's ([`PoolConfig::retry`]): a
    /// subscription's own policy. Shared: one policy serves every job of a subscription.
    ///
    /// [`PoolConfig::retry`]: crate::PoolConfig::retry
    pub fn with_retry(mut self, policy: Arc<RetryPolicy>) -> Self {
        self.retry = Some(policy);
        self
    }

    pub(crate) fn scope_id(&self) -> u64 {
        self.scope.as_ref().map_or(UNSCOPED, |scope| scope.id)
    }

    /// Adds a finishing step: once the job has its outcome, `finish` runs **before the lane is
    /// released**, so the key's next job starts only after it. A backend acknowledges or
    /// dead-letters here: a dead-letter write that has to be retried keeps the aggregate's later
    /// messages waiting, as the delivery contract asks. Steps added more than once run one after
    /// the other, in the order they were added.
    ///
    /// A final outcome (succeeded, failed, panicked) is finished on the actor. For a job without
    /// a scope the step is dropped if the pool's drain deadline passes meanwhile (the outcome
    /// still reaches the [`JobHandle`]); a scoped job's step is not cut short: it watches its
    /// scope's cancellation token itself (the consume runtime gives the message back then). A cancelled job (handed back by a closing scope, or cancelled at a drain
    /// deadline) is finished with [`Outcome::Cancelled`] and that step is not cut short, so it
    /// must be quick (give the message back); cancelled jobs of one lane are finished in lane
    /// order. A panic in the step is caught and logged.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use eventbus_core::{DeliveryClass, Outcome};
    /// use eventbus_pool::{Job, Pool, PoolConfig};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), eventbus_core::Error> {
    /// let pool = Pool::new(PoolConfig::default())?;
    /// let acked = Arc::new(Mutex::new(Vec::new()));
    /// let log = acked.clone();
    /// let job = Job::new(None, DeliveryClass::AtMostOnce, |_ctx| async { Ok(()) })
    ///     .with_finish(move |outcome: &Outcome| {
    ///         let succeeded = outcome.is_success();
    ///         async move { log.lock().unwrap().push(succeeded) }
    ///     });
    /// pool.submit(job).await?.await;
    /// assert_eq!(*acked.lock().unwrap(), [true]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_finish<F, Fut>(mut self, finish: F) -> Self
    where
        F: FnOnce(&Outcome) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let work = std::mem::replace(&mut self.work, Box::new(Finished));
        self.work = Box::new(WithFinish {
            work,
            finish: Box::new(move |outcome| Box::pin(finish(outcome))),
        });
        self
    }

    /// The routing key.
    pub fn key(&self) -> Option<&AggregateId> {
        self.key.as_ref()
    }

    /// The delivery class.
    pub fn class(&self) -> DeliveryClass {
        self.class
    }
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("key", &self.key)
            .field("class", &self.class)
            .field("scope", &self.scope_id())
            .field("unlimited", &self.unlimited)
            .finish_non_exhaustive()
    }
}

/// What one attempt of a job knows.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub(crate) attempt: u32,
    pub(crate) cancellation: Arc<CancellationToken>,
}

impl JobContext {
    /// The attempt number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Cancelled when the job's drain deadline passes (its scope's, or the pool's); the attempt
    /// is then dropped.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }
}

/// The submitter's side of a job: resolves to its [`Outcome`] once it settles.
///
/// Dropping the handle does not cancel the job; its outcome is then discarded.
#[derive(Debug)]
pub struct JobHandle {
    pub(crate) outcome: oneshot::Receiver<Outcome>,
}

impl JobHandle {
    /// The outcome if the job has settled, without waiting.
    pub fn try_outcome(&mut self) -> Option<Outcome> {
        self.outcome.try_recv().ok()
    }
}

impl Future for JobHandle {
    type Output = Outcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        // The pool settles every job before it drops the sender; a closed channel only happens
        // when the runtime itself is torn down, and the job then never finished.
        Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|outcome| outcome.unwrap_or(Outcome::Cancelled { attempts: 0 }))
    }
}
