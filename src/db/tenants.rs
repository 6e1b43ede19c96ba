//! Tenant schemas `<tenant>_mod_pubsub`.

use sqlx::PgPool;

use crate::config::DbConfig;
use crate::domain::TenantId;

/// Creates or upgrades the tenant's schema.
pub async fn migrate(cfg: &DbConfig, tenant: &TenantId) -> anyhow::Result<()> {
    super::migrate_schema(cfg, &tenant.schema_name(), &super::TENANT_MIGRATIONS).await
}

pub async fn schema_exists(pool: &PgPool, tenant: &TenantId) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(tenant.schema_name())
        .fetch_one(pool)
        .await
}

/// Drops the tenant's schema and its registrations, in one transaction.
pub async fn purge(pool: &PgPool, tenant: &TenantId) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
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
    crate::registry::notify(&mut *tx, tenant).await?;
    tx.commit().await?;
    Ok(registrations)
}
