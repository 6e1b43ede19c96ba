//! Topic creation with the configured partitions and replication factor.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::{client_config, TopicName};
use crate::config::KafkaConfig;

/// Why topics could not be made sure of.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("Kafka did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Kafka refused to create topic {topic}: {code}")]
    Refused {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

pub struct TopicAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    /// For the short-lived client of [`TopicAdmin::existing`].
    config: ClientConfig,
    partitions: i32,
    replication_factor: i32,
    timeout: Duration,
}

impl TopicAdmin {
    pub fn new(kafka: &KafkaConfig) -> Result<Self, KafkaError> {
        let config = client_config(kafka);
        let client = Arc::new(config.create()?);
        Ok(TopicAdmin {
            client,
            config,
            partitions: kafka.number_of_partitions,
            replication_factor: kafka.replication_factor,
            timeout: kafka.admin_timeout,
        })
    }

    /// Creates the topics that do not exist yet; an existing topic is fine. Fails after the
    /// configured admin timeout when the broker does not answer.
    pub async fn ensure(&self, topics: &BTreeSet<TopicName>) -> Result<(), TopicError> {
        if topics.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                NewTopic::new(
                    t.as_str(),
                    self.partitions,
                    TopicReplication::Fixed(self.replication_factor),
                )
            })
            .collect();
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.timeout))
            .request_timeout(Some(self.timeout));
        let results = tokio::time::timeout(
            self.timeout + Duration::from_millis(500),
            self.client.create_topics(&new, &opts),
        )
        .await
        .map_err(|_| TopicError::Timeout(self.timeout))??;
        for result in results {
            match result {
                Ok(name) => {
                    tracing::info!(topic = %name, partitions = self.partitions, replication_factor = self.replication_factor, "topic created")
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((
                    _,
                    RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::RequestTimedOut,
                )) => return Err(TopicError::Timeout(self.timeout)),
                Err((topic, code)) => return Err(TopicError::Refused { topic, code }),
            }
        }
        Ok(())
    }

    /// Names of the topics the broker has (for the reconciler and tests). Asked by a client of
    /// its own that is dropped afterwards: librdkafka keeps every topic of a full metadata
    /// answer in the asking client's cache (about 1 KiB a topic, 9 MiB at 1,000 tenants),
    /// which the long-lived admin client never needs.
    pub async fn existing(&self) -> Result<BTreeSet<String>, TopicError> {
        let config = self.config.clone();
        let timeout = self.timeout;
        // fetch_metadata blocks: keep it off the async workers.
        let names = tokio::task::spawn_blocking(move || -> Result<BTreeSet<String>, KafkaError> {
            let client: AdminClient<DefaultClientContext> = config.create()?;
            let md = client.inner().fetch_metadata(None, timeout)?;
            Ok(md.topics().iter().map(|t| t.name().to_owned()).collect())
        })
        .await
        .map_err(|_| TopicError::Timeout(self.timeout))??;
        Ok(names)
    }
}
