//! Envelope validation and decoding errors name the field, as a table.

use eventbus_core::{Envelope, EnvelopeError, Error, ErrorKind};

const GOOD: &str = r#"{"event_id":"e-1","aggregate_id":"order-1","event_type":"T","event_version":1,"timestamp":"2024-01-01T00:00:00Z","payload":{}}"#;

/// Replaces the first occurrence of `from` in the good envelope.
fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

/// (case, input, the field the error names, or None for a document-level error)
fn invalid() -> Vec<(&'static str, String, Option<&'static str>)> {
    vec![
        (
            "empty event_id",
            with(r#""e-1""#, r#""""#),
            Some("event_id"),
        ),
        (
            "blank event_id",
            with(r#""e-1""#, r#"" \n ""#),
            Some("event_id"),
        ),
        ("null event_id", with(r#""e-1""#, "null"), Some("event_id")),
        ("numeric event_id", with(r#""e-1""#, "1"), Some("event_id")),
        (
            "array event_id",
            with(r#""e-1""#, r#"["e"]"#),
            Some("event_id"),
        ),
        (
            "missing event_id",
            with(r#""event_id":"e-1","#, ""),
            Some("event_id"),
        ),
        (
            "empty aggregate_id",
            with(r#""order-1""#, r#""""#),
            Some("aggregate_id"),
        ),
        (
            "blank aggregate_id",
            with(r#""order-1""#, r#""\t""#),
            Some("aggregate_id"),
        ),
        (
            "aggregate_id with space",
            with("order-1", "order 1"),
            Some("aggregate_id"),
        ),
        (
            "aggregate_id with @",
            with("order-1", "order@1"),
            Some("aggregate_id"),
        ),
        (
            "aggregate_id with unicode",
            with("order-1", "ordér"),
            Some("aggregate_id"),
        ),
        (
            "aggregate_id too long",
            with("order-1", &"o".repeat(257)),
            Some("aggregate_id"),
        ),
        (
            "object aggregate_id",
            with(r#""order-1""#, "{}"),
            Some("aggregate_id"),
        ),
        (
            "missing aggregate_id",
            with(r#""aggregate_id":"order-1","#, ""),
            Some("aggregate_id"),
        ),
        (
            "empty event_type",
            with(r#""T""#, r#""""#),
            Some("event_type"),
        ),
        (
            "blank event_type",
            with(r#""T""#, r#""  ""#),
            Some("event_type"),
        ),
        (
            "bool event_type",
            with(r#""T""#, "true"),
            Some("event_type"),
        ),
        (
            "missing event_type",
            with(r#""event_type":"T","#, ""),
            Some("event_type"),
        ),
        (
            "zero event_version",
            with(r#""event_version":1"#, r#""event_version":0"#),
            Some("event_version"),
        ),
        (
            "negative event_version",
            with(r#""event_version":1"#, r#""event_version":-1"#),
            Some("event_version"),
        ),
        (
            "fractional event_version",
            with(r#""event_version":1"#, r#""event_version":1.5"#),
            Some("event_version"),
        ),
        (
            "exponent event_version",
            with(r#""event_version":1"#, r#""event_version":1e0"#),
            Some("event_version"),
        ),
        (
            "string event_version",
            with(r#""event_version":1"#, r#""event_version":"1""#),
            Some("event_version"),
        ),
        (
            "overflowing event_version",
            with(
                r#""event_version":1"#,
                r#""event_version":99999999999999999999"#,
            ),
            Some("event_version"),
        ),
        (
            "missing event_version",
            with(r#""event_version":1,"#, ""),
            Some("event_version"),
        ),
        (
            "missing payload",
            with(r#","payload":{}"#, ""),
            Some("payload"),
        ),
        (
            "null payload",
            with(r#""payload":{}"#, r#""payload":null"#),
            Some("payload"),
        ),
        (
            "date-only timestamp",
            with("2024-01-01T00:00:00Z", "2024-01-01"),
            Some("timestamp"),
        ),
        (
            "timestamp without zone",
            with("2024-01-01T00:00:00Z", "2024-01-01T00:00:00"),
            Some("timestamp"),
        ),
        (
            "timestamp with space",
            with("2024-01-01T00:00:00Z", "2024-01-01 00:00:00Z"),
            Some("timestamp"),
        ),
        (
            "timestamp hour 24",
            with("2024-01-01T00:00:00Z", "2024-01-01T24:00:00Z"),
            Some("timestamp"),
        ),
        (
            "timestamp April 31",
            with("2024-01-01T00:00:00Z", "2024-04-31T00:00:00Z"),
            Some("timestamp"),
        ),
        (
            "numeric timestamp",
            with(r#""2024-01-01T00:00:00Z""#, "1704067200"),
            Some("timestamp"),
        ),
        (
            "string tenant_id",
            with(r#""payload""#, r#""tenant_id":"7","payload""#),
            Some("tenant_id"),
        ),
        (
            "fractional tenant_id",
            with(r#""payload""#, r#""tenant_id":7.5,"payload""#),
            Some("tenant_id"),
        ),
        (
            "numeric trace_id",
            with(r#""payload""#, r#""trace_id":7,"payload""#),
            Some("trace_id"),
        ),
        (
            "object correlation_id",
            with(r#""payload""#, r#""correlation_id":{},"payload""#),
            Some("correlation_id"),
        ),
        ("empty input", String::new(), None),
        ("whitespace only", " \n ".into(), None),
        ("array", "[]".into(), None),
        ("number", "42".into(), None),
        ("string", r#""envelope""#.into(), None),
        ("truncated", GOOD[..GOOD.len() - 1].into(), None),
        ("two documents", format!("{GOOD}{GOOD}"), None),
        ("trailing comma", with("{}}", "{},}"), None),
        ("unquoted name", with(r#""event_id""#, "event_id"), None),
        ("single quotes", with(r#""e-1""#, "'e-1'"), None),
        (
            "bad payload",
            with(r#""payload":{}"#, r#""payload":{"a":}"#),
            None,
        ),
        (
            "NaN payload",
            with(r#""payload":{}"#, r#""payload":NaN"#),
            None,
        ),
        ("raw control character", with("e-1", "e\u{1}1"), None),
        ("bad escape", with("e-1", "e\\q1"), None),
        ("BOM before the object", format!("\u{feff}{GOOD}"), None),
    ]
}

#[test]
fn invalid_envelopes_are_rejected_with_the_field_named() {
    let cases = invalid();
    assert!(cases.len() >= 50);
    for (name, input, field) in cases {
        let error = Envelope::from_bytes(input.as_bytes())
            .map(|e| panic!("{name}: accepted {e:?}"))
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidEnvelope, "{name}");
        let Error::InvalidEnvelope(reason) = &error else {
            panic!("{name}: {error:?}")
        };
        assert_eq!(reason.field(), field, "{name}: {reason}");
        if let Some(field) = field {
            assert!(error.to_string().contains(field), "{name}: {error}");
        }
    }
}

#[test]
fn validation_follows_the_go_sdk_order() {
    let all_wrong = r#"{"event_id":"","aggregate_id":"","event_type":"","event_version":0}"#;
    let message = |input: &str| {
        Envelope::from_bytes(input.as_bytes())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(message(all_wrong), "invalid envelope: event_id is required");
    let next = all_wrong.replace(r#""event_id":"""#, r#""event_id":"e""#);
    assert_eq!(message(&next), "invalid envelope: aggregate_id is required");
    let next = next.replace(r#""aggregate_id":"""#, r#""aggregate_id":"a b""#);
    assert_eq!(message(&next), "invalid envelope: event_type is required");
    let next = next.replace(r#""event_type":"""#, r#""event_type":"T""#);
    assert_eq!(
        message(&next),
        "invalid envelope: event_version must be positive"
    );
    let next = next.replace(r#""event_version":0"#, r#""event_version":1"#);
    assert_eq!(message(&next), "invalid envelope: payload is required");
    let next = next.replace('}', r#","payload":1}"#);
    assert_eq!(
        message(&next),
        "invalid envelope: invalid aggregate_id: aggregate_id contains invalid character:  "
    );
}

#[test]
fn constructed_envelopes_are_validated_too() {
    let field = |result: Result<Envelope, Error>| match result {
        Err(Error::InvalidEnvelope(reason)) => reason.field(),
        other => panic!("{other:?}"),
    };
    assert_eq!(field(Envelope::new(" ", "T", 1, &0)), Some("aggregate_id"));
    assert_eq!(field(Envelope::new("a", "", 1, &0)), Some("event_type"));
    assert_eq!(field(Envelope::new("a", "T", 0, &0)), Some("event_version"));
    assert_eq!(
        field(Envelope::new("a b", "T", 1, &0)),
        Some("aggregate_id")
    );
    assert_eq!(field(Envelope::new_raw("a", "T", 1, "{")), Some("payload"));
    // `()` serializes to `null`, which is no payload.
    assert_eq!(field(Envelope::new("a", "T", 1, &())), Some("payload"));

    let mut envelope = Envelope::new("a", "T", 1, &0).unwrap();
    envelope.event_id.clear();
    assert!(matches!(
        envelope.to_bytes(),
        Err(Error::InvalidEnvelope(EnvelopeError::Required {
            field: "event_id"
        }))
    ));
    let year = time::macros::datetime!(-0001-01-01 0:00 UTC);
    let envelope = Envelope::new("a", "T", 1, &0).unwrap().with_timestamp(year);
    assert!(matches!(
        envelope.to_bytes(),
        Err(Error::InvalidEnvelope(EnvelopeError::Timestamp { .. }))
    ));
}
