//! Property tests: envelopes round-trip; decoding and extraction never panic on any input.

// The strategies build dates, envelopes and values from known-good constants.
#![allow(clippy::unwrap_used)]

use eventbus_core::{
    AggregateId, Envelope, Headers, MessageSource, extract_aggregate_id, validate_aggregate_id,
    validate_topic,
};
use proptest::prelude::*;
use serde_json::Value;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn non_blank() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9<>&\"\\\\ \t\n\u{2028}\u{2029}\u{1}-]{1,20}",
        any::<String>(),
    ]
    .prop_filter("not blank", |s| !s.trim().is_empty())
}

fn aggregate_id() -> impl Strategy<Value = String> {
    ("[ \t]{0,2}", "[A-Za-z0-9:_./-]{1,256}", "[ \t]{0,2}")
        .prop_map(|(before, id, after)| format!("{before}{id}{after}"))
}

fn timestamp() -> impl Strategy<Value = OffsetDateTime> {
    let first = Date::from_calendar_date(0, time::Month::January, 1)
        .unwrap()
        .to_julian_day();
    let last = Date::from_calendar_date(9999, time::Month::December, 31)
        .unwrap()
        .to_julian_day();
    (
        first..=last,
        0u32..86_400,
        prop_oneof![Just(0u32), 0u32..1_000_000_000],
        prop_oneof![Just(0i32), -(23 * 60 + 59)..=(23 * 60 + 59)],
    )
        .prop_map(|(day, second, nanos, offset_minutes)| {
            let date = Date::from_julian_day(day).unwrap();
            let clock = Time::from_hms_nano(
                (second / 3600) as u8,
                (second / 60 % 60) as u8,
                (second % 60) as u8,
                nanos,
            )
            .unwrap();
            let offset = UtcOffset::from_whole_seconds(offset_minutes * 60).unwrap();
            PrimitiveDateTime::new(date, clock).assume_offset(offset)
        })
}

