//! `eventbus dlq list | show | replay`: the dead letters of a topic, looked at and put back.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use eventbus::{EventBus, OffsetDateTime, Position, StoredDeadLetter};
use serde_json::{Map, Value, json};

use crate::CliError;

/// `eventbus dlq …`.
#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// List the dead letters of a topic: position, time, aggregate, event, attempts, reason.
    List(ListArgs),
    /// Print one dead letter in full (headers, key, payload) as JSON.
    Show(ShowArgs),
    /// Publish selected dead letters back to their topic (original key, payload and headers,
    /// without the dead-letter headers), in their order, removing each once it is published.
    Replay(ReplayArgs),
}

/// Which topic's dead letters.
#[derive(Args, Debug)]
pub(crate) struct Source {
    /// The bus configuration file (NATS or Kafka).
    #[arg(long)]
    config: PathBuf,
    /// The topic whose dead letters to read (they are in `{topic}.DLQ`).
    #[arg(long)]
    topic: String,
    /// The dead-letter topic, when the subscriptions used another than `{topic}.DLQ`.
    #[arg(long)]
    dead_letter_topic: Option<String>,
}

/// Which dead letters.
#[derive(Args, Debug)]
pub(crate) struct Selection {
    /// Only this aggregate's.
    #[arg(long)]
    aggregate: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    since: Option<OffsetDateTime>,
    /// Only those dead-lettered before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    until: Option<OffsetDateTime>,
}

/// Options of `eventbus dlq list`.
#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    selection: Selection,
}

/// Options of `eventbus dlq show`.
#[derive(Args, Debug)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    source: Source,
    /// Its position, as `list` prints it (a stream sequence, or `partition/offset`).
    #[arg(long)]
    position: String,
}

/// Options of `eventbus dlq replay`.
#[derive(Args, Debug)]
pub(crate) struct ReplayArgs {
    #[command(flatten)]
    source: Source,
    #[command(flatten)]
    selection: Selection,
    /// Every dead letter of the topic (required when no other selection is given).
    #[arg(long)]
    all: bool,
    /// Print what would be replayed; publish and remove nothing.
    #[arg(long)]
    dry_run: bool,
}

fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    humantime::parse_rfc3339_weak(text)
        .map(OffsetDateTime::from)
        .map_err(|error| format!("not an RFC 3339 time ({error})"))
}

/// A position as `list` prints it and `show` takes it.
fn position_text(position: Position) -> String {
    match position {
        Position::Sequence(sequence) => sequence.to_string(),
        Position::Partition { partition, offset } => format!("{partition}/{offset}"),
        _ => "-".to_owned(),
    }
}

impl Selection {
    fn selects(&self, letter: &StoredDeadLetter) -> bool {
        let at = letter.dead_lettered_at();
        self.aggregate
            .as_deref()
            .is_none_or(|aggregate| letter.aggregate_id().as_deref() == Some(aggregate))
            && self
                .since
                .is_none_or(|since| at.is_some_and(|at| at >= since))
            && self
                .until
                .is_none_or(|until| at.is_some_and(|at| at < until))
    }

    fn is_empty(&self) -> bool {
        self.aggregate.is_none() && self.since.is_none() && self.until.is_none()
    }
}

/// Connects the bus and reads the dead letters of `source`.
async fn read(source: &Source) -> Result<(eventbus::Bus, String, Vec<StoredDeadLetter>), CliError> {
    let config = eventbus::Config::load(Some(&source.config))?;
    let topic = match &source.dead_letter_topic {
        Some(topic) => topic.clone(),
        None => eventbus::dead_letter_topic(&source.topic)?,
    };
    let bus = eventbus::connect(config).await?;
    let letters = bus.dead_letters(&topic).await?;
    Ok((bus, topic, letters))
}

/// One line of `list`, tab-separated.
fn summary_line(letter: &StoredDeadLetter) -> String {
    let envelope = letter.envelope();
    let at = letter
        .dead_lettered_at()
        .and_then(|at| at.format(&time_format()).ok())
        .unwrap_or_else(|| "-".to_owned());
    [
        position_text(letter.position()),
        at,
        letter.aggregate_id().unwrap_or_else(|| "-".to_owned()),
        envelope
            .as_ref()
            .map_or_else(|| "-".to_owned(), |envelope| envelope.event_id.clone()),
        envelope
            .as_ref()
            .map_or_else(|| "-".to_owned(), |envelope| envelope.event_type.clone()),
        letter
            .attempts()
            .map_or_else(|| "-".to_owned(), |attempts| attempts.to_string()),
        letter.reason().unwrap_or("-").to_owned(),
    ]
    .join("\t")
}

fn time_format() -> &'static [time::format_description::BorrowedFormatItem<'static>] {
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z")
}

