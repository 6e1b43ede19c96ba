//! `POST /pubsub/publish` (endpoint 14): checks the publisher, writes the event to its topic and
//! answers 204 once the broker acknowledged it.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{is_json_object, okapi_url, parse_json, JsonBody, Tenant};
use super::AppState;
use crate::app::publishing::{self, Publication, PublishFailure, PublishedEvent};
use crate::error::{AppError, AppResult};
use crate::event::Event;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(publish))
}

/// The optional request header that sets the Kafka partition key (default: the event id).
pub const PARTITION_KEY_HEADER: &str = "x-pubsub-partition-key";
pub const PARTITION_KEY_MAX: usize = 255;

/// Publishes an event. The publisher (`eventMetadata.publishedBy`) must be registered for the
/// event type in this tenant, and `eventMetadata.tenantId` must be this tenant. 204 once Kafka
/// acknowledged the event (no subscriber is not an error).
#[utoipa::path(post, path = "/pubsub/publish", tag = "publish",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id"),
           ("X-Pubsub-Partition-Key" = Option<String>, Header,
            description = "Kafka partition key (1 to 255 bytes): events with the same key keep their order. Default: the event id")),
    request_body = Event,
    responses((status = 204, description = "Written to Kafka"),
              (status = 400, description = "Publisher not registered, tenant mismatch, tenant not enabled", body = String, content_type = "text/plain"),
              (status = 413, description = "Larger than MAX_REQUEST_SIZE", body = String, content_type = "text/plain"),
              (status = 422, body = crate::error::Errors),
              (status = 503, description = "Kafka did not acknowledge in time", body = String, content_type = "text/plain")))]
async fn publish(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> AppResult<StatusCode> {
    let event = parse_event(&body)?;
    drop(body);
    let key = partition_key(&headers)?.unwrap_or_else(|| event.id.0.to_string());
    let okapi_url = okapi_url(&headers, &state.config);
    let mut forwarded = vec![("x-okapi-url", okapi_url.as_str())];
    for name in ["x-okapi-request-id", "x-okapi-user-id"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            forwarded.push((name, v));
        }
    }
    let publication = Publication {
        tenant: &tenant,
        event,
        key,
        headers: forwarded,
    };
    match publishing::publish(&state.deps(), publication).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(match e {
            PublishFailure::InvalidEventType { value, reason } => {
                AppError::invalid_field("eventType", &value, reason)
            }
            PublishFailure::NotEnabled(_) | PublishFailure::Rejected(_) => {
                AppError::BadRequest(e.to_string())
            }
            PublishFailure::TooLarge(m) => AppError::PayloadTooLarge(m),
            PublishFailure::Unavailable(m) => AppError::Unavailable(m),
            PublishFailure::Internal(e) => AppError::Internal(e.into()),
        }),
    }
}

fn partition_key(headers: &HeaderMap) -> AppResult<Option<String>> {
    let Some(raw) = headers.get(PARTITION_KEY_HEADER) else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .map_err(|_| AppError::BadRequest("X-Pubsub-Partition-Key must be visible ASCII".into()))?;
    if key.is_empty() || key.len() > PARTITION_KEY_MAX {
        return Err(AppError::BadRequest(format!(
            "X-Pubsub-Partition-Key must be 1 to {PARTITION_KEY_MAX} bytes"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// The body as a [`PublishedEvent`]: one pass for a valid event; anything else gets the errors
/// an [`Event`] body gets.
fn parse_event(body: &[u8]) -> AppResult<PublishedEvent> {
    if is_json_object(body) {
        if let Ok(e) = serde_json::from_slice::<PublishedEvent>(body) {
            if e.event_payload
                .as_ref()
                .is_none_or(|p| p.get().starts_with('"'))
            {
                return Ok(e);
            }
        }
    }
    let event: Event = parse_json(body)?;
    let event_payload = match event.event_payload {
        Some(p) => Some(serde_json::value::to_raw_value(&p).map_err(anyhow::Error::from)?),
        None => None,
    };
    Ok(PublishedEvent {
        id: event.id,
        event_type: event.event_type,
        event_metadata: event.event_metadata,
        event_payload,
    })
}
