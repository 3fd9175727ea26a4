//! `eventbus`: the SDK's command line.
//!
//! ```text
//! eventbus demo                 ordered, retried, dead-lettered handling on the memory backend
//! eventbus publish --topic T    stdin JSON lines → messages (or envelopes with --envelope)
//! eventbus subscribe --topic T  messages → stdout JSON lines
//! eventbus bench --backend B    throughput as ratios to raw baselines, with their targets
//! eventbus config convert --from go.yaml   a Go SDK YAML configuration as eventbus.toml
//! eventbus topics ensure --config F         the configured topics made so (or checked) on the broker
//! eventbus dlq list|show|replay --topic T   a topic's dead letters, looked at and put back
//! ```
// A command-line tool prints; that is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod convert;
mod counter;
mod demo;
mod dlq;
mod output;
mod shell;
mod topics;

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Domain events in order per aggregate, concurrently across aggregates, without losing any.
#[derive(Parser)]
#[command(name = "eventbus", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish envelopes for many aggregates through a handler that is slow, fails and panics now
    /// and then; check that nothing was lost or reordered.
    Demo(demo::DemoArgs),
    /// Publish each line of standard input to a topic.
    Publish(shell::PublishArgs),
    /// Print each message of a topic as a JSON line.
    ///
    /// Stops with status 1 when standard output is closed (`| head -n 5`): the message being
    /// printed is not acknowledged, and a broker keeps it for the next subscriber.
    Subscribe(shell::SubscribeArgs),
    /// Measure publish and consume throughput against the broker's raw client in the same run
    /// and print the ratios (memory: against a raw channel).
    Bench(bench::BenchArgs),
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Dead letters: list, show and replay them (NATS and Kafka).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Topic management.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Make the topics of a configuration file what it says (partitions, replication, retention,
    /// storage), or with `--mode validate-only` report how they differ; exits with status 1 while
    /// a topic differs.
    Ensure(topics::EnsureArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the eventbus.toml equivalent of a Go SDK (jxt-core) YAML configuration, with a
    /// note on every setting that has no equivalent or a different meaning.
    Convert(convert::ConvertArgs),
}

/// A failure of the command itself, with what the user needs to fix it.
#[derive(Debug)]
pub(crate) struct CliError(String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<eventbus::Error> for CliError {
    /// The error with its causes: "cannot publish to orders" alone does not say whether the
    /// server was unreachable, timed out or had no stream leader.
    fn from(error: eventbus::Error) -> Self {
        CliError(error.report().to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(error: std::io::Error) -> Self {
        CliError(format!("I/O error: {error}"))
    }
}

fn main() -> ExitCode {
    // Bad flags: clap prints what is wrong and exits with status 2.
    let cli = Cli::parse();
    // Errors are logged by default; the demo's are the failures it injects on purpose, which its
    // summary counts, so they are logged only when RUST_LOG asks for them. Warnings about the
    // configuration (an unknown EVENTBUS_ variable, maybe a typo) always show.
    let default_filter = match cli.command {
        Command::Demo(_) | Command::Bench(_) => "off,eventbus::config=warn",
        _ => "error,eventbus::config=warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Publish(args) => shell::publish(args).await,
            Command::Subscribe(args) => shell::subscribe(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Config {
                command: ConfigCommand::Convert(args),
            } => convert::run(&args),
            Command::Dlq { command } => dlq::run(command).await,
            Command::Topics {
                command: TopicsCommand::Ensure(args),
            } => topics::ensure(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