/// `eventbus dlq list`.
async fn list(args: ListArgs) -> Result<ExitCode, CliError> {
    let (bus, topic, letters) = read(&args.source).await?;
    bus.close().await?;
    let selected: Vec<&StoredDeadLetter> = letters
        .iter()
        .filter(|letter| args.selection.selects(letter))
        .collect();
    println!("position\tdead-lettered at\taggregate\tevent id\tevent type\tattempts\treason");
    for letter in &selected {
        println!("{}", summary_line(letter));
    }
    eprintln!(
        "{} of {} dead letters in {topic}",
        selected.len(),
        letters.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `eventbus dlq show`.
async fn show(args: ShowArgs) -> Result<ExitCode, CliError> {
    let (bus, topic, letters) = read(&args.source).await?;
    bus.close().await?;
    let Some(letter) = letters
        .iter()
        .find(|letter| position_text(letter.position()) == args.position)
    else {
        return Err(CliError(format!(
            "no dead letter at {} in {topic}",
            args.position
        )));
    };
    let message = &letter.message;
    let headers: Map<String, Value> = message
        .headers
        .iter()
        .map(|(name, value)| (name.to_owned(), String::from_utf8_lossy(value).into()))
        .collect();
    let payload = serde_json::from_slice::<Value>(&message.payload)
        .unwrap_or_else(|_| String::from_utf8_lossy(&message.payload).into());
    let shown = json!({
        "topic": topic,
        "position": position_text(letter.position()),
        "original_topic": letter.original_topic(),
        "reason": letter.reason(),
        "attempts": letter.attempts(),
        "aggregate_id": letter.aggregate_id(),
        "key": message.key.as_ref().map(|key| String::from_utf8_lossy(key).into_owned()),
        "headers": headers,
        "payload": payload,
    });
    let text = serde_json::to_string_pretty(&shown)
        .map_err(|error| CliError(format!("cannot print the dead letter: {error}")))?;
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// `eventbus dlq replay`.
async fn replay(args: ReplayArgs) -> Result<ExitCode, CliError> {
    if args.selection.is_empty() && !args.all {
        return Err(CliError(
            "say what to replay: --aggregate, --since, --until, or --all".to_owned(),
        ));
    }
    let (bus, topic, letters) = read(&args.source).await?;
    let selected: Vec<&StoredDeadLetter> = letters
        .iter()
        .filter(|letter| args.selection.selects(letter))
        .collect();
    if args.dry_run {
        for letter in &selected {
            let (to, _) = letter.replay()?;
            println!("would replay {} to {to}", summary_line(letter));
        }
        bus.close().await?;
        eprintln!(
            "dry run: {} of {} dead letters in {topic} would be replayed",
            selected.len(),
            letters.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let progress = indicatif::ProgressBar::new(selected.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} replayed {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    // A parking subscription lets an aggregate's replayed events through from the first one
    // of this replay and takes up its new events again after the last one.
    let mut first = std::collections::HashMap::new();
    let mut final_one = std::collections::HashMap::new();
    for (index, letter) in selected.iter().enumerate() {
        let aggregate = letter.aggregate_id();
        first.entry(aggregate.clone()).or_insert(index);
        final_one.insert(aggregate, index);
    }
    let mut replayed = 0usize;
    let mut failure = None;
    for (index, letter) in selected.iter().enumerate() {
        let aggregate = letter.aggregate_id();
        let head = first.get(&aggregate) == Some(&index);
        let last = final_one.get(&aggregate) == Some(&index);
        // Stop at the first failure: replaying the aggregate's later events before it would
        // put them out of order.
        let result = async {
            let (to, mut message) = letter.replay()?;
            message.headers.insert(eventbus::HEADER_REPLAYED, "true");
            if head {
                message.headers.insert(eventbus::HEADER_REPLAY_HEAD, "true");
            }
            if last {
                message.headers.insert(eventbus::HEADER_REPLAY_LAST, "true");
            }
            bus.publish(&to, message).await?;
            bus.remove_dead_letter(letter).await
        }
        .await;
        match result {
            Ok(()) => {
                replayed += 1;
                progress.inc(1);
            }
            Err(error) => {
                failure = Some(format!(
                    "dead letter {}: {error}",
                    position_text(letter.position())
                ));
                break;
            }
        }
    }
    progress.finish_and_clear();
    bus.close().await?;
    eprintln!(
        "replayed {replayed} of {} selected ({} dead letters in {topic})",
        selected.len(),
        letters.len()
    );
    match failure {
        Some(failure) => Err(CliError(format!(
            "stopped at {failure}; the rest stay dead-lettered"
        ))),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// Runs `eventbus dlq …`.
pub(crate) async fn run(command: DlqCommand) -> Result<ExitCode, CliError> {
    match command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Show(args) => show(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}
