//! `_tenant` 2.0 jobs in `pubsub_config.tenant_job`.

use sqlx::PgPool;
use uuid::Uuid;

use crate::domain::TenantId;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub tenant_id: String,
    pub attributes: sqlx::types::Json<serde_json::Value>,
    pub complete: bool,
    pub error: Option<String>,
    pub messages: sqlx::types::Json<Vec<String>>,
}

pub async fn insert(
    pool: &PgPool,
    id: Uuid,
    tenant: &TenantId,
    attributes: &serde_json::Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO pubsub_config.tenant_job (id, tenant_id, attributes) VALUES ($1, $2, $3)",
    )
    .bind(id)
    .bind(tenant.as_str())
    .bind(sqlx::types::Json(attributes))
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether job `id` still has its row (a purge deletes its tenant's jobs).
pub async fn exists(conn: &mut sqlx::PgConnection, id: Uuid) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pubsub_config.tenant_job WHERE id = $1)")
        .bind(id)
        .fetch_one(conn)
        .await
}

pub async fn finish(
    pool: &PgPool,
    id: Uuid,
    error: Option<&str>,
    messages: &[String],
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pubsub_config.tenant_job SET complete = true, error = $2, messages = $3, updated_date = now() WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(sqlx::types::Json(messages))
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn find(pool: &PgPool, id: Uuid, tenant: &TenantId) -> sqlx::Result<Option<JobRow>> {
    sqlx::query_as(
        "SELECT id, tenant_id, attributes, complete, error, messages FROM pubsub_config.tenant_job \
         WHERE id = $1 AND tenant_id = $2",
    )
    .bind(id)
    .bind(tenant.as_str())
    .fetch_optional(pool)
    .await
}

pub async fn delete(pool: &PgPool, id: Uuid, tenant: &TenantId) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM pubsub_config.tenant_job WHERE id = $1 AND tenant_id = $2")
        .bind(id)
        .bind(tenant.as_str())
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}
