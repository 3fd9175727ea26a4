//! Partitioned topics: which partition an aggregate's events go to, and the subjects.
//!
//! A topic with `n` partitions ([`TopicOptions::partitions`](crate::TopicOptions::partitions))
//! is stored under `n + 1` subjects: `{topic}.0` … `{topic}.{n-1}`, where this SDK publishes,
//! and the bare `{topic}`, where publishers that do not partition (the Go services) still
//! publish. Each is read by one instance of a service at a time.

/// The partition of `aggregate_id` among `partitions`: the 32-bit FNV-1a hash of its UTF-8
/// bytes modulo `partitions`, the same mapping as JetStream's `partition(n, …)` subject
/// transform, so a stream transform over a subject token holding the aggregate ID agrees with
/// this SDK. `partitions` 0 counts as 1.
///
/// ```
/// assert_eq!(eventbus_nats::partition_of("order-42", 1), 0);
/// assert!(eventbus_nats::partition_of("order-42", 12) < 12);
/// ```
pub fn partition_of(aggregate_id: &str, partitions: u16) -> u16 {
    let hash = aggregate_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    });
    // The remainder is below `partitions`, so it fits.
    u16::try_from(hash % u32::from(partitions.max(1))).unwrap_or(0)
}

/// The subject of `topic`'s partition `index`: `{topic}.{index}`.
pub fn partition_subject(topic: &str, index: u16) -> String {
    format!("{topic}.{index}")
}

/// Every subject of a topic with `partitions` partitions: the bare topic first, then each
/// partition's.
pub(crate) fn subjects(topic: &str, partitions: u16) -> Vec<String> {
    std::iter::once(topic.to_owned())
        .chain((0..partitions).map(|index| partition_subject(topic, index)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_is_fnv1a_32_of_the_aggregate_modulo_the_count() {
        // FNV-1a 32 reference values (the algorithm's published test vectors).
        assert_eq!(partition_of("", 1000), (0x811c_9dc5_u32 % 1000) as u16);
        assert_eq!(partition_of("a", 1000), (0xe40c_292c_u32 % 1000) as u16);
        assert_eq!(
            partition_of("foobar", 1000),
            (0xbf9c_f968_u32 % 1000) as u16
        );
    }

    #[test]
    fn every_aggregate_has_one_stable_partition_within_range() {
        for n in [1_u16, 2, 12, 1000] {
            for i in 0..500 {
                let id = format!("aggregate-{i}");
                let p = partition_of(&id, n);
                assert!(p < n);
                assert_eq!(p, partition_of(&id, n));
            }
        }
        assert_eq!(partition_of("x", 0), 0);
    }

    #[test]
    fn the_bare_topic_comes_before_the_partition_subjects() {
        assert_eq!(
            subjects("orders", 3),
            ["orders", "orders.0", "orders.1", "orders.2"]
        );
    }
}
