//! Tenant schemas `<tenant>_mod_pubsub`.

use sqlx::{Connection, PgPool};
use uuid::Uuid;

use crate::config::DbConfig;
use crate::domain::TenantId;

/// Creates or upgrades the tenant's schema, for install job `job` if given. Returns false, and
/// does nothing, when that job's row is gone: a purge came after the job was started and before
/// it got the schema's lock, and a purge has the last word.
pub async fn migrate(cfg: &DbConfig, tenant: &TenantId, job: Option<Uuid>) -> anyhow::Result<bool> {
    let schema = tenant.schema_name();
    let mut conn = super::locked_schema_connection(cfg, &schema).await?;
    if let Some(job) = job {
        if !super::jobs::exists(&mut conn, job).await? {
            conn.close().await?;
            return Ok(false);
        }
    }
    super::migrate_locked(&mut conn, &schema, &super::TENANT_MIGRATIONS).await?;
    conn.close().await?;
    Ok(true)
}

pub async fn schema_exists(pool: &PgPool, tenant: &TenantId) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(tenant.schema_name())
        .fetch_one(pool)
        .await
}

/// Drops the tenant's schema and its registrations, in one transaction, holding the schema's
/// lock. The lock is taken before the transaction begins: PostgreSQL reads the catalog changes of
/// others (an install's CREATE SCHEMA committed while we waited) when a transaction starts, not
/// when an advisory lock is granted, so `DROP SCHEMA IF EXISTS` in a transaction begun before the
/// wait can miss a schema created during it and skip.
pub async fn purge(cfg: &DbConfig, tenant: &TenantId) -> sqlx::Result<u64> {
    let mut conn = super::locked_schema_connection(cfg, &tenant.schema_name()).await?;
    let mut tx = conn.begin().await?;
    sqlx::query(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        tenant.schema_ident()
    ))
    .execute(&mut *tx)
    .await?;
    let registrations = super::registry::delete_tenant_registrations(&mut *tx, tenant).await?;
    sqlx::query("DELETE FROM pubsub_config.tenant_job WHERE tenant_id = $1")
        .bind(tenant.as_str())
        .execute(&mut *tx)
        .await?;
    super::registry::notify(&mut *tx, tenant).await?;
    tx.commit().await?;
    conn.close().await?;
    Ok(registrations)
}

/// Tenant schemas that have not applied all `count` migrations (or none: schemas the Java
/// module created), in one query: `query_to_xml` reads each schema's `_sqlx_migrations` without a
/// round trip per schema.
pub async fn schemas_behind(pool: &PgPool, count: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace
         WHERE nspname LIKE '%\\_mod\\_pubsub'
           AND CASE WHEN to_regclass(format('%I._sqlx_migrations', nspname)) IS NULL THEN true
               ELSE (xpath('/row/v/text()', query_to_xml(
                       format('SELECT count(*) AS v FROM %I._sqlx_migrations WHERE success', nspname),
                       false, true, '')))[1]::text::bigint IS DISTINCT FROM $1
               END
         ORDER BY 1",
    )
    .bind(count)
    .fetch_all(pool)
    .await
}

/// Tenant schemas without the role of their name, which RMB logs in as (the migration could not
/// create it: no CREATEROLE).
pub async fn schemas_without_role(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace n
         WHERE nspname LIKE '%\\_mod\\_pubsub'
           AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = n.nspname)
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
}

/// The names of every tenant schema (`*_mod_pubsub`).
pub async fn tenant_schemas(pool: &PgPool) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE '%\\_mod\\_pubsub'",
    )
    .fetch_all(pool)
    .await
}
