//! Publishing straight to Kafka.

use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;

use super::ClientError;
use crate::domain::{EventType, TenantId};
use crate::kafka::{folio_headers, idempotent_producer, Topics};

/// One event to publish. The envelope is built as `POST /pubsub/publish` completes it: a new
/// event id, `eventTTL` 1, `publishedDate` now.
#[derive(Debug, Clone)]
pub struct OutgoingEvent {
    pub event_type: String,
    /// The publishing module's id, e.g. `mod-inventory-20.0.0`.
    pub published_by: String,
    /// The payload, usually JSON text; delivered to HTTP subscribers as the request body.
    pub payload: String,
    /// The Kafka key (events with the same key stay in order); default: the event id.
    pub key: Option<String>,
    pub correlation_id: Option<String>,
    /// The `x-okapi-url` header; default: none.
    pub okapi_url: Option<String>,
}

impl OutgoingEvent {
    pub fn new(
        event_type: impl Into<String>,
        published_by: impl Into<String>,
        payload: impl Into<String>,
    ) -> Self {
        OutgoingEvent {
            event_type: event_type.into(),
            published_by: published_by.into(),
            payload: payload.into(),
            key: None,
            correlation_id: None,
            okapi_url: None,
        }
    }

    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    pub fn okapi_url(mut self, url: impl Into<String>) -> Self {
        self.okapi_url = Some(url.into());
        self
    }
}

/// Publishes events straight to Kafka, as `POST /pubsub/publish` would: topic
/// `{env}.Default.{tenant}.{eventType}`, the Event JSON envelope as value, the key, and the
/// headers `folio.tenantId`, `x-okapi-tenant` (and `x-okapi-url` when given). The producer is
/// idempotent with `acks=all`; every call returns once Kafka acknowledged.
pub struct DirectPublisher {
    producer: FutureProducer,
    topics: Topics,
    tenant: TenantId,
    timeout: Duration,
}

/// A record ready to send, owning its parts.
struct Prepared {
    id: String,
    topic: String,
    key: String,
    value: Vec<u8>,
    okapi_url: Option<String>,
}

impl DirectPublisher {
    /// `bootstrap`: Kafka's bootstrap servers; `env`: the `ENV` pubsub runs with; `tenant`: the
    /// tenant this publisher publishes for.
    pub fn new(bootstrap: &str, env: &str, tenant: &str) -> Result<Self, ClientError> {
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", bootstrap);
        Self::with_config(cfg, env, tenant)
    }

    /// As [`DirectPublisher::new`], with librdkafka settings of your own (security
    /// properties, for instance); the idempotence settings are applied on top. An event not
    /// acknowledged within `message.timeout.ms` (default here: 30 s) fails.
    pub fn with_config(cfg: ClientConfig, env: &str, tenant: &str) -> Result<Self, ClientError> {
        Self::with_topics(cfg, Topics::with_defaults(env), tenant)
    }

    /// As [`DirectPublisher::with_config`], with the topic names of a service configured with
    /// another namespace or a tenant collection.
    pub fn with_topics(
        mut cfg: ClientConfig,
        topics: Topics,
        tenant: &str,
    ) -> Result<Self, ClientError> {
        let tenant = TenantId::parse(tenant).map_err(|e| ClientError::Invalid(e.0))?;
        if cfg.get("message.timeout.ms").is_none() {
            cfg.set("message.timeout.ms", "30000");
        }
        let producer = idempotent_producer(&mut cfg)
            .create()
            .map_err(ClientError::Kafka)?;
        Ok(DirectPublisher {
            producer,
            topics,
            tenant,
            timeout: Duration::from_secs(10),
        })
    }

    /// How long an event may wait for room in the producer's queue (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The topic of an event type: `{env}.Default.{tenant}.{eventType}`.
    pub fn topic(&self, event_type: &str) -> Result<String, ClientError> {
        let t = EventType::parse(event_type)
            .map_err(|e| ClientError::Invalid(format!("eventType: {}", e.0)))?;
        Ok(self.topics.name(&self.tenant, &t).to_string())
    }

