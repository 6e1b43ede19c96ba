//! PostgreSQL: the pool, the two migration sets and the queries, one module per table group.
//!
//! All SQL binds its values; the only identifiers built at run time are tenant schema names,
//! which come from a validated [`TenantId`](crate::domain::TenantId).

pub mod audit;
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

/// A pool of one connection for the registry's LISTEN, which holds its connection for good:
/// taken from [`pool`], it would leave `DB_MAXPOOLSIZE - 1` for requests (none with 1).
pub fn listener_pool(cfg: &DbConfig) -> PgPool {
    PgPoolOptions::new()
        .max_connections(1)
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
    adopt_rewritten_migrations(conn, migrations).await?;
    migrations.run_direct(&mut *conn).await?;
    Ok(())
}

/// Migrations edited after a release, by version and the sha384 checksum that release recorded.
/// sqlx refuses to run when a recorded checksum differs from the file's, so schemas migrated by
/// that release get the new checksum first. Only the listed old checksum is replaced.
const REWRITTEN_MIGRATIONS: &[(i64, &str)] = &[
    // Tenant 20261126000001 created `audit_date` as `timestamptz` (converting the Java module's
    // column); it now keeps `timestamp`, and 20261202000001 converts such schemas back.
    (
        20261126000001,
        "3c1245ea03108121f825713a73d4238792abbb9e80cca96f31e8aa1b98a47f9111a9e9135b6ea9b72a404330fd536a82",
    ),
];

async fn adopt_rewritten_migrations(
    conn: &mut PgConnection,
    migrations: &Migrator,
) -> sqlx::Result<()> {
    let recorded: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&mut *conn)
            .await?;
    if recorded.is_none() {
        return Ok(());
    }
    for (version, old) in REWRITTEN_MIGRATIONS {
        let Some(current) = migrations.iter().find(|m| m.version == *version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 WHERE version = $2 AND encode(checksum, 'hex') = $3",
        )
            .bind(current.checksum.as_ref())
            .bind(version)
            .bind(*old)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Migrates the module schema, retrying while the database is not reachable yet (a container
/// may start before its database), for at most `patience`.
pub async fn migrate_module(cfg: &DbConfig, patience: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    // Hand-written backoff (here, in the tenant job and in the audit writer): two lines each, and
    // each bounds its retries its own way (a deadline, a count, a count after the stop began).
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
        .is_some_and(is_unavailable)
}

/// Whether a database error means "the database is not reachable" (503) rather than a bug (500).
pub fn is_unavailable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 08 connection exceptions, 28 authorization (wrong credentials), 53 insufficient
            // resources (too many connections), 57P shutdown / cannot connect now, 3D000 no
            // such database, 55000 "database is not currently accepting connections".
            ["08", "28", "53", "57P"].iter().any(|p| c.starts_with(p))
                || c == "3D000"
                || c == "55000"
        }),
        _ => false,
    }
}

/// Whether the database answers.
pub async fn ping(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await
        .map(|_| ())
}
