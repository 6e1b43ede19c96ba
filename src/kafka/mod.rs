//! Kafka: topic names, topic creation and the producer of the HTTP publish path.
//!
//! Every topic name is built from validated newtypes by [`Topics::name`], the same way as
//! folio-kafka-wrapper names them, so Java modules on that library, this service and the
//! direct-Kafka clients of this crate share topics.

#[cfg(feature = "server")]
pub mod admin;
#[cfg(feature = "server")]
pub mod producer;
#[cfg(feature = "server")]
pub mod reconciler;

use std::fmt;

use rdkafka::ClientConfig;

#[cfg(feature = "server")]
use crate::config::KafkaConfig;
use crate::domain::{EventType, TenantId};

/// A Kafka topic name: `{ENV}.{namespace}.{tenant or collection}.{eventType}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Builds topic names. `env`, `namespace` and the tenant collection are validated by the
/// configuration, tenant and event type by their newtypes; all are `[A-Za-z0-9_-]`, so the
/// result is a legal topic name of at most 64 + 64 + 31 + 100 + 3 characters (< 249).
#[derive(Debug, Clone)]
pub struct Topics {
    env: String,
    namespace: String,
    tenant_collection: Option<String>,
}

impl Topics {
    #[cfg(feature = "server")]
    pub fn new(env: &str, kafka: &KafkaConfig) -> Self {
        Topics {
            env: env.to_owned(),
            namespace: kafka.namespace.clone(),
            tenant_collection: kafka.tenant_collection.clone(),
        }
    }

    /// Names as folio-kafka-wrapper makes them by default: namespace `Default`, no tenant
    /// collection (for clients that know only `ENV`).
    pub fn with_defaults(env: &str) -> Self {
        Topics {
            env: env.to_owned(),
            namespace: "Default".to_owned(),
            tenant_collection: None,
        }
    }

    pub fn name(&self, tenant: &TenantId, event_type: &EventType) -> TopicName {
        let qualifier = self.tenant_collection.as_deref().unwrap_or(tenant.as_str());
        TopicName(format!(
            "{}.{}.{}.{}",
            self.env, self.namespace, qualifier, event_type
        ))
    }

    /// The tenant's dead-letter topic, `{ENV}.{namespace}.{tenant or collection}.mod-pubsub.dead-letters`.
    /// Its last part contains a `.`, so it is never an event type's topic.
    pub fn dead_letters(&self, tenant: &TenantId) -> TopicName {
        let qualifier = self.tenant_collection.as_deref().unwrap_or(tenant.as_str());
        TopicName(format!(
            "{}.{}.{}.mod-pubsub.dead-letters",
            self.env, self.namespace, qualifier
        ))
    }

    /// What a consumer of `event_type` subscribes to: the tenant's topic, or with no tenant
    /// the pattern of every tenant's.
    pub fn subscription(&self, tenant: Option<&TenantId>, event_type: &EventType) -> String {
        match tenant {
            Some(tenant) => self.name(tenant, event_type).to_string(),
            None => self.all_tenants_pattern(event_type),
        }
    }

    /// A regular expression matching the topics of `event_type` in every tenant (as the
    /// wrapper's `formatSubscriptionPattern`, but for any tenant id this service accepts).
    pub fn all_tenants_pattern(&self, event_type: &EventType) -> String {
        format!(
            "^{}\\.{}\\.[a-zA-Z0-9_]+\\.{}$",
            self.env, self.namespace, event_type
        )
    }
}

/// The headers folio-kafka-wrapper puts on an event record: `folio.tenantId`, `x-okapi-tenant`,
/// and `x-okapi-url` when there is one (the direct publisher's; the benches write the same).
pub fn folio_headers(tenant: &str, okapi_url: Option<&str>) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new_with_capacity(3)
        .insert(Header {
            key: "folio.tenantId",
            value: Some(tenant),
        })
        .insert(Header {
            key: "x-okapi-tenant",
            value: Some(tenant),
        });
    if let Some(url) = okapi_url {
        headers = headers.insert(Header {
            key: "x-okapi-url",
            value: Some(url),
        });
    }
    headers
}

/// The settings of every producer of events (the service's, the client's, the benches'):
/// idempotent, acknowledged by all in-sync replicas, sent at once (`linger.ms=0`: with records
/// awaited one by one, librdkafka's default 5 ms linger cut throughput about sixfold; batching
/// still happens under load).
pub fn idempotent_producer(cfg: &mut ClientConfig) -> &mut ClientConfig {
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
}

/// The settings of every at-least-once consumer (the delivery engine's, the client's, the
/// bare loop of the delivery bench): offsets are stored by hand once an event's outcome is
/// final and librdkafka commits the stored offsets every 500 ms (and on close), so a crash
/// repeats at most the events finished in the last half second and never skips one; a new
/// group starts at the earliest offset; an idle fetch waits at most `fetch_wait` (brokers that
/// hold every fetch to that maximum, like tansu, add it to each event's latency); at most
/// 16 MiB are prefetched (librdkafka's default is 64 MiB).
pub fn at_least_once_consumer<'a>(
    cfg: &'a mut ClientConfig,
    group: &str,
    fetch_wait: std::time::Duration,
) -> &'a mut ClientConfig {
    cfg.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "500")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        .set("queued.max.messages.kbytes", "16384")
}

