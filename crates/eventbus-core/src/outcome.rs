//! How a delivered message ended, and what the backend does about it.

use crate::handler::HandlerError;

/// The delivery guarantee a message is handled under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryClass {
    /// Envelope messages: acknowledged only after success or after dead-lettering; failures
    /// are retried in the aggregate's lane.
    AtLeastOnce,
    /// Plain messages: run once and acknowledged whatever the handler returned.
    AtMostOnce,
}

/// How the handling of one message ended; every message settles with exactly one.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler returned `Ok`.
    Succeeded {
        /// Attempts made, the successful one included.
        attempts: u32,
    },
    /// The handler returned an error and no attempt is left (or the error was permanent).
    Failed {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        error: HandlerError,
    },
    /// The handler panicked and the message may not run again: at-least-once messages after
    /// `max_restarts` panics, at-most-once messages after their one run.
    Panicked {
        /// Attempts made.
        attempts: u32,
        /// Panics caused (actor restarts).
        panics: u32,
        /// The last panic's message.
        message: String,
    },
    /// The message did not finish before shutdown; it is left for the broker to redeliver.
    Cancelled {
        /// Attempts started before cancellation.
        attempts: u32,
    },
}

/// What the backend does with a settled message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// Acknowledge / commit it.
    Ack,
    /// Write it to the dead-letter destination, then acknowledge it.
    DeadLetter,
    /// Leave it unacknowledged so that the broker delivers it again.
    Redeliver,
}

impl Outcome {
    /// True for [`Outcome::Succeeded`].
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded { .. })
    }

    /// Attempts made.
    pub fn attempts(&self) -> u32 {
        match self {
            Outcome::Succeeded { attempts }
            | Outcome::Failed { attempts, .. }
            | Outcome::Panicked { attempts, .. }
            | Outcome::Cancelled { attempts } => *attempts,
        }
    }

    /// Why the message failed, as written to `X-Error-Message`: the last error, or the panic
    /// message; empty for a success or a cancellation.
    ///
    /// ```
    /// use eventbus_core::Outcome;
    ///
    /// let outcome = Outcome::Panicked { attempts: 2, panics: 2, message: "bug".into() };
    /// assert_eq!(outcome.failure_reason(), "handler panicked: bug");
    /// ```
    pub fn failure_reason(&self) -> String {
        match self {
            Outcome::Failed { error, .. } => error.to_string(),
            Outcome::Panicked { message, .. } => format!("handler panicked: {message}"),
            Outcome::Succeeded { .. } | Outcome::Cancelled { .. } => String::new(),
        }
    }

    /// The delivery contract: what to do with a message of `class` that ended like this.
    ///
    /// | outcome | at-least-once | at-most-once |
    /// |---|---|---|
    /// | succeeded | ack | ack |
    /// | failed, panicked | dead-letter | ack |
    /// | cancelled before it ran | redeliver | redeliver |
    /// | cancelled while it ran | redeliver | ack (it ran: it must not run again) |
    ///
    /// ```
    /// use eventbus_core::{DeliveryClass, Outcome, Settlement};
    ///
    /// let outcome = Outcome::Cancelled { attempts: 0 };
    /// assert_eq!(outcome.settlement(DeliveryClass::AtLeastOnce), Settlement::Redeliver);
    /// ```
    pub fn settlement(&self, class: DeliveryClass) -> Settlement {
        match (self, class) {
            (Outcome::Cancelled { attempts }, DeliveryClass::AtMostOnce) if *attempts > 0 => {
                Settlement::Ack
            }
            (Outcome::Cancelled { .. }, _) => Settlement::Redeliver,
            (Outcome::Succeeded { .. }, _) | (_, DeliveryClass::AtMostOnce) => Settlement::Ack,
            (Outcome::Failed { .. } | Outcome::Panicked { .. }, DeliveryClass::AtLeastOnce) => {
                Settlement::DeadLetter
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes() -> Vec<Outcome> {
        vec![
            Outcome::Succeeded { attempts: 2 },
            Outcome::Failed {
                attempts: 3,
                error: HandlerError::transient("boom"),
            },
            Outcome::Panicked {
                attempts: 3,
                panics: 3,
                message: "bad".into(),
            },
            Outcome::Cancelled { attempts: 1 },
        ]
    }

    #[test]
    fn envelopes_are_acked_only_after_success_or_dead_lettering() {
        let settled: Vec<Settlement> = outcomes()
            .iter()
            .map(|o| o.settlement(DeliveryClass::AtLeastOnce))
            .collect();
        assert_eq!(
            settled,
            [
                Settlement::Ack,
                Settlement::DeadLetter,
                Settlement::DeadLetter,
                Settlement::Redeliver
            ]
        );
    }

    #[test]
    fn plain_messages_are_acked_whatever_the_handler_returned() {
        let settled: Vec<Settlement> = outcomes()
            .iter()
            .map(|o| o.settlement(DeliveryClass::AtMostOnce))
            .collect();
        assert_eq!(
            settled,
            [
                Settlement::Ack,
                Settlement::Ack,
                Settlement::Ack,
                // Cancelled after its one run started: it ran, so it is not run again.
                Settlement::Ack
            ]
        );
        assert_eq!(
            Outcome::Cancelled { attempts: 0 }.settlement(DeliveryClass::AtMostOnce),
            Settlement::Redeliver,
            "a plain message that never ran is given back"
        );
    }

    #[test]
    fn outcomes_report_attempts() {
        let attempts: Vec<u32> = outcomes().iter().map(Outcome::attempts).collect();
        assert_eq!(attempts, [2, 3, 3, 1]);
        assert!(outcomes()[0].is_success());
        assert!(!outcomes()[1].is_success());
    }
}
