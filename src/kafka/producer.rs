//! The one long-lived idempotent producer of the HTTP publish path.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{client_config, TopicName};
use crate::config::KafkaConfig;

/// Why a record was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka did not acknowledge the event within {0:?}")]
    Timeout(Duration),
    #[error("the event is larger than the broker accepts")]
    TooLarge,
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("Kafka: {0}")]
    Kafka(KafkaError),
}

/// A record to write: value, key and headers.
pub struct OutgoingRecord<'a> {
    pub topic: &'a TopicName,
    pub key: &'a str,
    pub value: &'a [u8],
    pub headers: Vec<(&'a str, &'a str)>,
}

/// Producer settings, chosen deliberately (see the README's Kafka section):
/// * `enable.idempotence=true`, `acks=all`: no duplicates from producer retries, no loss on
///   leader change;
/// * `linger.ms=0`: a publish is sent at once; under load librdkafka still batches what queues
///   up while a request is in flight (measured against tansu: ~16k/s at 16 in flight with 0,
///   ~2.6k/s with the default 5 ms when every publish awaits its acknowledgement);
/// * `message.timeout.ms` = `KAFKA_PUBLISH_TIMEOUT_MS`: the bound after which a publish is
///   answered 503;
/// * `message.max.bytes` = `MAX_REQUEST_SIZE` plus room for the envelope and headers;
/// * `topic.metadata.propagation.max.ms` = min(2000, half the publish timeout): a topic that
///   vanished (a wiped broker) is reported before the publish times out, so the publish path
///   can recreate it and retry; failed publishes also wake the topic reconciler.
pub struct EventProducer {
    producer: RwLock<Arc<FutureProducer>>,
    kafka: KafkaConfig,
    max_request_size: usize,
    /// Set by a failed send, cleared by a successful one.
    failing_since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl EventProducer {
    pub fn new(kafka: &KafkaConfig, max_request_size: usize) -> Result<Self, KafkaError> {
        let producer = Self::build(kafka, max_request_size)?;
        Ok(EventProducer {
            producer: RwLock::new(Arc::new(producer)),
            kafka: kafka.clone(),
            max_request_size,
            failing_since: std::sync::Mutex::new(None),
        })
    }

    fn build(kafka: &KafkaConfig, max_request_size: usize) -> Result<FutureProducer, KafkaError> {
        super::idempotent_producer(&mut client_config(kafka))
            .set(
                "message.timeout.ms",
                kafka.publish_timeout.as_millis().to_string(),
            )
            .set(
                "message.max.bytes",
                (max_request_size + 64 * 1024).to_string(),
            )
            .set(
                "topic.metadata.propagation.max.ms",
                (kafka.publish_timeout.as_millis() / 2)
                    .min(2000)
                    .to_string(),
            )
            .create()
    }

    fn current(&self) -> Arc<FutureProducer> {
        Arc::clone(&self.producer.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes one record and waits for the broker's acknowledgement (all in-sync replicas).
    pub async fn send(&self, record: &OutgoingRecord<'_>) -> Result<(i32, i64), PublishError> {
        let producer = self.current();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let fr = FutureRecord::to(record.topic.as_str())
            .key(record.key)
            .payload(record.value)
            .headers(headers);
        let timeout = self.kafka.publish_timeout;
        let sent = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            producer.send(fr, Timeout::After(timeout)),
        )
        .await;
        let result = match sent {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Ok(delivery)) => Ok((delivery.partition, delivery.offset)),
            Ok(Err((err, _))) => {
                self.replace_if_fatal(&producer);
                Err(classify(err, record.topic, timeout))
            }
        };
        let mut failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => *failing = None,
            Err(PublishError::TooLarge) => {}
            Err(_) => {
                failing.get_or_insert_with(std::time::Instant::now);
            }
        }
        result
    }

    /// Called when the broker is known to answer again (the reconciler just talked to it). A
    /// producer that kept failing across the outage may hold stale state (a producer id or
    /// topic metadata the restarted broker no longer knows): it is replaced by a fresh one.
    pub fn heal(&self) {
        let failing = *self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        if failing.is_none_or(|since| since.elapsed() < Duration::from_millis(500)) {
            return;
        }
        match Self::build(&self.kafka, self.max_request_size) {
            Ok(p) => {
                let old = std::mem::replace(
                    &mut *self.producer.write().unwrap_or_else(|e| e.into_inner()),
                    Arc::new(p),
                );
                *self.failing_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
                tracing::warn!("Kafka producer kept failing while the broker answers; replaced it");
                // Dropping a producer blocks briefly (purge, flush, join): not on this thread.
                std::thread::spawn(move || drop(old));
            }
            Err(e) => tracing::error!(error = %e, "could not create a new Kafka producer"),
        }
    }

    /// An idempotent producer that hit a fatal error is unusable: build a new one.
    fn replace_if_fatal(&self, failed: &Arc<FutureProducer>) {
        if let Some((code, reason)) = failed.client().fatal_error() {
            tracing::error!(?code, %reason, "Kafka producer hit a fatal error; replacing it");
            match Self::build(&self.kafka, self.max_request_size) {
                Ok(p) => {
                    let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
                    if Arc::ptr_eq(&slot, failed) {
                        *slot = Arc::new(p);
                    }
                }
                Err(e) => tracing::error!(error = %e, "could not create a new Kafka producer"),
            }
        }
    }

    /// Waits until queued records are delivered (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.current().flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "Kafka producer flush incomplete");
        }
    }
}

fn classify(err: KafkaError, topic: &TopicName, timeout: Duration) -> PublishError {
    match err.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::QueueFull,
        ) => PublishError::Timeout(timeout),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => PublishError::TooLarge,
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => PublishError::UnknownTopic(topic.to_string()),
        _ => PublishError::Kafka(err),
    }
}
