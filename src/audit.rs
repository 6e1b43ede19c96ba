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

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::AuditConfig;
use crate::domain::TenantId;

pub const QUEUE_CAPACITY: usize = 10_000;
const BATCH_MAX: usize = 1_000;
/// How long the writer lets rows gather after the first one: the audit trail lags the publish
/// by up to this much (plus the write), the request never waits for it.
const BATCH_LINGER: Duration = Duration::from_millis(20);

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum AuditState {
    Created,
    Published,
    Received,
    Delivered,
    Rejected,
}

impl AuditState {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditState::Created => "CREATED",
            AuditState::Published => "PUBLISHED",
            AuditState::Received => "RECEIVED",
            AuditState::Delivered => "DELIVERED",
            AuditState::Rejected => "REJECTED",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub tenant: TenantId,
    pub event_id: Uuid,
    pub event_type: String,
    pub correlation_id: Option<String>,
    pub created_by: Option<String>,
    pub published_by: String,
    pub state: AuditState,
    pub error_message: Option<String>,
    pub audit_date: DateTime<Utc>,
    /// The subscriber module of a delivery row (RECEIVED, DELIVERED, REJECTED on delivery).
    pub subscriber: Option<String>,
    /// The delivery attempt (1, 2, …) of a delivery row.
    pub attempt: Option<i32>,
}

#[derive(Debug, Clone)]
pub enum AuditItem {
    Message(AuditRecord),
    Payload {
        tenant: TenantId,
        event_id: Uuid,
        content: String,
    },
}

impl AuditItem {
    fn tenant(&self) -> &TenantId {
        match self {
            AuditItem::Message(r) => &r.tenant,
            AuditItem::Payload { tenant, .. } => tenant,
        }
    }
}

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
                Err(e) if crate::error::is_unavailable(&e) && attempts_after_stop < 20 => {
                    if stop.is_cancelled() {
                        attempts_after_stop += 1;
                    }
                    tracing::warn!(error = %e, %tenant, rows = items.len(), "audit write failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    let missing_schema = matches!(&e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("3F000" | "42P01" | "42704")));
                    let reason = if missing_schema {
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

/// PostgreSQL cannot store NUL characters in text or jsonb.
fn clean(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// Appends `s` as a field of COPY's text format: backslash, tab, newline and carriage return
/// escaped, NUL replaced (PostgreSQL cannot store it in text).
fn copy_text(out: &mut Vec<u8>, s: &str) {
    // These are ASCII bytes, never part of a multi-byte UTF-8 sequence.
    for &b in s.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0 => out.extend_from_slice("\u{FFFD}".as_bytes()),
            b => out.push(b),
        }
    }
}

fn copy_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => copy_text(out, s),
        None => out.extend_from_slice(b"\\N"),
    }
}

/// The rows of `items` in COPY's text format, in the column order of [`COPY_COLUMNS`].
fn copy_rows(tenant: &TenantId, items: &[&AuditItem]) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(items.len() * 256);
    for item in items {
        let AuditItem::Message(r) = item else {
            continue;
        };
        // A time-ordered (version 7) id, random bits from the thread's CSPRNG: primary-key
        // insertions append, and no system call per row.
        let id = uuid::Builder::from_unix_timestamp_millis(
            u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or_default(),
            &rand::random(),
        )
        .into_uuid();
        let mut text = [0u8; 36];
        out.extend_from_slice(id.hyphenated().encode_lower(&mut text).as_bytes());
        out.push(b'\t');
        out.extend_from_slice(r.event_id.hyphenated().encode_lower(&mut text).as_bytes());
        out.push(b'\t');
        copy_text(&mut out, &r.event_type);
        out.push(b'\t');
        copy_text(&mut out, r.correlation_id.as_deref().unwrap_or_default());
        out.push(b'\t');
        copy_text(&mut out, tenant.as_str());
        out.push(b'\t');
        copy_text(&mut out, r.created_by.as_deref().unwrap_or_default());
        out.push(b'\t');
        copy_text(&mut out, &r.published_by);
        out.push(b'\t');
        out.extend_from_slice(r.state.as_str().as_bytes());
        out.push(b'\t');
        copy_text(&mut out, r.error_message.as_deref().unwrap_or_default());
        out.push(b'\t');
        // `audit_date` is the Java module's `timestamp without time zone`, in UTC.
        let _ = write!(
            out,
            "{}",
            r.audit_date.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f")
        );
        out.push(b'\t');
        copy_opt(&mut out, r.subscriber.as_deref());
        out.push(b'\t');
        match r.attempt {
            Some(a) => {
                let _ = write!(out, "{a}");
            }
            None => out.extend_from_slice(b"\\N"),
        }
        out.push(b'\n');
    }
    out
}

