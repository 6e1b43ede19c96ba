//! The `_tenant` 2.0 interface: install and upgrade run as asynchronous jobs that Okapi polls;
//! disable and purge answer 204 synchronously.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::{FolioJson, Tenant};
use super::AppState;
use crate::app::tenants::{self, OkapiHeaders};
use crate::db;
use crate::error::{codes, AppError, AppResult, ErrorItem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(post_tenant))
        .routes(routes!(get_job, delete_job))
}

/// Okapi's tenantAttributes. Unknown fields are ignored: this is a system interface and Okapi
/// may add fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct TenantAttributes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[^\\x00]*$")]
    pub module_from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[^\\x00]*$")]
    pub module_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Vec<TenantParameter>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TenantParameter {
    #[schema(pattern = "^[^\\x00]*$")]
    pub key: String,
    #[serde(default)]
    #[schema(pattern = "^[^\\x00]*$")]
    pub value: Option<String>,
}

impl TenantAttributes {
    /// The first text PostgreSQL's `jsonb` cannot store (a NUL character), as a FOLIO error
    /// naming the field: the job row keeps the attributes.
    fn check_storable(&self) -> Result<(), AppError> {
        let mut fields: Vec<(String, &str)> = [
            ("module_from", &self.module_from),
            ("module_to", &self.module_to),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_owned(), v.as_deref()?)))
        .collect();
        for (i, p) in self.parameters.iter().flatten().enumerate() {
            fields.push((format!("parameters[{i}].key"), &p.key));
            if let Some(v) = &p.value {
                fields.push((format!("parameters[{i}].value"), v));
            }
        }
        match fields.into_iter().find(|(_, v)| v.contains('\0')) {
            Some((key, value)) => Err(AppError::unprocessable(vec![ErrorItem::field(
                key,
                value.replace('\0', "\\u0000"),
                "must not contain the NUL character",
                codes::PATTERN,
            )])),
            None => Ok(()),
        }
    }
}

/// Okapi's tenantJob.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantJob {
    pub id: Uuid,
    pub tenant: String,
    pub tenant_attributes: serde_json::Value,
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub messages: Vec<String>,
}

impl From<db::jobs::JobRow> for TenantJob {
    fn from(r: db::jobs::JobRow) -> Self {
        TenantJob {
            id: r.id,
            tenant: r.tenant_id,
            tenant_attributes: r.attributes.0,
            complete: r.complete,
            error: r.error,
            messages: r.messages.0,
        }
    }
}

/// Enables (install or upgrade), disables or purges the module for a tenant.
#[utoipa::path(post, path = "/_/tenant", tag = "tenant",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = TenantAttributes,
    responses((status = 201, description = "Install/upgrade job started; poll the Location", body = TenantJob,
               headers(("Location" = String, description = "/_/tenant/{id}"))),
              (status = 204, description = "Disabled or purged"),
              (status = 400, body = String, content_type = "text/plain")))]
async fn post_tenant(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    FolioJson(attrs): FolioJson<TenantAttributes>,
) -> AppResult<Response> {
    attrs.check_storable()?;
    if attrs.purge == Some(true) {
        tenants::purge(&state.deps(), &tenant).await?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if attrs.module_to.is_none() {
        tracing::info!(%tenant, module_from = ?attrs.module_from, "tenant disabled");
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let attributes = serde_json::to_value(&attrs).map_err(anyhow::Error::from)?;
    let id = tenants::create_job(&state.deps(), &tenant, &attributes).await?;
    tracing::info!(%tenant, job = %id, module_from = ?attrs.module_from, module_to = ?attrs.module_to, "tenant init job started");
    let okapi = OkapiHeaders {
        url: super::extract::okapi_url(&headers, &state.config),
        token: headers
            .get("x-okapi-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let job_state = state.clone();
    let job_tenant = tenant.clone();
    state.tasks.spawn(async move {
        tenants::run_install_job(&job_state.deps(), &job_tenant, id, okapi).await
    });
    let body = TenantJob {
        id,
        tenant: tenant.to_string(),
        tenant_attributes: attributes,
        complete: false,
        error: None,
        messages: vec![],
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/_/tenant/{id}"))],
        Json(body),
    )
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this many milliseconds for the job to complete; longer waits are cut to
    /// 600000. Values outside int64 are a 400, not a silent cut.
    #[param(minimum = 0)]
    pub wait: Option<i64>,
}

const MAX_WAIT_MS: u64 = 600_000;

fn job_id(raw: &str) -> AppResult<Uuid> {
    Uuid::parse_str(raw).map_err(|_| AppError::BadRequest(format!("Invalid job id: {raw}")))
}

/// A tenant job, optionally waiting for it to complete.
#[utoipa::path(get, path = "/_/tenant/{id}", tag = "tenant",
    params(("id" = String, Path, format = Uuid, description = "Job id"), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"), WaitQuery),
    responses((status = 200, body = TenantJob), (status = 404, body = String, content_type = "text/plain")))]
async fn get_job(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> AppResult<Json<TenantJob>> {
    let id = job_id(&id)?;
    let wait = match q.wait.unwrap_or(0) {
        w if w < 0 => {
            return Err(AppError::BadRequest(format!(
                "wait must not be negative: {w}"
            )))
        }
        w => w.unsigned_abs().min(MAX_WAIT_MS),
    };
    tenants::wait_for_job(&state.deps(), &tenant, id, Duration::from_millis(wait))
        .await?
        .map(|job| Json(job.into()))
        .ok_or_else(|| AppError::NotFound(format!("Job not found {id}")))
}

/// Deletes a tenant job record.
#[utoipa::path(delete, path = "/_/tenant/{id}", tag = "tenant",
    params(("id" = String, Path, format = Uuid, description = "Job id"), ("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    responses((status = 204), (status = 404, body = String, content_type = "text/plain")))]
async fn delete_job(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> AppResult<StatusCode> {
    let id = job_id(&id)?;
    if db::jobs::delete(&state.pool, id, &tenant).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound(format!("Job not found {id}")))
    }
}
