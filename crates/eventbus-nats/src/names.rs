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

/// The durable consumer name of a subscription: `{client_id}_{topic}`, and `_{slot}` for the
/// second and later subscriptions of one bus to the same topic (slot 2, 3, ...).
pub(crate) fn durable_name(client_id: &str, topic: &str, slot: usize) -> String {
    let client: String = client_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let base = format!("{client}_{}", escape(topic));
    if slot <= 1 {
        base
    } else {
        format!("{base}_{slot}")
    }
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
        assert_eq!(
            durable_name("billing", "orders.created", 2),
            "billing_orders_created_2"
        );
        assert_eq!(durable_name("svc.eu@1", "orders", 1), "svc_eu_1_orders");
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
