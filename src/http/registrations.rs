//! What publishers and subscribers share: the messaging-module DTOs, listing and deleting one
//! module's registrations for an event type.

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use crate::app::registrations::{self as app, DescriptorMismatch, RegistrationError};
use crate::db::registry::{self, Registration};
use crate::domain::{EventType, ModuleId, ModuleRole, TenantId};
use crate::error::{AppError, AppResult, ErrorItem};

/// One registration of a module as publisher or subscriber of an event type in a tenant.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagingModule {
    pub id: Uuid,
    pub event_type: String,
    pub module_id: String,
    pub tenant_id: String,
    pub module_role: ModuleRole,
    pub activated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_callback: Option<String>,
}

impl From<Registration> for MessagingModule {
    fn from(r: Registration) -> Self {
        MessagingModule {
            id: r.id,
            event_type: r.event_type_id,
            module_id: r.module_id,
            tenant_id: r.tenant_id,
            module_role: r.role,
            activated: r.activated,
            subscriber_callback: r.subscriber_callback,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagingModuleCollection {
    pub messaging_modules: Vec<MessagingModule>,
    pub total_records: usize,
}

/// `?moduleId=` of the DELETE endpoints.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct ModuleIdQuery {
    /// The module whose registrations to delete; any version of it matches.
    #[param(required = true, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")]
    pub module_id: Option<String>,
}

/// Parses a required `moduleId` query parameter (400 naming it when absent or invalid).
pub(crate) fn module_id_param(raw: Option<&str>) -> AppResult<ModuleId> {
    let raw = raw
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| AppError::BadRequest("moduleId is a required query parameter".into()))?;
    ModuleId::parse(raw)
        .map_err(|e| AppError::BadRequest(format!("Invalid moduleId query parameter: {e}")))
}

pub(crate) async fn list(
    state: &AppState,
    tenant: &TenantId,
    event_type: &str,
    role: ModuleRole,
) -> AppResult<MessagingModuleCollection> {
    // A name that is not a valid event type has no registrations (and never reaches SQL).
    let rows = match EventType::parse(event_type) {
        Ok(t) => registry::registrations_for(&state.pool, tenant, t.as_str(), role).await?,
        Err(_) => Vec::new(),
    };
    let modules: Vec<MessagingModule> = rows.into_iter().map(Into::into).collect();
    Ok(MessagingModuleCollection {
        total_records: modules.len(),
        messaging_modules: modules,
    })
}

/// Deletes one module's registrations (any version) for one event type. 204 even when nothing
/// matched; a missing `moduleId` is 400 (the Java module deleted every registration instead).
pub(crate) async fn delete(
    state: &AppState,
    tenant: &TenantId,
    event_type: &str,
    role: ModuleRole,
    module_id: Option<&str>,
) -> AppResult<StatusCode> {
    let module = module_id_param(module_id)?;
    let Ok(event_type) = EventType::parse(event_type) else {
        return Ok(StatusCode::NO_CONTENT);
    };
    app::delete(&state.deps(), tenant, role, &module, Some(&event_type)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The index of the first repeated key, for "the same event type twice in one declaration".
pub(crate) fn first_duplicate<'a>(keys: impl Iterator<Item = &'a str>) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    keys.enumerate()
        .find(|(_, k)| !seen.insert(*k))
        .map(|(i, _)| i)
}

impl From<RegistrationError> for AppError {
    fn from(e: RegistrationError) -> Self {
        match e {
            RegistrationError::Descriptors(mismatches) => AppError::BadRequestErrors(
                mismatches
                    .into_iter()
                    .map(|m| match m {
                        DescriptorMismatch::Unknown(event_type) => {
                            ErrorItem::message(format!("Event type '{event_type}' does not exist"))
                        }
                        DescriptorMismatch::Different { existing } => ErrorItem::message(format!(
                            "Publisher descriptor does not match existing descriptor for event type '{}'. To declare a publisher one should use the following descriptor: {}",
                            existing.event_type,
                            super::event_types::pretty(&existing)
                        )),
                    })
                    .collect::<Vec<_>>()
                    .into(),
            ),
            RegistrationError::Database(e) => e.into(),
        }
    }
}
