//! A transactional outbox with tenants, on the pipelined publish path.
//!
//! ```text
//! cargo run -p eventbus --example outbox
//! ```
//!
//! The relay reads unsent rows, starts publishing each with `start_publish_envelope` (many in
//! flight, bounded by `publish_max_in_flight`) and does not wait for them one by one. One task
//! reads the bus's `publish_results` stream and routes each result by tenant to that tenant's
//! outbox, which marks the row sent (or keeps it for the next sweep when the publish failed).
//! A reader that falls behind is told how many results it missed: those rows stay unsent, and a
//! real relay's next sweep publishes them again (consumers deduplicate by event ID). Here the
//! 300 results fit the stream's buffer many times over, so every row ends marked sent.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use eventbus::{Config, Envelope, PublishResult, ResultsError};
use tokio::sync::mpsc;

/// One tenant's outbox table: event ID → sent.
#[derive(Default)]
struct Outbox {
    rows: Mutex<BTreeMap<String, bool>>,
}

impl Outbox {
    fn add(&self, envelope: &Envelope) {
        self.rows
            .lock()
            .unwrap()
            .insert(envelope.event_id.clone(), false);
    }

    fn mark(&self, result: &PublishResult) {
        if let (Some(event_id), true) = (&result.event_id, result.is_success()) {
            self.rows.lock().unwrap().insert(event_id.clone(), true);
        }
    }

    /// Rows, and rows not marked sent.
    fn counts(&self) -> (usize, usize) {
        let rows = self.rows.lock().unwrap();
        (rows.len(), rows.values().filter(|sent| !**sent).count())
    }
}

#[tokio::main]
async fn main() -> Result<(), eventbus::Error> {
    let bus = eventbus::connect(Config::default()).await?;
    let tenants = [7_i64, 8, 9];
    let outboxes: HashMap<i64, Arc<Outbox>> = tenants
        .iter()
        .map(|tenant| (*tenant, Arc::new(Outbox::default())))
        .collect();

    // Per-tenant routing: one channel per tenant, fed by one reader of the results stream.
    let mut routes = HashMap::new();
    let mut markers = Vec::new();
    for (tenant, outbox) in &outboxes {
        let (route, mut results) = mpsc::unbounded_channel::<PublishResult>();
        routes.insert(*tenant, route);
        let outbox = outbox.clone();
        markers.push(tokio::spawn(async move {
            while let Some(result) = results.recv().await {
                outbox.mark(&result);
            }
        }));
    }
    let mut results = bus.publish_results();
    let router = tokio::spawn(async move {
        loop {
            match results.recv().await {
                Ok(result) => {
                    if let Some(route) = routes.get(&result.tenant_id) {
                        let _ = route.send(result);
                    }
                }
                Err(ResultsError::Lagged(missed)) => {
                    println!("missed {missed} results: the next sweep sends those rows again");
                }
                Err(ResultsError::Closed) => return,
                Err(other) => {
                    println!("results stream ended: {other}");
                    return;
                }
            }
        }
    });

    // The relay: every tenant's rows, started one after the other without waiting.
    let mut pending = Vec::new();
    for version in 1..=100 {
        for tenant in tenants {
            let envelope = Envelope::new(
                format!("order-{tenant}-{}", version % 10),
                "OrderUpdated",
                version,
                &serde_json::json!({ "tenant": tenant, "line": version }),
            )?
            .with_tenant_id(tenant);
            outboxes[&tenant].add(&envelope);
            pending.push(bus.start_publish_envelope("orders", &envelope).await?);
        }
    }
    // Awaiting is optional (the results stream reports every publish); here it tells when the
    // last acknowledgement is in.
    for publish in pending {
        publish.await?;
    }
    bus.close().await?;
    router.await.expect("the router ends when the bus closes");
    for marker in markers {
        marker
            .await
            .expect("each tenant's marker ends with the router");
    }
    for tenant in tenants {
        let (rows, unsent) = outboxes[&tenant].counts();
        println!("tenant {tenant}: {rows} rows, {unsent} unsent");
        assert_eq!(unsent, 0);
    }
    Ok(())
}
