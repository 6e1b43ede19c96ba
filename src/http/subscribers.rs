//! Subscriber declarations (endpoints 9–11).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{FolioJson, Tenant};
use super::registrations::{
    self as http_registrations, first_duplicate, MessagingModuleCollection, ModuleIdQuery,
};
use super::AppState;
use crate::app::registrations::{self, Entry};
use crate::domain::{ModuleId, ModuleRole};
use crate::error::{codes, AppError, AppResult, ErrorItem};
use crate::event::event_type;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(declare_subscriber))
        .routes(routes!(list_subscribers, delete_subscribers))
}

/// A module declaring the event types it consumes and where to deliver them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriberDescriptor {
    #[schema(value_type = String, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$", example = "mod-patron-blocks-1.0.0")]
    pub module_id: ModuleId,
    pub subscription_definitions: Vec<SubscriptionDefinition>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionDefinition {
    #[serde(deserialize_with = "event_type")]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,100}$")]
    pub event_type: String,
    /// An Okapi path such as `/patron-blocks/handlers/item-checked-out`; events are POSTed to
    /// `OKAPI_URL` + this path. Absent (or null): a **direct consumer**, which reads the topic
    /// itself (e.g. with this crate's client); pubsub records the subscription, creates the
    /// topic, and never pushes to it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "callback_address"
    )]
    #[schema(
        pattern = "^/[^\\s\\x00-\\x1f\\x7f-\\x9f]*$",
        max_length = 2048,
        example = "/automated-patron-blocks/handlers/item-checked-out"
    )]
    pub callback_address: Option<String>,
}

fn callback_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let Some(raw) = Option::<String>::deserialize(d)? else {
        return Ok(None);
    };
    let ok = raw.starts_with('/')
        && raw.chars().count() <= 2048
        && !raw.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(Some(raw))
    } else {
        Err(serde::de::Error::custom(
            "must match \"^/[^\\s\\x00-\\x1f\\x7f-\\x9f]*$\": an Okapi path starting with '/', at most 2048 characters, without white space or control characters",
        ))
    }
}

/// Declares a module as subscriber of the listed event types in this tenant, replacing its
/// earlier declaration (any version). Unknown event types get a temporary descriptor that the
/// publisher's registration later overwrites.
#[utoipa::path(post, path = "/pubsub/event-types/declare/subscriber", tag = "subscribers",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = SubscriberDescriptor,
    responses((status = 201, description = "Declared; its topics exist or are reported missing until created"), (status = 422, body = crate::error::Errors),
              (status = 503, description = "The database did not answer; nothing was stored (Kafka trouble does not fail a declaration: its topics are created later)", body = String, content_type = "text/plain")))]
async fn declare_subscriber(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    FolioJson(body): FolioJson<SubscriberDescriptor>,
) -> AppResult<StatusCode> {
    let defs = &body.subscription_definitions;
    if let Some(i) = first_duplicate(defs.iter().map(|d| d.event_type.as_str())) {
        return Err(AppError::unprocessable(vec![ErrorItem::field(
            format!("subscriptionDefinitions[{i}].eventType"),
            defs[i].event_type.clone(),
            "is listed more than once",
            codes::DUPLICATE,
        )]));
    }
    if defs.is_empty() {
        return Ok(StatusCode::CREATED);
    }
    let entries: Vec<Entry> = defs
        .iter()
        .map(|d| Entry {
            event_type: d.event_type.clone(),
            callback: d.callback_address.clone(),
        })
        .collect();
    registrations::declare_subscriber(&state.deps(), &tenant, &body.module_id, &entries).await?;
    Ok(StatusCode::CREATED)
}

/// The subscribers of an event type in this tenant.
#[utoipa::path(get, path = "/pubsub/event-types/{eventTypeName}/subscribers", tag = "subscribers",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    responses((status = 200, body = MessagingModuleCollection)))]
async fn list_subscribers(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(event_type): Path<String>,
) -> AppResult<Json<MessagingModuleCollection>> {
    http_registrations::list(&state, &tenant, &event_type, ModuleRole::Subscriber)
        .await
        .map(Json)
}

/// Removes a module (any version) as subscriber of an event type in this tenant.
#[utoipa::path(delete, path = "/pubsub/event-types/{eventTypeName}/subscribers", tag = "subscribers",
    params(("eventTypeName" = String, Path), ("X-Okapi-Tenant" = String, Header, description = "Tenant id"), ModuleIdQuery),
    responses((status = 204), (status = 400, description = "Missing or invalid moduleId", body = String, content_type = "text/plain")))]
async fn delete_subscribers(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(event_type): Path<String>,
    Query(q): Query<ModuleIdQuery>,
) -> AppResult<StatusCode> {
    http_registrations::delete(
        &state,
        &tenant,
        &event_type,
        ModuleRole::Subscriber,
        q.module_id.as_deref(),
    )
    .await
}
