//! Starting and stopping the whole service.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::config::Config;
use crate::{audit, db, delivery, http, kafka, metrics, registry_cache, system_user};

/// How long start-up waits for the database before giving up.
pub const DB_STARTUP_PATIENCE: Duration = Duration::from_secs(30);

/// How many tenant schemas start-up migrates at once.
const UPGRADE_CONCURRENCY: usize = 4;

/// Brings every tenant schema up to this version's migrations: schemas the Java module created
/// (audit writes and history need the new columns) and schemas of an earlier version, without
/// waiting for Okapi to call `_tenant` again. A schema that fails is logged and left for its next
/// `_tenant` call; the others and start-up go on.
pub async fn upgrade_tenant_schemas(cfg: &crate::config::DbConfig, pool: &sqlx::PgPool) {
    use futures_util::StreamExt;
    let count = db::TENANT_MIGRATIONS.migrations.len() as i64;
    let schemas = match db::tenants::schemas_behind(pool, count).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "could not list the tenant schemas to upgrade");
            return;
        }
    };
    if schemas.is_empty() {
        return;
    }
    tracing::info!(count = schemas.len(), "upgrading tenant schemas");
    let tenants = schemas.iter().filter_map(|schema| {
        let tenant = schema
            .strip_suffix("_mod_pubsub")
            .and_then(|t| crate::domain::TenantId::parse(t).ok());
        if tenant.is_none() {
            tracing::warn!(schema, "not a tenant schema name; left alone");
        }
        tenant
    });
    futures_util::stream::iter(tenants)
        .for_each_concurrent(UPGRADE_CONCURRENCY, |tenant| async move {
            match db::tenants::migrate(cfg, &tenant, None).await {
                Ok(_) => tracing::info!(%tenant, "tenant schema upgraded"),
                Err(e) => {
                    tracing::error!(%tenant, error = format!("{e:#}"), "tenant schema upgrade failed")
                }
            }
        })
        .await;
}

/// What `mod-pubsub prepare-rollback` did and what it leaves to the operator.
#[derive(Debug)]
pub struct RollbackReport {
    /// Direct-consumer registrations deleted: (tenant, module, event type).
    pub direct_consumers: Vec<(String, String, String)>,
    /// Tenant schemas still without the role RMB logs in as.
    pub schemas_without_role: Vec<String>,
}

/// Makes the database ready for the Java module (run with every instance of this service
/// stopped): every schema migrated, so each has the Liquibase and RMB bookkeeping the Java module
/// needs; direct-consumer registrations deleted, because the Java module would POST their events
/// to `<okapi>null`; tenants whose RMB role is missing listed.
pub async fn prepare_rollback(cfg: &crate::config::DbConfig) -> anyhow::Result<RollbackReport> {
    db::migrate_module(cfg, DB_STARTUP_PATIENCE).await?;
    let pool = db::pool(cfg);
    upgrade_tenant_schemas(cfg, &pool).await;
    let direct_consumers = db::registry::delete_direct_consumers(&pool).await?;
    let schemas_without_role = db::tenants::schemas_without_role(&pool).await?;
    pool.close().await;
    Ok(RollbackReport {
        direct_consumers,
        schemas_without_role,
    })
}

/// Migrates the module schema, then serves HTTP on `listener` until `shutdown` is cancelled,
/// then waits for in-flight requests and background jobs.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (state, running) = start(config).await?;
    tracing::info!(addr = %listener.local_addr()?, "mod-pubsub listening");
    // Small responses (204) go out at once instead of waiting for Nagle's algorithm.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let serve = axum::serve(listener, http::app(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    tokio::pin!(serve);
    // The server ends on its own only after the shutdown signal (all connections closed) or on
    // an error; otherwise `stop` waits for its requests. A finished future is not polled again.
    let still_serving = tokio::select! {
        served = &mut serve => {
            served?;
            None
        }
        _ = shutdown.cancelled() => Some(serve),
    };
    running.stop(still_serving).await;
    tracing::info!("mod-pubsub stopped");
    Ok(())
}

/// What a running service must stop, in order, when it is asked to.
struct Running {
    shutdown_timeout: Duration,
    pool: sqlx::PgPool,
    kafka: Arc<kafka::Kafka>,
    /// Tenant jobs and replays.
    tasks: TaskTracker,
    /// Delivery, the registry listener, the reconciler, trimming and purging.
    workers: TaskTracker,
    background: CancellationToken,
    audit_stop: CancellationToken,
    audit_writer: tokio::task::JoinHandle<()>,
}

/// Migrates, connects, and starts the background work; returns what the HTTP layer serves.
/// The database (module schema migrated, tenant schemas upgraded), the Kafka clients and the
/// registry cache.
async fn open_stores(
    config: &Config,
) -> anyhow::Result<(
    sqlx::PgPool,
    Arc<kafka::Kafka>,
    registry_cache::RegistryCache,
)> {
    db::migrate_module(&config.db, DB_STARTUP_PATIENCE).await?;
    let pool = db::pool(&config.db);
    upgrade_tenant_schemas(&config.db, &pool).await;
    let kafka = Arc::new(
        kafka::Kafka::new(config)
            .map_err(|e| anyhow::anyhow!("Kafka client configuration: {e}"))?,
    );
    let registry = registry_cache::RegistryCache::default();
    if let Err(e) = registry.reload_all(&pool).await {
        tracing::warn!(error = %e, "could not load the registry yet; it follows the database");
    }
    Ok((pool, kafka, registry))
}

