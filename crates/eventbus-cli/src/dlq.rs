//! `eventbus dlq list | show | replay`: the dead letters of a topic, looked at and put back.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use eventbus::{OffsetDateTime, StoredDeadLetter};
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
    /// without the dead-letter headers), in their order; each leaves the dead-letter topic once
    /// a subscription has handled its copy.
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
    let mut config = eventbus::Config::load(Some(&source.config))?;
    // Run beside the service, whose metrics port is taken.
    config.metrics.listen = None;
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
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".to_owned());
    [
        letter.position().to_string(),
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
        .find(|letter| letter.position().to_string() == args.position)
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
        "position": letter.position().to_string(),
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
    let selected = in_replay_order(&letters, selected)?;
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
    let marks = replay_marks(&selected);
    let mut replayed = 0usize;
    let mut failure = None;
    for (letter, ReplayMark { head, last }) in selected.iter().zip(marks) {
        // Stop at the first failure: replaying the aggregate's later events before it would
        // put them out of order.
        // The dead letter stays until a subscription has handled its copy (`X-Replay-Of`):
        // a parking reader that starts meanwhile still finds its aggregate parked.
        let result = async {
            let (to, mut message) = letter.replay()?;
            if head {
                message.headers.insert(eventbus::HEADER_REPLAY_HEAD, "true");
            }
            if last {
                message.headers.insert(eventbus::HEADER_REPLAY_LAST, "true");
            }
            bus.publish(&to, message).await.map_err(CliError::from)
        }
        .await;
        match result {
            Ok(()) => {
                replayed += 1;
                progress.inc(1);
            }
            Err(error) => {
                failure = Some(format!("dead letter {}: {error}", letter.position()));
                break;
            }
        }
    }
    progress.finish_and_clear();
    bus.close().await?;
    eprintln!(
        "replayed {replayed} of {} selected ({} dead letters in {topic}; each leaves it once a \
         subscription has handled its copy)",
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

/// Where a replayed dead letter stands in its lane's replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReplayMark {
    /// The lane's first replayed event (`X-Replay-Head`).
    head: bool,
    /// The lane's last replayed event (`X-Replay-Last`).
    last: bool,
}

/// The marks of `selected` (in replay order): a parking subscription lets a lane's replayed
/// events through from its first one and takes up its new events again after its last one.
/// First and last are per lane, (original topic, aggregate), as each topic's subscription
/// parks its own: one aggregate parked on two topics sharing a dead-letter topic gets a head
/// and a last on each.
fn replay_marks(selected: &[&StoredDeadLetter]) -> Vec<ReplayMark> {
    let lanes: Vec<Option<Lane>> = selected.iter().map(|letter| lane_of(letter)).collect();
    let mut first = std::collections::HashMap::new();
    let mut final_one = std::collections::HashMap::new();
    for (index, lane) in lanes.iter().enumerate() {
        if let Some(lane) = lane {
            first.entry(lane).or_insert(index);
            final_one.insert(lane, index);
        }
    }
    lanes
        .iter()
        .enumerate()
        .map(|(index, lane)| ReplayMark {
            head: lane
                .as_ref()
                .is_some_and(|lane| first.get(lane) == Some(&index)),
            last: lane
                .as_ref()
                .is_some_and(|lane| final_one.get(lane) == Some(&index)),
        })
        .collect()
}

/// The lane a parking subscription puts a dead letter in: its original topic (several topics
/// may share one dead-letter topic) and the trimmed aggregate ID of a decodable envelope (the
/// runtime's key); `None` for anything else.
fn lane_of(letter: &StoredDeadLetter) -> Option<Lane> {
    let envelope = letter.envelope()?;
    let aggregate = envelope.aggregate().ok()?;
    Some(Lane {
        topic: letter.original_topic().unwrap_or_default().to_owned(),
        aggregate: aggregate.as_str().to_owned(),
    })
}

/// An aggregate of one original topic: what a parking subscription parks and a replay brings
/// back as one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Lane {
    topic: String,
    aggregate: String,
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of topic {}", self.aggregate, self.topic)
    }
}

