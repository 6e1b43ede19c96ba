//! Dead letters and replay: reading a tenant's dead-letter topic, redelivering from it, and
//! replaying a subscriber's topics from a point in time. None of these touch the delivery
//! consumer groups' positions: they read with consumers of their own (assigned partitions, no
//! commits), so they work whichever instance holds the groups' partitions.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use super::Engine;
use crate::audit::AuditState;
use crate::domain::TenantId;
use crate::event::Event;
use crate::kafka::record_headers;

const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// One record of a dead-letter topic.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    pub subscriber: String,
    pub reason: String,
    pub attempts: String,
    pub dead_lettered_at: String,
    pub original_topic: String,
    pub original_partition: String,
    pub original_offset: String,
    /// Position in the dead-letter topic.
    pub partition: i32,
    pub offset: i64,
    /// The Event envelope as published.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
    #[serde(skip)]
    pub key: String,
    #[serde(skip)]
    pub headers: HashMap<String, String>,
}

/// Why reading, redelivering or replaying dead letters failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("reading {0} did not finish in time")]
    ReadTimeout(String),
    #[error("replay of {0} stalled")]
    Stalled(String),
    #[error("stopped")]
    Stopped,
    #[error("not an Event envelope: {0}")]
    NotAnEvent(#[source] serde_json::Error),
    #[error("{subscriber} no longer subscribes to {event_type} in {tenant}")]
    NotSubscribed {
        subscriber: String,
        event_type: String,
        tenant: TenantId,
    },
    /// The callback failed (its status or transport error).
    #[error("{0}")]
    Delivery(String),
    #[error("a blocking Kafka task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

fn reader(engine: &Engine) -> Result<BaseConsumer, DeadLetterError> {
    crate::kafka::client_config(&engine.config.kafka)
        .set(
            "group.id",
            format!(
                "{}.mod-pubsub.reader.{}",
                engine.config.env,
                uuid::Uuid::new_v4().simple()
            ),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(DeadLetterError::from)
}

/// Reads every record of `topic` between the given start offsets and the current ends.
/// Blocking: call it off the async workers.
fn read_range(
    consumer: &BaseConsumer,
    topic: &str,
    start: &HashMap<i32, i64>,
) -> Result<Vec<rdkafka::message::OwnedMessage>, DeadLetterError> {
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for (&partition, &from) in start {
        let (_, high) = consumer.fetch_watermarks(topic, partition, READ_TIMEOUT)?;
        if high > from {
            ends.insert(partition, high);
            tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + READ_TIMEOUT * 3;
    let mut out = Vec::new();
    let mut done: BTreeSet<i32> = BTreeSet::new();
    while done.len() < ends.len() {
        if std::time::Instant::now() > deadline {
            return Err(DeadLetterError::ReadTimeout(topic.to_owned()));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        if msg.offset() + 1 >= ends[&msg.partition()] {
            done.insert(msg.partition());
        }
        out.push(msg.detach());
    }
    Ok(out)
}

/// The partitions of `topic` and their first offsets (all partitions from the beginning).
fn from_beginning(
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<HashMap<i32, i64>, DeadLetterError> {
    let md = consumer.fetch_metadata(Some(topic), READ_TIMEOUT)?;
    let mut out = HashMap::new();
    for t in md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
    {
        for p in t.partitions() {
            let (low, _) = consumer.fetch_watermarks(topic, p.id(), READ_TIMEOUT)?;
            out.insert(p.id(), low);
        }
    }
    Ok(out)
}

impl Engine {
    /// The tenant's dead letters, oldest first.
    pub async fn dead_letters(
        self: &Arc<Self>,
        tenant: &TenantId,
    ) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let topic = self.kafka.topics.dead_letters(tenant).to_string();
        let consumer = reader(self)?;
        let records = tokio::task::spawn_blocking(move || {
            let start = from_beginning(&consumer, &topic)?;
            read_range(&consumer, &topic, &start)
        })
        .await??;
        Ok(records
            .into_iter()
            .map(|m| {
                let headers = record_headers(&m);
                let event: serde_json::Value = m
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(serde_json::Value::Null);
                let h = |k: &str| headers.get(k).cloned().unwrap_or_default();
                DeadLetter {
                    event_id: event["id"].as_str().map(str::to_owned),
                    event_type: event["eventType"].as_str().map(str::to_owned),
                    subscriber: h("pubsub.subscriber"),
                    reason: h("pubsub.reason"),
                    attempts: h("pubsub.attempts"),
                    dead_lettered_at: h("pubsub.dead-lettered-at"),
                    original_topic: h("pubsub.original-topic"),
                    original_partition: h("pubsub.original-partition"),
                    original_offset: h("pubsub.original-offset"),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default(),
                    event,
                    headers,
                }
            })
            .collect())
    }

    /// Delivers a dead letter again, once, to its subscriber (if it still subscribes).
    pub async fn redeliver(
        &self,
        tenant: &TenantId,
        letter: &DeadLetter,
    ) -> Result<(), DeadLetterError> {
        let event: Event =
            serde_json::from_value(letter.event.clone()).map_err(DeadLetterError::NotAnEvent)?;
        let module = crate::domain::module_name(&letter.subscriber);
        let sub = self
            .registry
            .subscriber(tenant.as_str(), &event.event_type, module)
            .ok_or_else(|| DeadLetterError::NotSubscribed {
                subscriber: letter.subscriber.clone(),
                event_type: event.event_type.clone(),
                tenant: tenant.clone(),
            })?;
        let attempt: i32 = letter.attempts.parse::<i32>().unwrap_or(0) + 1;
        let result = self
            .post(tenant, &sub, &event, &letter.headers, attempt)
            .await
            .map_err(|f| DeadLetterError::Delivery(f.message));
        let (state, error) = match &result {
            Ok(()) => (AuditState::Delivered, None),
            Err(e) => (
                AuditState::Rejected,
                Some(format!("redelivery failed: {e}")),
            ),
        };
        self.audit
            .record(super::delivery_row(
                tenant,
                &event,
                &sub.module_id,
                state,
                Some(attempt),
                error,
            ))
            .await;
        result
    }

    /// The topics `module` subscribes to in `tenant`.
    pub fn subscribed_topics(&self, tenant: &TenantId, module: &str) -> BTreeSet<String> {
        self.subscription_topics()
            .into_iter()
            .filter(|(t, m, _)| t == tenant && m == module)
            .map(|(_, _, topic)| topic)
            .collect()
    }

    /// A consumer of a group of its own that commits nothing (a replay moves nobody's position).
    fn replay_consumer(&self) -> Result<StreamConsumer, DeadLetterError> {
        let group = format!(
            "{}.mod-pubsub.replay.{}",
            self.config.env,
            uuid::Uuid::new_v4().simple()
        );
        Ok(crate::kafka::client_config(&self.config.kafka)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set(
                "fetch.wait.max.ms",
                self.config.delivery.fetch_wait.as_millis().to_string(),
            )
            .create()?)
    }

    /// Delivers to `module` again every event of `tenant` on its topics published since `from`
    /// (with the usual retries and dead letters). Returns the number of records read.
    pub async fn replay(
        self: &Arc<Self>,
        tenant: &TenantId,
        module: &str,
        from: DateTime<Utc>,
        stop: &CancellationToken,
    ) -> Result<usize, DeadLetterError> {
        let topics = self.subscribed_topics(tenant, module);
        // One record at a time, through the same retries and dead letters as the module's
        // consumer.
        let pipeline = self.pipeline(Arc::default(), 1);
        let handler = super::ModuleHandler {
            engine: self.as_ref(),
            module,
        };
        let mut total = 0;
        for topic in topics {
            let consumer = Arc::new(self.replay_consumer()?);
            let (c, t) = (Arc::clone(&consumer), topic.clone());
            // Start offsets for the time, end offsets now; then assign.
            let ends =
                tokio::task::spawn_blocking(move || assign_from_time(&c, &t, from)).await??;
            let mut done = BTreeSet::new();
            while done.len() < ends.len() {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return Err(DeadLetterError::Stopped),
                    m = tokio::time::timeout(READ_TIMEOUT * 3, consumer.recv()) => {
                        m.map_err(|_| DeadLetterError::Stalled(topic.clone()))??
                    }
                };
                if msg.offset() + 1 >= ends[&msg.partition()] {
                    done.insert(msg.partition());
                }
                // Tenant-collection topics carry several tenants: replay only this one's.
                let of_tenant = record_headers(&msg)
                    .get("folio.tenantId")
                    .is_none_or(|t| t == tenant.as_str());
                if of_tenant {
                    let msg = msg.detach();
                    pipeline.process(&handler, &msg, stop).await;
                    total += 1;
                }
            }
        }
        Ok(total)
    }
}

/// Assigns `consumer` the partitions of `topic` that have records at or after `from`, each from
/// its first such record; returns their end offsets now (where the replay stops). Blocking: call
/// it off the async workers.
fn assign_from_time(
    consumer: &StreamConsumer,
    topic: &str,
    from: DateTime<Utc>,
) -> Result<HashMap<i32, i64>, DeadLetterError> {
    let md = consumer.fetch_metadata(Some(topic), READ_TIMEOUT)?;
    let mut by_time = TopicPartitionList::new();
    for p in md
        .topics()
        .iter()
        .filter(|x| x.name() == topic)
        .flat_map(|x| x.partitions())
    {
        // Kafka reads negative times as special offsets; before 1970 means everything.
        let at = Offset::Offset(from.timestamp_millis().max(0));
        by_time.add_partition_offset(topic, p.id(), at)?;
    }
    let starts = consumer.offsets_for_times(by_time, READ_TIMEOUT)?;
    let mut assign = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for e in starts.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), READ_TIMEOUT)?;
        let start = match e.offset() {
            Offset::Offset(o) => o,
            _ => high, // nothing at or after `from`
        }
        .max(low);
        if high > start {
            assign.add_partition_offset(topic, e.partition(), Offset::Offset(start))?;
            ends.insert(e.partition(), high);
        }
    }
    consumer.assign(&assign)?;
    Ok(ends)
}
