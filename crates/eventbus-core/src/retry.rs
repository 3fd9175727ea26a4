//! How a failed handler is tried again: the retry policy of a subscription (or of the whole
//! bus), and the backoff that settlement uses apart from it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::Error;
use crate::handler::HandlerError;

/// The longest backoff accepted: an hour.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The most attempts a policy may make.
pub const MAX_ATTEMPTS: u32 = 1000;

/// What a retry policy's decision says about one failed attempt (see
/// [`RetryPolicy::with_decision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryDecision {
    /// Try again, after the handler's own delay ([`HandlerError::with_retry_after`]) or the
    /// policy's backoff, while attempts are left.
    Retry,
    /// Try again after this delay, while attempts are left.
    RetryAfter(Duration),
    /// Do not try again: the message fails now (an envelope is dead-lettered).
    GiveUp,
}

type Decide = Arc<dyn Fn(&HandlerError, u32) -> RetryDecision + Send + Sync>;

/// How an envelope whose handler fails is tried again, inside its aggregate's lane (later
/// events of the aggregate wait; other aggregates go on).
///
/// After failed attempt `n` (1-based), the message is tried again unless:
///
/// - the error is permanent ([`HandlerError::permanent`]), or
/// - `n` reached [`max_attempts`](Self::max_attempts), or
/// - the policy's decision ([`with_decision`](Self::with_decision)) says
///   [`RetryDecision::GiveUp`].
///
/// The delay before the next attempt is the decision's [`RetryDecision::RetryAfter`], else the
/// handler's own ([`HandlerError::with_retry_after`]), else the backoff: a random delay in
/// `[d/2, d]` with `d = min(initial_backoff × 2^(n-1), max_backoff)`.
///
/// The bus's policy (`[retry]` in the configuration) is every subscription's default;
/// `SubscribeOptions::with_retry` gives one subscription its own. Settling a message (acks,
/// dead-letter writes, reading parked aggregates) is retried with the bus's
/// [`Backoff`] for settlement instead, whatever the handler's policy says.
///
/// ```
/// use std::time::Duration;
/// use eventbus_core::{HandlerError, RetryDecision, RetryPolicy};
///
/// #[derive(Debug)]
/// struct Conflict;
/// impl std::fmt::Display for Conflict {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("version conflict") }
/// }
/// impl std::error::Error for Conflict {}
///
/// let policy = RetryPolicy::new()
///     .with_max_attempts(5)
///     .with_backoff(Duration::from_millis(100), Duration::from_secs(10))
///     .with_decision(|error, _attempt| {
///         if error.cause().is::<Conflict>() { RetryDecision::GiveUp } else { RetryDecision::Retry }
///     });
///
/// // A conflict is not retried; another error is, after the backoff or the handler's delay.
/// assert_eq!(policy.next_attempt(&HandlerError::transient(Conflict), 1), None);
/// let busy = HandlerError::transient("busy").with_retry_after(Duration::from_secs(2));
/// assert_eq!(policy.next_attempt(&busy, 1), Some(Duration::from_secs(2)));
/// assert!(policy.next_attempt(&HandlerError::transient("busy"), 1).unwrap() <= Duration::from_millis(100));
/// assert_eq!(policy.next_attempt(&HandlerError::transient("busy"), 5), None);
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retries). Default 3.
    pub max_attempts: u32,
    /// The backoff after the first failure. Default 1 s.
    pub initial_backoff: Duration,
    /// The longest backoff. Default 30 s.
    pub max_backoff: Duration,
    decide: Option<Decide>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            decide: None,
        }
    }
}

impl RetryPolicy {
    /// The defaults: 3 attempts, backoff from 1 s to 30 s, every transient error retried.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the attempts in all, the first included (1 = no retries).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the backoff after the first failure and the longest backoff.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Decides per failed attempt (its error and its number, from 1) whether to try again, and
    /// after how long. Called for transient errors only, while attempts are left.
    pub fn with_decision(
        mut self,
        decide: impl Fn(&HandlerError, u32) -> RetryDecision + Send + Sync + 'static,
    ) -> Self {
        self.decide = Some(Arc::new(decide));
        self
    }

    /// The delay before the attempt after failed attempt `attempt`, or `None` when the
    /// message is not tried again (see the type's documentation). A delay asked for by the
    /// decision or the handler is cut to [`MAX_BACKOFF`].
    pub fn next_attempt(&self, error: &HandlerError, attempt: u32) -> Option<Duration> {
        if error.is_permanent() || attempt >= self.max_attempts {
            return None;
        }
        let delay = match self
            .decide
            .as_ref()
            .map_or(RetryDecision::Retry, |decide| decide(error, attempt))
        {
            RetryDecision::GiveUp => return None,
            RetryDecision::RetryAfter(delay) => delay,
            RetryDecision::Retry => error.retry_after().unwrap_or_else(|| self.backoff(attempt)),
        };
        Some(delay.min(MAX_BACKOFF))
    }

    /// The backoff after failed attempt `attempt` (1-based), jitter included.
    pub fn backoff(&self, attempt: u32) -> Duration {
        jittered_backoff(self.initial_backoff, self.max_backoff, attempt)
    }

