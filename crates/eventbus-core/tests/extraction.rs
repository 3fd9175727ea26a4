//! Aggregate-ID extraction: the priority of the delivery contract, as a table.
//!
//! payload envelope → headers (`X-Aggregate-ID`, `x-aggregate-id`, `Aggregate-ID`,
//! `aggregate-id`) → record key → subject tokens from the last (only when opted in).

use eventbus_core::{Headers, Message, MessageSource, extract_aggregate_id};

struct Case {
    name: &'static str,
    payload: Vec<u8>,
    headers: Vec<(&'static str, &'static [u8])>,
    key: Option<&'static [u8]>,
    subject: Option<&'static str>,
    expected: Option<&'static str>,
}

fn envelope(aggregate_id: &str) -> Vec<u8> {
    format!(
        r#"{{"event_id":"e-1","aggregate_id":"{aggregate_id}","event_type":"T","event_version":1,"payload":{{}}}}"#
    )
    .into_bytes()
}

fn case(name: &'static str, payload: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        payload: payload.into(),
        headers: Vec::new(),
        key: None,
        subject: None,
        expected: None,
    }
}

impl Case {
    fn header(mut self, name: &'static str, value: &'static [u8]) -> Self {
        self.headers.push((name, value));
        self
    }
    fn key(mut self, key: &'static [u8]) -> Self {
        self.key = Some(key);
        self
    }
    fn subject(mut self, subject: &'static str) -> Self {
        self.subject = Some(subject);
        self
    }
    fn expect(mut self, id: &'static str) -> Self {
        self.expected = Some(id);
        self
    }
}

