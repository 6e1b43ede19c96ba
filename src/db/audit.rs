//! The audit trail: `<tenant>_mod_pubsub.audit_message` and `audit_message_payload` (the Java
//! module's tables, with the columns `subscriber` and `attempt` added).

use chrono::{DateTime, NaiveDateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::TenantId;

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
    pub fn tenant(&self) -> &TenantId {
        match self {
            AuditItem::Message(r) => &r.tenant,
            AuditItem::Payload { tenant, .. } => tenant,
        }
    }
}

/// A state this service does not know, read from the database.
#[derive(Debug, thiserror::Error)]
#[error("unknown audit message state {0:?}")]
pub struct UnknownState(String);

impl TryFrom<String> for AuditState {
    type Error = UnknownState;

    fn try_from(s: String) -> Result<Self, UnknownState> {
        Ok(match s.as_str() {
            "CREATED" => AuditState::Created,
            "PUBLISHED" => AuditState::Published,
            "RECEIVED" => AuditState::Received,
            "DELIVERED" => AuditState::Delivered,
            "REJECTED" => AuditState::Rejected,
            _ => return Err(UnknownState(s)),
        })
    }
}

/// Whether the error says the tenant's schema (or its tables) does not exist.
pub fn is_missing_schema(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("3F000" | "42P01" | "42704")))
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
pub async fn insert(pool: &PgPool, tenant: &TenantId, items: &[&AuditItem]) -> sqlx::Result<()> {
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

/// A row of `audit_message`.
#[derive(Debug, sqlx::FromRow)]
pub struct AuditRow {
    pub id: Uuid,
    pub event_id: Uuid,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    pub tenant_id: String,
    pub created_by: Option<String>,
    pub published_by: Option<String>,
    /// `timestamp without time zone` (the Java module's type), holding UTC.
    pub audit_date: NaiveDateTime,
    #[sqlx(try_from = "String")]
    pub state: AuditState,
    pub error_message: Option<String>,
    pub subscriber: Option<String>,
    pub attempt: Option<i32>,
}

/// What `/pubsub/history` asks for: a date range (inclusive, UTC), optional filters, a page.
pub struct HistoryFilter<'a> {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub event_id: Option<Uuid>,
    pub event_type: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub offset: i64,
    pub limit: i64,
}

/// The tenant's audit rows that match `f`, oldest first, and how many match in all.
pub async fn history(
    pool: &PgPool,
    tenant: &TenantId,
    f: &HistoryFilter<'_>,
) -> sqlx::Result<(i64, Vec<AuditRow>)> {
    let schema = tenant.schema_ident();
    let filter = "audit_date >= $1 AND audit_date <= $2 AND ($3::uuid IS NULL OR event_id = $3) \
                  AND ($4::text IS NULL OR event_type = $4) AND ($5::text IS NULL OR correlation_id = $5)";
    let total: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {schema}.audit_message WHERE {filter}"
    ))
    .bind(f.start.naive_utc())
    .bind(f.end.naive_utc())
    .bind(f.event_id)
    .bind(f.event_type)
    .bind(f.correlation_id)
    .fetch_one(pool)
    .await?;
    let rows = sqlx::query_as(&format!(
        "SELECT id, event_id, event_type, correlation_id, tenant_id, created_by, published_by, audit_date, \
                state::text AS state, error_message, subscriber, attempt \
         FROM {schema}.audit_message WHERE {filter} ORDER BY audit_date, id OFFSET $6 LIMIT $7"
    ))
    .bind(f.start.naive_utc())
    .bind(f.end.naive_utc())
    .bind(f.event_id)
    .bind(f.event_type)
    .bind(f.correlation_id)
    .bind(f.offset)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    Ok((total, rows))
}

/// The stored payload row of an event: the Java module's wrapper `{"eventId", "content"}`.
pub async fn payload(
    pool: &PgPool,
    tenant: &TenantId,
    event_id: Uuid,
) -> sqlx::Result<Option<serde_json::Value>> {
    sqlx::query_scalar(&format!(
        "SELECT content FROM {}.audit_message_payload WHERE event_id = $1",
        tenant.schema_ident()
    ))
    .bind(event_id)
    .fetch_optional(pool)
    .await
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
