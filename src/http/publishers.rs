//! Publisher declarations (endpoints 6–8).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::event_types::EventDescriptor;
use super::extract::{FolioJson, Tenant};
use super::registrations::{
    self as http_registrations, first_duplicate, MessagingModuleCollection, ModuleIdQuery,
};
use super::AppState;
use crate::app::registrations;
use crate::db::registry::StoredDescriptor;
use crate::domain::{ModuleId, ModuleRole};
use crate::error::{codes, AppError, AppResult, ErrorItem};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(declare_publisher))
        .routes(routes!(list_publishers, delete_publishers))
}

/// A module declaring the event types it publishes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublisherDescriptor {
    #[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$", example = "mod-circulation-24.0.0")]
    pub module_id: ModuleId,
    pub event_descriptors: Vec<EventDescriptor>,
}

/// Declares a module as publisher of the listed event types in this tenant, replacing its
/// earlier declaration (any version). Every listed descriptor must equal the registered one.
#[utoipa::path(post, path = "/pubsub/event-types/declare/publisher", tag = "publishers",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = PublisherDescriptor,
    responses((status = 201, description = "Declared; its topics exist or are reported missing until created"),
              (status = 400, description = "Unknown or different event descriptors", body = crate::error::Errors),
              (status = 422, body = crate::error::Errors),
              (status = 503, description = "The database did not answer; nothing was stored (Kafka trouble does not fail a declaration: its topics are created later)", body = String, content_type = "text/plain")))]
async fn declare_publisher(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    FolioJson(body): FolioJson<PublisherDescriptor>,
) -> AppResult<StatusCode> {
    if let Some(i) = first_duplicate(body.event_descriptors.iter().map(|d| d.event_type.as_str())) {
        return Err(AppError::unprocessable(vec![ErrorItem::field(
            format!("eventDescriptors[{i}].eventType"),
            body.event_descriptors[i].event_type.clone(),
            "is listed more than once",
            codes::DUPLICATE,
        )]));
    }
    if body.event_descriptors.is_empty() {
        return Ok(StatusCode::CREATED);
    }
    let descriptors: Vec<StoredDescriptor> = body
        .event_descriptors
        .into_iter()
        .map(StoredDescriptor::from)
        .collect();
    registrations::declare_publisher(&state.deps(), &tenant, &body.module_id, &descriptors).await?;
    Ok(StatusCode::CREATED)
}

/// The publishers of an event type in this tenant.
#[utoipa::path(get, path = "/pubsub/event-types/{eventTypeName}/publishers", tag = "publishers",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    responses((status = 200, body = MessagingModuleCollection)))]
async fn list_publishers(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(event_type): Path<String>,
) -> AppResult<Json<MessagingModuleCollection>> {
    http_registrations::list(&state, &tenant, &event_type, ModuleRole::Publisher)
        .await
        .map(Json)
}

/// Removes a module (any version) as publisher of an event type in this tenant.
#[utoipa::path(delete, path = "/pubsub/event-types/{eventTypeName}/publishers", tag = "publishers",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"), ModuleIdQuery),
    responses((status = 204), (status = 400, description = "Missing or invalid moduleId", body = String, content_type = "text/plain")))]
async fn delete_publishers(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(event_type): Path<String>,
    Query(q): Query<ModuleIdQuery>,
) -> AppResult<StatusCode> {
    http_registrations::delete(
        &state,
        &tenant,
        &event_type,
        ModuleRole::Publisher,
        q.module_id.as_deref(),
    )
    .await
}
