//! The direct-Kafka client: modules register through pubsub's REST API (which creates the
//! topics) and then publish straight to Kafka, with exactly the topic names, envelope, key and
//! headers of the HTTP publish path.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use mod_pubsub::client::{DirectPublisher, MessagingDescriptor, Registrar};
//!
//! let descriptor = MessagingDescriptor::from_file("MessagingDescriptor.json".as_ref())?;
//! let registrar = Registrar::new("http://okapi:9130", "diku", Some("okapi-token".into()));
//! registrar.register("mod-circulation-24.0.0", &descriptor).await?;
//!
//! let publisher = DirectPublisher::new("kafka:9092", "folio", "diku")?;
//! let payload = serde_json::json!({"loanId": "…"}).to_string();
//! publisher.publish("ITEM_CHECKED_OUT", "mod-circulation-24.0.0", &payload, None).await?;
//! # Ok(()) }
//! ```
//!
//! [`DirectConsumer`] consumes event types of one tenant or of all tenants with an async
//! handler: the offset is stored after the handler succeeded, failures are retried and then
//! dead-lettered.
//!
//! Still to come (issue 5): a cargo feature without the server's dependencies, batch publishing,
//! more than one record in flight with pause/resume back-pressure, the CLI.

use std::path::Path;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::domain::{EventType, TenantId};
use crate::kafka::{at_least_once_consumer, idempotent_producer, Topics};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid messaging descriptor: {0}")]
    Descriptor(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("pubsub answered {status} to {call}: {body}")]
    Refused {
        call: String,
        status: u16,
        body: String,
    },
    #[error("pubsub did not answer {call}: {source}")]
    Transport {
        call: String,
        source: reqwest::Error,
    },
    #[error("Kafka: {0}")]
    Kafka(String),
}

/// A module's `MessagingDescriptor.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagingDescriptor {
    pub publications: Vec<serde_json::Value>,
    pub subscriptions: Vec<Subscription>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subscription {
    pub event_type: String,
    /// Absent: the module consumes the topic directly; pubsub never pushes to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_address: Option<String>,
}

impl MessagingDescriptor {
    pub fn from_file(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Descriptor(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Descriptor(format!("{}: {e}", path.display())))
    }
}

/// Registers modules through pubsub's REST API (through Okapi).
pub struct Registrar {
    http: reqwest::Client,
    base: String,
    tenant: String,
    token: Option<String>,
}

impl Registrar {
    pub fn new(okapi_url: &str, tenant: &str, token: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        Registrar {
            http,
            base: okapi_url.trim_end_matches('/').to_owned(),
            tenant: tenant.to_owned(),
            token,
        }
    }

    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        expect: u16,
    ) -> Result<(), ClientError> {
        let call = format!("POST {path}");
        let mut r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("X-Okapi-Tenant", &self.tenant)
            .header("X-Okapi-Url", &self.base)
            .json(body);
        if let Some(t) = &self.token {
            r = r.header("X-Okapi-Token", t);
        }
        let resp = r.send().await.map_err(|source| ClientError::Transport {
            call: call.clone(),
            source,
        })?;
        let status = resp.status().as_u16();
        if status == expect {
            Ok(())
        } else {
            Err(ClientError::Refused {
                call,
                status,
                body: resp.text().await.unwrap_or_default(),
            })
        }
    }

    /// The Java client's order: every publication as an event type, then the publisher
    /// declaration, then the subscriber declaration. Idempotent. Returns false when there was
    /// nothing to register.
    pub async fn register(
        &self,
        module_id: &str,
        descriptor: &MessagingDescriptor,
    ) -> Result<bool, ClientError> {
        if descriptor.publications.is_empty() && descriptor.subscriptions.is_empty() {
            return Ok(false);
        }
        if !descriptor.publications.is_empty() {
            for p in &descriptor.publications {
                self.post("/pubsub/event-types", p, 201).await?;
            }
            let body = json!({"moduleId": module_id, "eventDescriptors": descriptor.publications});
            self.post("/pubsub/event-types/declare/publisher", &body, 201)
                .await?;
        }
        if !descriptor.subscriptions.is_empty() {
            let body =
                json!({"moduleId": module_id, "subscriptionDefinitions": descriptor.subscriptions});
            self.post("/pubsub/event-types/declare/subscriber", &body, 201)
                .await?;
        }
        Ok(true)
    }
}

