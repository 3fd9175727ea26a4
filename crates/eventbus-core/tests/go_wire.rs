//! Wire compatibility with the Go SDK, checked against fixtures written by the Go SDK's own
//! envelope code (`github.com/ChenBigdata421/jxt-core` v1.7.5, `sdk/pkg/eventbus`, called by
//! `interop/go/cmd/oracle`; the integration test `go_sdk` checks the committed fixtures against
//! it): the bytes we encode for the same values are the bytes Go sends, and we accept exactly the
//! inputs Go accepts.

use eventbus_core::{Envelope, ErrorKind};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

#[allow(clippy::unwrap_used)] // a broken fixture should fail loudly
fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/go_envelopes.json")).unwrap()
}

#[allow(clippy::unwrap_used)] // a broken fixture should fail loudly
fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

#[allow(clippy::unwrap_used)] // a broken fixture should fail loudly
fn text<'a>(case: &'a Value, field: &str) -> &'a str {
    case[field].as_str().unwrap()
}

#[test]
fn envelopes_encode_to_the_bytes_the_go_sdk_sends() {
    let fixtures = fixtures();
    let cases = fixtures["encode"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let name = text(case, "name");
        let mut envelope = Envelope::new_raw(
            text(case, "aggregate_id"),
            text(case, "event_type"),
            case["event_version"].as_i64().unwrap(),
            hex(text(case, "payload_hex")),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        envelope.event_id = text(case, "event_id").to_owned();
        envelope.timestamp = OffsetDateTime::parse(text(case, "timestamp"), &Rfc3339).unwrap();
        envelope.trace_id = text(case, "trace_id").to_owned();
        envelope.correlation_id = text(case, "correlation_id").to_owned();
        envelope.tenant_id = case["tenant_id"].as_i64().unwrap();

        let ours = envelope
            .to_bytes()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let go = hex(text(case, "go_hex"));
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&go),
            "{name}"
        );
        assert_eq!(ours, go, "{name}");
        // Decoding Go's bytes gives the values back (a payload without its surrounding
        // whitespace, as Go's decoder also gives it).
        let back = Envelope::from_bytes(&go).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.payload(), envelope.payload().trim_ascii(), "{name}");
        assert_eq!(
            back.with_raw_payload(envelope.payload().clone()).unwrap(),
            envelope,
            "{name}"
        );
    }
}

/// The one input on which we cannot match Go byte for byte: invalid UTF-8 inside a string field.
/// jsoniter keeps the raw bytes and writes each as `\ufffd`; a Rust `String` cannot hold them, so
/// we decode each to U+FFFD and write that character. Both sides accept the envelope.
const INVALID_UTF8_IN_STRING: &str = "invalid_utf8_in_string";

#[test]
fn we_accept_exactly_the_envelopes_the_go_sdk_accepts() {
    let fixtures = fixtures();
    let cases = fixtures["decode"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let (mut accepted, mut rejected) = (0, 0);
    for case in cases {
        let name = text(case, "name");
        let input = hex(text(case, "input_hex"));
        let ours = Envelope::from_bytes(&input);
        if case["accepted"].as_bool().unwrap() {
            accepted += 1;
            let envelope =
                ours.unwrap_or_else(|e| panic!("{name}: Go accepts it, we refused: {e}"));
            let reencoded = envelope.to_bytes().unwrap();
            let go = hex(text(case, "reencode_hex"));
            if name == INVALID_UTF8_IN_STRING {
                assert_eq!(envelope.event_id, "e\u{FFFD}\u{FFFD}1");
            } else {
                assert_eq!(
                    String::from_utf8_lossy(&reencoded),
                    String::from_utf8_lossy(&go),
                    "{name}"
                );
                assert_eq!(reencoded, go, "{name}");
            }
        } else {
            rejected += 1;
            let go_error = text(case, "go_error");
            let error = match ours {
                Ok(envelope) => {
                    panic!("{name}: Go refuses it ({go_error}), we accepted {envelope:?}")
                }
                Err(error) => error,
            };
            assert_eq!(error.kind(), ErrorKind::InvalidEnvelope, "{name}");
            // Validation messages are the Go SDK's, word for word.
            if go_error.starts_with("invalid envelope: ") {
                assert_eq!(error.to_string(), go_error, "{name}");
            }
        }
    }
    assert!(
        accepted >= 20 && rejected >= 30,
        "{accepted} accepted, {rejected} rejected"
    );
}
