//! Standard output for the lines the handlers print, with its failures reported instead of
//! panicked on.
//!
//! `println!` panics when standard output is closed (`eventbus subscribe … | head -n 5`): in a
//! handler, that panic failed the message, which was then dead-lettered and acknowledged, and the
//! subscription went on taking messages it could not print. [`Output`] returns the failure to the
//! handler and wakes the command, which stops the subscription and gives back what was not printed.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, watch};

/// Standard output shared by the handlers of one command: whole lines, one at a time.
///
/// Once a write failed, nothing more is written and [`closed`](Self::closed) returns.
pub(crate) struct Output {
    /// Tokio's handle writes on a blocking thread, so a reader that is slow or gone holds no
    /// runtime worker; the lock keeps lines whole.
    stdout: Mutex<tokio::io::Stdout>,
    /// Why writing failed; `None` while it works.
    failure: watch::Sender<Option<String>>,
}

impl Output {
    /// The process's standard output.
    pub(crate) fn stdout() -> Arc<Self> {
        Arc::new(Self {
            stdout: Mutex::new(tokio::io::stdout()),
            failure: watch::Sender::new(None),
        })
    }

    /// Writes `line` and a line break, and flushes them. Returns `false` when the write failed, or
    /// without writing when an earlier one failed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the call releases the lock; what it handed to the writer is still
    /// written.
    pub(crate) async fn print_line(&self, mut line: Vec<u8>) -> bool {
        line.push(b'\n');
        let mut stdout = self.stdout.lock().await;
        if self.failure.borrow().is_some() {
            return false;
        }
        let written = match stdout.write_all(&line).await {
            Ok(()) => stdout.flush().await,
            Err(error) => Err(error),
        };
        match written {
            Ok(()) => true,
            Err(error) => {
                self.failure.send_if_modified(|failure| {
                    let first = failure.is_none();
                    if first {
                        *failure = Some(error.to_string());
                    }
                    first
                });
                false
            }
        }
    }

    /// Waits until a write to standard output failed; returns why.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: nothing is consumed.
    pub(crate) async fn closed(&self) -> String {
        let mut failure = self.failure.subscribe();
        match failure.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // Unreachable: `self` holds the sender.
            Err(_) => std::future::pending().await,
        }
    }
}
