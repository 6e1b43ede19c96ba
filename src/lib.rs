//! mod-pubsub: FOLIO's publish/subscribe broker.
//!
//! [`run`] starts the whole service on a listener the caller binds, so tests start the real
//! server on port 0.

pub mod config;
pub mod db;
pub mod domain;
pub mod error;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// How long start-up waits for the database before giving up.
pub const DB_STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How long graceful shutdown waits for background work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Migrates the module schema, then serves HTTP on `listener` until `shutdown` is cancelled,
/// then waits for in-flight requests and background jobs.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    db::migrate_module(&config.db, DB_STARTUP_PATIENCE).await?;
    let state = http::AppState {
        pool: db::pool(&config.db),
        config: Arc::new(config),
        tasks: TaskTracker::new(),
    };
    let tasks = state.tasks.clone();
    let pool = state.pool.clone();
    tracing::info!(addr = %listener.local_addr()?, "mod-pubsub listening");
    axum::serve(listener, http::app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not finish within the shutdown grace period");
    }
    pool.close().await;
    tracing::info!("mod-pubsub stopped");
    Ok(())
}
