//! The direct-Kafka client: modules register through pubsub's REST API (which creates the
//! topics) and then publish to and consume from Kafka directly, with exactly the topic names,
//! envelope, key and headers of the HTTP publish path, so Java modules on folio-kafka-wrapper,
//! pubsub's delivery engine and these clients all share the same topics.
//!
//! Use it without the server's dependencies:
//!
//! ```toml
//! [dependencies]
//! mod-pubsub = { git = "…", default-features = false, features = ["client"] }
//! ```
//!
//! # Registering
//!
//! [`Registrar`] registers a module's `MessagingDescriptor.json` at tenant init, in the Java
//! client's order; pubsub creates the topics (and the tenant's dead-letter topic).
//!
//! ```no_run
//! # async fn example() -> Result<(), mod_pubsub::client::ClientError> {
//! use mod_pubsub::client::{MessagingDescriptor, Registrar};
//!
//! let descriptor = MessagingDescriptor::from_file("MessagingDescriptor.json".as_ref())?;
//! let registrar = Registrar::new("http://okapi:9130", "diku", Some("okapi-token".into()));
//! registrar.register("mod-circulation-24.0.0", &descriptor).await?;
//! # Ok(()) }
//! ```
//!
//! A subscription without `callbackAddress` declares a *direct consumer*: pubsub records it (so
//! `GET /pubsub/messaging-modules` shows who consumes what) and creates its topic, but never
//! pushes to it.
//!
//! # Publishing
//!
//! [`DirectPublisher`] awaits Kafka's acknowledgement of every event; [`DirectPublisher::send_batch`]
//! sends many at once and awaits them together.
//!
//! ```no_run
//! # async fn example() -> Result<(), mod_pubsub::client::ClientError> {
//! use mod_pubsub::client::{DirectPublisher, OutgoingEvent};
//!
//! let publisher = DirectPublisher::new("kafka:9092", "folio", "diku")?;
//! let payload = serde_json::json!({"loanId": "…"}).to_string();
//! let id = publisher
//!     .publish("ITEM_CHECKED_OUT", "mod-circulation-24.0.0", &payload, None)
//!     .await?;
//!
//! let batch: Vec<OutgoingEvent> = (0..100)
//!     .map(|i| {
//!         OutgoingEvent::new("DI_COMPLETED", "mod-inventory-20.0.0", format!("{{\"n\":{i}}}"))
//!             .key("job-42")
//!             .correlation_id("job-42")
//!     })
//!     .collect();
//! for result in publisher.send_batch(&batch).await {
//!     result?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Consuming
//!
//! [`DirectConsumer`] consumes event types of one tenant or of every tenant with an async
//! handler: up to [`ConsumerOptions::max_in_flight`] handler calls at once (events with the
//! same key one after another), each partition read on its own with at most that many
//! unfinished records, so a partition whose records fail or are slow never holds up the
//! others; an offset is committed only when every record before it is finished; a failing
//! handler is retried after the waits of [`ConsumerOptions::retry_schedule`], then the record
//! goes to the tenant's dead-letter topic. It runs on the same consumer core as pubsub's
//! delivery engine.
//!
//! ```no_run
//! # async fn example() -> Result<(), mod_pubsub::client::ClientError> {
//! use mod_pubsub::client::{ConsumerOptions, DirectConsumer};
//! use tokio_util::sync::CancellationToken;
//!
//! let options = ConsumerOptions { max_in_flight: 32, ..ConsumerOptions::default() };
//! let consumer = DirectConsumer::with_options(
//!     "kafka:9092", "folio", "mod-patron-blocks", None, &["ITEM_CHECKED_OUT"], options,
//! )?;
//! let stop = CancellationToken::new();
//! consumer
//!     .run(
//!         |received| async move {
//!             println!("{} {}", received.tenant, received.event.id.0);
//!             Ok::<(), String>(())
//!         },
//!         stop,
//!     )
//!     .await?;
//! # Ok(()) }
//! ```

mod consumer;
pub(crate) mod dispatch;
mod okapi;
mod publisher;

pub use consumer::{ConsumerOptions, ConsumerStats, DirectConsumer, ReceivedEvent};
pub use okapi::Okapi;
pub use publisher::{DirectPublisher, OutgoingEvent};

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

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
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Writing to `topic` failed.
    #[error("Kafka: {topic}: {source}")]
    Write {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    /// The service's dead-letter writer failed (topic creation or the write).
    #[error("Kafka: {0}")]
    Sink(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The producer went away before Kafka acknowledged a record for `topic`.
    #[error("Kafka: {topic}: the producer was dropped before Kafka acknowledged")]
    Dropped { topic: String },
}

impl ClientError {
    /// Whether Kafka did not acknowledge a record in time (unreachable, or no such topic).
    pub fn is_timeout(&self) -> bool {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        matches!(
            self,
            ClientError::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut
            )) | ClientError::Write {
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
                ..
            }
        )
    }
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
    okapi: Okapi,
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
            okapi: Okapi::new(http, okapi_url),
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
        let resp = self
            .okapi
            .request(
                reqwest::Method::POST,
                path,
                &self.tenant,
                self.token.as_deref(),
            )
            .json(body)
            .send()
            .await
            .map_err(|source| ClientError::Transport {
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

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    #[test]
    fn timeouts_are_told_apart_by_their_code() {
        let timed_out = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let write = |source| ClientError::Write {
            topic: "t".into(),
            source,
        };
        assert!(write(timed_out.clone()).is_timeout());
        assert!(ClientError::Kafka(timed_out).is_timeout());
        assert!(!write(too_large).is_timeout());
        assert!(!ClientError::Dropped { topic: "t".into() }.is_timeout());
    }
}