prop_compose! {
    fn envelope()(
        event_id in non_blank(),
        aggregate_id in aggregate_id(),
        event_type in non_blank(),
        event_version in 1..=i64::MAX,
        timestamp in timestamp(),
        trace_id in prop_oneof![Just(String::new()), any::<String>()],
        correlation_id in prop_oneof![Just(String::new()), any::<String>()],
        tenant_id in prop_oneof![Just(0i64), any::<i64>()],
        payload in json_value().prop_filter("not null", |v| !v.is_null()),
    ) -> Envelope {
        let mut envelope = Envelope::new(aggregate_id, event_type, event_version, &payload).unwrap();
        envelope.event_id = event_id;
        envelope.timestamp = timestamp;
        envelope.trace_id = trace_id;
        envelope.correlation_id = correlation_id;
        envelope.tenant_id = tenant_id;
        envelope
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn envelopes_round_trip_byte_for_byte(envelope in envelope()) {
        let bytes = envelope.to_bytes().unwrap();
        let decoded = Envelope::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&decoded, &envelope);
        prop_assert_eq!(decoded.timestamp.offset(), envelope.timestamp.offset());
        prop_assert_eq!(decoded.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn encoded_envelopes_are_json_that_any_decoder_reads_the_same(envelope in envelope()) {
        let bytes = envelope.to_bytes().unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let event_id = envelope.event_id.as_str();
        prop_assert_eq!(value["event_id"].as_str(), Some(event_id));
        let aggregate_id = envelope.aggregate_id.as_str();
        prop_assert_eq!(value["aggregate_id"].as_str(), Some(aggregate_id));
        let event_type = envelope.event_type.as_str();
        prop_assert_eq!(value["event_type"].as_str(), Some(event_type));
        prop_assert_eq!(value["event_version"].as_i64(), Some(envelope.event_version));
        prop_assert_eq!(value.get("trace_id").is_some(), !envelope.trace_id.is_empty());
        prop_assert_eq!(value.get("tenant_id").is_some(), envelope.tenant_id != 0);
        let payload: Value = envelope.payload_as().unwrap();
        prop_assert_eq!(&value["payload"], &payload);
        // Go's HTML-safe escaping: no raw <, > or & anywhere outside the verbatim payload.
        let head = &bytes[..bytes.len() - envelope.payload().len()];
        prop_assert!(!head.iter().any(|b| matches!(b, b'<' | b'>' | b'&')));
    }

    #[test]
    fn valid_aggregate_ids_are_always_accepted(id in aggregate_id()) {
        prop_assert!(validate_aggregate_id(&id).is_ok());
        let parsed = AggregateId::new(&id).unwrap();
        prop_assert_eq!(parsed.as_str(), id.trim());
    }

    #[test]
    fn an_id_with_a_character_outside_the_set_is_always_rejected(
        (before, bad, after) in ("[A-Za-z0-9]{0,10}", "[^A-Za-z0-9:_./\\s-]", "[A-Za-z0-9]{0,10}")
    ) {
        let id = format!("{before}{bad}{after}");
        prop_assert!(validate_aggregate_id(&id).is_err());
    }

    #[test]
    fn topic_validation_matches_a_reference_model(topic in "[A-Za-z0-9._ *>/-]{0,12}") {
        let expected = !topic.is_empty()
            && topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            && topic.split('.').all(|token| !token.is_empty());
        prop_assert_eq!(validate_topic(&topic).is_ok(), expected);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Envelope::from_bytes(&bytes);
    }

    #[test]
    fn reading_arbitrary_bytes_as_a_heartbeat_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let now = eventbus_core::OffsetDateTime::now_utc();
        let _ = eventbus_core::Heartbeat::from_bytes(&bytes, now);
        let mut beat = eventbus_core::Heartbeat::new("svc", "nats").to_bytes().unwrap();
        for (index, byte) in edits {
            let at = index.index(beat.len());
            beat[at] = byte;
        }
        let _ = eventbus_core::Heartbeat::from_bytes(&beat, now);
    }

    #[test]
    fn decoding_mutated_envelopes_never_panics(
        envelope in envelope(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = envelope.to_bytes().unwrap().to_vec();
        for (index, byte, operation) in edits {
            if bytes.is_empty() {
                break;
            }
            let at = index.index(bytes.len());
            match operation {
                0 => bytes[at] = byte,
                1 => { bytes.remove(at); }
                _ => bytes.insert(at, byte),
            }
        }
        if let Ok(decoded) = Envelope::from_bytes(&bytes) {
            // Whatever decodes must encode again.
            prop_assert!(decoded.to_bytes().is_ok());
        }
    }

    #[test]
    fn extraction_never_panics(
        payload in prop::collection::vec(any::<u8>(), 0..256),
        headers in prop::collection::vec(
            (prop_oneof![Just("X-Aggregate-ID".to_owned()), Just("aggregate-id".to_owned()), any::<String>()],
             prop::collection::vec(any::<u8>(), 0..64)),
            0..4,
        ),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        subject in prop::option::of(any::<String>()),
    ) {
        let headers: Headers = headers.into_iter().collect();
        let mut source = MessageSource::new(&payload).with_headers(&headers);
        if let Some(key) = &key {
            source = source.with_key(key);
        }
        if let Some(subject) = &subject {
            source = source.with_subject_keys(subject);
        }
        if let Some(id) = extract_aggregate_id(&source) {
            prop_assert!(validate_aggregate_id(id.as_str()).is_ok());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever an error or an envelope field holds, the header value the bus writes from it is
    /// one line of printable characters within the size limit, and text without control
    /// characters is kept as it is.
    #[test]
    fn header_values_have_no_control_characters_and_a_bounded_size(text in any::<String>()) {
        let value = eventbus_core::header_value(&text);
        prop_assert!(!value.chars().any(|c| c.is_ascii_control()), "{value:?}");
        prop_assert!(value.len() <= eventbus_core::MAX_HEADER_VALUE);
        if !text.chars().any(|c| c.is_ascii_control()) && text.len() < 4000 {
            prop_assert_eq!(value, text);
        }
    }
}
