//! Aggregate-ID validation: the Go SDK's rules as a table.

use eventbus_core::{AggregateId, AggregateIdError, Error, ErrorKind, validate_aggregate_id};

/// (input, the trimmed ID when valid)
const VALID: &[(&str, &str)] = &[
    ("a", "a"),
    ("Z", "Z"),
    ("0", "0"),
    ("order-42", "order-42"),
    ("order_42", "order_42"),
    ("order.42", "order.42"),
    ("order/42", "order/42"),
    ("order:42", "order:42"),
    ("tenant:7/order-42.v2", "tenant:7/order-42.v2"),
    (
        "0190a6f0-7c3e-7d2a-9b1e-1234567890ab",
        "0190a6f0-7c3e-7d2a-9b1e-1234567890ab",
    ),
    ("...", "..."),
    ("---", "---"),
    ("/", "/"),
    (":", ":"),
    ("_", "_"),
    ("  padded  ", "padded"),
    ("\tTabbed\t", "Tabbed"),
    ("\nnewline\r\n", "newline"),
    ("\u{a0}nbsp\u{a0}", "nbsp"),
    ("\u{3000}ideographic-space", "ideographic-space"),
    ("\u{85}nel", "nel"),
    ("ABCdef123", "ABCdef123"),
    ("a.b.c.d.e", "a.b.c.d.e"),
    ("user::1", "user::1"),
    ("x/y/z", "x/y/z"),
];

fn max_len() -> String {
    "a".repeat(256)
}

/// (input, expected error)
fn invalid() -> Vec<(String, AggregateIdError)> {
    let bad = |c: char, position: usize| AggregateIdError::InvalidCharacter {
        character: c,
        position,
    };
    vec![
        ("".into(), AggregateIdError::Empty),
        (" ".into(), AggregateIdError::Empty),
        ("\t\n\r ".into(), AggregateIdError::Empty),
        ("\u{a0}\u{2003}".into(), AggregateIdError::Empty),
        ("a".repeat(257), AggregateIdError::TooLong { len: 257 }),
        ("é".repeat(129), AggregateIdError::TooLong { len: 258 }),
        (
            format!(" {} ", "b".repeat(300)),
            AggregateIdError::TooLong { len: 300 },
        ),
        ("order 42".into(), bad(' ', 5)),
        ("order@42".into(), bad('@', 5)),
        ("order#42".into(), bad('#', 5)),
        ("order$42".into(), bad('$', 5)),
        ("order%42".into(), bad('%', 5)),
        ("order+42".into(), bad('+', 5)),
        ("order=42".into(), bad('=', 5)),
        ("order,42".into(), bad(',', 5)),
        ("order;42".into(), bad(';', 5)),
        ("order*".into(), bad('*', 5)),
        ("order>".into(), bad('>', 5)),
        ("<order".into(), bad('<', 0)),
        ("order?".into(), bad('?', 5)),
        ("order!".into(), bad('!', 5)),
        ("\"quoted\"".into(), bad('"', 0)),
        ("back\\slash".into(), bad('\\', 4)),
        ("tab\tinside".into(), bad('\t', 3)),
        ("new\nline".into(), bad('\n', 3)),
        ("nul\0".into(), bad('\0', 3)),
        ("café".into(), bad('é', 3)),
        ("注文".into(), bad('注', 0)),
        ("emoji😀".into(), bad('😀', 5)),
        ("order~1".into(), bad('~', 5)),
        ("order|1".into(), bad('|', 5)),
        ("order(1)".into(), bad('(', 5)),
        ("order[1]".into(), bad('[', 5)),
        ("order{1}".into(), bad('{', 5)),
        ("order'1".into(), bad('\'', 5)),
        ("order`1".into(), bad('`', 5)),
        ("order^1".into(), bad('^', 5)),
        ("order&1".into(), bad('&', 5)),
        ("a\u{200b}b".into(), bad('\u{200b}', 1)),
        ("\u{ff21}".into(), bad('\u{ff21}', 0)),
    ]
}

#[test]
fn valid_aggregate_ids_are_accepted_and_trimmed() {
    assert!(VALID.len() >= 25);
    for &(input, trimmed) in VALID {
        assert!(validate_aggregate_id(input).is_ok(), "{input:?}");
        let id = AggregateId::new(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(id.as_str(), trimmed);
        assert_eq!(id.to_string(), trimmed);
        assert_eq!(input.parse::<AggregateId>().unwrap(), id);
    }
    assert_eq!(AggregateId::new(max_len()).unwrap().as_str().len(), 256);
    assert!(validate_aggregate_id(&format!("  {}  ", max_len())).is_ok());
}

#[test]
fn invalid_aggregate_ids_say_why() {
    let cases = invalid();
    assert!(cases.len() >= 40);
    for (input, expected) in cases {
        let error = validate_aggregate_id(&input).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidAggregateId, "{input:?}");
        match error {
            Error::InvalidAggregateId(reason) => assert_eq!(reason, expected, "{input:?}"),
            other => panic!("{input:?}: {other:?}"),
        }
        assert!(AggregateId::try_from(input.as_str()).is_err());
    }
}

#[test]
fn messages_match_the_go_sdk() {
    let message = |input: &str| validate_aggregate_id(input).unwrap_err().to_string();
    assert_eq!(
        message(""),
        "invalid aggregate_id: aggregate_id cannot be empty"
    );
    assert_eq!(
        message(&"a".repeat(257)),
        "invalid aggregate_id: aggregate_id too long (max 256 characters)"
    );
    assert_eq!(
        message("a@b"),
        "invalid aggregate_id: aggregate_id contains invalid character: @"
    );
}

#[test]
fn aggregate_ids_compare_and_look_up_as_strings() {
    use std::collections::HashMap;
    let mut lanes = HashMap::new();
    lanes.insert(AggregateId::new(" order-1 ").unwrap(), 1);
    assert_eq!(lanes.get("order-1"), Some(&1));
    assert_eq!(
        AggregateId::new("a").unwrap(),
        AggregateId::try_from(String::from(" a")).unwrap()
    );
    assert_eq!(format!("{:?}", AggregateId::new("a").unwrap()), "\"a\"");
}