/// The selected dead letters in the order a replay publishes them: dead-letter order, except
/// that each aggregate's envelopes go in `event_version` order (a replayed event that failed
/// again is dead-lettered after its aggregate's later events: this puts it back first).
/// Refuses a selection that holds some but not all of an aggregate's dead letters: a parking
/// subscription would let the selected ones run before the others.
fn in_replay_order<'a>(
    all: &'a [StoredDeadLetter],
    selected: Vec<&'a StoredDeadLetter>,
) -> Result<Vec<&'a StoredDeadLetter>, CliError> {
    let mut by_lane: std::collections::HashMap<Lane, Vec<&'a StoredDeadLetter>> =
        std::collections::HashMap::new();
    for letter in &selected {
        if let Some(lane) = lane_of(letter) {
            by_lane.entry(lane).or_default().push(letter);
        }
    }
    for (lane, letters) in &by_lane {
        let total = all
            .iter()
            .filter(|letter| lane_of(letter).as_ref() == Some(lane))
            .count();
        if total != letters.len() {
            return Err(CliError(format!(
                "the selection holds {} of aggregate {lane}'s {total} dead letters: replay them \
                 together (--aggregate {}), or a parking subscription runs them out of order",
                letters.len(),
                lane.aggregate
            )));
        }
    }
    for letters in by_lane.values_mut() {
        letters.sort_by_key(|letter| letter.envelope().map_or(i64::MIN, |e| e.event_version));
    }
    let mut next: std::collections::HashMap<Lane, usize> = std::collections::HashMap::new();
    Ok(selected
        .into_iter()
        .map(|letter| match lane_of(letter) {
            Some(lane) => {
                let slot = next.entry(lane.clone()).or_default();
                let chosen = by_lane
                    .get(&lane)
                    .and_then(|letters| letters.get(*slot))
                    .copied()
                    .unwrap_or(letter);
                *slot += 1;
                chosen
            }
            None => letter,
        })
        .collect())
}

/// Runs `eventbus dlq …`.
pub(crate) async fn run(command: DlqCommand) -> Result<ExitCode, CliError> {
    match command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Show(args) => show(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed check.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn letter(aggregate: &str, version: i64, sequence: u64) -> StoredDeadLetter {
        let envelope = eventbus::Envelope::new(aggregate, "Changed", version, &version).unwrap();
        let mut message = eventbus::Message::new("orders.DLQ", envelope.to_bytes().unwrap());
        message.meta.position = eventbus::Position::Sequence(sequence);
        StoredDeadLetter { message }
    }

    fn versions(letters: &[&StoredDeadLetter]) -> Vec<(String, i64)> {
        letters
            .iter()
            .map(|letter| {
                let envelope = letter.envelope().unwrap();
                (envelope.aggregate_id, envelope.event_version)
            })
            .collect()
    }

    #[test]
    fn each_aggregate_is_replayed_in_version_order_in_its_own_slots() {
        // v1 of a failed again after its parked successors; b in between.
        let all = [
            letter("a", 2, 1),
            letter("b", 1, 2),
            letter("a", 3, 3),
            letter("a", 1, 4),
        ];
        let ordered = in_replay_order(&all, all.iter().collect()).unwrap();
        assert_eq!(
            versions(&ordered),
            [
                ("a".to_owned(), 1),
                ("b".to_owned(), 1),
                ("a".to_owned(), 2),
                ("a".to_owned(), 3)
            ]
        );
    }

    fn letter_of(topic: &str, aggregate: &str, version: i64, sequence: u64) -> StoredDeadLetter {
        let mut letter = letter(aggregate, version, sequence);
        letter
            .message
            .headers
            .insert(eventbus::HEADER_ORIGINAL_TOPIC, topic.to_owned());
        letter
    }

    #[test]
    fn an_aggregate_parked_on_two_topics_gets_a_replay_head_and_last_on_each() {
        let all = [
            letter_of("orders", "order-1", 1, 1),
            letter_of("payments", "order-1", 1, 2),
            letter_of("orders", "order-1", 2, 3),
        ];
        let ordered = in_replay_order(&all, all.iter().collect()).unwrap();
        let marks: Vec<(bool, bool)> = replay_marks(&ordered)
            .into_iter()
            .map(|mark| (mark.head, mark.last))
            .collect();
        assert_eq!(marks, [(true, false), (true, true), (false, true)]);
    }

    #[test]
    fn a_selection_cutting_an_aggregate_in_two_is_refused() {
        let all = [letter("a", 1, 1), letter("a", 2, 2), letter("b", 1, 3)];
        let Err(error) = in_replay_order(&all, vec![&all[1], &all[2]]) else {
            panic!("a partial selection was accepted");
        };
        assert!(error.to_string().contains("--aggregate a"), "{error}");
        assert!(in_replay_order(&all, vec![&all[2]]).is_ok());
    }
}