/// Publishes events straight to Kafka, as `POST /pubsub/publish` would.
pub struct DirectPublisher {
    producer: FutureProducer,
    topics: Topics,
    tenant: TenantId,
    timeout: Duration,
}

impl DirectPublisher {
    /// `bootstrap`: Kafka's bootstrap servers; `env`: the `ENV` pubsub runs with.
    pub fn new(bootstrap: &str, env: &str, tenant: &str) -> Result<Self, ClientError> {
        let tenant = TenantId::parse(tenant).map_err(|e| ClientError::Invalid(e.0))?;
        let producer = idempotent_producer(ClientConfig::new().set("bootstrap.servers", bootstrap))
            .create()
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        Ok(DirectPublisher {
            producer,
            topics: Topics::with_defaults(env),
            tenant,
            timeout: Duration::from_secs(10),
        })
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
        let topic = self.topic(event_type)?;
        let id = uuid::Uuid::new_v4().to_string();
        let envelope = json!({
            "id": id,
            "eventType": event_type,
            "eventMetadata": {"tenantId": self.tenant.as_str(), "eventTTL": 1, "publishedBy": published_by,
                              "publishedDate": crate::event::now_string()},
            "eventPayload": payload,
        });
        let value =
            serde_json::to_vec(&envelope).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "folio.tenantId",
                value: Some(self.tenant.as_str()),
            })
            .insert(Header {
                key: "x-okapi-tenant",
                value: Some(self.tenant.as_str()),
            });
        let record = FutureRecord::to(&topic)
            .key(key.unwrap_or(&id))
            .payload(&value)
            .headers(headers);
        self.producer
            .send(record, Timeout::After(self.timeout))
            .await
            .map_err(|(e, _)| ClientError::Kafka(e.to_string()))?;
        Ok(id)
    }
}

/// An event as a direct consumer receives it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub tenant: String,
    pub topic: String,
    pub key: Option<String>,
    /// The Event envelope.
    pub event: crate::event::Event,
    pub headers: std::collections::HashMap<String, String>,
}

/// Consumes event types straight from Kafka, one record at a time per consumer (so events of one
/// partition key stay in order): the handler's success stores the offset (committed every
/// 500 ms); a failure is retried after the waits of `retry_schedule`, then the record goes to the
/// tenant's dead-letter topic (`{env}.Default.{tenant}.mod-pubsub.dead-letters`, with the same
/// headers as the delivery engine's) and the consumer moves on.
pub struct DirectConsumer {
    consumer: rdkafka::consumer::StreamConsumer,
    producer: FutureProducer,
    topics: Topics,
    module: String,
    pub retry_schedule: Vec<Duration>,
}

impl DirectConsumer {
    /// `module`: the consuming module's name (the consumer group is `{env}.{module}`); `tenant`:
    /// one tenant, or `None` for every tenant (a regular-expression subscription).
    pub fn new(
        bootstrap: &str,
        env: &str,
        module: &str,
        tenant: Option<&str>,
        event_types: &[&str],
    ) -> Result<Self, ClientError> {
        use rdkafka::consumer::Consumer;
        let naming = Topics::with_defaults(env);
        let tenant = tenant
            .map(|t| TenantId::parse(t).map_err(|e| ClientError::Invalid(e.0)))
            .transpose()?;
        let mut topics = Vec::new();
        for t in event_types {
            let e = EventType::parse(t)
                .map_err(|e| ClientError::Invalid(format!("eventType: {}", e.0)))?;
            topics.push(match &tenant {
                Some(tenant) => naming.name(tenant, &e).to_string(),
                None => naming.all_tenants_pattern(&e),
            });
        }
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", bootstrap);
        let consumer: rdkafka::consumer::StreamConsumer = at_least_once_consumer(
            &mut cfg,
            &format!("{env}.{module}"),
            Duration::from_millis(20),
        )
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create()
        .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let producer = idempotent_producer(ClientConfig::new().set("bootstrap.servers", bootstrap))
            .create()
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        Ok(DirectConsumer {
            consumer,
            producer,
            topics: naming,
            module: module.to_owned(),
            retry_schedule: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
        })
    }

