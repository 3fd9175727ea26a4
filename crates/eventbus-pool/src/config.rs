//! The engine's configuration, and the settings every backend shares.

use std::time::Duration;

use eventbus_core::{Backoff, Error, RetryPolicy};

/// The largest `pool_size` accepted.
pub const MAX_POOL_SIZE: usize = 65_536;
/// The largest `inbox_size` accepted.
pub const MAX_INBOX_SIZE: usize = 1_000_000;
/// The largest engine capacity (`pool_size × inbox_size`) accepted.
pub const MAX_CAPACITY: usize = 100_000_000;

/// Configuration of a [`Pool`](crate::Pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Actors: the most handlers running at once. Default 256.
    pub pool_size: usize,
    /// The most jobs queued in one lane; the pool holds at most `pool_size × inbox_size`
    /// queued jobs. Default 1000.
    pub inbox_size: usize,
    /// The most panics one job may cause before it is not run again. Default 3.
    pub max_restarts: u32,
    /// Retries of at-least-once jobs without a policy of their own ([`Job::with_retry`]): the
    /// bus-wide policy, every subscription's default.
    ///
    /// [`Job::with_retry`]: crate::Job::with_retry
    pub retry: RetryPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            pool_size: 256,
            inbox_size: 1000,
            max_restarts: 3,
            retry: RetryPolicy::default(),
        }
    }
}

impl PoolConfig {
    /// Checks every field; the error names the first bad one (`pool.pool_size`, ...).
    pub fn validate(&self) -> Result<(), Error> {
        let range = |field: &str, value: usize, max: usize| {
            if value == 0 || value > max {
                Err(Error::config(
                    field,
                    format!("{value} is outside 1..={max}"),
                ))
            } else {
                Ok(())
            }
        };
        range("pool.pool_size", self.pool_size, MAX_POOL_SIZE)?;
        range("pool.inbox_size", self.inbox_size, MAX_INBOX_SIZE)?;
        range(
            "pool.pool_size × pool.inbox_size",
            self.pool_size.saturating_mul(self.inbox_size),
            MAX_CAPACITY,
        )?;
        range("pool.max_restarts", self.max_restarts as usize, 1000)?;
        self.retry.validate("retry")
    }

    /// The most queued jobs the pool holds.
    pub fn capacity(&self) -> usize {
        self.pool_size.saturating_mul(self.inbox_size)
    }
}

/// The settings every backend shares: computed once (the facade builds them from its
/// configuration) and handed to the backend's constructor, which passes them on to the
/// consume [`Runtime`](crate::consume::Runtime).
///
/// ```
/// use std::time::Duration;
/// use eventbus_pool::BusSettings;
///
/// let settings = BusSettings {
///     drain_timeout: Duration::from_secs(5),
///     ..BusSettings::new("nats", "billing")
/// };
/// assert_eq!(settings.metrics_namespace, "nats_eventbus_billing");
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSettings {
    /// Names the service to the broker (connection name, durable consumers, consumer group).
    pub client_id: String,
    /// The prefix of every metric the bus records; two live buses must not share one.
    pub metrics_namespace: String,
    /// The ordering engine and its retry policy.
    pub pool: PoolConfig,
    /// How settling a message is retried while the broker refuses it: acks and terminates,
    /// dead-letter writes, reading a parking subscription's dead letters, removing a replayed
    /// copy's dead letter. Apart from the handlers' retry policies: tuning those never retunes
    /// this. Default 1 s to 30 s.
    pub settlement: Backoff,
    /// How long unsubscribing and closing let in-flight messages finish. Default 30 s.
    pub drain_timeout: Duration,
    /// How long one attempt of a handler may run, for subscriptions that do not set their own
    /// (`SubscribeOptions::handler_timeout`). Default `None`: no limit.
    pub handler_timeout: Option<Duration>,
    /// How long an aggregate's current job may go on (running, retrying, dead-lettering) before
    /// its lane counts as blocked: in `lanes_blocked` and as a `Degraded` engine. Default 60 s.
    pub lane_blocked_after: Duration,
    /// How many pipelined publishes (`start_publish*`) may wait for their broker's
    /// acknowledgement at once; a further one waits for room. Also how far a
    /// `publish_results` reader may fall behind before it misses results. Default 10,000.
    pub publish_max_in_flight: usize,
}

