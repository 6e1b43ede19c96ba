//! The delivery engine: pushes events to subscribers' callbacks through Okapi, at least once.
//!
//! * One Kafka consumer group per subscriber **module** (`{ENV}.mod-pubsub.{module name}`,
//!   without the version, so an upgrade keeps the position), subscribed to the topics of every
//!   (tenant, event type) the module subscribes to. A subscriber that is down or slow only holds
//!   up its own group. Instances of this service share each group's partitions.
//! * Records are handled one at a time per consumer, so events of one partition (one partition
//!   key) reach a subscriber in order, retries included.
//! * An offset is committed only after its event was delivered, dead-lettered or found to be
//!   none of this subscriber's business; a crash before that means redelivery, never loss.
//! * Failed attempts are retried after the configured waits (±20 % jitter; `Retry-After` of a
//!   429 or 503 is honoured); when they are exhausted, or the event's `eventTTL` has passed, the
//!   event goes to the tenant's dead-letter topic `{ENV}.{namespace}.{tenant}.mod-pubsub.dead-letters`
//!   with headers saying who, why and where from, and a REJECTED audit row.
//! * Any 2xx answer counts as delivered (the Java module counted only 200, 201 and 204).

pub mod dead_letters;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::Timestamp;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditItem, AuditRecord, AuditState, AuditWriter};
use crate::config::Config;
use crate::domain::{EventType, TenantId};
use crate::event::Event;
use crate::kafka::producer::OutgoingRecord;
use crate::kafka::record_headers;
use crate::kafka::Kafka;
use crate::registry::{RegistryCache, Subscriber};

/// Events a little older than the registration are still delivered (clock skew).
const SINCE_GRACE: chrono::Duration = chrono::Duration::seconds(2);

/// A running per-module consumer: its topics, its stop token, its task.
type Worker = (
    watch::Sender<BTreeSet<String>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
);

