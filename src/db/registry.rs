//! `pubsub_config.event_descriptor` and `pubsub_config.messaging_module`.

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{ModuleId, ModuleRole, TenantId};

/// An event descriptor as stored in `descriptor` jsonb. Reading is lenient (the Java module's
/// rows may carry other fields); the HTTP layer validates what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredDescriptor {
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(rename = "eventTTL")]
    pub event_ttl: i64,
    #[serde(default)]
    pub signed: bool,
    #[serde(default)]
    pub tmp: bool,
}

pub async fn all_descriptors(pool: &PgPool) -> sqlx::Result<Vec<StoredDescriptor>> {
    let rows: Vec<(sqlx::types::Json<StoredDescriptor>,)> =
        sqlx::query_as("SELECT descriptor FROM pubsub_config.event_descriptor ORDER BY id")
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(d,)| d.0).collect())
}

pub async fn find_descriptor<'e, E>(
    exec: E,
    event_type: &str,
) -> sqlx::Result<Option<StoredDescriptor>>
where
    E: sqlx::PgExecutor<'e>,
{
    let row: Option<(sqlx::types::Json<StoredDescriptor>,)> =
        sqlx::query_as("SELECT descriptor FROM pubsub_config.event_descriptor WHERE id = $1")
            .bind(event_type)
            .fetch_optional(exec)
            .await?;
    Ok(row.map(|(d,)| d.0))
}

/// Descriptors for the given event types, in one query.
pub async fn find_descriptors(
    pool: &PgPool,
    event_types: &[&str],
) -> sqlx::Result<Vec<StoredDescriptor>> {
    let rows: Vec<(sqlx::types::Json<StoredDescriptor>,)> =
        sqlx::query_as("SELECT descriptor FROM pubsub_config.event_descriptor WHERE id = ANY($1)")
            .bind(event_types)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(d,)| d.0).collect())
}

pub async fn insert_descriptor<'e, E>(exec: E, d: &StoredDescriptor) -> sqlx::Result<()>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query("INSERT INTO pubsub_config.event_descriptor (id, descriptor) VALUES ($1, $2)")
        .bind(&d.event_type)
        .bind(sqlx::types::Json(d))
        .execute(exec)
        .await?;
    Ok(())
}

/// Inserts a descriptor unless one exists; returns whether it inserted.
pub async fn insert_descriptor_if_absent<'e, E>(exec: E, d: &StoredDescriptor) -> sqlx::Result<bool>
where
    E: sqlx::PgExecutor<'e>,
{
    let done = sqlx::query(
        "INSERT INTO pubsub_config.event_descriptor (id, descriptor) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&d.event_type)
    .bind(sqlx::types::Json(d))
    .execute(exec)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Replaces a descriptor; returns whether a row was updated.
pub async fn update_descriptor<'e, E>(exec: E, d: &StoredDescriptor) -> sqlx::Result<bool>
where
    E: sqlx::PgExecutor<'e>,
{
    let done =
        sqlx::query("UPDATE pubsub_config.event_descriptor SET descriptor = $2 WHERE id = $1")
            .bind(&d.event_type)
            .bind(sqlx::types::Json(d))
            .execute(exec)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub async fn delete_descriptor(
    tx: &mut Transaction<'_, Postgres>,
    event_type: &str,
) -> sqlx::Result<u64> {
    let done = sqlx::query("DELETE FROM pubsub_config.event_descriptor WHERE id = $1")
        .bind(event_type)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}

/// Module ids registered (in any tenant, any role) for an event type.
pub async fn modules_using_event_type(
    tx: &mut Transaction<'_, Postgres>,
    event_type: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT module_id FROM pubsub_config.messaging_module WHERE event_type_id = $1 ORDER BY module_id",
    )
    .bind(event_type)
    .fetch_all(&mut **tx)
    .await
}

/// A row of `messaging_module`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Registration {
    pub id: Uuid,
    pub event_type_id: String,
    pub tenant_id: String,
    pub role: ModuleRole,
    pub subscriber_callback: Option<String>,
    pub module_id: String,
    pub activated: bool,
    /// When the module first registered for this event type (kept across re-declarations);
    /// `None` on insert means now. Delivery starts with events published from then on.
    pub created_date: Option<chrono::DateTime<chrono::Utc>>,
}

const REGISTRATION_COLUMNS: &str =
    "id, event_type_id, tenant_id, role, subscriber_callback, module_id, activated, created_date";

pub async fn registrations_for(
    pool: &PgPool,
    tenant: &TenantId,
    event_type: &str,
    role: ModuleRole,
) -> sqlx::Result<Vec<Registration>> {
    sqlx::query_as(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM pubsub_config.messaging_module \
         WHERE tenant_id = $1 AND event_type_id = $2 AND role = $3 ORDER BY module_id, id"
    ))
    .bind(tenant.as_str())
    .bind(event_type)
    .bind(role)
    .fetch_all(pool)
    .await
}

