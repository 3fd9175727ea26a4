//! Metric naming shared by every backend.

/// The metric namespace of a bus: `{bus_type}_eventbus_{client_id}`, with every character
/// outside `[a-zA-Z0-9_]` replaced by `_`, so that it is a valid Prometheus name prefix and two
/// buses with different client IDs do not collide.
///
/// ```
/// use eventbus_core::metric_namespace;
///
/// assert_eq!(metric_namespace("nats", "order-service"), "nats_eventbus_order_service");
/// assert_eq!(metric_namespace("kafka", "billing.eu@1"), "kafka_eventbus_billing_eu_1");
/// ```
pub fn metric_namespace(bus_type: &str, client_id: &str) -> String {
    format!("{bus_type}_eventbus_{client_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_outside_the_prometheus_set_becomes_an_underscore() {
        assert_eq!(metric_namespace("memory", ""), "memory_eventbus_");
        assert_eq!(
            metric_namespace("nats", "a b.c/d:e"),
            "nats_eventbus_a_b_c_d_e"
        );
        assert_eq!(metric_namespace("kafka", "héllo"), "kafka_eventbus_h_llo");
        assert_eq!(metric_namespace("my-type", "X_1"), "my_type_eventbus_X_1");
    }
}