    /// Publishes one event and waits for Kafka's acknowledgement; returns the event id. `key`
    /// defaults to the event id, as on the HTTP path.
    pub async fn publish(
        &self,
        event_type: &str,
        published_by: &str,
        payload: &str,
        key: Option<&str>,
    ) -> Result<String, ClientError> {
        let mut event = OutgoingEvent::new(event_type, published_by, payload);
        event.key = key.map(str::to_owned);
        self.send(&event).await
    }

    /// Publishes one event and waits for Kafka's acknowledgement; returns the event id.
    pub async fn send(&self, event: &OutgoingEvent) -> Result<String, ClientError> {
        let prepared = self.prepare(event)?;
        self.deliver(&prepared).await?;
        Ok(prepared.id)
    }

    /// Publishes many events at once: every record is handed to the producer before any
    /// acknowledgement is awaited, so the batch costs about one round trip instead of one per
    /// event. Returns one result per event, in order (the event id, or why it failed); events
    /// with the same key keep their order on the topic. An invalid event fails alone.
    pub async fn send_batch(&self, events: &[OutgoingEvent]) -> Vec<Result<String, ClientError>> {
        // Enqueued one by one in order (so records with the same key keep their order), then
        // the acknowledgements are awaited together.
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let enqueued = match self.prepare(event) {
                Ok(p) => self.enqueue(&p).await.map(|ack| (p.id, p.topic, ack)),
                Err(e) => Err(e),
            };
            pending.push(enqueued);
        }
        join_all(pending.into_iter().map(|p| async move {
            let (id, topic, ack) = p?;
            Self::acknowledged(&topic, ack).await?;
            Ok(id)
        }))
        .await
    }

    fn prepare(&self, event: &OutgoingEvent) -> Result<Prepared, ClientError> {
        let topic = self.topic(&event.event_type)?;
        let id = uuid::Uuid::new_v4().to_string();
        let mut metadata = json!({
            "tenantId": self.tenant.as_str(),
            "eventTTL": 1,
            "publishedBy": event.published_by,
            "publishedDate": crate::event::now_string(),
        });
        if let Some(c) = &event.correlation_id {
            metadata["correlationId"] = json!(c);
        }
        let envelope = json!({
            "id": id,
            "eventType": event.event_type,
            "eventMetadata": metadata,
            "eventPayload": event.payload,
        });
        let value =
            serde_json::to_vec(&envelope).map_err(|e| ClientError::Invalid(e.to_string()))?;
        Ok(Prepared {
            key: event.key.clone().unwrap_or_else(|| id.clone()),
            id,
            topic,
            value,
            okapi_url: event.okapi_url.clone(),
        })
    }

    async fn deliver(&self, p: &Prepared) -> Result<(), ClientError> {
        let ack = self.enqueue(p).await?;
        Self::acknowledged(&p.topic, ack).await
    }

    /// Hands the record to the producer, waiting (up to the timeout) while its queue is full.
    async fn enqueue(&self, p: &Prepared) -> Result<DeliveryFuture, ClientError> {
        let headers = folio_headers(self.tenant.as_str(), p.okapi_url.as_deref());
        let mut record = FutureRecord::to(&p.topic)
            .key(&p.key)
            .payload(&p.value)
            .headers(headers);
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match self.producer.send_result(record) {
                Ok(ack) => return Ok(ack),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                    if tokio::time::Instant::now() < deadline =>
                {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((source, _)) => {
                    return Err(ClientError::Write {
                        topic: p.topic.to_string(),
                        source,
                    })
                }
            }
        }
    }

    async fn acknowledged(topic: &str, ack: DeliveryFuture) -> Result<(), ClientError> {
        match ack.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((source, _))) => Err(ClientError::Write {
                topic: topic.to_owned(),
                source,
            }),
            Err(_) => Err(ClientError::Dropped {
                topic: topic.to_owned(),
            }),
        }
    }
}