impl BusSettings {
    /// The defaults for a bus of `backend` (`memory`, `nats`, `kafka`) named `client_id`:
    /// metrics under `{backend}_eventbus_{client_id}` (the Go SDK's names), the default
    /// engine, a 30 s drain timeout.
    pub fn new(backend: &str, client_id: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            metrics_namespace: eventbus_core::metric_namespace(backend, client_id),
            pool: PoolConfig::default(),
            settlement: Backoff::default(),
            drain_timeout: Duration::from_secs(30),
            handler_timeout: None,
            lane_blocked_after: Duration::from_secs(60),
            publish_max_in_flight: 10_000,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        if self.client_id.trim().is_empty() {
            return Err(Error::config("client_id", "must not be empty"));
        }
        if self.drain_timeout.is_zero() {
            return Err(Error::config("drain_timeout", "must be longer than 0"));
        }
        self.settlement.validate("settlement")?;
        if self.lane_blocked_after.is_zero() {
            return Err(Error::config("lane_blocked_after", "must be longer than 0"));
        }
        if self.publish_max_in_flight == 0 || self.publish_max_in_flight > MAX_PUBLISH_IN_FLIGHT {
            return Err(Error::config(
                "publish_max_in_flight",
                format!("must be between 1 and {MAX_PUBLISH_IN_FLIGHT}"),
            ));
        }
        if self
            .handler_timeout
            .is_some_and(|timeout| timeout.is_zero())
        {
            return Err(Error::config("handler_timeout", "must be longer than 0"));
        }
        validate_namespace(&self.metrics_namespace)?;
        self.pool.validate()
    }
}

/// The largest `publish_max_in_flight`: the window is a semaphore, and the results streams hold
/// as many results.
pub const MAX_PUBLISH_IN_FLIGHT: usize = 1 << 20;

/// Checks that `namespace` can prefix Prometheus metric names: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn validate_namespace(namespace: &str) -> Result<(), Error> {
    let valid = !namespace.is_empty()
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !namespace.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(Error::config(
            "metrics_namespace",
            format!("{namespace:?} is not a Prometheus name prefix"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::{Error, ErrorKind};

    fn field(config: PoolConfig) -> String {
        match config.validate() {
            Err(Error::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_are_the_go_sdk_knobs_and_valid() {
        let config = PoolConfig::default();
        assert_eq!(
            (config.pool_size, config.inbox_size, config.max_restarts),
            (256, 1000, 3)
        );
        assert_eq!(config.capacity(), 256_000);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn zero_and_absurd_values_are_rejected_with_the_field_named() {
        let with = |f: fn(&mut PoolConfig)| {
            let mut config = PoolConfig::default();
            f(&mut config);
            config
        };
        assert_eq!(field(with(|c| c.pool_size = 0)), "pool.pool_size");
        assert_eq!(
            field(with(|c| c.pool_size = MAX_POOL_SIZE + 1)),
            "pool.pool_size"
        );
        assert_eq!(field(with(|c| c.inbox_size = 0)), "pool.inbox_size");
        assert_eq!(
            field(with(|c| c.inbox_size = usize::MAX)),
            "pool.inbox_size"
        );
        assert_eq!(
            field(with(|c| {
                c.pool_size = MAX_POOL_SIZE;
                c.inbox_size = MAX_INBOX_SIZE;
            })),
            "pool.pool_size × pool.inbox_size"
        );
        assert_eq!(field(with(|c| c.max_restarts = 0)), "pool.max_restarts");
        assert_eq!(
            field(with(|c| c.retry.max_attempts = 0)),
            "retry.max_attempts"
        );
        assert_eq!(
            field(with(|c| c.retry.max_backoff = Duration::from_secs(7200))),
            "retry.max_backoff"
        );
        assert_eq!(
            field(with(|c| c.retry.initial_backoff = Duration::from_secs(60))),
            "retry.initial_backoff"
        );
        assert_eq!(
            PoolConfig {
                pool_size: 0,
                ..PoolConfig::default()
            }
            .validate()
            .unwrap_err()
            .kind(),
            ErrorKind::Config
        );
    }
}
