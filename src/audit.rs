//! The per-tenant audit trail, written in batches off the request path.
//!
//! Requests hand rows to a bounded queue; one writer task lets rows gather for up to 20 ms, then
//! writes them, one transaction and one COPY per tenant. When the queue is full (the database is slow or away) the
//! request waits: rows are never dropped to keep up. While the database is unreachable the
//! writer keeps its batch and retries with backoff. The only rows that are not written are rows
//! for a tenant whose schema does not exist (never enabled, or purged): those are logged, each
//! with its event id and state, at error level.

use std::collections::BTreeMap;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::AuditConfig;
use crate::domain::TenantId;

pub const QUEUE_CAPACITY: usize = 10_000;
const BATCH_MAX: usize = 1_000;
/// How long the writer lets rows gather after the first one: the audit trail lags the publish
/// by up to this much (plus the write), the request never waits for it.
const BATCH_LINGER: Duration = Duration::from_millis(20);

use crate::db::audit::{insert, is_missing_schema};
pub use crate::db::audit::{purge_once, AuditItem, AuditRecord, AuditState};

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<AuditItem>,
}

impl AuditWriter {
    /// Starts the writer task. It runs until `stop` is cancelled, then writes what is queued
    /// and ends.
    pub fn start(
        pool: PgPool,
        stop: CancellationToken,
    ) -> (AuditWriter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let handle = tokio::spawn(write_loop(pool, rx, stop));
        (AuditWriter { tx }, handle)
    }

    /// Queues a row, waiting while the queue is full.
    pub async fn record(&self, item: AuditItem) {
        if let Err(mpsc::error::SendError(item)) = self.tx.send(item).await {
            // Only after shutdown began; say what is not written.
            tracing::error!(?item, "audit row after shutdown, not written");
        }
    }
}

async fn write_loop(pool: PgPool, mut rx: mpsc::Receiver<AuditItem>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(BATCH_MAX);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH_MAX) => n,
            _ = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, BATCH_MAX).await
            }
        };
        if n == 0 {
            return;
        }
        if batch.len() < BATCH_MAX && !stop.is_cancelled() {
            // Let a batch gather: fewer, larger transactions cost PostgreSQL and this task much
            // less per row than a transaction per publish at low rates. Sleeping (rather than
            // waiting on the queue) spares the senders a wake-up per row.
            tokio::select! {
                _ = tokio::time::sleep(BATCH_LINGER) => {}
                _ = stop.cancelled() => {}
            }
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
        }
        write_with_retry(&pool, &batch, &stop).await;
        batch.clear();
    }
}

async fn write_with_retry(pool: &PgPool, batch: &[AuditItem], stop: &CancellationToken) {
    let mut by_tenant: BTreeMap<&TenantId, Vec<&AuditItem>> = BTreeMap::new();
    for item in batch {
        by_tenant.entry(item.tenant()).or_default().push(item);
    }
    for (tenant, items) in by_tenant {
        let mut delay = Duration::from_millis(100);
        // While stopping, the database gets a bounded time to come back.
        let mut attempts_after_stop = 0;
        loop {
            match insert(pool, tenant, &items).await {
                Ok(()) => break,
                Err(e) if crate::db::is_unavailable(&e) && attempts_after_stop < 20 => {
                    if stop.is_cancelled() {
                        attempts_after_stop += 1;
                    }
                    tracing::warn!(error = %e, %tenant, rows = items.len(), "audit write failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let reason = if is_missing_schema(&e) {
                        "the tenant's schema does not exist (tenant not enabled, or purged)"
                    } else {
                        "database error"
                    };
                    for item in &items {
                        tracing::error!(%tenant, ?item, error = %e, reason, "audit row not written");
                    }
                    break;
                }
            }
        }
    }
}

/// Deletes audit rows older than the retention period, in every tenant, periodically. Only one
/// instance purges at a time (advisory lock).
pub async fn purge_loop(pool: PgPool, cfg: AuditConfig, stop: CancellationToken) {
    if cfg.retention_days == 0 {
        return;
    }
    loop {
        match purge_once(&pool, cfg.retention_days).await {
            Ok(Some(n)) if n > 0 => tracing::info!(
                rows = n,
                days = cfg.retention_days,
                "audit rows past retention purged"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "audit purge failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.purge_interval) => {}
        }
    }
}
