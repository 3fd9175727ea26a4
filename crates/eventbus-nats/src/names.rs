//! Names of the streams and durable consumers the bus creates.
//!
//! Stream and consumer names may not contain `.`, so a topic's dots become `_`. That alone would
//! give `a.b` and `a_b` the same name; a topic that already contains `_` therefore gets a short
//! hash of its exact spelling appended, which keeps names readable for the common dotted topics
//! and distinct for all.

/// The name of the stream created for `topic`: `{prefix}{topic}` with `.` as `_`.
pub(crate) fn stream_name(prefix: &str, topic: &str) -> String {
    format!("{prefix}{}", escape(topic))
}

/// Checks a durable consumer name given by a subscription (`SubscribeOptions::durable`):
/// JetStream refuses names that are empty, longer than 255 bytes, or hold whitespace, `.`, `*`,
/// `>`, `/` or `\\` (they would be read as subject tokens or paths).
pub(crate) fn validate_durable_name(name: &str) -> Result<(), eventbus_core::Error> {
    let bad = name
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'));
    let reason = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name.len() > 255 {
        Some("it is longer than 255 bytes".to_owned())
    } else {
        bad.map(|c| format!("it holds {c:?}"))
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(eventbus_core::Error::config(
            "durable",
            format!("{name:?} cannot name a durable consumer: {reason}"),
        )),
    }
}

/// The durable consumer name of a subscription.
///
/// The common case keeps the readable name `{client_id}_{topic}` with `.` as `_`: a client ID
/// of ASCII letters, digits and `-`, a topic of those and `.`, the first subscription (slot 1).
/// There the first `_` separates the two parts and every other `_` was a `.`, so no two such
/// subscriptions share a name. Anything else (a client ID with `_` or other characters, a topic
/// with `_`, a second subscription) gets the sanitized parts, the slot, and a 64-bit hash of the
/// exact (client ID, topic, slot): `a.b` and `a_b`, or topic `t` slot 2 and topic `t.2`, differ.
pub(crate) fn durable_name(client_id: &str, topic: &str, slot: usize) -> String {
    let plain_client = !client_id.is_empty()
        && client_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    let plain_topic = topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if plain_client && plain_topic && slot <= 1 {
        return format!("{client_id}_{}", topic.replace('.', "_"));
    }
    let client: String = client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut exact = Vec::with_capacity(client_id.len() + topic.len() + 24);
    exact.extend_from_slice(client_id.as_bytes());
    exact.push(0);
    exact.extend_from_slice(topic.as_bytes());
    exact.push(0);
    exact.extend_from_slice(slot.to_string().as_bytes());
    format!(
        "{client}_{}_{slot}-{:016x}",
        topic.replace('.', "_"),
        fnv1a64(&exact)
    )
}

/// 64-bit FNV-1a: stable across versions and platforms, unlike the std hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `topic` with `.` as `_`, plus `-{fnv1a32 hex}` when the topic itself contains `_`.
fn escape(topic: &str) -> String {
    let dotted = topic.replace('.', "_");
    if topic.contains('_') {
        format!("{dotted}-{:08x}", fnv1a(topic.as_bytes()))
    } else {
        dotted
    }
}

/// 32-bit FNV-1a: stable across versions and platforms, unlike the std hasher.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// Whether a stream subject (with NATS wildcards `*` and `>`) matches `subject`.
pub(crate) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// `name` as a key-value bucket or key name allows it: itself when it holds only letters,
/// digits, `_` and `-`; else with every other character made `_` and a hash of the whole name
/// appended, so two names never meet.
pub(crate) fn kv_safe(name: &str) -> String {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == name {
        clean
    } else {
        format!("{clean}-{:08x}", fnv1a(name.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_topics_keep_readable_names() {
        assert_eq!(
            stream_name("STREAM_", "orders.created"),
            "STREAM_orders_created"
        );
        assert_eq!(
            durable_name("billing", "orders.created", 1),
            "billing_orders_created"
        );
        assert_eq!(durable_name("svc-eu", "orders", 1), "svc-eu_orders");
        let second = durable_name("billing", "orders.created", 2);
        assert!(second.starts_with("billing_orders_created_2-"), "{second}");
        let odd = durable_name("svc.eu@1", "orders", 1);
        assert!(odd.starts_with("svc_eu_1_orders_1-"), "{odd}");
    }

    #[test]
    fn durable_names_a_subscription_gives_are_checked_as_jetstream_would() {
        for good in [
            "business-consumer-unified_orders_created",
            "a",
            "svc-eu_orders",
        ] {
            assert!(validate_durable_name(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "a*", "a>", "a/b", "a\\b", "a\nb"] {
            let error = validate_durable_name(bad).unwrap_err();
            assert_eq!(error.kind(), eventbus_core::ErrorKind::Config, "{bad:?}");
        }
        assert!(validate_durable_name(&"x".repeat(256)).is_err());
    }

    #[test]
    fn different_subscriptions_never_share_a_durable_name() {
        let cases = [
            ("c", "t", 2),
            ("c", "t.2", 1),
            ("c", "t_2", 1),
            ("a.b", "t", 1),
            ("a_b", "t", 1),
            ("a", "b.t", 1),
            ("a", "b_t", 1),
            ("billing_svc", "orders", 1),
            ("billing", "svc.orders", 1),
            ("billing", "svc_orders", 1),
            ("c", "t", 3),
            ("c", "t", 1),
        ];
        let names: Vec<String> = cases
            .iter()
            .map(|(client, topic, slot)| durable_name(client, topic, *slot))
            .collect();
        for (i, a) in names.iter().enumerate() {
            assert!(
                a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{a}"
            );
            for (j, b) in names.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{:?} and {:?}", cases[i], cases[j]);
            }
        }
    }

    #[test]
    fn topics_that_differ_only_in_dots_and_underscores_get_different_names() {
        let names = ["a.b", "a_b", "a.b_c", "a_b.c", "a_b_c", "a.b.c"]
            .map(|topic| stream_name("S_", topic));
        for (i, a) in names.iter().enumerate() {
            for b in names.iter().skip(i + 1) {
                assert_ne!(a, b);
            }
            assert!(!a.contains('.'), "{a}");
        }
        assert_eq!(
            stream_name("S_", "a_b"),
            format!("S_a_b-{:08x}", fnv1a(b"a_b"))
        );
    }

    #[test]
    fn wildcards_match_like_the_server() {
        assert!(subject_matches("orders.>", "orders.created"));
        assert!(subject_matches("orders.>", "orders.created.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.*", "orders.created"));
        assert!(!subject_matches("orders.*", "orders.created.eu"));
        assert!(subject_matches("*.created", "orders.created"));
        assert!(subject_matches("orders", "orders"));
        assert!(!subject_matches("orders", "orders.DLQ"));
        assert!(subject_matches(">", "anything.at.all"));
    }
}
