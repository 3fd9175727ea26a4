//! The Go SDK's health-check heartbeat, sent and watched by this SDK: every service publishes a
//! [`Heartbeat`] to a shared topic (`jxt-core-health-check`) every interval and subscribes to
//! it; a topic that stays silent for intervals raises the severity the Go SDK's subscriber
//! reports. Go and Rust services on one topic see each other's heartbeats.
//!
//! ```
//! use std::time::Duration;
//! use eventbus::{Config, HeartbeatOptions, Heartbeats};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventbus::Error> {
//! let bus = eventbus::connect(Config::default()).await?;
//! let heartbeats = Heartbeats::start(
//!     bus.as_event_bus(),
//!     HeartbeatOptions::new("billing", "memory").with_interval(Duration::from_millis(20)),
//! )
//! .await?;
//! while heartbeats.status().received == 0 {
//!     tokio::time::sleep(Duration::from_millis(5)).await;
//! }
//! assert_eq!(heartbeats.status().severity, None);
//! heartbeats.stop().await?;
//! bus.close().await?;
//! # Ok(())
//! # }
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use eventbus_core::{
    Error, EventBus, HEARTBEAT_TOPIC, HandlerContext, Heartbeat, Message, OffsetDateTime,
    OutboundMessage, SubscribeOptions, Subscription,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What [`Heartbeats`] sends and watches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatOptions {
    /// The shared topic. Default [`HEARTBEAT_TOPIC`], the Go SDK's.
    pub topic: String,
    /// How often a heartbeat is sent, and how long the topic may stay silent before that counts
    /// as a miss. Default 2 minutes, the Go SDK's.
    pub interval: Duration,
    /// Missed intervals that make the severity critical (half of it: error). Default 3.
    pub failure_threshold: u32,
    /// The heartbeat's `source`: the service's name.
    pub source: String,
    /// The heartbeat's `eventBusType`: `kafka`, `nats` or `memory`.
    pub bus_type: String,
    /// Send heartbeats. Default true.
    pub publish: bool,
    /// Watch the topic. Default true.
    pub monitor: bool,
}

impl HeartbeatOptions {
    /// The defaults for service `source` on a bus of `bus_type`.
    pub fn new(source: impl Into<String>, bus_type: impl Into<String>) -> Self {
        Self {
            topic: HEARTBEAT_TOPIC.to_owned(),
            interval: Duration::from_secs(120),
            failure_threshold: 3,
            source: source.into(),
            bus_type: bus_type.into(),
            publish: true,
            monitor: true,
        }
    }

    /// Sets the topic.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// Sets the interval.
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Sets the failure threshold.
    pub fn with_failure_threshold(mut self, threshold: u32) -> Self {
        self.failure_threshold = threshold;
        self
    }

    /// Sends heartbeats, or not.
    pub fn with_publishing(mut self, publish: bool) -> Self {
        self.publish = publish;
        self
    }

    /// Watches the topic, or not.
    pub fn with_monitoring(mut self, monitor: bool) -> Self {
        self.monitor = monitor;
        self
    }
}

/// How long the heartbeat topic has been silent, as the Go SDK's subscriber grades it:
/// critical from the failure threshold on, an error from half of it (integer division: with the
/// default 3 the first missed interval is already an error), a warning below that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// At least one interval missed.
    Warning,
    /// At least half the failure threshold.
    Error,
    /// At least the failure threshold.
    Critical,
}

/// What [`Heartbeats`] saw and did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeartbeatStatus {
    /// Heartbeats received that passed the checks (from any source on the topic).
    pub received: u64,
    /// Messages on the topic that were not heartbeats that count (stale, unknown bus type, not
    /// the format).
    pub refused: u64,
    /// The last heartbeat received.
    pub last: Option<Heartbeat>,
    /// Whole intervals since the last heartbeat (or since monitoring started).
    pub missed_intervals: u32,
    /// `None` while heartbeats arrive; see [`Severity`]. Always `None` when not monitoring.
    pub severity: Option<Severity>,
    /// Heartbeats sent.
    pub sent: u64,
    /// Sends that failed in a row (0 after a success).
    pub send_failures: u32,
}

