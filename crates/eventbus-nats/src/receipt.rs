//! A consumed NATS message taken apart for the runtime, and its receipt: acks on JetStream.

use async_nats::HeaderMap;
use async_nats::jetstream::message::{AckKind, Acker};
use async_trait::async_trait;
use bytes::Bytes;
use eventbus_core::{
    DeliveryMeta, Error, HEADER_REPLAY_HEAD, HEADER_REPLAY_LAST, HEADER_REPLAY_OF, HEADER_REPLAYED,
    Headers, Message, TRACEPARENT, TRACESTATE,
};
use eventbus_pool::transport::Receipt;

use crate::publish::KEY_HEADER;

/// The message for the runtime, and the NATS headers still to convert when the handler does
/// not need them (envelope handlers see only the envelope): then only the headers the runtime
/// reads are converted (the trace context, and a replay's marks for parking).
pub(crate) fn take_apart(
    message: async_nats::Message,
    convert_headers: bool,
    meta: DeliveryMeta,
) -> (Message, Option<HeaderMap>) {
    let delivered = Message {
        topic: message.subject.to_string(),
        key: None,
        headers: Headers::new(),
        payload: message.payload,
        meta,
    };
    if convert_headers {
        (with_headers(&delivered, message.headers.as_ref()), None)
    } else {
        let mut delivered = delivered;
        if let Some(map) = &message.headers {
            for name in [
                TRACEPARENT,
                TRACESTATE,
                HEADER_REPLAYED,
                HEADER_REPLAY_HEAD,
                HEADER_REPLAY_LAST,
                HEADER_REPLAY_OF,
            ] {
                if let Some(value) = map.get(name) {
                    delivered.headers.insert(name, value.as_str().to_owned());
                }
            }
        }
        (delivered, message.headers)
    }
}

/// `message` with the NATS headers converted: the key header becomes the key.
fn with_headers(message: &Message, map: Option<&HeaderMap>) -> Message {
    let mut message = message.clone();
    // All of them, the trace context headers `take_apart` kept included.
    message.headers = Headers::new();
    if let Some(map) = map {
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            for value in values {
                if name == KEY_HEADER {
                    message.key = Some(Bytes::copy_from_slice(value.as_str().as_bytes()));
                } else {
                    message.headers.append(name, value.as_str().to_owned());
                }
            }
        }
    }
    message
}

/// The receipt of a JetStream message: ack, nak, term and in-progress acks on its reply
/// subject.
pub(crate) struct JetStreamReceipt {
    pub(crate) acker: Acker,
    /// Headers not converted yet (see [`take_apart`]).
    pub(crate) headers: Option<HeaderMap>,
}

impl JetStreamReceipt {
    async fn send(&self, kind: AckKind) -> Result<(), Error> {
        self.acker
            .ack_with(kind)
            .await
            .map_err(|error| Error::broker("cannot acknowledge", error))
    }
}

#[async_trait]
impl Receipt for JetStreamReceipt {
    async fn ack(&self) -> Result<(), Error> {
        self.send(AckKind::Ack).await
    }

    async fn give_back(&self) -> Result<(), Error> {
        self.send(AckKind::Nak(None)).await
    }

    async fn terminate(&self) -> Result<(), Error> {
        self.send(AckKind::Term).await
    }

    async fn in_progress(&self) -> Result<(), Error> {
        self.send(AckKind::Progress).await
    }

    fn full_message(&self, delivered: &Message) -> Message {
        match &self.headers {
            Some(map) => with_headers(delivered, Some(map)),
            None => delivered.clone(),
        }
    }
}

/// The receipt of a core NATS message (an ephemeral topic): nothing to acknowledge.
pub(crate) struct CoreReceipt;

#[async_trait]
impl Receipt for CoreReceipt {
    async fn ack(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn give_back(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn terminate(&self) -> Result<(), Error> {
        Ok(())
    }
}
