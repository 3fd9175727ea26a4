//! Typed envelope handlers.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use eventbus_core::{
    Envelope, Error, EventBus, HandlerContext, HandlerError, SubscribeOptions, Subscription,
    TypedHandler,
};
use serde::de::DeserializeOwned;

/// Conveniences on every [`EventBus`].
#[async_trait]
pub trait EventBusExt: EventBus {
    /// Subscribes a handler that receives the envelope and its payload decoded as `T`. A payload
    /// that does not decode as `T` is a permanent error: the envelope is dead-lettered at once.
    async fn subscribe_envelope_typed<T, F, Fut>(
        &self,
        topic: &str,
        handler: F,
        options: SubscribeOptions,
    ) -> Result<Subscription, Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(HandlerContext, Envelope, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.subscribe_envelope(topic, Arc::new(TypedHandler::new(handler)), options)
            .await
    }
}

impl<B: EventBus + ?Sized> EventBusExt for B {}
