//! Publisher declarations (endpoints 6–8).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::event_types::{pretty, EventDescriptor};
use super::extract::{FolioJson, Tenant};
use super::registrations::{self, first_duplicate, MessagingModuleCollection, ModuleIdQuery};
use super::AppState;
use crate::db::registry::{self, Registration, StoredDescriptor};
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
    responses((status = 201, description = "Declared; the topics exist"),
              (status = 400, description = "Unknown or different event descriptors", body = crate::error::Errors),
              (status = 422, body = crate::error::Errors),
              (status = 503, description = "Kafka did not answer; nothing was stored", body = String, content_type = "text/plain")))]
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
    let module = body.module_id;
    let mut tx = state.pool.begin().await?;
    let names: Vec<&str> = body
        .event_descriptors
        .iter()
        .map(|d| d.event_type.as_str())
        .collect();
    let existing = registry::find_descriptors(&mut tx, &names).await?;
    let mut errors = Vec::new();
    for wanted in &body.event_descriptors {
        let wanted = StoredDescriptor::from(wanted.clone());
        match existing.iter().find(|e| e.event_type == wanted.event_type) {
            None => errors.push(ErrorItem::message(format!("Event type '{}' does not exist", wanted.event_type))),
            Some(e) if *e != wanted => errors.push(ErrorItem::message(format!(
                "Publisher descriptor does not match existing descriptor for event type '{}'. To declare a publisher one should use the following descriptor: {}",
                wanted.event_type,
                pretty(e)
            ))),
            Some(_) => {}
        }
    }
    if !errors.is_empty() {
        return Err(AppError::BadRequestErrors(errors.into()));
    }
    registrations::ensure_topics(&state, &tenant, names.iter().copied()).await?;
    registry::lock_module(&mut tx, &tenant, ModuleRole::Publisher, &module).await?;
    let replaced =
        registry::delete_module_rows(&mut tx, &tenant, ModuleRole::Publisher, &module, None)
            .await?;
    for d in &body.event_descriptors {
        let row = Registration {
            id: Uuid::new_v4(),
            event_type_id: d.event_type.clone(),
            tenant_id: tenant.to_string(),
            role: ModuleRole::Publisher,
            subscriber_callback: Some(String::new()),
            module_id: module.to_string(),
            activated: true,
            created_date: replaced
                .iter()
                .find(|r| r.event_type_id == d.event_type)
                .and_then(|r| r.created_date),
        };
        registry::insert_registration(&mut tx, &row).await?;
    }
    crate::registry::notify(&mut *tx, &tenant).await?;
    tx.commit().await?;
    registrations::registry_changed(&state, &tenant).await;
    tracing::info!(%tenant, module = %module, event_types = ?names, replaced = replaced.len(), "publisher declared");
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
    registrations::list(&state, &tenant, &event_type, ModuleRole::Publisher)
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
    registrations::delete(
        &state,
        &tenant,
        &event_type,
        ModuleRole::Publisher,
        q.module_id.as_deref(),
    )
    .await
}
