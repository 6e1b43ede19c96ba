//! PostgreSQL: the pool, the two migration sets and the queries, one module per table group.
//!
//! All SQL binds its values; the only identifiers built at run time are tenant schema names,
//! which come from a validated [`TenantId`](crate::domain::TenantId).

pub mod jobs;
pub mod registry;
pub mod tenants;

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};

use crate::config::DbConfig;

/// Migrations of the module schema `pubsub_config`.
pub static MODULE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/module");
/// Migrations of every tenant schema `<tenant>_mod_pubsub`.
pub static TENANT_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/tenant");

pub const MODULE_SCHEMA: &str = "pubsub_config";

/// Serialises the work that creates, migrates or drops one schema (concurrent `_tenant` calls
/// for one tenant: an install racing a purge fails half-way, two `CREATE SCHEMA`s collide). The
/// two-key form keeps these locks apart from sqlx's own single-key migration lock.
const SCHEMA_LOCK: &str = "SELECT pg_advisory_lock(1836016482, hashtext($1))";

/// A pool that connects lazily: requests made while the database is down get 503 after
/// `connect_timeout` instead of hanging.
pub fn pool(cfg: &DbConfig) -> PgPool {
    PgPoolOptions::new()
        .max_connections(cfg.max_pool_size)
        .acquire_timeout(cfg.connect_timeout)
        .connect_lazy_with(cfg.connect_options())
}

/// Runs `migrations` inside `schema` on a dedicated connection (creating the schema first), so
/// the sqlx bookkeeping table lives in that schema and pooled connections keep their default
/// search path. `schema` must already be a safe identifier.
pub async fn migrate_schema(
    cfg: &DbConfig,
    schema: &str,
    migrations: &Migrator,
) -> anyhow::Result<()> {
    let mut conn = locked_schema_connection(cfg, schema).await?;
    migrate_locked(&mut conn, schema, migrations).await?;
    conn.close().await?;
    Ok(())
}

/// A dedicated connection holding `schema`'s lock until it closes: a purge or another install
/// of the same schema waits for it.
async fn locked_schema_connection(cfg: &DbConfig, schema: &str) -> sqlx::Result<PgConnection> {
    let mut conn = PgConnection::connect_with(&cfg.connect_options()).await?;
    sqlx::query(SCHEMA_LOCK)
        .bind(schema)
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// The work of [`migrate_schema`] on a connection that holds the schema's lock.
async fn migrate_locked(
    conn: &mut PgConnection,
    schema: &str,
    migrations: &Migrator,
) -> anyhow::Result<()> {
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("SET search_path TO \"{schema}\""))
        .execute(&mut *conn)
        .await?;
    migrations.run_direct(&mut *conn).await?;
    Ok(())
}

/// Migrates the module schema, retrying while the database is not reachable yet (a container
/// may start before its database), for at most `patience`.
pub async fn migrate_module(cfg: &DbConfig, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        match migrate_schema(cfg, MODULE_SCHEMA, &MODULE_MIGRATIONS).await {
            Ok(()) => return Ok(()),
            Err(err)
                if tokio::time::Instant::now() + delay < deadline && is_connect_error(&err) =>
            {
                tracing::warn!(error = %err, host = %cfg.host, port = cfg.port, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(err) => {
                return Err(err.context(format!(
                    "migrating schema {MODULE_SCHEMA} in database {} at {}:{}",
                    cfg.database, cfg.host, cfg.port
                )))
            }
        }
    }
}

fn is_connect_error(err: &anyhow::Error) -> bool {
    err.downcast_ref::<sqlx::Error>()
        .is_some_and(crate::error::is_unavailable)
}
