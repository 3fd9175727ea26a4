//! Health reports.

/// How healthy a bus or one of its components is. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// Working.
    Healthy,
    /// Working with trouble (reconnecting, lagging).
    Degraded,
    /// Not working (disconnected, closed).
    Unhealthy,
}

/// The health of one component of a bus (a connection, a subscription, the engine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentHealth {
    /// The component's name (`connection`, `subscription orders`).
    pub name: String,
    /// Its status.
    pub status: HealthStatus,
    /// What a person should know, if anything.
    pub detail: Option<String>,
}

/// What [`EventBus::health`](crate::EventBus::health) reports: the backend and its components;
/// the bus's status is the worst of theirs.
///
/// ```
/// use eventbus_core::{HealthReport, HealthStatus};
///
/// let report = HealthReport::new("nats")
///     .with_component("connection", HealthStatus::Degraded, Some("reconnecting".into()))
///     .with_component("subscription orders", HealthStatus::Healthy, None);
/// assert_eq!(report.status(), HealthStatus::Degraded);
/// assert!(!report.is_healthy());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    /// The backend (`memory`, `nats`, `kafka`).
    pub backend: String,
    /// The components checked.
    pub components: Vec<ComponentHealth>,
}

impl HealthReport {
    /// A report for `backend` with no components yet.
    pub fn new(backend: impl Into<String>) -> Self {
        Self {
            backend: backend.into(),
            components: Vec::new(),
        }
    }

    /// Adds a component.
    pub fn with_component(
        mut self,
        name: impl Into<String>,
        status: HealthStatus,
        detail: Option<String>,
    ) -> Self {
        self.components.push(ComponentHealth {
            name: name.into(),
            status,
            detail,
        });
        self
    }

    /// Adds the `bus` component every backend reports: healthy while open, unhealthy once
    /// closed, with the number of subscriptions.
    ///
    /// ```
    /// use eventbus_core::HealthReport;
    ///
    /// let report = HealthReport::new("memory").with_bus_state(false, 2);
    /// assert!(report.is_healthy());
    /// assert_eq!(report.components[0].detail.as_deref(), Some("open (2 subscriptions)"));
    /// assert!(!HealthReport::new("memory").with_bus_state(true, 0).is_healthy());
    /// ```
    pub fn with_bus_state(self, closed: bool, subscriptions: usize) -> Self {
        let (status, state) = if closed {
            (HealthStatus::Unhealthy, "closed")
        } else {
            (HealthStatus::Healthy, "open")
        };
        self.with_component(
            "bus",
            status,
            Some(format!("{state} ({subscriptions} subscriptions)")),
        )
    }

    /// The worst status of the components (healthy when there are none).
    pub fn status(&self) -> HealthStatus {
        self.components
            .iter()
            .map(|component| component.status)
            .max()
            .unwrap_or(HealthStatus::Healthy)
    }

    /// True when every component is healthy.
    pub fn is_healthy(&self) -> bool {
        self.status() == HealthStatus::Healthy
    }
}
