//! Topic names valid on both Kafka and NATS, as a table.

use eventbus_core::{Error, ErrorKind, TopicError, dead_letter_topic, validate_topic};

const VALID: &[&str] = &[
    "a",
    "Z",
    "0",
    "_",
    "-",
    "orders",
    "orders.created",
    "orders.created.v2",
    "ORDERS",
    "orders_created",
    "orders-created",
    "a.b.c.d.e.f",
    "a-.-b",
    "_._",
    "123.456",
    "tenant-7.orders.DLQ",
    "x1.y2.z3",
    "health_check_topic",
    "jxt.topology.ready",
    "a--b__c",
];

fn invalid() -> Vec<(String, TopicError)> {
    let bad = |c: char, position: usize| TopicError::InvalidCharacter {
        character: c,
        position,
    };
    let empty = |position: usize| TopicError::EmptyToken { position };
    vec![
        ("".into(), TopicError::Empty),
        (".".into(), empty(0)),
        ("..".into(), empty(0)),
        ("...".into(), empty(0)),
        (".orders".into(), empty(0)),
        ("orders.".into(), empty(7)),
        ("orders..created".into(), empty(7)),
        ("a.b..c".into(), empty(4)),
        ("a.".into(), empty(2)),
        ("t".repeat(250), TopicError::TooLong { len: 250 }),
        ("t".repeat(1000), TopicError::TooLong { len: 1000 }),
        ("orders created".into(), bad(' ', 6)),
        (" orders".into(), bad(' ', 0)),
        ("orders ".into(), bad(' ', 6)),
        ("orders.*".into(), bad('*', 7)),
        ("orders.>".into(), bad('>', 7)),
        ("orders/created".into(), bad('/', 6)),
        ("orders:created".into(), bad(':', 6)),
        ("orders@1".into(), bad('@', 6)),
        ("orders#1".into(), bad('#', 6)),
        ("orders$1".into(), bad('$', 6)),
        ("orders%1".into(), bad('%', 6)),
        ("orders+1".into(), bad('+', 6)),
        ("orders=1".into(), bad('=', 6)),
        ("orders,1".into(), bad(',', 6)),
        ("orders;1".into(), bad(';', 6)),
        ("orders?".into(), bad('?', 6)),
        ("orders!".into(), bad('!', 6)),
        ("orders\"".into(), bad('"', 6)),
        ("orders'".into(), bad('\'', 6)),
        ("orders\\".into(), bad('\\', 6)),
        ("orders\t".into(), bad('\t', 6)),
        ("orders\n".into(), bad('\n', 6)),
        ("orders\0".into(), bad('\0', 6)),
        ("commandes-é".into(), bad('é', 10)),
        ("注文".into(), bad('注', 0)),
        ("orders|1".into(), bad('|', 6)),
        ("orders~1".into(), bad('~', 6)),
        ("orders(1)".into(), bad('(', 6)),
        ("orders{1}".into(), bad('{', 6)),
    ]
}

#[test]
fn valid_topics_are_accepted() {
    for topic in VALID {
        assert!(validate_topic(topic).is_ok(), "{topic:?}");
    }
    assert!(validate_topic(&"t".repeat(249)).is_ok());
    assert!(validate_topic(&format!("{}.{}", "a".repeat(124), "b".repeat(124))).is_ok());
}

#[test]
fn invalid_topics_say_why() {
    let cases = invalid();
    assert!(cases.len() + VALID.len() >= 60 && cases.len() >= 40);
    for (topic, expected) in cases {
        match validate_topic(&topic) {
            Err(Error::InvalidTopic {
                topic: named,
                reason,
            }) => {
                assert_eq!(named, topic);
                assert_eq!(reason, expected, "{topic:?}");
            }
            other => panic!("{topic:?}: {other:?}"),
        }
    }
}

#[test]
fn dead_letter_topics_append_dlq_and_must_stay_valid() {
    assert_eq!(dead_letter_topic("orders").unwrap(), "orders.DLQ");
    assert_eq!(dead_letter_topic("orders.DLQ").unwrap(), "orders.DLQ.DLQ");
    assert_eq!(
        dead_letter_topic(&"t".repeat(246)).unwrap_err().kind(),
        ErrorKind::InvalidTopic
    );
    assert!(dead_letter_topic(&"t".repeat(245)).is_ok());
    assert!(dead_letter_topic("bad topic").is_err());
}
