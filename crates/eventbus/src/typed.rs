//! Typed envelope handlers.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use eventbus_core::{
    Envelope, Error, EventBus, HandlerContext, HandlerError, SubscribeOptions, Subscription,
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
        let handler = Arc::new(handler);
        self.subscribe_envelope(
            topic,
            Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
                let handler = handler.clone();
                async move {
                    let payload: T = envelope.payload_as().map_err(HandlerError::permanent)?;
                    handler(ctx, envelope, payload).await
                }
            }),
            options,
        )
        .await
    }
}

impl<B: EventBus + ?Sized> EventBusExt for B {}
