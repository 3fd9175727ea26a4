//! The state of a bus's connection to its broker, watchable as it changes.

/// Where a bus stands with its broker. Watch it with
/// [`EventBus::connection_state`](crate::EventBus::connection_state) (this replaces the Go SDK's
/// reconnect callback): `borrow()` reads it now, `changed().await` waits for the next change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected (the memory backend always is while open).
    Connected,
    /// The connection was lost and the client is reconnecting by itself (NATS); every broker is
    /// unreachable and the client keeps retrying (Kafka).
    Reconnecting,
    /// The bus was closed, or the client gave up: nothing reconnects any more.
    Closed,
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectionState::Connected => "connected",
            ConnectionState::Reconnecting => "reconnecting",
            ConnectionState::Closed => "closed",
        })
    }
}

/// A watch of a bus's [`ConnectionState`].
///
/// ```
/// use eventbus_core::{ConnectionState, ConnectionWatch};
///
/// let (state, watch): (_, ConnectionWatch) = tokio::sync::watch::channel(ConnectionState::Connected);
/// state.send_replace(ConnectionState::Reconnecting);
/// assert_eq!(*watch.borrow(), ConnectionState::Reconnecting);
/// ```
pub type ConnectionWatch = tokio::sync::watch::Receiver<ConnectionState>;
