//! `eventbus topics ensure`: the topics a configuration describes, made so (or checked) on its
//! broker, for deploy pipelines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use eventbus::{Config, EnsureMode};

use crate::CliError;

/// What `eventbus topics ensure` may do.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Mode {
    /// Create missing topics; leave existing ones as they are.
    CreateOnly,
    /// Create missing topics and change what can be changed on existing ones; partitions
    /// are not added to a Kafka topic that holds records (its aggregates would move to other
    /// partitions, and their events could be consumed out of order).
    CreateOrUpdate,
    /// As create-or-update, and add partitions to Kafka topics that hold records too.
    CreateOrUpdateAllowingRepartition,
    /// Change nothing; report every difference.
    ValidateOnly,
}

/// Options of `eventbus topics ensure`.
#[derive(Args, Debug)]
pub(crate) struct EnsureArgs {
    /// The bus configuration file: its `[kafka.topics."…"]` or `[nats.topics."…"]` tables.
    #[arg(long)]
    config: PathBuf,
    /// What may be done.
    #[arg(long, value_enum, default_value = "create-or-update")]
    mode: Mode,
}

/// `eventbus topics ensure`: one line per topic on stdout (`orders: created`, `orders: differs
/// (retention: wanted …, has …)`); exits with status 1 when a topic still differs from its
/// configuration.
pub(crate) async fn ensure(args: EnsureArgs) -> Result<ExitCode, CliError> {
    let mut config = Config::load(Some(&args.config))?;
    // Run beside the service, whose metrics port is taken.
    config.metrics.listen = None;
    let specs = config.topic_specs();
    if specs.is_empty() {
        eprintln!(
            "{} configures no topics ([kafka.topics.\"…\"] or [nats.topics.\"…\"])",
            args.config.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mode = match args.mode {
        Mode::CreateOnly => EnsureMode::CreateOnly,
        Mode::CreateOrUpdate => EnsureMode::CreateOrUpdate,
        Mode::CreateOrUpdateAllowingRepartition => EnsureMode::CreateOrUpdateAllowingRepartition,
        Mode::ValidateOnly => EnsureMode::ValidateOnly,
    };
    let bus = eventbus::connect(config).await?;
    let mut differing = 0;
    for spec in &specs {
        let report = bus.ensure_topic(spec, mode).await?;
        if !report.matches() {
            differing += 1;
        }
        println!("{}: {report}", spec.name);
    }
    bus.close().await?;
    if differing > 0 {
        eprintln!(
            "{differing} of {} topics differ from the configuration",
            specs.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