const COPY_COLUMNS: &str = "id, event_id, event_type, correlation_id, tenant_id, created_by, \
                            published_by, state, error_message, audit_date, subscriber, attempt";

/// Writes one tenant's rows in one transaction: the messages with COPY (cheaper for PostgreSQL
/// than a multi-row INSERT), the payloads with INSERT … ON CONFLICT.
async fn insert(pool: &PgPool, tenant: &TenantId, items: &[&AuditItem]) -> sqlx::Result<()> {
    let schema = tenant.schema_ident();
    let mut payload_ids = Vec::new();
    let mut payloads = Vec::new();
    for item in items {
        if let AuditItem::Payload {
            event_id, content, ..
        } = item
        {
            payload_ids.push(*event_id);
            payloads.push(
                serde_json::json!({"eventId": event_id, "content": clean(content)}).to_string(),
            );
        }
    }
    let mut tx = pool.begin().await?;
    if payload_ids.len() < items.len() {
        let mut copy = tx
            .copy_in_raw(&format!(
                "COPY {schema}.audit_message ({COPY_COLUMNS}) FROM STDIN"
            ))
            .await?;
        copy.send(copy_rows(tenant, items)).await?;
        copy.finish().await?;
    }
    if !payload_ids.is_empty() {
        sqlx::query(&format!(
            "INSERT INTO {schema}.audit_message_payload (event_id, content) \
             SELECT u.event_id, u.content::jsonb FROM UNNEST($1::uuid[], $2::text[]) AS u(event_id, content) \
             ON CONFLICT (event_id) DO NOTHING"
        ))
        .bind(&payload_ids)
        .bind(&payloads)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
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

/// One purge pass; `None` when another instance holds the lock.
pub async fn purge_once(pool: &PgPool, retention_days: u32) -> sqlx::Result<Option<u64>> {
    let mut conn = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtextextended('pubsub:audit-purge', 0))",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !locked {
        return Ok(None);
    }
    let result = async {
        let schemas: Vec<String> = sqlx::query_scalar(
            "SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'audit_message' AND table_schema LIKE '%\\_mod\\_pubsub'",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut deleted = 0;
        for schema in schemas {
            let Some(tenant) = schema.strip_suffix("_mod_pubsub").and_then(|t| TenantId::parse(t).ok()) else { continue };
            let s = tenant.schema_ident();
            let done = sqlx::query(&format!("DELETE FROM {s}.audit_message WHERE audit_date < (now() AT TIME ZONE 'UTC') - make_interval(days => $1)"))
                .bind(retention_days as i32)
                .execute(&mut *conn)
                .await?;
            deleted += done.rows_affected();
            sqlx::query(&format!(
                "DELETE FROM {s}.audit_message_payload p WHERE NOT EXISTS (SELECT 1 FROM {s}.audit_message a WHERE a.event_id = p.event_id)"
            ))
            .execute(&mut *conn)
            .await?;
        }
        Ok::<u64, sqlx::Error>(deleted)
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended('pubsub:audit-purge', 0))")
        .execute(&mut *conn)
        .await;
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes() {
        let mut out = Vec::new();
        copy_text(&mut out, "a\\b\tc\nd\re\0f ü");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\\\b\\tc\\nd\\re\u{FFFD}f ü"
        );
    }
}