async fn start(config: Config) -> anyhow::Result<(http::AppState, Running)> {
    let (pool, kafka, registry) = open_stores(&config).await?;

    // Background work stops with `background`; the audit writer stops last, after HTTP.
    let background = CancellationToken::new();
    let audit_stop = CancellationToken::new();
    let (audit, audit_writer) = audit::AuditWriter::start(pool.clone(), audit_stop.clone());
    let shutdown_timeout = config.shutdown_timeout;
    let config = Arc::new(config);
    // Calls to Okapi (system user, logins) are bounded like deliveries.
    let okapi_http = reqwest::Client::builder()
        .connect_timeout(config.delivery.connect_timeout)
        .timeout(config.delivery.timeout)
        .build()?;
    let tokens = Arc::new(system_user::Tokens::new(
        config.system_user.clone(),
        config.okapi_url.as_str(),
        okapi_http.clone(),
    ));
    let metrics = Arc::new(metrics::Metrics::default());
    // The engine serves the admin endpoints (dead letters, replay) on every instance; it
    // consumes only where delivery is enabled.
    let engine = Arc::new(delivery::Engine::new(
        Arc::clone(&config),
        Arc::clone(&kafka),
        registry.clone(),
        audit.clone(),
        Arc::clone(&tokens),
        Arc::clone(&metrics),
    )?);
    let workers = spawn_background(&config, &pool, &kafka, &registry, &engine, &background);

    let state = http::AppState::new(http::Services {
        pool: pool.clone(),
        config,
        tasks: TaskTracker::new(),
        kafka: Arc::clone(&kafka),
        registry,
        audit,
        okapi_http,
        tokens,
        metrics,
        engine,
        shutdown: background.clone(),
    });
    let tasks = state.tasks.clone();
    let running = Running {
        shutdown_timeout,
        pool,
        kafka,
        tasks,
        workers,
        background,
        audit_stop,
        audit_writer,
    };
    Ok((state, running))
}

/// The background work, stopped by `stop`: the registry's listener, the topic reconciler,
/// memory trimming, the audit retention and (where delivery is on) the delivery engine.
fn spawn_background(
    config: &Config,
    pool: &sqlx::PgPool,
    kafka: &Arc<kafka::Kafka>,
    registry: &registry_cache::RegistryCache,
    engine: &Arc<delivery::Engine>,
    stop: &CancellationToken,
) -> TaskTracker {
    let workers = TaskTracker::new();
    workers.spawn(registry.clone().follow(
        pool.clone(),
        db::listener_pool(&config.db),
        stop.clone(),
    ));
    workers.spawn(kafka::reconciler::reconcile_loop(
        Arc::clone(kafka),
        pool.clone(),
        stop.clone(),
    ));
    workers.spawn(crate::memory::trim_loop(stop.clone()));
    workers.spawn(audit::purge_loop(
        pool.clone(),
        config.audit.clone(),
        stop.clone(),
    ));
    if config.delivery.enabled {
        workers.spawn(Arc::clone(engine).run(stop.clone()));
    }
    workers.close();
    workers
}

impl Running {
    /// Stops everything under one deadline (`SHUTDOWN_TIMEOUT_MS`) once HTTP stopped accepting
    /// requests: requests in flight, tenant jobs, replays and background work get it all but a
    /// reserve; the audit queue and the producer's flush share the reserve (their rows and
    /// records come from the work before them).
    async fn stop(self, serving: Option<std::pin::Pin<&mut impl std::future::Future>>) {
        let timeout = self.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let reserve = (timeout / 4).min(Duration::from_secs(5));
        let work_deadline = deadline - reserve;
        if let Some(serve) = serving {
            if tokio::time::timeout_at(work_deadline, serve).await.is_err() {
                tracing::warn!("requests still running at the shutdown deadline are abandoned");
            }
        }
        // Delivery, the reconciler and replays stop now; tenant jobs finish their migration.
        self.background.cancel();
        self.tasks.close();
        if tokio::time::timeout_at(work_deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("tenant jobs or replays did not finish by the shutdown deadline");
        }
        if tokio::time::timeout_at(work_deadline, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("background work did not finish by the shutdown deadline");
        }
        self.audit_stop.cancel();
        if tokio::time::timeout_at(deadline, self.audit_writer)
            .await
            .is_err()
        {
            tracing::error!("audit writer did not finish by the shutdown deadline");
        }
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(100));
        let kafka = self.kafka;
        let _ = tokio::task::spawn_blocking(move || kafka.producer.flush(left)).await;
        self.pool.close().await;
    }
}
