//! Publishing one event: audit it, check its publisher, write it to its topic (recreating a
//! topic the broker lost), and answer once Kafka acknowledged it.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::Deps;
use crate::audit::{AuditItem, AuditRecord, AuditState};
use crate::domain::{EventType, FolioUuid, TenantId};
use crate::event::{now_string, EventMetadata};
use crate::kafka::producer::{OutgoingRecord, PublishError};
use crate::kafka::TopicName;
use crate::metrics::Metrics;
use crate::registry_cache::PublisherCheck;

/// An [`Event`](crate::event::Event) as published, its payload kept as the JSON string literal
/// of the request: it is neither unescaped when read nor escaped again when written to Kafka (for
/// a 1 KB payload that was a quarter of the handler's instructions). The record is the same JSON
/// document as the `Event` would write, up to how the payload's characters are escaped.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishedEvent {
    pub id: FolioUuid,
    #[serde(deserialize_with = "crate::event::event_type")]
    pub event_type: String,
    pub event_metadata: EventMetadata,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_payload: Option<Box<RawValue>>,
}

impl PublishedEvent {
    /// The payload's text (unescaped).
    pub fn payload(&self) -> Option<String> {
        self.event_payload
            .as_ref()
            .and_then(|p| serde_json::from_str(p.get()).ok())
    }
}

/// One publish request.
pub struct Publication<'a> {
    pub tenant: &'a TenantId,
    pub event: PublishedEvent,
    /// The partition key (the event id unless the request names one).
    pub key: String,
    /// The record's headers besides the tenant's: `x-okapi-url` and what the request forwards.
    pub headers: Vec<(&'a str, &'a str)>,
}

/// Why an event was not published. Each has been audited as REJECTED (but [`NotEnabled`] and
/// [`InvalidEventType`], which come before the first audit row).
///
/// [`NotEnabled`]: PublishFailure::NotEnabled
/// [`InvalidEventType`]: PublishFailure::InvalidEventType
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    #[error("Tenant {0} is not enabled for mod-pubsub (POST /_/tenant first)")]
    NotEnabled(TenantId),
    #[error("{reason}")]
    InvalidEventType { value: String, reason: String },
    /// Not this publisher's to publish (tenant mismatch, not registered, not activated).
    #[error("{0}")]
    Rejected(String),
    /// The broker refuses records this large.
    #[error("{0}")]
    TooLarge(String),
    /// Kafka did not acknowledge in time.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] serde_json::Error),
}

/// Publishes `p`; `Ok` once Kafka acknowledged the record.
pub async fn publish(deps: &Deps<'_>, p: Publication<'_>) -> Result<(), PublishFailure> {
    let Publication {
        tenant,
        mut event,
        key,
        headers,
    } = p;
    if !deps.registry.tenant_enabled(tenant) {
        return Err(PublishFailure::NotEnabled(tenant.clone()));
    }
    let event_type =
        EventType::parse(&event.event_type).map_err(|e| PublishFailure::InvalidEventType {
            value: event.event_type.clone(),
            reason: e.0,
        })?;
    let audit = Auditor::new(deps, tenant, &event);
    audit.created(deps, &event).await;
    if let Some(message) = rejection(deps, tenant, &event_type, &event.event_metadata) {
        audit
            .record(AuditState::Rejected, Some(message.clone()))
            .await;
        return Err(PublishFailure::Rejected(message));
    }

    if event.event_metadata.published_date.is_none() {
        event.event_metadata.published_date = Some(now_string());
    }
    let value = serde_json::to_vec(&event)?;
    let topic = deps.kafka.topics.name(tenant, &event_type);
    let mut record_headers = vec![
        ("folio.tenantId", tenant.as_str()),
        ("x-okapi-tenant", tenant.as_str()),
    ];
    record_headers.extend(headers);
    let record = OutgoingRecord {
        topic: &topic,
        key: &key,
        value: &value,
        headers: record_headers,
    };
    let sent = send_recreating_topic(deps, &record).await;
    settle(deps, &audit, &event, &event_type, &topic, sent).await
}

