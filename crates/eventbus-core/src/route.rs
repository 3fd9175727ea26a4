//! Routing by event type: one subscription to a topic that carries many event types, each
//! envelope handed to the typed handler registered for its `event_type`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::envelope::Envelope;
use crate::error::Error;
use crate::handler::{EnvelopeHandler, HandlerContext, HandlerError};

/// What a [`Router`] does with an envelope whose `event_type` no route claims.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unclaimed {
    /// Dead-letter it at once (a permanent error, `no handler for event type "…"`): nothing is
    /// lost, and `eventbus dlq replay` brings it back once a handler exists. The default.
    #[default]
    DeadLetter,
    /// Acknowledge it unhandled: the subscription does not care about that type. Counted
    /// ([`Router::unclaimed`]) and logged at `debug`.
    Skip,
    /// Fail it as a transient error: retried by the subscription's retry policy (the
    /// aggregate's later events wait meanwhile), then dead-lettered like any failure. For a
    /// type that must not be passed over, whose handler a deploy is about to bring.
    Fail,
}

/// An envelope handler whose function takes the payload decoded as `T`: a [`Router`]'s route,
/// and what `EventBusExt::subscribe_envelope_typed` subscribes. A payload that does not decode
/// as `T` never will: a permanent error (dead-lettered at once, the reason naming the field).
pub struct TypedHandler<T, F> {
    handler: F,
    payload: PhantomData<fn() -> T>,
}

impl<T, F> TypedHandler<T, F> {
    /// The handler calling `handler` with each envelope and its payload decoded as `T`.
    pub fn new(handler: F) -> Self {
        Self {
            handler,
            payload: PhantomData,
        }
    }
}

#[async_trait]
impl<T, F, Fut> EnvelopeHandler for TypedHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(HandlerContext, Envelope, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, ctx: HandlerContext, envelope: Envelope) -> Result<(), HandlerError> {
        let payload: T = envelope.payload_as().map_err(HandlerError::permanent)?;
        (self.handler)(ctx, envelope, payload).await
    }
}

/// An envelope handler that dispatches each envelope to the handler registered for its
/// `event_type`, its payload decoded into that handler's type.
///
/// The router is one handler of one subscription, so the delivery contract holds across types:
/// an aggregate's events run one at a time and in order whatever their types, retries and dead
/// letters included. A payload that does not decode into its route's type is a permanent error
/// (dead-lettered at once, the reason naming the field); a type no route claims follows the
/// router's [`Unclaimed`] policy.
///
/// ```
/// use std::sync::Arc;
/// use eventbus_core::{Envelope, EnvelopeHandler, HandlerContext, Router, Unclaimed};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct OrderPlaced { total_cents: u64 }
/// #[derive(Deserialize)]
/// struct OrderShipped { carrier: String }
///
/// let router = Router::new()
///     .route("OrderPlaced", |_ctx: HandlerContext, envelope: Envelope, order: OrderPlaced| async move {
///         println!("{} placed: {} cents", envelope.aggregate_id, order.total_cents);
///         Ok(())
///     })?
///     .route("OrderShipped", |_ctx: HandlerContext, envelope: Envelope, shipped: OrderShipped| async move {
///         println!("{} shipped by {}", envelope.aggregate_id, shipped.carrier);
///         Ok(())
///     })?
///     .with_unclaimed(Unclaimed::Skip);
/// assert_eq!(router.event_types().count(), 2);
/// let handler: Arc<dyn EnvelopeHandler> = Arc::new(router);
/// # let _ = handler;
/// # Ok::<(), eventbus_core::Error>(())
/// ```
pub struct Router {
    routes: HashMap<String, Box<dyn EnvelopeHandler>>,
    unclaimed: Unclaimed,
    /// Envelopes no route claimed.
    unclaimed_seen: Arc<AtomicU64>,
}

impl Default for Router {
    fn default() -> Self {
        Self::new()
    }
}

impl Router {
    /// A router with no routes; unclaimed types are dead-lettered.
    pub fn new() -> Self {
        Self {
            routes: HashMap::new(),
            unclaimed: Unclaimed::DeadLetter,
            unclaimed_seen: Arc::default(),
        }
    }

    /// Routes envelopes of `event_type` to `handler`, which gets the payload decoded as `T`.
    /// Registering a type twice is a `Config` error (field `event_type`): one type, one
    /// handler.
    pub fn route<T, F, Fut>(
        mut self,
        event_type: impl Into<String>,
        handler: F,
    ) -> Result<Self, Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(HandlerContext, Envelope, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let event_type = event_type.into();
        if event_type.trim().is_empty() {
            return Err(Error::config("event_type", "a route needs an event type"));
        }
        if self.routes.contains_key(&event_type) {
            return Err(Error::config(
                "event_type",
                format!("{event_type:?} has a route already"),
            ));
        }
        self.routes
            .insert(event_type, Box::new(TypedHandler::new(handler)));
        Ok(self)
    }

    /// Sets what happens to an envelope whose type no route claims.
    pub fn with_unclaimed(mut self, policy: Unclaimed) -> Self {
        self.unclaimed = policy;
        self
    }

