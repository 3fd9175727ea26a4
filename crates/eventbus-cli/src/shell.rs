//! `eventbus publish` and `eventbus subscribe`: JSON lines in and out.
//!
//! The memory backend lives inside one process, so there both commands make a round trip: they
//! subscribe to the topic, publish the lines of standard input, print what the subscription
//! receives, and stop once every line came back.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use eventbus::{
    Backend, Bus, Config, Envelope, EventBus, HandlerContext, Message, OutboundMessage, Position,
    SubscribeOptions,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::CliError;
use crate::counter::Counter;

/// Options of `eventbus publish`.
#[derive(Args, Debug)]
pub(crate) struct PublishArgs {
    /// The topic to publish to.
    #[arg(long)]
    topic: String,
    /// Each line is an envelope (JSON), published with its headers and key; otherwise each line
    /// is a plain message payload.
    #[arg(long)]
    envelope: bool,
    /// The bus configuration file (TOML or YAML); default: memory.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Options of `eventbus subscribe`.
#[derive(Args, Debug)]
pub(crate) struct SubscribeArgs {
    /// The topic to subscribe to.
    #[arg(long)]
    topic: String,
    /// Subscribe for envelopes (printed as envelope JSON); otherwise plain messages.
    #[arg(long)]
    envelope: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// The bus configuration file (TOML or YAML); default: memory.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// A consumed message as one JSON object.
fn message_json(message: &Message) -> Value {
    let headers: Map<String, Value> = message
        .headers
        .iter()
        .map(|(name, value)| (name.to_owned(), String::from_utf8_lossy(value).into()))
        .collect();
    let payload = serde_json::from_slice::<Value>(&message.payload)
        .unwrap_or_else(|_| String::from_utf8_lossy(&message.payload).into());
    let sequence = match message.meta.position {
        Position::Sequence(sequence) => json!(sequence),
        _ => Value::Null,
    };
    json!({
        "topic": message.topic,
        "sequence": sequence,
        "key": message.key.as_ref().map(|key| String::from_utf8_lossy(key).into_owned()),
        "headers": headers,
        "payload": payload,
    })
}

async fn print_subscription(
    bus: &Bus,
    topic: &str,
    envelope: bool,
) -> Result<Arc<Counter>, CliError> {
    let printed = Arc::new(Counter::default());
    let p = printed.clone();
    if envelope {
        bus.subscribe_envelope(
            topic,
            Arc::new(move |_ctx: HandlerContext, envelope: Envelope| {
                let p = p.clone();
                async move {
                    let bytes = envelope
                        .to_bytes()
                        .map_err(eventbus::HandlerError::permanent)?;
                    println!("{}", String::from_utf8_lossy(&bytes));
                    p.add_one();
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;
    } else {
        bus.subscribe(
            topic,
            Arc::new(move |_ctx: HandlerContext, message: Message| {
                let p = p.clone();
                async move {
                    println!("{}", message_json(&message));
                    p.add_one();
                    Ok(())
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;
    }
    Ok(printed)
}

/// Publishes every line of standard input; returns how many.
async fn publish_stdin(bus: &Bus, topic: &str, envelope: bool) -> Result<u64, CliError> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut published = 0;
    let mut number = 0;
    while let Some(line) = lines.next_line().await? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let result = if envelope {
            match Envelope::from_bytes(line.as_bytes()) {
                Ok(envelope) => bus.publish_envelope(topic, &envelope).await,
                Err(error) => Err(error),
            }
        } else {
            bus.publish(topic, OutboundMessage::new(line.into_bytes()))
                .await
        };
        result.map_err(|error| CliError(format!("standard input, line {number}: {error}")))?;
        published += 1;
    }
    Ok(published)
}

async fn connect(config: Option<&std::path::Path>) -> Result<Bus, CliError> {
    Ok(eventbus::connect(Config::load(config)?).await?)
}

/// How long a round trip on memory may take before the command gives up.
const ROUND_TRIP: Duration = Duration::from_secs(60);

async fn round_trip(bus: &Bus, printed: &Counter, published: u64) -> Result<(), CliError> {
    tokio::time::timeout(ROUND_TRIP, printed.wait_for(published))
        .await
        .map_err(|_| CliError(format!("messages did not come back within {ROUND_TRIP:?}")))?;
    bus.close().await?;
    Ok(())
}

pub(crate) async fn publish(args: PublishArgs) -> Result<ExitCode, CliError> {
    let bus = connect(args.config.as_deref()).await?;
    let printed = match bus.backend() {
        Backend::Memory => Some(print_subscription(&bus, &args.topic, args.envelope).await?),
        // A broker keeps the messages for its subscribers.
        _ => None,
    };
    let published = publish_stdin(&bus, &args.topic, args.envelope).await?;
    match printed {
        Some(printed) => round_trip(&bus, &printed, published).await?,
        None => bus.close().await?,
    }
    eprintln!("published {published} messages to {}", args.topic);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn subscribe(args: SubscribeArgs) -> Result<ExitCode, CliError> {
    let bus = connect(args.config.as_deref()).await?;
    let printed = print_subscription(&bus, &args.topic, args.envelope).await?;
    match bus.backend() {
        Backend::Memory => {
            let published = publish_stdin(&bus, &args.topic, args.envelope).await?;
            let wanted = args.count.map_or(published, |count| count.min(published));
            tokio::time::timeout(ROUND_TRIP, printed.wait_for(wanted))
                .await
                .map_err(|_| {
                    CliError(format!("messages did not come back within {ROUND_TRIP:?}"))
                })?;
            bus.close().await?;
        }
        // A broker: print until `--count` messages arrived or Ctrl-C.
        _ => {
            let until_count = async {
                match args.count {
                    Some(count) => printed.wait_for(count).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = until_count => {}
                interrupted = tokio::signal::ctrl_c() => interrupted?,
            }
            bus.close().await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
