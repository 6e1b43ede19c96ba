//! `POST /pubsub/publish` (endpoint 14): checks the publisher, writes the event to its topic and
//! answers 204 once the broker acknowledged it.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::extract::{is_json_object, parse_json, JsonBody, Tenant};
use super::AppState;
use crate::audit::{AuditItem, AuditRecord, AuditState};
use crate::domain::{EventType, FolioUuid, TenantId};
use crate::error::{AppError, AppResult};
use crate::event::{now_string, Event, EventMetadata};
use crate::kafka::producer::{OutgoingRecord, PublishError};
use crate::metrics::Metrics;
use crate::registry::PublisherCheck;

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
    let mut event = PublishedEvent::parse(&body)?;
    drop(body);
    if !state.registry.tenant_enabled(&tenant) {
        return Err(AppError::BadRequest(format!(
            "Tenant {tenant} is not enabled for mod-pubsub (POST /_/tenant first)"
        )));
    }
    let key = partition_key(&headers)?.unwrap_or_else(|| event.id.0.to_string());
    let event_type = EventType::parse(&event.event_type)
        .map_err(|e| AppError::invalid_field("eventType", &event.event_type, e.0))?;
    let audit = Auditor::new(&state, &tenant, &event);
    audit.record(AuditState::Created, None).await;
    if state.config.audit.payload_enabled {
        if let Some(content) = event.payload().filter(|p| !p.is_empty()) {
            state
                .audit
                .record(AuditItem::Payload {
                    tenant: tenant.clone(),
                    event_id: event.id.0,
                    content,
                })
                .await;
        }
    }

    let meta = &event.event_metadata;
    let rejection = if meta.tenant_id != tenant.as_str() {
        Some(format!(
            "eventMetadata.tenantId '{}' does not match the X-Okapi-Tenant header '{tenant}'",
            meta.tenant_id
        ))
    } else {
        match state
            .registry
            .check_publisher(&tenant, event_type.as_str(), &meta.published_by)
        {
            PublisherCheck::Registered => None,
            PublisherCheck::NotRegistered => Some(format!(
                "{} is not registered as PUBLISHER for event type {event_type}",
                meta.published_by
            )),
            PublisherCheck::NotActivated => Some(format!(
                "Event type {event_type} is not activated for tenant {tenant}"
            )),
        }
    };
    if let Some(message) = rejection {
        audit
            .record(AuditState::Rejected, Some(message.clone()))
            .await;
        return Err(AppError::BadRequest(message));
    }

    if event.event_metadata.published_date.is_none() {
        event.event_metadata.published_date = Some(now_string());
    }
    let value = serde_json::to_vec(&event).map_err(anyhow::Error::from)?;
    let topic = state.kafka.topics.name(&tenant, &event_type);
    let okapi_url = headers
        .get("x-okapi-url")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            state
                .config
                .okapi_url
                .as_str()
                .trim_end_matches('/')
                .to_owned()
        });
    let mut record_headers = vec![
        ("folio.tenantId", tenant.as_str()),
        ("x-okapi-tenant", tenant.as_str()),
        ("x-okapi-url", okapi_url.as_str()),
    ];
    for name in ["x-okapi-request-id", "x-okapi-user-id"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            record_headers.push((name, v));
        }
    }
    let record = OutgoingRecord {
        topic: &topic,
        key: &key,
        value: &value,
        headers: record_headers,
    };

    let mut sent = state.kafka.producer.send(&record).await;
    if let Err(PublishError::UnknownTopic(_)) = &sent {
        // The broker lost the topic (wiped or replaced): the registration exists, so recreate it.
        tracing::warn!(%topic, "topic missing on publish; recreating it");
        match state
            .kafka
            .admin
            .ensure(&BTreeSet::from([topic.clone()]))
            .await
        {
            Ok(()) => sent = state.kafka.producer.send(&record).await,
            Err(e) => tracing::error!(%topic, error = %e, "could not recreate topic"),
        }
    }
    match sent {
        Ok((partition, offset)) => {
            tracing::debug!(%tenant, event_id = %event.id.0, %topic, partition, offset, "event published");
            state.engine.published(topic.as_str());
            audit.record(AuditState::Published, None).await;
            state
                .metrics
                .published
                .get_or_create(&Metrics::event(event_type.as_str()))
                .inc();
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e) => {
            state
                .metrics
                .publish_failed
                .get_or_create(&Metrics::event(event_type.as_str()))
                .inc();
            let message = format!(
                "{event_type} event to topic {topic} was not sent. Payload size is {}. {e}",
                event.payload().map_or(0, |p| p.len())
            );
            tracing::error!(%tenant, event_id = %event.id.0, %topic, error = %e, "publish failed");
            if !matches!(e, PublishError::TooLarge) {
                // The broker may be back without its topics: have them checked now.
                state.kafka.reconcile_now.notify_one();
            }
            audit
                .record(AuditState::Rejected, Some(message.clone()))
                .await;
            Err(match e {
                PublishError::TooLarge => AppError::PayloadTooLarge(message),
                _ => AppError::Unavailable(message),
            })
        }
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

/// An [`Event`] as published, its payload kept as the JSON string literal of the request: it is
/// neither unescaped when read nor escaped again when written to Kafka (for a 1 KB payload that
/// was a quarter of the handler's instructions). The record is the same JSON document as the
/// [`Event`] would write, up to how the payload's characters are escaped.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PublishedEvent {
    id: FolioUuid,
    #[serde(deserialize_with = "crate::event::event_type")]
    event_type: String,
    event_metadata: EventMetadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_payload: Option<Box<RawValue>>,
}

impl PublishedEvent {
    /// One pass for a valid event; anything else gets the errors an [`Event`] body gets.
    fn parse(body: &[u8]) -> AppResult<PublishedEvent> {
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

    /// The payload's text (unescaped).
    fn payload(&self) -> Option<String> {
        self.event_payload
            .as_ref()
            .and_then(|p| serde_json::from_str(p.get()).ok())
    }
}

/// Writes the audit rows of one publish.
struct Auditor<'a> {
    state: &'a AppState,
    template: AuditRecord,
}

impl<'a> Auditor<'a> {
    fn new(state: &'a AppState, tenant: &TenantId, event: &PublishedEvent) -> Self {
        let meta = &event.event_metadata;
        let template = AuditRecord {
            tenant: tenant.clone(),
            event_id: event.id.0,
            event_type: event.event_type.clone(),
            correlation_id: meta.correlation_id.clone(),
            created_by: meta.created_by.clone(),
            published_by: meta.published_by.clone(),
            state: AuditState::Created,
            error_message: None,
            audit_date: chrono::Utc::now(),
            subscriber: None,
            attempt: None,
        };
        Auditor { state, template }
    }

    async fn record(&self, state: AuditState, error_message: Option<String>) {
        let row = AuditRecord {
            state,
            error_message,
            audit_date: chrono::Utc::now(),
            ..self.template.clone()
        };
        self.state.audit.record(AuditItem::Message(row)).await;
    }
}
