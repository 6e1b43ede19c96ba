//! `DELETE /pubsub/messaging-modules` (endpoint 15): a module unregisters itself in one tenant.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::Tenant;
use super::registrations::module_id_param;
use super::AppState;
use crate::domain::ModuleRole;
use crate::error::{AppError, AppResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(delete_messaging_modules))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct MessagingModuleQuery {
    #[param(required = true, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")]
    pub module_id: Option<String>,
    /// `PUBLISHER` or `SUBSCRIBER`.
    #[param(required = true, pattern = "^(PUBLISHER|SUBSCRIBER)$")]
    pub module_role: Option<String>,
}

/// Deletes all registrations of a module (any version) in one role, in this tenant only (the
/// Java module deleted them in every tenant).
#[utoipa::path(delete, path = "/pubsub/messaging-modules", tag = "messaging-modules",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id"), MessagingModuleQuery),
    responses((status = 204), (status = 400, body = String, content_type = "text/plain")))]
async fn delete_messaging_modules(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Query(q): Query<MessagingModuleQuery>,
) -> AppResult<StatusCode> {
    let (Some(module_id), Some(role)) = (q.module_id.as_deref(), q.module_role.as_deref()) else {
        return Err(AppError::BadRequest(
            "ModuleId and moduleRole are required query parameters".into(),
        ));
    };
    let role = ModuleRole::parse(role).ok_or_else(|| {
        AppError::BadRequest(format!(
            "Invalid moduleRole was specified: {role}. Acceptable moduleRole values are: PUBLISHER, SUBSCRIBER."
        ))
    })?;
    let module = module_id_param(Some(module_id))?;
    crate::app::registrations::delete(&state.deps(), &tenant, role, &module, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
