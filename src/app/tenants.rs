//! Tenants: install and upgrade jobs (the `_tenant` 2.0 interface runs them in the background
//! and Okapi polls them), and purges.

use std::time::Duration;

use uuid::Uuid;

use super::Deps;
use crate::db;
use crate::domain::TenantId;

/// Drops the tenant's schema, registrations and jobs; returns how many registrations went.
pub async fn purge(deps: &Deps<'_>, tenant: &TenantId) -> sqlx::Result<u64> {
    let registrations = db::tenants::purge(&deps.config.db, tenant).await?;
    super::registrations::registry_changed(deps, tenant).await;
    tracing::info!(%tenant, registrations, "tenant purged: schema dropped, registrations deleted");
    Ok(registrations)
}

/// Records a new install/upgrade job for `tenant`; [`run_install_job`] does its work.
pub async fn create_job(
    deps: &Deps<'_>,
    tenant: &TenantId,
    attributes: &serde_json::Value,
) -> sqlx::Result<Uuid> {
    let id = Uuid::new_v4();
    db::jobs::insert(deps.pool, id, tenant, attributes).await?;
    Ok(id)
}

/// The tenant's job `id`, once complete or after `wait`; `None` when there is no such job.
pub async fn wait_for_job(
    deps: &Deps<'_>,
    tenant: &TenantId,
    id: Uuid,
    wait: Duration,
) -> sqlx::Result<Option<db::jobs::JobRow>> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let Some(job) = db::jobs::find(deps.pool, id, tenant).await? else {
            return Ok(None);
        };
        if job.complete || tokio::time::Instant::now() >= deadline {
            return Ok(Some(job));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the `_tenant` request says Okapi is, and its token (kept only for the job).
pub struct OkapiHeaders {
    pub url: String,
    pub token: Option<String>,
}

/// The work of an install/upgrade job; its outcome is recorded in the job row.
pub async fn run_install_job(deps: &Deps<'_>, tenant: &TenantId, id: Uuid, okapi: OkapiHeaders) {
    let mut outcome = match db::tenants::migrate(&deps.config.db, tenant, Some(id)).await {
        Ok(false) => {
            tracing::info!(%tenant, job = %id, "tenant init job dropped: the tenant was purged before it started");
            return;
        }
        other => other.map(|_| ()),
    };
    if outcome.is_ok() {
        // Every instance learns that the tenant is enabled.
        outcome = db::registry::notify(deps.pool, tenant)
            .await
            .map_err(anyhow::Error::from);
        super::registrations::registry_changed(deps, tenant).await;
    }
    let (mut error, mut messages) = match outcome {
        Ok(()) => (
            None,
            vec![format!("schema {} is up to date", tenant.schema_name())],
        ),
        Err(err) => {
            tracing::error!(%tenant, job = %id, error = format!("{err:#}"), "tenant init failed");
            (
                Some(format!(
                    "Failed to migrate schema {}: {err:#}",
                    tenant.schema_name()
                )),
                vec![],
            )
        }
    };
    if error.is_none() && deps.config.system_user.create {
        let call = crate::system_user::OkapiCall {
            okapi: crate::client::Okapi::new(deps.okapi_http.clone(), &okapi.url),
            tenant,
            token: okapi.token.as_deref(),
        };
        match crate::system_user::provision(&call, &deps.config.system_user).await {
            Ok(()) => messages.push(format!(
                "system user {} is ready",
                deps.config.system_user.name
            )),
            Err(e) => {
                tracing::error!(%tenant, job = %id, error = %e, "system user provisioning failed");
                error = Some(e.to_string());
            }
        }
    }
    finish_job(deps, tenant, id, error, messages).await;
}

/// Completes the job row: it must be completed or Okapi polls forever, so this retries while
/// the database is away.
async fn finish_job(
    deps: &Deps<'_>,
    tenant: &TenantId,
    id: Uuid,
    error: Option<String>,
    messages: Vec<String>,
) {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=20 {
        match db::jobs::finish(deps.pool, id, error.as_deref(), &messages).await {
            Ok(()) => {
                tracing::info!(%tenant, job = %id, failed = error.is_some(), "tenant init job complete");
                return;
            }
            Err(err) => {
                tracing::warn!(%tenant, job = %id, attempt, error = %err, "could not record tenant job outcome, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(%tenant, job = %id, "gave up recording the tenant job outcome");
}