#[derive(Default)]
struct State {
    received: u64,
    refused: u64,
    last: Option<Heartbeat>,
    last_at: Option<Instant>,
    sent: u64,
    send_failures: u32,
}

/// The heartbeat of one service: a task that sends, a plain subscription that watches.
pub struct Heartbeats {
    options: HeartbeatOptions,
    state: Arc<Mutex<State>>,
    started: Instant,
    sender: Option<JoinHandle<()>>,
    subscription: Option<Subscription>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Heartbeats {
    /// Subscribes to the topic (when monitoring), then starts sending (when publishing): one
    /// heartbeat at once, then one every interval. A failed send is logged and counted, and the
    /// next interval sends again.
    ///
    /// # Cancel safety
    ///
    /// Dropping the call before it returns leaves at most a subscription that the bus stops at
    /// `close`; nothing is sent.
    pub async fn start(bus: Arc<dyn EventBus>, options: HeartbeatOptions) -> Result<Self, Error> {
        if options.interval.is_zero() {
            return Err(Error::config("heartbeat.interval", "must be more than 0"));
        }
        let state = Arc::new(Mutex::new(State::default()));
        let subscription = if options.monitor {
            let seen = state.clone();
            let handler = Arc::new(move |_ctx: HandlerContext, message: Message| {
                let seen = seen.clone();
                async move {
                    let mut state = lock(&seen);
                    match Heartbeat::from_bytes(&message.payload, OffsetDateTime::now_utc()) {
                        Ok(beat) => {
                            state.received += 1;
                            state.last = Some(beat);
                            state.last_at = Some(Instant::now());
                        }
                        Err(error) => {
                            state.refused += 1;
                            tracing::debug!(%error, "health-check message refused");
                        }
                    }
                    Ok(())
                }
            });
            Some(
                bus.subscribe(&options.topic, handler, SubscribeOptions::new())
                    .await?,
            )
        } else {
            None
        };
        let sender = options.publish.then(|| {
            let (bus, state, options) = (bus.clone(), state.clone(), options.clone());
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(options.interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    let sent = match Heartbeat::new(&options.source, &options.bus_type).to_bytes()
                    {
                        Ok(bytes) => {
                            bus.publish(&options.topic, OutboundMessage::new(bytes))
                                .await
                        }
                        Err(error) => Err(error),
                    };
                    let mut state = lock(&state);
                    match sent {
                        Ok(()) => {
                            state.sent += 1;
                            state.send_failures = 0;
                        }
                        Err(error) => {
                            state.send_failures = state.send_failures.saturating_add(1);
                            tracing::warn!(%error, failures = state.send_failures, topic = %options.topic, "heartbeat not sent");
                        }
                    }
                }
            })
        });
        Ok(Self {
            options,
            state,
            started: Instant::now(),
            sender,
            subscription,
        })
    }

    /// What was seen and sent so far, and the severity of the silence.
    pub fn status(&self) -> HeartbeatStatus {
        let state = lock(&self.state);
        let since = state.last_at.unwrap_or(self.started);
        let missed = since.elapsed().as_nanos() / self.options.interval.as_nanos().max(1);
        let missed_intervals = u32::try_from(missed).unwrap_or(u32::MAX);
        let threshold = self.options.failure_threshold.max(1);
        let severity = if !self.options.monitor || missed_intervals == 0 {
            None
        } else if missed_intervals >= threshold {
            Some(Severity::Critical)
        } else if missed_intervals >= threshold / 2 && threshold / 2 > 0 {
            Some(Severity::Error)
        } else {
            Some(Severity::Warning)
        };
        HeartbeatStatus {
            received: state.received,
            refused: state.refused,
            last: state.last.clone(),
            missed_intervals,
            severity,
            sent: state.sent,
            send_failures: state.send_failures,
        }
    }

    /// Stops sending and unsubscribes.
    pub async fn stop(mut self) -> Result<(), Error> {
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
        if let Some(subscription) = self.subscription.take() {
            subscription.unsubscribe().await?;
        }
        Ok(())
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
    }
}
