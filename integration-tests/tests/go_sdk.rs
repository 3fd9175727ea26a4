//! The Go SDK itself (`github.com/ChenBigdata421/jxt-core` v1.7.5) builds here, the interop
//! peer links it, and this SDK's wire fixtures are what the Go SDK's own envelope code writes
//! and accepts. A Go SDK that cannot be had fails these tests, saying how to provide it.

// Test code: a failed unwrap or expect is a failed check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use integration_tests::go_peer::{
    GO_SDK_MODULE, GO_SDK_VERSION, go_binary, go_peer, try_go_binary,
};

/// The fixtures `eventbus-core`'s wire tests (`tests/go_wire.rs`) read.
const FIXTURES: &str = "../crates/eventbus-core/tests/fixtures/go_envelopes.json";

/// The oracle, built against the Go SDK, prints exactly the committed fixtures: the Rust wire
/// tests compare this SDK's envelope code with the Go SDK's, not with a restatement of it.
#[test]
fn the_go_sdks_own_envelope_code_writes_the_committed_wire_fixtures() {
    let oracle = go_binary("oracle");
    let output = Command::new(&oracle).output().expect("the oracle runs");
    assert!(
        output.status.success(),
        "the oracle failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURES);
    let committed = std::fs::read_to_string(&fixtures).expect("the committed fixtures");
    let fresh = String::from_utf8_lossy(&output.stdout);
    if fresh != committed {
        let line = fresh
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| fresh.lines().count().min(committed.lines().count()));
        panic!(
            "{} differs from what the Go SDK's envelope code writes now, first at line {}: \
             regenerate it with `{} > crates/eventbus-core/tests/fixtures/go_envelopes.json` \
             and look at what changed",
            fixtures.display(),
            line + 1,
            oracle.display()
        );
    }
}

/// The peer the interop tests run is a Go program that links the Go SDK module at the version
/// a Go service requires (`go version -m` reads the module list from the binary).
#[test]
fn the_go_peer_links_the_go_sdk_module_itself() {
    let output = Command::new("go")
        .args(["version", "-m"])
        .arg(go_peer())
        .output()
        .expect("go runs");
    let modules = String::from_utf8_lossy(&output.stdout);
    let line = modules
        .lines()
        .find(|line| line.split_whitespace().nth(1) == Some(GO_SDK_MODULE))
        .unwrap_or_else(|| panic!("the peer does not link {GO_SDK_MODULE}:\n{modules}"));
    assert_eq!(
        line.split_whitespace().nth(2),
        Some(GO_SDK_VERSION),
        "{line}"
    );
    for dependency in ["github.com/IBM/sarama", "github.com/nats-io/nats.go"] {
        assert!(
            modules.contains(dependency),
            "{dependency} missing:\n{modules}"
        );
    }
}

/// Without a local copy the build takes the SDK from the Go module proxy. The proxy this
/// workplace reaches refuses the module (403), so the build fails, and the failure says how to
/// provide the SDK instead of reading as a broken build (were the proxy to serve it one day, this
/// test would fail and the local copy would no longer be needed).
#[test]
fn a_go_sdk_that_nobody_provides_fails_the_build_saying_how_to_provide_it() {
    let binary = std::env::temp_dir().join(format!("go-peer-{}", std::process::id()));
    let failure = try_go_binary("peer", None, &binary).expect_err("the proxy refuses the module");
    assert!(
        failure.contains("could not be had from the Go module proxy"),
        "{failure}"
    );
    assert!(failure.contains("JXT_CORE_DIR"), "{failure}");
    assert!(failure.contains("../shared/gosdk/jxt-core"), "{failure}");
}