fn cases() -> Vec<Case> {
    vec![
        // 1. the envelope wins over everything
        case("envelope alone", envelope("order-1")).expect("order-1"),
        case("envelope over header", envelope("order-1"))
            .header("X-Aggregate-ID", b"header-1")
            .expect("order-1"),
        case("envelope over key", envelope("order-1")).key(b"key-1").expect("order-1"),
        case("envelope over subject", envelope("order-1"))
            .subject("orders.subject-1")
            .expect("order-1"),
        case("envelope id is trimmed", envelope("  order-1 ")).expect("order-1"),
        case("envelope with slashes", envelope("tenant:1/order.2")).expect("tenant:1/order.2"),
        // an envelope that fails validation is not a source; the next one is used
        case("invalid envelope aggregate falls back to header", envelope("bad id"))
            .header("X-Aggregate-ID", b"header-1")
            .expect("header-1"),
        case(
            "envelope without event_id falls back to key",
            r#"{"aggregate_id":"order-1","event_type":"T","event_version":1,"payload":{}}"#,
        )
        .key(b"key-1")
        .expect("key-1"),
        case(
            "envelope with version 0 falls back to key",
            r#"{"event_id":"e","aggregate_id":"order-1","event_type":"T","event_version":0,"payload":{}}"#,
        )
        .key(b"key-1")
        .expect("key-1"),
        case(
            "envelope with null payload is not an envelope",
            r#"{"event_id":"e","aggregate_id":"order-1","event_type":"T","event_version":1,"payload":null}"#,
        ),
        case("plain JSON object is not an envelope", r#"{"aggregate_id":"order-1"}"#),
        case("truncated envelope", envelope("order-1").into_iter().take(40).collect::<Vec<_>>()),
        case("empty payload", ""),
        case("binary payload", vec![0xff, 0x00, 0xfe]),
        // 2. headers in their fixed order
        case("X-Aggregate-ID", "plain").header("X-Aggregate-ID", b"h-1").expect("h-1"),
        case("x-aggregate-id", "plain").header("x-aggregate-id", b"h-2").expect("h-2"),
        case("Aggregate-ID", "plain").header("Aggregate-ID", b"h-3").expect("h-3"),
        case("aggregate-id", "plain").header("aggregate-id", b"h-4").expect("h-4"),
        case("header order beats insertion order", "plain")
            .header("aggregate-id", b"h-4")
            .header("X-Aggregate-ID", b"h-1")
            .expect("h-1"),
        case("second header name when the first is absent", "plain")
            .header("Aggregate-ID", b"h-3")
            .header("x-aggregate-id", b"h-2")
            .expect("h-2"),
        case("invalid first header is skipped", "plain")
            .header("X-Aggregate-ID", b"bad id")
            .header("x-aggregate-id", b"h-2")
            .expect("h-2"),
        case("blank header is skipped", "plain")
            .header("X-Aggregate-ID", b"   ")
            .header("Aggregate-ID", b"h-3")
            .expect("h-3"),
        case("non-UTF-8 header is skipped", "plain")
            .header("X-Aggregate-ID", b"\xff\xfe")
            .key(b"key-1")
            .expect("key-1"),
        case("header value is trimmed", "plain")
            .header("X-Aggregate-ID", b"  h-1\t")
            .expect("h-1"),
        case("repeated header: the last value counts", "plain")
            .header("X-Aggregate-ID", b"first")
            .header("X-Aggregate-ID", b"last")
            .expect("last"),
        case("other casings are not consulted", "plain")
            .header("X-AGGREGATE-ID", b"h-9")
            .header("X-Aggregate-Id", b"h-8"),
        case("unrelated header is ignored", "plain").header("X-Event-ID", b"evt-1"),
        case("header beats key", "plain")
            .header("aggregate-id", b"h-4")
            .key(b"key-1")
            .expect("h-4"),
        case("header beats subject", "plain")
            .header("aggregate-id", b"h-4")
            .subject("orders.s-1")
            .expect("h-4"),
        case("all headers invalid fall back to key", "plain")
            .header("X-Aggregate-ID", b"a b")
            .header("x-aggregate-id", b"a#b")
            .header("Aggregate-ID", b"")
            .header("aggregate-id", b"\xc3\xa9")
            .key(b"key-1")
            .expect("key-1"),
        // 3. the record key
        case("key", "plain").key(b"order-7").expect("order-7"),
        case("key is trimmed", "plain").key(b" order-7 ").expect("order-7"),
        case("invalid key", "plain").key(b"order 7"),
        case("empty key", "plain").key(b""),
        case("non-UTF-8 key", "plain").key(b"\x80order"),
        case("too long key", "plain").key(&[b'k'; 257]),
        case("256-byte key", "plain")
            .key(&[b'k'; 256])
            .expect(Box::leak("k".repeat(256).into_boxed_str())),
        case("invalid key falls back to subject", "plain")
            .key(b"a b")
            .subject("orders.s-1")
            .expect("s-1"),
        case("key beats subject", "plain")
            .key(b"key-1")
            .subject("orders.s-1")
            .expect("key-1"),
        // 4. subject tokens, only when opted in, from the last one backwards
        case("last subject token", "plain").subject("events.user.agg-999").expect("agg-999"),
        case("invalid last token: the one before", "plain").subject("debug.test@1").expect("debug"),
        case("plain two-token subject", "plain").subject("orders.events").expect("events"),
        case("single-token subject", "plain").subject("orders").expect("orders"),
        case("trailing empty token is skipped", "plain").subject("orders.").expect("orders"),
        case("subject tokens are trimmed", "plain").subject("orders. s-1 ").expect("s-1"),
        case("no valid token", "plain").subject("a b.c d"),
        case("empty subject", "plain").subject(""),
        case("subject not consulted without opt-in", "plain"),
        case("NATS wildcard token is invalid", "plain").subject("orders.*").expect("orders"),
        case("colon and slash tokens are valid", "plain").subject("x.tenant:1/o-2").expect("tenant:1/o-2"),
    ]
}

#[test]
fn aggregate_ids_are_found_in_priority_order() {
    let cases = cases();
    assert!(cases.len() >= 40, "{}", cases.len());
    for case in &cases {
        let headers: Headers = case.headers.iter().map(|&(n, v)| (n, v)).collect();
        let mut source = MessageSource::new(&case.payload).with_headers(&headers);
        if let Some(key) = case.key {
            source = source.with_key(key);
        }
        if let Some(subject) = case.subject {
            source = source.with_subject_keys(subject);
        }
        let found = extract_aggregate_id(&source);
        assert_eq!(
            found.as_ref().map(|id| id.as_str()),
            case.expected,
            "{}",
            case.name
        );
    }
}

#[test]
fn a_message_source_never_reads_the_topic_as_a_key() {
    let mut message = Message::new("orders.order-1", &b"plain"[..]);
    assert_eq!(
        extract_aggregate_id(&MessageSource::from_message(&message)),
        None
    );
    message.headers.append("X-Aggregate-ID", "h-1");
    message.key = Some("key-1".into());
    let found = extract_aggregate_id(&MessageSource::from_message(&message)).unwrap();
    assert_eq!(found.as_str(), "h-1");
    let opted_in = MessageSource::from_message(&message).with_subject_keys(&message.topic);
    assert_eq!(extract_aggregate_id(&opted_in).unwrap().as_str(), "h-1");
}