/// The queue limits of a consumer that reads each partition on a queue of its own (the delivery
/// engine's fetchers; the delivery bench's bare loop): a partition that is not being read is
/// fetched only up to 1,000 records or 1 MiB, and one below them is fetched again 10 ms after
/// it drained (librdkafka's default of 1 s stalls a fast partition that was drained).
pub fn partition_queue_limits(cfg: &mut ClientConfig) -> &mut ClientConfig {
    cfg.set("queued.min.messages", "1000")
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.queue.backoff.ms", "10")
}

/// A record's headers as text (values that are not UTF-8 are converted lossily).
pub fn record_headers<M: rdkafka::message::Message>(
    msg: &M,
) -> std::collections::HashMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = std::collections::HashMap::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            if let Some(v) = header.value {
                out.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                );
            }
        }
    }
    out
}

/// The headers of a record written to a dead-letter topic: the original record's headers (but
/// earlier `pubsub.*` ones) and where and why it failed. The dead-letter endpoints read these.
pub fn dead_letter_headers(
    original: &std::collections::HashMap<String, String>,
    subscriber: &str,
    reason: &str,
    attempts: u32,
    (topic, partition, offset): (&str, i32, i64),
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = original
        .iter()
        .filter(|(k, _)| !k.starts_with("pubsub."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    out.extend(
        [
            ("pubsub.subscriber", subscriber.to_owned()),
            ("pubsub.reason", reason.to_owned()),
            ("pubsub.attempts", attempts.to_string()),
            ("pubsub.original-topic", topic.to_owned()),
            ("pubsub.original-partition", partition.to_string()),
            ("pubsub.original-offset", offset.to_string()),
            ("pubsub.dead-lettered-at", chrono::Utc::now().to_rfc3339()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    out
}

/// Base librdkafka configuration: bootstrap servers and the security properties.
#[cfg(feature = "server")]
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (k, v) in &kafka.client_properties {
        cfg.set(k, v);
    }
    cfg.set("client.id", "mod-pubsub");
    cfg
}

/// What the service holds of Kafka.
#[cfg(feature = "server")]
pub struct Kafka {
    pub topics: Topics,
    pub admin: admin::TopicAdmin,
    pub producer: producer::EventProducer,
    /// Asks the reconciler for a pass now (a publish failed: the broker may have lost topics).
    pub reconcile_now: tokio::sync::Notify,
    /// Registered topics the broker does not have yet, as far as this instance knows (a
    /// declaration whose topics could not be created, or the reconciler's last pass).
    missing: std::sync::Mutex<std::collections::BTreeSet<TopicName>>,
}

#[cfg(feature = "server")]
impl Kafka {
    /// Creates the clients (they connect lazily).
    pub fn new(config: &crate::Config) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(Kafka {
            topics: Topics::new(&config.env, &config.kafka),
            admin: admin::TopicAdmin::new(&config.kafka)?,
            producer: producer::EventProducer::new(&config.kafka, config.max_request_size)?,
            reconcile_now: tokio::sync::Notify::new(),
            missing: std::sync::Mutex::default(),
        })
    }

    /// How many registered topics are not created yet, and the first `first` of them (for
    /// `/admin/health` and the metrics).
    pub fn missing_topics(&self, first: usize) -> (usize, Vec<TopicName>) {
        let missing = self.missing.lock().unwrap_or_else(|e| e.into_inner());
        (missing.len(), missing.iter().take(first).cloned().collect())
    }

    /// Topics a declaration needs that could not be created now: the reconciler retries them.
    pub fn topics_still_missing(&self, topics: impl IntoIterator<Item = TopicName>) {
        self.missing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(topics);
        self.reconcile_now.notify_one();
    }

    fn set_missing(&self, topics: std::collections::BTreeSet<TopicName>) {
        *self.missing.lock().unwrap_or_else(|e| e.into_inner()) = topics;
    }

    /// The topics of `event_types` in `tenant`.
    pub fn topic_set<'a>(
        &self,
        tenant: &TenantId,
        event_types: impl IntoIterator<Item = &'a str>,
    ) -> std::collections::BTreeSet<TopicName> {
        event_types
            .into_iter()
            .filter_map(|t| EventType::parse(t).ok())
            .map(|t| self.topics.name(tenant, &t))
            .collect()
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn topics(extra: &[(&str, &str)]) -> Topics {
        let mut vars: HashMap<String, String> = [("SYSTEM_USER_CREATE", "false"), ("ENV", "folio")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let c = crate::Config::from_map(&vars).unwrap();
        Topics::new(&c.env, &c.kafka)
    }

    #[test]
    fn names_follow_folio_kafka_wrapper() {
        let t = TenantId::parse("fs09000000").unwrap();
        let e = EventType::parse("DI_RAW_RECORDS_CHUNK_PARSED").unwrap();
        assert_eq!(
            topics(&[]).name(&t, &e).as_str(),
            "folio.Default.fs09000000.DI_RAW_RECORDS_CHUNK_PARSED"
        );
        assert_eq!(
            topics(&[("KAFKA_PRODUCER_TENANT_COLLECTION", "ALL")])
                .name(&t, &e)
                .as_str(),
            "folio.Default.ALL.DI_RAW_RECORDS_CHUNK_PARSED"
        );
        assert_eq!(
            topics(&[("KAFKA_TOPIC_NAMESPACE", "pubsub")])
                .name(&t, &e)
                .as_str(),
            "folio.pubsub.fs09000000.DI_RAW_RECORDS_CHUNK_PARSED"
        );
    }
}