/// Takes a transaction-scoped lock on one (tenant, role, module name), so that concurrent
/// declarations of the same module serialise instead of failing on the unique key.
pub async fn lock_module(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    role: ModuleRole,
    module: &ModuleId,
) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!(
            "pubsub:{}:{}:{}",
            tenant,
            role.as_str(),
            module.name()
        ))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Deletes the rows of `module` (any version, compared by module name) for one tenant and role,
/// optionally only for one event type. Returns the deleted rows. Call it after [`lock_module`].
pub async fn delete_module_rows(
    tx: &mut Transaction<'_, Postgres>,
    tenant: &TenantId,
    role: ModuleRole,
    module: &ModuleId,
    event_type: Option<&str>,
) -> sqlx::Result<Vec<Registration>> {
    // SQL narrows the candidates by the literal name prefix (LIKE-escaped); the exact name
    // comparison of `ModuleId::same_module` decides, so no pattern is ever built from input.
    let candidates: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, module_id FROM pubsub_config.messaging_module \
         WHERE tenant_id = $1 AND role = $2 AND module_id LIKE $3 || '%' ESCAPE '\\' \
           AND ($4::text IS NULL OR event_type_id = $4)",
    )
    .bind(tenant.as_str())
    .bind(role)
    .bind(like_escape(module.name()))
    .bind(event_type)
    .fetch_all(&mut **tx)
    .await?;
    let ids: Vec<Uuid> = candidates
        .into_iter()
        .filter(|(_, id)| module.same_module(id))
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(&format!(
        "DELETE FROM pubsub_config.messaging_module WHERE id = ANY($1) RETURNING {REGISTRATION_COLUMNS}"
    ))
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
}

fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub async fn insert_registration(
    tx: &mut Transaction<'_, Postgres>,
    r: &Registration,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO pubsub_config.messaging_module \
         (id, event_type_id, tenant_id, role, subscriber_callback, module_id, activated, created_date) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now()))",
    )
    .bind(r.id)
    .bind(&r.event_type_id)
    .bind(&r.tenant_id)
    .bind(r.role)
    .bind(&r.subscriber_callback)
    .bind(&r.module_id)
    .bind(r.activated)
    .bind(r.created_date)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn delete_tenant_registrations<'e, E>(exec: E, tenant: &TenantId) -> sqlx::Result<u64>
where
    E: sqlx::PgExecutor<'e>,
{
    let done = sqlx::query("DELETE FROM pubsub_config.messaging_module WHERE tenant_id = $1")
        .bind(tenant.as_str())
        .execute(exec)
        .await?;
    Ok(done.rows_affected())
}

/// Deletes the registrations of direct consumers (subscribers without a callback) in every
/// tenant; returns them as (tenant, module, event type).
pub async fn delete_direct_consumers(pool: &PgPool) -> sqlx::Result<Vec<(String, String, String)>> {
    sqlx::query_as(
        "DELETE FROM pubsub_config.messaging_module
         WHERE role = 'SUBSCRIBER' AND subscriber_callback IS NULL
         RETURNING tenant_id, module_id, event_type_id",
    )
    .fetch_all(pool)
    .await
}

/// The channel registrations and enablements are announced on (LISTEN/NOTIFY).
pub const CHANNEL: &str = "pubsub_registry";

/// Announces a change of `tenant`'s registrations or enablement (call inside the transaction).
pub async fn notify<'e, E: sqlx::PgExecutor<'e>>(exec: E, tenant: &TenantId) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(tenant.as_str())
        .execute(exec)
        .await?;
    Ok(())
}

/// Every registration of `tenant` (a name from a notification: not necessarily a tenant id).
pub async fn tenant_registrations(pool: &PgPool, tenant: &str) -> sqlx::Result<Vec<Registration>> {
    sqlx::query_as(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM pubsub_config.messaging_module WHERE tenant_id = $1"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await
}

/// Every registration.
pub async fn all_registrations(pool: &PgPool) -> sqlx::Result<Vec<Registration>> {
    sqlx::query_as(&format!(
        "SELECT {REGISTRATION_COLUMNS} FROM pubsub_config.messaging_module"
    ))
    .fetch_all(pool)
    .await
}

/// A (tenant, event type) that has a registration, so a topic.
#[derive(Debug, sqlx::FromRow)]
pub struct RegisteredEventType {
    pub tenant_id: String,
    pub event_type_id: String,
}

/// Every (tenant, event type) with a registration.
pub async fn registered_event_types(pool: &PgPool) -> sqlx::Result<Vec<RegisteredEventType>> {
    sqlx::query_as("SELECT DISTINCT tenant_id, event_type_id FROM pubsub_config.messaging_module")
        .fetch_all(pool)
        .await
}

/// The stored descriptor of `event_type`, locked for the rest of the transaction.
pub async fn find_descriptor_for_update(
    tx: &mut Transaction<'_, Postgres>,
    event_type: &str,
) -> sqlx::Result<Option<StoredDescriptor>> {
    let row: Option<(sqlx::types::Json<StoredDescriptor>,)> = sqlx::query_as(
        "SELECT descriptor FROM pubsub_config.event_descriptor WHERE id = $1 FOR UPDATE",
    )
    .bind(event_type)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(|(d,)| d.0))
}