    /// Handles records until `stop` is cancelled.
    pub async fn run<F, Fut>(
        &self,
        handler: F,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<(), ClientError>
    where
        F: Fn(ReceivedEvent) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        use rdkafka::consumer::Consumer;
        use rdkafka::message::Message;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                m = self.consumer.recv() => m.map_err(|e| ClientError::Kafka(e.to_string()))?,
            };
            let headers = crate::delivery::record_headers(&msg);
            let parsed = msg
                .payload()
                .map(serde_json::from_slice::<crate::event::Event>);
            let mut reason = String::new();
            let mut attempts = 0;
            if let Some(Ok(event)) = parsed {
                let tenant = headers
                    .get("folio.tenantId")
                    .cloned()
                    .unwrap_or_else(|| event.event_metadata.tenant_id.clone());
                let received = ReceivedEvent {
                    tenant,
                    topic: msg.topic().to_owned(),
                    key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    event,
                    headers: headers.clone(),
                };
                for wait in self
                    .retry_schedule
                    .iter()
                    .map(Some)
                    .chain(std::iter::once(None))
                {
                    attempts += 1;
                    match handler(received.clone()).await {
                        Ok(()) => {
                            reason.clear();
                            break;
                        }
                        Err(e) => reason = e,
                    }
                    match wait {
                        Some(w) => tokio::select! {
                            _ = stop.cancelled() => return Ok(()), // not stored: handled again later
                            _ = tokio::time::sleep(*w) => {}
                        },
                        None => break,
                    }
                }
            } else {
                reason = "not an Event envelope".to_owned();
            }
            if !reason.is_empty() {
                let tenant = headers
                    .get("folio.tenantId")
                    .cloned()
                    .or_else(|| msg.topic().split('.').nth(2).map(str::to_owned))
                    .unwrap_or_default();
                let tenant = TenantId::parse(&tenant).map_err(|e| {
                    ClientError::Invalid(format!(
                        "record without a valid tenant ({tenant}): {}",
                        e.0
                    ))
                })?;
                let dlq = self.topics.dead_letters(&tenant).to_string();
                let (partition, offset, attempts) = (
                    msg.partition().to_string(),
                    msg.offset().to_string(),
                    attempts.to_string(),
                );
                let mut out = OwnedHeaders::new();
                for (k, v) in headers.iter().filter(|(k, _)| !k.starts_with("pubsub.")) {
                    out = out.insert(Header {
                        key: k,
                        value: Some(v.as_str()),
                    });
                }
                for (k, v) in [
                    ("pubsub.subscriber", self.module.as_str()),
                    ("pubsub.reason", reason.as_str()),
                    ("pubsub.attempts", attempts.as_str()),
                    ("pubsub.original-topic", msg.topic()),
                    ("pubsub.original-partition", partition.as_str()),
                    ("pubsub.original-offset", offset.as_str()),
                ] {
                    out = out.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let key = msg
                    .key()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default();
                let record = FutureRecord::to(&dlq)
                    .key(&key)
                    .payload(msg.payload().unwrap_or_default())
                    .headers(out);
                self.producer
                    .send(record, Timeout::After(Duration::from_secs(30)))
                    .await
                    .map_err(|(e, _)| ClientError::Kafka(e.to_string()))?;
            }
            self.consumer
                .store_offset_from_message(&msg)
                .map_err(|e| ClientError::Kafka(e.to_string()))?;
        }
    }
}
