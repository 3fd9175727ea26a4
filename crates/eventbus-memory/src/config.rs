//! Configuration of the memory bus.

use std::time::Duration;

use eventbus_core::Error;
use eventbus_pool::PoolConfig;

/// Configuration of a [`MemoryBus`](crate::MemoryBus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Names the bus in metrics: `memory_eventbus_{client_id}` (sanitized). Default `eventbus`.
    pub client_id: String,
    /// The ordering engine and its retry policy.
    pub pool: PoolConfig,
    /// How long `close` lets in-flight messages finish. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            client_id: "eventbus".to_owned(),
            pool: PoolConfig::default(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl MemoryConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        if self.client_id.trim().is_empty() {
            return Err(Error::config("client_id", "must not be empty"));
        }
        self.pool.validate()
    }
}
