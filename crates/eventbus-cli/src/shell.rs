//! `eventbus publish` and `eventbus subscribe`: JSON lines in and out.
//!
//! The memory backend lives inside one process, so there both commands make a round trip: they
//! subscribe to the topic, publish the lines of standard input, print what the subscription
//! receives, and stop once every line came back.
//!
//! When standard output is closed (`eventbus subscribe … | head -n 5`), the command stops: the
//! message being printed is not acknowledged (a broker gives it back), nothing more is taken, the
//! bus closes after a short drain and the command exits with status 1, saying so on stderr.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use eventbus::{
    Backend, Bus, Config, Envelope, HandlerContext, HandlerError, Message, OutboundMessage,
    Position, SubscribeOptions,
};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::CliError;
use crate::counter::Counter;
use crate::output::Output;

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
    /// NATS: take over from this durable of the service this one replaces (a Go service's
    /// `business-consumer-unified_{topic, . as _}`): wait while it is read, then start right
    /// after its ack floor (`nats.topics."T".take_over_from`; docs/migration.md).
    #[arg(long, value_name = "DURABLE")]
    take_over_from: Option<String>,
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

/// Prints `line` for the message of `ctx` and counts it in `printed`.
///
/// When standard output is closed, the message is neither acknowledged nor failed (an error
/// would retry and then dead-letter it): the call waits until the bus, which the command is
/// closing, cancels it at its drain deadline, and the message is given back to the broker.
async fn print_or_give_back(
    output: &Output,
    printed: &Counter,
    ctx: &HandlerContext,
    line: Vec<u8>,
) -> Result<(), HandlerError> {
    if output.print_line(line).await {
        printed.add_one();
        return Ok(());
    }
    ctx.cancellation().cancelled().await;
    // The bus settles a cancelled attempt as cancelled whatever it returns.
    Err(HandlerError::transient("standard output is closed"))
}

/// Subscribes to `topic` with a handler that prints each message to `output` as a JSON line;
/// returns the count of printed messages.
async fn print_subscription(
    bus: &Bus,
    topic: &str,
    envelope: bool,
    output: &Arc<Output>,
) -> Result<Arc<Counter>, CliError> {
    let printed = Arc::new(Counter::default());
    let (p, out) = (printed.clone(), output.clone());
    if envelope {
        bus.subscribe_envelope(
            topic,
            Arc::new(move |ctx: HandlerContext, envelope: Envelope| {
                let (p, out) = (p.clone(), out.clone());
                async move {
                    let bytes = envelope.to_bytes().map_err(HandlerError::permanent)?;
                    print_or_give_back(&out, &p, &ctx, bytes.into()).await
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;
    } else {
        bus.subscribe(
            topic,
            Arc::new(move |ctx: HandlerContext, message: Message| {
                let (p, out) = (p.clone(), out.clone());
                async move {
                    let line = message_json(&message).to_string().into_bytes();
                    print_or_give_back(&out, &p, &ctx, line).await
                }
            }),
            SubscribeOptions::new(),
        )
        .await?;
    }
    Ok(printed)
}

/// Runs `work` until it ends, then closes `bus` and returns what `work` returned; stops early,
/// closing `bus`, with an error when standard output is closed.
async fn close_when_done<T>(
    bus: &Bus,
    output: &Output,
    printed: &Counter,
    work: impl Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::select! {
        done = work => {
            let done = done?;
            bus.close().await?;
            Ok(done)
        }
        reason = output.closed() => {
            bus.close().await?;
            Err(CliError(format!(
                "standard output closed ({reason}): stopped after printing {} messages; the \
                 others were not acknowledged",
                printed.get()
            )))
        }
    }
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
        result.map_err(|error| {
            CliError(format!("standard input, line {number}: {}", error.report()))
        })?;
        published += 1;
    }
    Ok(published)
}

/// The longest a shell command's bus waits for running handlers when it closes (shorter if the
/// configuration says so). The handlers only print a line: one still running after this waits on
/// a standard output that is full or closed, and its message is given back.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Connects the bus `config` describes (memory without one), with at most [`DRAIN_TIMEOUT`].
async fn connect(config: Option<&std::path::Path>) -> Result<Bus, CliError> {
    connect_with(Config::load(config)?).await
}

/// Connects a bus with `config`, its drain bounded for a command.
async fn connect_with(mut config: Config) -> Result<Bus, CliError> {
    config.drain_timeout = config.drain_timeout.min(DRAIN_TIMEOUT);
    Ok(eventbus::connect(config).await?)
}

/// How long a round trip on memory may take before the command gives up.
const ROUND_TRIP: Duration = Duration::from_secs(60);

/// Waits until `printed` reaches `wanted`, for at most [`ROUND_TRIP`].
async fn round_trip(printed: &Counter, wanted: u64) -> Result<(), CliError> {
    tokio::time::timeout(ROUND_TRIP, printed.wait_for(wanted))
        .await
        .map_err(|_| CliError(format!("messages did not come back within {ROUND_TRIP:?}")))
}

/// `eventbus publish`.
pub(crate) async fn publish(args: PublishArgs) -> Result<ExitCode, CliError> {
    let bus = connect(args.config.as_deref()).await?;
    let published = match bus.backend() {
        Backend::Memory => {
            let output = Output::stdout();
            let printed = print_subscription(&bus, &args.topic, args.envelope, &output).await?;
            close_when_done(&bus, &output, &printed, async {
                let published = publish_stdin(&bus, &args.topic, args.envelope).await?;
                round_trip(&printed, published).await?;
                Ok(published)
            })
            .await?
        }
        // A broker keeps the messages for its subscribers.
        _ => {
            let published = publish_stdin(&bus, &args.topic, args.envelope).await?;
            bus.close().await?;
            published
        }
    };
    eprintln!("published {published} messages to {}", args.topic);
    Ok(ExitCode::SUCCESS)
}

/// `eventbus subscribe`.
pub(crate) async fn subscribe(args: SubscribeArgs) -> Result<ExitCode, CliError> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(durable) = args.take_over_from {
        if config.backend != Backend::Nats {
            return Err(CliError(
                "--take-over-from takes over a NATS durable: the configured backend is not NATS"
                    .into(),
            ));
        }
        config
            .nats
            .topics
            .entry(args.topic.clone())
            .or_default()
            .take_over_from = Some(durable);
    }
    let bus = connect_with(config).await?;
    let output = Output::stdout();
    let printed = print_subscription(&bus, &args.topic, args.envelope, &output).await?;
    let work = async {
        match bus.backend() {
            Backend::Memory => {
                let published = publish_stdin(&bus, &args.topic, args.envelope).await?;
                round_trip(
                    &printed,
                    args.count.map_or(published, |count| count.min(published)),
                )
                .await
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
                    () = until_count => Ok(()),
                    interrupted = tokio::signal::ctrl_c() => Ok(interrupted?),
                }
            }
        }
    };
    close_when_done(&bus, &output, &printed, work).await?;
    Ok(ExitCode::SUCCESS)
}