    /// Checks the numbers; the error names the field under `section` (`retry.max_attempts`).
    pub fn validate(&self, section: &str) -> Result<(), Error> {
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(Error::config(
                format!("{section}.max_attempts"),
                format!("{} is outside 1..={MAX_ATTEMPTS}", self.max_attempts),
            ));
        }
        validate_backoff(
            section,
            ("initial_backoff", self.initial_backoff),
            ("max_backoff", self.max_backoff),
        )
    }
}

impl fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_attempts", &self.max_attempts)
            .field("initial_backoff", &self.initial_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("decision", &self.decide.as_ref().map(|_| "custom"))
            .finish()
    }
}

impl PartialEq for RetryPolicy {
    /// Equal numbers and the same decision (the same closure, or none).
    fn eq(&self, other: &Self) -> bool {
        self.max_attempts == other.max_attempts
            && self.initial_backoff == other.initial_backoff
            && self.max_backoff == other.max_backoff
            && match (&self.decide, &other.decide) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for RetryPolicy {}

/// An exponential backoff with jitter: after failure `n` (1-based), a random delay in
/// `[d/2, d]` with `d = min(initial × 2^(n-1), max)`. What settlement (acks, dead-letter
/// writes, reading parked aggregates) waits between its tries, apart from any handler's
/// [`RetryPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backoff {
    /// The delay after the first failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    /// From 1 s to 30 s.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

impl Backoff {
    /// A backoff from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay after failure `failure` (1-based), jitter included.
    pub fn delay(&self, failure: u32) -> Duration {
        jittered_backoff(self.initial, self.max, failure)
    }

    /// Checks the numbers; the error names the field under `section` (`settlement.initial`).
    pub fn validate(&self, section: &str) -> Result<(), Error> {
        validate_backoff(section, ("initial", self.initial), ("max", self.max))
    }
}

fn jittered_backoff(initial: Duration, max: Duration, failure: u32) -> Duration {
    let doublings = failure.saturating_sub(1).min(31);
    let ceiling = initial
        .checked_mul(1u32 << doublings)
        .unwrap_or(max)
        .min(max);
    let half = ceiling / 2;
    let spread = (ceiling - half).as_nanos().min(u128::from(u64::MAX)) as u64;
    half + Duration::from_nanos(fastrand::u64(0..=spread))
}

fn validate_backoff(
    section: &str,
    (initial_name, initial): (&str, Duration),
    (max_name, max): (&str, Duration),
) -> Result<(), Error> {
    if max > MAX_BACKOFF {
        return Err(Error::config(
            format!("{section}.{max_name}"),
            format!("{max:?} is longer than {MAX_BACKOFF:?}"),
        ));
    }
    if initial > max {
        return Err(Error::config(
            format!("{section}.{initial_name}"),
            format!("{initial:?} is longer than {section}.{max_name} ({max:?})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_ceiling_with_jitter_below_it() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        for _ in 0..100 {
            let first = backoff.delay(1);
            assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
            let third = backoff.delay(3);
            assert!((Duration::from_millis(175)..=Duration::from_millis(350)).contains(&third));
            assert!(backoff.delay(u32::MAX) <= Duration::from_millis(350));
        }
        assert_eq!(
            Backoff::new(Duration::ZERO, Duration::ZERO).delay(5),
            Duration::ZERO
        );
    }

    #[test]
    fn a_permanent_error_or_the_last_attempt_is_not_tried_again() {
        let policy = RetryPolicy::new().with_max_attempts(2);
        assert_eq!(
            policy.next_attempt(&HandlerError::permanent("bad"), 1),
            None
        );
        assert!(
            policy
                .next_attempt(&HandlerError::transient("busy"), 1)
                .is_some()
        );
        assert_eq!(
            policy.next_attempt(&HandlerError::transient("busy"), 2),
            None
        );
    }

    #[test]
    fn the_decision_delay_comes_before_the_handlers_and_the_handlers_before_the_backoff() {
        let error = HandlerError::transient("busy").with_retry_after(Duration::from_secs(7));
        let policy = RetryPolicy::new().with_max_attempts(10);
        assert_eq!(policy.next_attempt(&error, 1), Some(Duration::from_secs(7)));
        let decided = policy.clone().with_decision(|_, attempt| {
            RetryDecision::RetryAfter(Duration::from_secs(attempt.into()))
        });
        assert_eq!(
            decided.next_attempt(&error, 3),
            Some(Duration::from_secs(3))
        );
        assert_ne!(decided, policy, "another decision is another policy");
        assert_eq!(policy.clone(), policy);
    }

    #[test]
    fn bad_numbers_are_config_errors_naming_the_field() {
        let zero = RetryPolicy::new()
            .with_max_attempts(0)
            .validate("retry")
            .unwrap_err();
        assert!(zero.to_string().contains("retry.max_attempts"), "{zero}");
        let inverted = RetryPolicy::new()
            .with_backoff(Duration::from_secs(2), Duration::from_secs(1))
            .validate("retry")
            .unwrap_err();
        assert!(
            inverted.to_string().contains("retry.initial_backoff"),
            "{inverted}"
        );
        let settle = Backoff::new(Duration::from_secs(1), Duration::from_secs(7200))
            .validate("settlement")
            .unwrap_err();
        assert!(settle.to_string().contains("settlement.max"), "{settle}");
        assert!(RetryPolicy::new().validate("retry").is_ok());
    }
}
