//! The topic reconciler: every registered (tenant, event type) has its topic, and the tenant its
//! dead-letter topic, whatever happened to the broker.

use std::sync::Arc;

use super::Kafka;
use crate::domain::{EventType, TenantId};
use crate::kafka::TopicName;

const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);
const RECONCILE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);
/// Requested passes run at most this often.
const RECONCILE_MIN_GAP: std::time::Duration = std::time::Duration::from_secs(2);

/// Makes sure every registered (tenant, event type) has its topic: at start-up, every five
/// minutes, and when a publish failed (at most every 2 s), so that a wiped broker heals without a
/// restart. Retries every 10 s while Kafka is unreachable.
pub async fn reconcile_loop(
    kafka: Arc<Kafka>,
    pool: sqlx::PgPool,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let wait = match reconcile_once(&kafka, &pool).await {
            Ok(n) => {
                tracing::info!(topics = n, "registered topics reconciled");
                RECONCILE_EVERY
            }
            Err(e) => {
                tracing::warn!(error = %e, "topic reconciliation failed; retrying");
                RECONCILE_RETRY
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = kafka.reconcile_now.notified() => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RECONCILE_MIN_GAP) => {}
                }
            }
        }
    }
}

/// One pass; returns the number of registered topics.
pub async fn reconcile_once(kafka: &Kafka, pool: &sqlx::PgPool) -> anyhow::Result<usize> {
    let rows = crate::db::registry::registered_event_types(pool).await?;
    let mut wanted = std::collections::BTreeSet::new();
    for crate::db::registry::RegisteredEventType {
        tenant_id: tenant,
        event_type_id: event_type,
    } in rows
    {
        match (TenantId::parse(&tenant), EventType::parse(&event_type)) {
            (Ok(t), Ok(e)) => {
                wanted.insert(kafka.topics.name(&t, &e));
                wanted.insert(kafka.topics.dead_letters(&t));
            }
            _ => {
                tracing::warn!(%tenant, %event_type, "registration cannot have a topic (invalid tenant id or event type)")
            }
        }
    }
    let existing = kafka.admin.existing().await?;
    let missing: std::collections::BTreeSet<TopicName> = wanted
        .iter()
        .filter(|t| !existing.contains(t.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        tracing::info!(missing = missing.len(), "creating missing topics");
        let created = kafka.admin.ensure(&missing).await;
        if created.is_err() {
            kafka.set_missing(missing);
        }
        created?;
    }
    kafka.set_missing(Default::default());
    // The broker answers: a producer that failed through an outage gets a fresh start.
    kafka.producer.heal();
    Ok(wanted.len())
}