    /// The event types with a route.
    pub fn event_types(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// A counter of the envelopes no route claimed (every attempt at one counts), readable
    /// after the router was handed to a subscription.
    pub fn unclaimed(&self) -> UnclaimedCount {
        UnclaimedCount(self.unclaimed_seen.clone())
    }
}

/// How many envelopes a [`Router`] found no route for (see [`Router::unclaimed`]).
#[derive(Debug, Clone)]
pub struct UnclaimedCount(Arc<AtomicU64>);

impl UnclaimedCount {
    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EnvelopeHandler for Router {
    async fn handle(&self, ctx: HandlerContext, envelope: Envelope) -> Result<(), HandlerError> {
        if let Some(route) = self.routes.get(&envelope.event_type) {
            return route.handle(ctx, envelope).await;
        }
        self.unclaimed_seen.fetch_add(1, Ordering::Relaxed);
        let reason = || format!("no handler for event type {:?}", envelope.event_type);
        match self.unclaimed {
            Unclaimed::DeadLetter => Err(HandlerError::permanent(reason())),
            Unclaimed::Fail => Err(HandlerError::transient(reason())),
            Unclaimed::Skip => {
                tracing::debug!(
                    topic = ctx.topic(),
                    event_type = %envelope.event_type,
                    event_id = %envelope.event_id,
                    "no handler for this event type: acknowledged unhandled"
                );
                Ok(())
            }
        }
    }
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&str> = self.event_types().collect();
        types.sort_unstable();
        f.debug_struct("Router")
            .field("event_types", &types)
            .field("unclaimed", &self.unclaimed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::DeliveryMeta;
    use crate::{ErrorKind, HandlerErrorKind};
    use serde::Deserialize;
    use std::sync::Mutex;

    #[derive(Deserialize)]
    struct Placed {
        total: u64,
    }

    #[derive(Deserialize)]
    struct Shipped {
        carrier: String,
    }

    fn ctx() -> HandlerContext {
        HandlerContext::new(
            "orders",
            DeliveryMeta::default(),
            1,
            tokio_util::sync::CancellationToken::new(),
        )
    }

    fn router(seen: &Arc<Mutex<Vec<String>>>, unclaimed: Unclaimed) -> Router {
        let (a, b) = (seen.clone(), seen.clone());
        Router::new()
            .route("Placed", move |_ctx, envelope: Envelope, placed: Placed| {
                let a = a.clone();
                async move {
                    a.lock()
                        .unwrap()
                        .push(format!("{} placed {}", envelope.aggregate_id, placed.total));
                    Ok(())
                }
            })
            .unwrap()
            .route(
                "Shipped",
                move |_ctx, envelope: Envelope, shipped: Shipped| {
                    let b = b.clone();
                    async move {
                        b.lock().unwrap().push(format!(
                            "{} shipped {}",
                            envelope.aggregate_id, shipped.carrier
                        ));
                        Ok(())
                    }
                },
            )
            .unwrap()
            .with_unclaimed(unclaimed)
    }

    /// Polls a future that is ready at once (the handlers above) without a runtime.
    fn ready<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
                return output;
            }
        }
    }

    #[test]
    fn each_type_goes_to_its_handler_with_its_payload_decoded() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = router(&seen, Unclaimed::DeadLetter);
        let placed = Envelope::new("o-1", "Placed", 1, &serde_json::json!({"total": 12})).unwrap();
        let shipped =
            Envelope::new("o-1", "Shipped", 2, &serde_json::json!({"carrier": "DHL"})).unwrap();
        ready(router.handle(ctx(), placed)).unwrap();
        ready(router.handle(ctx(), shipped)).unwrap();
        assert_eq!(*seen.lock().unwrap(), ["o-1 placed 12", "o-1 shipped DHL"]);
        assert_eq!(router.unclaimed().get(), 0);
    }

    #[test]
    fn a_payload_that_does_not_decode_as_its_routes_type_is_a_permanent_error() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let router = router(&seen, Unclaimed::Skip);
        let bad = Envelope::new("o-1", "Placed", 1, &serde_json::json!({"total": "x"})).unwrap();
        let error = ready(router.handle(ctx(), bad)).unwrap_err();
        assert!(error.is_permanent());
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn an_unclaimed_type_follows_the_routers_policy_and_is_counted() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let unknown = || Envelope::new("o-1", "Cancelled", 3, &1).unwrap();
        let dead = router(&seen, Unclaimed::DeadLetter);
        let error = ready(dead.handle(ctx(), unknown())).unwrap_err();
        assert_eq!(error.kind(), HandlerErrorKind::Permanent);
        assert_eq!(error.to_string(), "no handler for event type \"Cancelled\"");
        let fail = router(&seen, Unclaimed::Fail);
        assert_eq!(
            ready(fail.handle(ctx(), unknown())).unwrap_err().kind(),
            HandlerErrorKind::Transient
        );
        let skip = router(&seen, Unclaimed::Skip);
        let count = skip.unclaimed();
        ready(skip.handle(ctx(), unknown())).unwrap();
        assert_eq!(count.get(), 1);
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn a_type_routed_twice_or_an_empty_type_is_a_config_error() {
        let twice = Router::new()
            .route("Placed", |_ctx, _e: Envelope, _p: Placed| async { Ok(()) })
            .unwrap()
            .route("Placed", |_ctx, _e: Envelope, _p: Placed| async { Ok(()) })
            .unwrap_err();
        assert_eq!(twice.kind(), ErrorKind::Config);
        let empty = Router::new()
            .route(" ", |_ctx, _e: Envelope, _p: Placed| async { Ok(()) })
            .unwrap_err();
        assert_eq!(empty.kind(), ErrorKind::Config);
    }
}