/// Audits and counts what came of the write, and answers for it.
async fn settle(
    deps: &Deps<'_>,
    audit: &Auditor<'_>,
    event: &PublishedEvent,
    event_type: &EventType,
    topic: &TopicName,
    sent: Result<(i32, i64), PublishError>,
) -> Result<(), PublishFailure> {
    let labels = Metrics::event(event_type.as_str());
    let tenant = &audit.template.tenant;
    match sent {
        Ok((partition, offset)) => {
            tracing::debug!(%tenant, event_id = %event.id.0, %topic, partition, offset, "event published");
            deps.engine.published(topic.as_str());
            audit.record(AuditState::Published, None).await;
            deps.metrics.published.get_or_create(&labels).inc();
            Ok(())
        }
        Err(e) => {
            deps.metrics.publish_failed.get_or_create(&labels).inc();
            let message = format!(
                "{event_type} event to topic {topic} was not sent. Payload size is {}. {e}",
                event.payload().map_or(0, |p| p.len())
            );
            tracing::error!(%tenant, event_id = %event.id.0, %topic, error = %e, "publish failed");
            if !matches!(e, PublishError::TooLarge) {
                // The broker may be back without its topics: have them checked now.
                deps.kafka.reconcile_now.notify_one();
            }
            audit
                .record(AuditState::Rejected, Some(message.clone()))
                .await;
            Err(match e {
                PublishError::TooLarge => PublishFailure::TooLarge(message),
                _ => PublishFailure::Unavailable(message),
            })
        }
    }
}

/// Writes `record`; when the broker lost its topic (wiped or replaced) the registration still
/// exists, so the topic is created again and the record written once more.
async fn send_recreating_topic(
    deps: &Deps<'_>,
    record: &OutgoingRecord<'_>,
) -> Result<(i32, i64), PublishError> {
    let sent = deps.kafka.producer.send(record).await;
    if !matches!(sent, Err(PublishError::UnknownTopic(_))) {
        return sent;
    }
    let topic = record.topic;
    tracing::warn!(%topic, "topic missing on publish; recreating it");
    match deps
        .kafka
        .admin
        .ensure(&BTreeSet::from([topic.clone()]))
        .await
    {
        Ok(()) => deps.kafka.producer.send(record).await,
        Err(e) => {
            tracing::error!(%topic, error = %e, "could not recreate topic");
            sent
        }
    }
}

/// Why the event is not this publisher's to publish, if it is not.
fn rejection(
    deps: &Deps<'_>,
    tenant: &TenantId,
    event_type: &EventType,
    meta: &EventMetadata,
) -> Option<String> {
    if meta.tenant_id != tenant.as_str() {
        return Some(format!(
            "eventMetadata.tenantId '{}' does not match the X-Okapi-Tenant header '{tenant}'",
            meta.tenant_id
        ));
    }
    match deps
        .registry
        .check_publisher(tenant, event_type.as_str(), &meta.published_by)
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
}

/// Writes the audit rows of one publish.
struct Auditor<'a> {
    audit: &'a crate::audit::AuditWriter,
    template: AuditRecord,
}

impl<'a> Auditor<'a> {
    fn new(deps: &Deps<'a>, tenant: &TenantId, event: &PublishedEvent) -> Self {
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
        Auditor {
            audit: deps.audit,
            template,
        }
    }

    /// The CREATED row, and the payload when payload audit is on.
    async fn created(&self, deps: &Deps<'_>, event: &PublishedEvent) {
        self.record(AuditState::Created, None).await;
        if deps.config.audit.payload_enabled {
            if let Some(content) = event.payload().filter(|p| !p.is_empty()) {
                self.audit
                    .record(AuditItem::Payload {
                        tenant: self.template.tenant.clone(),
                        event_id: event.id.0,
                        content,
                    })
                    .await;
            }
        }
    }

    async fn record(&self, state: AuditState, error_message: Option<String>) {
        let row = AuditRecord {
            state,
            error_message,
            audit_date: chrono::Utc::now(),
            ..self.template.clone()
        };
        self.audit.record(AuditItem::Message(row)).await;
    }
}
