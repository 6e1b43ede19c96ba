//! `/pubsub/event-types`: event descriptors (endpoints 1–5 of the behaviour spec).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{FolioJson, Tenant};
use super::AppState;
use crate::app::event_types::{self, DeleteError, RegisterError};
use crate::db::registry::{self, StoredDescriptor};
use crate::domain::EventType;
use crate::error::{AppError, AppResult};
use crate::event::event_type;
use crate::lenient;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_event_types, create_event_type))
        .routes(routes!(get_event_type, put_event_type, delete_event_type))
}

/// An event type's descriptor. Descriptors are global (shared by all tenants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventDescriptor {
    /// The event type; becomes part of Kafka topic names, so it is limited to `[A-Za-z0-9_-]`.
    #[serde(deserialize_with = "event_type")]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,100}$", example = "ITEM_CHECKED_OUT")]
    pub event_type: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::optional_text"
    )]
    pub description: Option<String>,
    /// Time to live, in minutes. Numeric strings are accepted, as Jackson does.
    #[serde(rename = "eventTTL", deserialize_with = "lenient::non_negative_int")]
    #[schema(minimum = 0, maximum = 2147483647)]
    pub event_ttl: i64,
    #[serde(default, deserialize_with = "lenient::bool_or_null")]
    #[schema(value_type = Option<bool>)]
    pub signed: bool,
    /// A temporary descriptor, created by a subscriber declaration, that the first real
    /// registration overwrites.
    #[serde(default, deserialize_with = "lenient::bool_or_null")]
    #[schema(value_type = Option<bool>)]
    pub tmp: bool,
}

impl From<EventDescriptor> for StoredDescriptor {
    fn from(d: EventDescriptor) -> Self {
        StoredDescriptor {
            event_type: d.event_type,
            description: d.description,
            event_ttl: d.event_ttl,
            signed: d.signed,
            tmp: d.tmp,
        }
    }
}

impl From<StoredDescriptor> for EventDescriptor {
    fn from(d: StoredDescriptor) -> Self {
        EventDescriptor {
            event_type: d.event_type,
            description: d.description,
            event_ttl: d.event_ttl,
            signed: d.signed,
            tmp: d.tmp,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventDescriptorCollection {
    pub event_descriptors: Vec<EventDescriptor>,
    pub total_records: usize,
}

/// Pretty JSON of a descriptor, as the Java module prints it in messages.
pub(crate) fn pretty(d: &StoredDescriptor) -> String {
    serde_json::to_string_pretty(d).unwrap_or_default()
}

/// All event descriptors, temporary ones included.
#[utoipa::path(get, path = "/pubsub/event-types", tag = "event-types",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id"),
           ("lang" = Option<String>, Query, description = "Ignored (RMB language trait)")),
    responses((status = 200, body = EventDescriptorCollection),
              (status = 400, description = "Missing or invalid tenant", body = String, content_type = "text/plain")))]
async fn list_event_types(
    _tenant: Tenant,
    State(state): State<AppState>,
) -> AppResult<Json<EventDescriptorCollection>> {
    let descriptors: Vec<EventDescriptor> = registry::all_descriptors(&state.pool)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(EventDescriptorCollection {
        total_records: descriptors.len(),
        event_descriptors: descriptors,
    }))
}

/// Registers an event type. Idempotent for an equal descriptor; overwrites a temporary one;
/// 400 when a different descriptor exists.
#[utoipa::path(post, path = "/pubsub/event-types", tag = "event-types",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = EventDescriptor,
    responses((status = 201, body = EventDescriptor),
              (status = 400, description = "A different descriptor exists, malformed JSON or missing tenant", body = String, content_type = "text/plain"),
              (status = 413, description = "Body too large", body = String, content_type = "text/plain"),
              (status = 422, description = "Invalid descriptor", body = crate::error::Errors)))]
async fn create_event_type(
    _tenant: Tenant,
    State(state): State<AppState>,
    FolioJson(body): FolioJson<EventDescriptor>,
) -> AppResult<impl IntoResponse> {
    let wanted = StoredDescriptor::from(body.clone());
    match event_types::register(&state.deps(), &wanted).await {
        Ok(()) => Ok((StatusCode::CREATED, Json(body))),
        Err(RegisterError::Different { existing }) => Err(AppError::BadRequest(format!(
            "Event descriptor for event type '{}' already exists, but the content is different. Existing event descriptor: {}",
            wanted.event_type,
            pretty(&existing)
        ))),
        Err(RegisterError::Database(e)) => Err(e.into()),
    }
}

/// One event descriptor.
#[utoipa::path(get, path = "/pubsub/event-types/{eventTypeName}", tag = "event-types",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"),
           ("lang" = Option<String>, Query, description = "Ignored")),
    responses((status = 200, body = EventDescriptor),
              (status = 404, body = String, content_type = "text/plain")))]
async fn get_event_type(
    _tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> AppResult<Json<EventDescriptor>> {
    let found = match EventType::parse(&name) {
        Ok(t) => registry::find_descriptor(&state.pool, t.as_str()).await?,
        Err(_) => None,
    };
    match found {
        Some(d) => Ok(Json(d.into())),
        None => Err(AppError::NotFound(format!(
            "Event Descriptor with event type '{name}' was not found"
        ))),
    }
}

/// Replaces an event descriptor. The body's `eventType` must equal the path's.
#[utoipa::path(put, path = "/pubsub/event-types/{eventTypeName}", tag = "event-types",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"),
           ("lang" = Option<String>, Query, description = "Ignored")),
    request_body = EventDescriptor,
    responses((status = 200, body = EventDescriptor),
              (status = 404, body = String, content_type = "text/plain"),
              (status = 422, body = crate::error::Errors)))]
async fn put_event_type(
    _tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
    FolioJson(body): FolioJson<EventDescriptor>,
) -> AppResult<Json<EventDescriptor>> {
    if body.event_type != name {
        return Err(AppError::invalid_field(
            "eventType",
            body.event_type,
            format!("must equal the event type in the path ('{name}')"),
        ));
    }
    let stored = StoredDescriptor::from(body.clone());
    if registry::update_descriptor(&state.pool, &stored).await? {
        Ok(Json(body))
    } else {
        Err(AppError::NotFound(format!(
            "EventDescriptor with event type '{name}' was not updated"
        )))
    }
}

/// Deletes an event type that no module (of any tenant) is registered for.
#[utoipa::path(delete, path = "/pubsub/event-types/{eventTypeName}", tag = "event-types",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"),
           ("lang" = Option<String>, Query, description = "Ignored")),
    responses((status = 204),
              (status = 400, description = "Modules are registered for it", body = String, content_type = "text/plain"),
              (status = 404, body = String, content_type = "text/plain")))]
async fn delete_event_type(
    _tenant: Tenant,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> AppResult<StatusCode> {
    let not_found = || {
        AppError::NotFound(format!(
            "EventDescriptor with event type name '{name}' was not found"
        ))
    };
    let Ok(event_type) = EventType::parse(&name) else {
        return Err(not_found());
    };
    match event_types::delete(&state.deps(), &event_type).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(DeleteError::NotFound) => Err(not_found()),
        Err(DeleteError::InUse { modules }) if !modules.is_empty() => Err(AppError::BadRequest(format!(
            "Event type {name} cannot be deleted. Modules [{}] are registered as publishers or subscribers for this event type.",
            modules.join(", ")
        ))),
        Err(DeleteError::InUse { .. }) => Err(AppError::BadRequest(format!(
            "Event type {name} cannot be deleted. Modules are registered for it."
        ))),
        Err(DeleteError::Database(e)) => Err(e.into()),
    }
}