pub struct Engine {
    pub config: Arc<Config>,
    pub kafka: Arc<Kafka>,
    pub registry: RegistryCache,
    pub audit: AuditWriter,
    pub http: reqwest::Client,
    pub tokens: Arc<crate::system_user::Tokens>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        kafka: Arc<Kafka>,
        registry: RegistryCache,
        audit: AuditWriter,
        tokens: Arc<crate::system_user::Tokens>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.delivery.connect_timeout)
            .timeout(config.delivery.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Engine {
            metrics,
            tokens,
            config,
            kafka,
            registry,
            audit,
            http,
        })
    }

    /// module name → topics it needs, from the registrations.
    fn desired(&self) -> HashMap<String, BTreeSet<String>> {
        let mut out: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (_, module, topic) in self.subscription_topics() {
            out.entry(module).or_default().insert(topic);
        }
        out
    }

    /// (tenant, subscriber module name, topic) of every pushed-to subscription.
    fn subscription_topics(&self) -> Vec<(TenantId, String, String)> {
        self.registry
            .all_subscriptions()
            .into_iter()
            .filter_map(|(tenant, event_type, sub)| {
                let (t, e) = (
                    TenantId::parse(&tenant).ok()?,
                    EventType::parse(&event_type).ok()?,
                );
                let topic = self.kafka.topics.name(&t, &e).to_string();
                Some((t, sub.module_name().to_owned(), topic))
            })
            .collect()
    }

    /// Runs until `stop`: keeps one worker per subscriber module, following registrations.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.registry.changes();
        let mut workers: HashMap<String, Worker> = HashMap::new();
        tracing::info!("delivery engine started");
        loop {
            let desired = self.desired();
            tracing::debug!(
                modules = desired.len(),
                "delivery engine follows the registrations"
            );
            let gone: Vec<String> = workers
                .keys()
                .filter(|m| !desired.contains_key(*m))
                .cloned()
                .collect();
            for module in gone {
                if let Some((_, token, handle)) = workers.remove(&module) {
                    tracing::info!(%module, "no subscriptions left; stopping its consumer");
                    token.cancel();
                    let _ = handle.await;
                }
            }
            for (module, topics) in desired {
                match workers.get(&module) {
                    Some((tx, _, _)) => {
                        tx.send_if_modified(|current| {
                            let changed = *current != topics;
                            *current = topics.clone();
                            changed
                        });
                    }
                    None => {
                        let (tx, rx) = watch::channel(topics);
                        let token = stop.child_token();
                        let handle = tokio::spawn(Arc::clone(&self).worker(
                            module.clone(),
                            rx,
                            token.clone(),
                        ));
                        workers.insert(module, (tx, token, handle));
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = changes.changed() => if changed.is_err() { break },
            }
        }
        for (_, (_, token, handle)) in workers {
            token.cancel();
            let _ = handle.await;
        }
    }

    /// The consumer group of a subscriber module.
    fn group(&self, module: &str) -> String {
        format!("{}.mod-pubsub.{module}", self.config.env)
    }

    fn consumer(&self, module: &str) -> anyhow::Result<StreamConsumer> {
        let retry_total: Duration = self.config.delivery.retry_schedule.iter().sum::<Duration>()
            + self.config.delivery.timeout * (self.config.delivery.retry_schedule.len() as u32 + 1);
        let max_poll = (retry_total * 2)
            .max(Duration::from_secs(300))
            .min(Duration::from_secs(86_400));
        let mut cfg = crate::kafka::client_config(&self.config.kafka);
        let consumer: StreamConsumer = crate::kafka::at_least_once_consumer(
            &mut cfg,
            &self.group(module),
            self.config.delivery.fetch_wait,
        )
        .set("topic.metadata.refresh.interval.ms", "10000")
        .set("max.poll.interval.ms", max_poll.as_millis().to_string())
        .create()?;
        Ok(consumer)
    }

    async fn worker(
        self: Arc<Self>,
        module: String,
        mut topics: watch::Receiver<BTreeSet<String>>,
        stop: CancellationToken,
    ) {
        let consumer = match self.consumer(&module) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(%module, error = %e, "cannot create the delivery consumer");
                return;
            }
        };
        let subscribe = |set: &BTreeSet<String>| {
            let names: Vec<&str> = set.iter().map(String::as_str).collect();
            if let Err(e) = consumer.subscribe(&names) {
                tracing::error!(%module, error = %e, "subscribe failed");
            }
            tracing::info!(%module, topics = ?names, "delivery consumer subscribed");
        };
        subscribe(&topics.borrow_and_update());
        let group = self.group(&module);
        let mut lag_tick = tokio::time::interval(LAG_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = lag_tick.tick() => {
                    let c = Arc::clone(&consumer);
                    if let Ok(Some(lag)) = tokio::task::spawn_blocking(move || lag(&c)).await {
                        self.metrics.consumer_lag.get_or_create(&crate::metrics::GroupLabels { group: group.clone() }).set(lag);
                    }
                }
                changed = topics.changed() => {
                    if changed.is_err() { break }
                    subscribe(&topics.borrow_and_update());
                }
                received = consumer.recv() => match received {
                    Ok(msg) => {
                        if self.handle(&module, &msg, &stop).await {
                            if let Err(e) = consumer.store_offset_from_message(&msg) {
                                tracing::warn!(%module, error = %e, "could not store offset; the event may be delivered again");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%module, error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%module, error = %e, "final commit");
        }
        tracing::info!(%module, "delivery consumer stopped");
    }

    /// Handles one record; returns whether its offset may be committed (false only when
    /// stopping interrupted it: it will be delivered again).
    async fn handle(
        &self,
        module: &str,
        msg: &BorrowedMessage<'_>,
        stop: &CancellationToken,
    ) -> bool {
        let topic = msg.topic();
        let headers = record_headers(msg);
        let event: Event = match msg.payload().map(serde_json::from_slice::<Event>) {
            Some(Ok(e)) => e,
            other => {
                let reason = match other {
                    Some(Err(e)) => format!("not an Event envelope: {e}"),
                    _ => "empty record".to_owned(),
                };
                let tenant = headers
                    .get("folio.tenantId")
                    .and_then(|t| TenantId::parse(t).ok());
                tracing::error!(%module, topic, offset = msg.offset(), %reason, "unreadable record");
                return match tenant {
                    Some(t) => {
                        self.dead_letter(&t, module, msg, &headers, &reason, 0, stop)
                            .await
                    }
                    // No tenant to file it under: logged above, skipped.
                    None => true,
                };
            }
        };
        let tenant_raw = headers
            .get("folio.tenantId")
            .cloned()
            .unwrap_or_else(|| event.event_metadata.tenant_id.clone());
        let Ok(tenant) = TenantId::parse(&tenant_raw) else {
            tracing::error!(%module, topic, tenant = %tenant_raw, event_id = %event.id.0, "record with an invalid tenant id skipped");
            return true;
        };
        let Some(sub) = self
            .registry
            .subscriber(tenant.as_str(), &event.event_type, module)
        else {
            return true; // this module does not subscribe to it in this tenant
        };
        if let Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) = msg.timestamp() {
            if chrono::DateTime::from_timestamp_millis(ms)
                .is_some_and(|t| t < sub.since - SINCE_GRACE)
            {
                return true; // published before the module subscribed
            }
        }
        let audit = |state, attempt, error: Option<String>| {
            delivery_row(&tenant, &event, &sub.module_id, state, attempt, error)
        };
        self.audit
            .record(audit(AuditState::Received, None, None))
            .await;

        let schedule = &self.config.delivery.retry_schedule;
        let mut reason = String::new();
        for attempt in 1..=(schedule.len() as i32 + 1) {
            if expired(&event, msg.timestamp()) {
                reason = format!(
                    "eventTTL of {} minutes has passed",
                    event.event_metadata.event_ttl
                );
                break;
            }
            match self.post(&tenant, &sub, &event, &headers, attempt).await {
                Ok(()) => {
                    tracing::debug!(%tenant, subscriber = %sub.module_id, event_id = %event.id.0, attempt, offset = msg.offset(), "delivered");
                    let labels = crate::metrics::Metrics::event(&event.event_type);
                    self.metrics.delivered.get_or_create(&labels).inc();
                    if let Some(published) = event
                        .event_metadata
                        .published_date
                        .as_deref()
                        .and_then(crate::event::parse_date_time)
                    {
                        let seconds = (Utc::now() - published.with_timezone(&Utc))
                            .num_milliseconds()
                            .max(0) as f64
                            / 1000.0;
                        self.metrics
                            .delivery_latency
                            .get_or_create(&labels)
                            .observe(seconds);
                    }
                    self.audit
                        .record(audit(AuditState::Delivered, Some(attempt), None))
                        .await;
                    return true;
                }
                Err(failure) => {
                    let labels = crate::metrics::Metrics::event(&event.event_type);
                    self.metrics.delivery_failed.get_or_create(&labels).inc();
                    if (attempt as usize) <= schedule.len() {
                        self.metrics.retried.get_or_create(&labels).inc();
                    }
                    reason = failure.message.clone();
                    self.audit
                        .record(audit(
                            AuditState::Rejected,
                            Some(attempt),
                            Some(failure.message),
                        ))
                        .await;
                    let Some(wait) = schedule.get(attempt as usize - 1) else {
                        break;
                    };
                    let wait = failure.retry_after.unwrap_or_else(|| jitter(*wait));
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let attempts = schedule.len() as i32 + 1;
        let done = self
            .dead_letter(
                &tenant,
                &sub.module_id,
                msg,
                &headers,
                &reason,
                attempts,
                stop,
            )
            .await;
        if done {
            self.metrics
                .dead_lettered
                .get_or_create(&crate::metrics::Metrics::event(&event.event_type))
                .inc();
            self.audit
                .record(audit(
                    AuditState::Rejected,
                    None,
                    Some(format!("dead-lettered: {reason}")),
                ))
                .await;
        }
        done
    }

    async fn post(
        &self,
        tenant: &TenantId,
        sub: &Subscriber,
        event: &Event,
        headers: &HashMap<String, String>,
        attempt: i32,
    ) -> Result<(), Failure> {
        let base = self.config.okapi_url.as_str().trim_end_matches('/');
        let url = format!("{base}{}", sub.callback);
        // Java modules write okapi-common's spelling (`X-Okapi-Request-Id`) as often as the
        // lower-case one; folio-kafka-wrapper matches these names case-insensitively too.
        let request_id = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-okapi-request-id"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let body = event
            .event_payload
            .clone()
            .unwrap_or_else(|| "null".to_owned());
        // A 401 means the cached token is no good: log in again, once, and retry at once.
        let mut relogged = false;
        let sent = loop {
            let token = self.tokens.token(tenant).await.map_err(|e| Failure {
                message: format!(
                    "{} event with id '{}' was not delivered to {}: {e}",
                    event.event_type, event.id.0, sub.callback
                ),
                retry_after: None,
            })?;
            let mut request = self
                .http
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Accept", "application/json, text/plain")
                .header("X-Okapi-Tenant", tenant.as_str())
                .header("X-Okapi-Url", base)
                .header("X-Okapi-Request-Id", &request_id)
                .header("X-Pubsub-Event-Id", event.id.0.to_string())
                .header("X-Pubsub-Event-Type", &event.event_type)
                .header("X-Pubsub-Delivery-Attempt", attempt.to_string())
                .body(body.clone());
            if let Some(t) = &token {
                request = request.header("X-Okapi-Token", t);
            }
            let sent = request.send().await;
            match &sent {
                Ok(r)
                    if r.status() == reqwest::StatusCode::UNAUTHORIZED
                        && token.is_some()
                        && !relogged =>
                {
                    self.tokens.invalidate(tenant);
                    relogged = true;
                }
                _ => break sent,
            }
        };
        match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let status = r.status();
                let retry_after = matches!(status.as_u16(), 429 | 503)
                    .then(|| {
                        r.headers()
                            .get("retry-after")?
                            .to_str()
                            .ok()?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .flatten()
                    .map(|s| Duration::from_secs(s.min(3600)));
                Err(Failure {
                    message: format!(
                        "Error delivering {} event with id '{}' to {}, response status code is {}",
                        event.event_type, event.id.0, sub.callback, status
                    ),
                    retry_after,
                })
            }
            Err(e) => Err(Failure {
                message: format!(
                    "{} event with id '{}' was not delivered to {}: {e}",
                    event.event_type, event.id.0, sub.callback
                ),
                retry_after: None,
            }),
        }
    }

    /// Writes the record to the tenant's dead-letter topic, retrying until it is written or
    /// the service stops (then it is not committed and will be handled again).
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        tenant: &TenantId,
        subscriber: &str,
        msg: &BorrowedMessage<'_>,
        headers: &HashMap<String, String>,
        reason: &str,
        attempts: i32,
        stop: &CancellationToken,
    ) -> bool {
        let topic = self.kafka.topics.dead_letters(tenant);
        let out = crate::kafka::dead_letter_headers(
            headers,
            subscriber,
            reason,
            attempts.max(0) as u32,
            (msg.topic(), msg.partition(), msg.offset()),
        );
        let out: Vec<(&str, &str)> = out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let record = OutgoingRecord {
            topic: &topic,
            key: &key,
            value: msg.payload().unwrap_or_default(),
            headers: out,
        };
        let mut wait = Duration::from_millis(500);
        loop {
            let ensured = self
                .kafka
                .admin
                .ensure(&BTreeSet::from([topic.clone()]))
                .await;
            let sent = match ensured {
                Ok(()) => self
                    .kafka
                    .producer
                    .send(&record)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match sent {
                Ok(()) => {
                    tracing::warn!(%tenant, subscriber, %topic, reason, "event dead-lettered");
                    return true;
                }
                Err(e) => {
                    tracing::error!(%tenant, subscriber, %topic, error = %e, "dead-lettering failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// An audit row of a delivery to `subscriber`.
fn delivery_row(
    tenant: &TenantId,
    event: &Event,
    subscriber: &str,
    state: AuditState,
    attempt: Option<i32>,
    error: Option<String>,
) -> AuditItem {
    AuditItem::Message(AuditRecord {
        tenant: tenant.clone(),
        event_id: event.id.0,
        event_type: event.event_type.clone(),
        correlation_id: event.event_metadata.correlation_id.clone(),
        created_by: event.event_metadata.created_by.clone(),
        published_by: event.event_metadata.published_by.clone(),
        state,
        error_message: error,
        audit_date: Utc::now(),
        subscriber: Some(subscriber.to_owned()),
        attempt,
    })
}

const LAG_EVERY: Duration = Duration::from_secs(10);

/// Records behind on the partitions this consumer holds (blocking: broker round trips).
fn lag(consumer: &StreamConsumer) -> Option<i64> {
    let positions = consumer.position().ok()?;
    let mut total = 0;
    for tp in positions.elements() {
        let (_, high) = consumer
            .fetch_watermarks(tp.topic(), tp.partition(), Duration::from_secs(2))
            .ok()?;
        let at = match tp.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => {
                let (low, _) = consumer
                    .fetch_watermarks(tp.topic(), tp.partition(), Duration::from_secs(2))
                    .ok()?;
                low
            }
        };
        total += (high - at).max(0);
    }
    Some(total)
}

struct Failure {
    message: String,
    retry_after: Option<Duration>,
}

/// ±20 % around `base`.
fn jitter(base: Duration) -> Duration {
    let factor = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(factor)
}

/// Whether the event's time to live (minutes, from its publishedDate or else the record's
/// timestamp) has passed. A TTL of 0 means no limit.
fn expired(event: &Event, timestamp: Timestamp) -> bool {
    let ttl = event.event_metadata.event_ttl;
    if ttl <= 0 {
        return false;
    }
    let published = event
        .event_metadata
        .published_date
        .as_deref()
        .and_then(crate::event::parse_date_time)
        .map(|d| d.with_timezone(&Utc))
        .or_else(|| {
            timestamp
                .to_millis()
                .and_then(chrono::DateTime::from_timestamp_millis)
        });
    published.is_some_and(|p| Utc::now() > p + chrono::Duration::minutes(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }

    #[test]
    fn ttl() {
        let mut e: Event = serde_json::from_value(serde_json::json!({
            "id": "5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f", "eventType": "T",
            "eventMetadata": {"tenantId": "diku", "eventTTL": 1, "publishedBy": "m-1",
                              "publishedDate": crate::event::format_date(Utc::now() - chrono::Duration::minutes(5))}
        }))
        .unwrap();
        assert!(expired(&e, Timestamp::NotAvailable));
        e.event_metadata.event_ttl = 10;
        assert!(!expired(&e, Timestamp::NotAvailable));
        e.event_metadata.event_ttl = 0;
        assert!(!expired(&e, Timestamp::NotAvailable), "0 is no limit");
    }
}
