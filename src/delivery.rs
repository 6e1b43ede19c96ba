//! The delivery engine: pushes events to subscribers' callbacks through Okapi, at least once.
//!
//! * One Kafka consumer group per subscriber **module** (`{ENV}.mod-pubsub.{module name}`,
//!   without the version, so an upgrade keeps the position), subscribed to the topics of every
//!   (tenant, event type) the module subscribes to. Instances of this service share each group's
//!   partitions (cooperative rebalancing).
//! * The consumer core ([`crate::client::dispatch`], shared with the direct-Kafka consumer) reads
//!   every partition on its own with a window of `DELIVERY_MAX_IN_FLIGHT` unfinished records and
//!   runs at most that many callbacks at once per module. Topics are per tenant and event type,
//!   so a tenant, event type or event whose deliveries fail or are slow holds at most its own
//!   partition's window; the module's other partitions go on. Records with the same key in a
//!   partition are delivered one after another, in publish order, retries included.
//! * An offset is committed only up to the oldest record of its partition that is not finished
//!   (delivered, dead-lettered or none of this subscriber's business): a crash means
//!   redelivery, never loss.
//! * A failed attempt is retried after the configured waits (±20 % jitter; `Retry-After` of a
//!   429 or 503 is honoured) without holding a callback slot; a 4xx other than 401, 408, 425 and
//!   429 is final unless `DELIVERY_RETRY_CLIENT_ERRORS`; when the attempts are exhausted (or, with
//!   `DELIVERY_HONOUR_EVENT_TTL`, the event's `eventTTL` has passed) the event goes to the
//!   tenant's dead-letter topic `{ENV}.{namespace}.{tenant}.mod-pubsub.dead-letters` with headers
//!   saying who, why and where from, and a REJECTED audit row.
//! * Any 2xx answer counts as delivered (the Java module counted only 200, 201 and 204).

pub mod dead_letters;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::audit::{AuditItem, AuditRecord, AuditState, AuditWriter};
use crate::client::dispatch::{
    DeadLetterRecord, DeadLetterSink, Dispatcher, DispatcherOptions, Handler, Pipeline, Retry,
    SinkFuture, Stats, Verdict,
};
use crate::client::{ClientError, ReceivedEvent};
use crate::config::Config;
use crate::domain::{EventType, TenantId};
use crate::event::Event;
use crate::kafka::producer::OutgoingRecord;
use crate::kafka::Kafka;
use crate::metrics::{Metrics, ModuleLabels};
use crate::registry_cache::{RegistryCache, Subscriber};

/// Events a little older than the registration are still delivered (clock skew).
const SINCE_GRACE: chrono::Duration = chrono::Duration::seconds(2);
/// How often a module's gauges (and its consumer lag) are refreshed.
const GAUGES_EVERY: Duration = Duration::from_secs(2);
/// `/admin/health` lists a module's last failure for this long.
const RECENT_FAILURE: chrono::Duration = chrono::Duration::minutes(10);

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
    /// Subscribers' callbacks go through Okapi (`OKAPI_URL`).
    pub okapi: crate::client::Okapi,
    pub tokens: Arc<crate::system_user::Tokens>,
    pub metrics: Arc<Metrics>,
    sink: Arc<ServiceSink>,
    /// What each module's consumer on this instance is doing.
    modules: Mutex<BTreeMap<String, Arc<Stats>>>,
    /// Topics the HTTP publish path just wrote to: the consumers fetch their parked partitions
    /// at once instead of at the next end-offset reading.
    published: tokio::sync::broadcast::Sender<Arc<str>>,
}

/// Dead letters go out through the service's producer, to a topic created when missing.
struct ServiceSink(Arc<Kafka>);

impl DeadLetterSink for ServiceSink {
    fn write<'a>(&'a self, record: &'a DeadLetterRecord) -> SinkFuture<'a> {
        Box::pin(async move {
            let kafka = &self.0;
            kafka
                .admin
                .ensure(&BTreeSet::from([record.topic.clone()]))
                .await
                .map_err(|e| ClientError::Sink(e.into()))?;
            let key = String::from_utf8_lossy(&record.key);
            let out = OutgoingRecord {
                topic: &record.topic,
                key: &key,
                value: &record.value,
                headers: record
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            };
            kafka
                .producer
                .send(&out)
                .await
                .map(|_| ())
                .map_err(|e| ClientError::Sink(e.into()))
        })
    }
}

/// One line of `/admin/health` about a module's deliveries, when there is something to say.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleReport {
    pub module: String,
    pub in_flight: usize,
    pub retrying: usize,
    pub paused_partitions: usize,
    pub retrying_partitions: usize,
    pub oldest_unfinished: Option<Duration>,
    pub last_failure: Option<(chrono::DateTime<Utc>, String)>,
}

impl std::fmt::Display for ModuleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivery to {}: {} in flight, {} waiting to retry ({} partitions), {} partitions paused",
            self.module, self.in_flight, self.retrying, self.retrying_partitions, self.paused_partitions
        )?;
        if let Some(age) = self.oldest_unfinished {
            write!(f, ", oldest unfinished event {} s old", age.as_secs())?;
        }
        if let Some((at, reason)) = &self.last_failure {
            write!(f, ", last failure at {}: {reason}", at.to_rfc3339())?;
        }
        Ok(())
    }
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        kafka: Arc<Kafka>,
        registry: RegistryCache,
        audit: AuditWriter,
        tokens: Arc<crate::system_user::Tokens>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.delivery.connect_timeout)
            .timeout(config.delivery.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.delivery.max_in_flight.max(32))
            .build()?;
        let okapi = crate::client::Okapi::new(http, config.okapi_url.as_str());
        Ok(Engine {
            sink: Arc::new(ServiceSink(Arc::clone(&kafka))),
            metrics,
            tokens,
            config,
            kafka,
            registry,
            audit,
            okapi,
            modules: Mutex::default(),
            published: tokio::sync::broadcast::channel(4096).0,
        })
    }

    /// The HTTP publish path wrote an event to `topic`.
    pub fn published(&self, topic: &str) {
        if self.published.receiver_count() > 0 {
            let _ = self.published.send(Arc::from(topic));
        }
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

    /// What the modules' consumers on this instance are doing, for those with something to
    /// report (records in flight, retries, paused partitions, a recent failure).
    pub fn reports(&self) -> Vec<ModuleReport> {
        let modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        modules
            .iter()
            .map(|(module, s)| ModuleReport {
                module: module.clone(),
                in_flight: s.in_flight.load(Ordering::Relaxed),
                retrying: s.retrying.load(Ordering::Relaxed),
                paused_partitions: s.paused_partitions.load(Ordering::Relaxed),
                retrying_partitions: s.retrying_partitions.load(Ordering::Relaxed),
                oldest_unfinished: s.oldest_unfinished(),
                last_failure: s
                    .last_failure()
                    .filter(|(at, _)| Utc::now() - *at < RECENT_FAILURE),
            })
            .filter(|r| r.retrying > 0 || r.paused_partitions > 0 || r.last_failure.is_some())
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

    /// The retry schedule, callback slots and dead-letter topic of one module.
    fn pipeline(&self, stats: Arc<Stats>, max_in_flight: usize) -> Pipeline {
        Pipeline::new(
            self.config.delivery.retry_schedule.clone(),
            max_in_flight,
            Arc::clone(&self.sink) as Arc<dyn DeadLetterSink>,
            self.kafka.topics.clone(),
            stats,
        )
    }

    /// The consumer core of one subscriber module.
    fn dispatcher(&self, module: &str) -> Result<Dispatcher, crate::client::ClientError> {
        let delivery = &self.config.delivery;
        Dispatcher::new(
            crate::kafka::client_config(&self.config.kafka),
            &DispatcherOptions {
                group: self.group(module),
                max_in_flight: delivery.max_in_flight,
                fetch_wait: delivery.fetch_wait,
                session_timeout: delivery.session_timeout,
                metadata_refresh: Duration::from_secs(10),
                max_active: delivery.max_active_partitions,
                idle_check: delivery.idle_check,
            },
        )
    }

    async fn worker(
        self: Arc<Self>,
        module: String,
        mut topics: watch::Receiver<BTreeSet<String>>,
        stop: CancellationToken,
    ) {
        let delivery = &self.config.delivery;
        let dispatcher = match self.dispatcher(&module) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(%module, error = %e, "cannot create the delivery consumer");
                return;
            }
        };
        subscribe(&dispatcher, &module, &topics.borrow_and_update());
        dispatcher.hints(self.published.subscribe());
        let stats = Arc::new(Stats::default());
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(module.clone(), Arc::clone(&stats));
        let pipeline = self.pipeline(Arc::clone(&stats), delivery.max_in_flight);
        let handler = ModuleHandler {
            engine: &self,
            module: &module,
        };
        let run = dispatcher.run(&pipeline, &handler, &stop);
        tokio::pin!(run);
        let labels = ModuleLabels {
            module: module.clone(),
        };
        let group = crate::metrics::GroupLabels {
            group: self.group(&module),
        };
        let mut gauges = tokio::time::interval(GAUGES_EVERY);
        loop {
            tokio::select! {
                result = &mut run => {
                    if let Err(e) = result {
                        tracing::error!(%module, error = %e, "delivery consumer failed");
                    }
                    break;
                }
                _ = gauges.tick() => {
                    self.metrics.module_gauges(&labels, &stats);
                    self.metrics.consumer_lag.get_or_create(&group).set(stats.lag.load(Ordering::Relaxed));
                }
                changed = topics.changed() => {
                    if changed.is_ok() {
                        subscribe(&dispatcher, &module, &topics.borrow_and_update());
                    }
                }
            }
        }
        self.modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&module);
        self.metrics.remove_module(&labels);
        tracing::info!(%module, "delivery consumer stopped");
    }

    async fn post(
        &self,
        tenant: &TenantId,
        sub: &Subscriber,
        event: &Event,
        headers: &HashMap<String, String>,
        attempt: i32,
    ) -> Result<(), Failure> {
        let request_id = request_id(headers);
        let body = event
            .event_payload
            .clone()
            .unwrap_or_else(|| "null".to_owned());
        let not_delivered = |e: &dyn std::fmt::Display| Failure {
            message: format!(
                "{} event with id '{}' was not delivered to {}: {e}",
                event.event_type, event.id.0, sub.callback
            ),
            retry_after: None,
            status: None,
        };
        // A 401 means the cached token is no good: log in again, once, and retry at once.
        let mut relogged = false;
        let sent = loop {
            let token = self
                .tokens
                .token(tenant)
                .await
                .map_err(|e| not_delivered(&e))?;
            let request = self
                .okapi
                .request(
                    reqwest::Method::POST,
                    &sub.callback,
                    tenant.as_str(),
                    token.as_deref(),
                )
                .header("Content-Type", "application/json")
                .header("Accept", "application/json, text/plain")
                .header("X-Okapi-Request-Id", &request_id)
                .header("X-Pubsub-Event-Id", event.id.0.to_string())
                .header("X-Pubsub-Event-Type", &event.event_type)
                .header("X-Pubsub-Delivery-Attempt", attempt.to_string())
                .body(body.clone());
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
            Ok(r) => Err(refused(&r, event, sub)),
            Err(e) => Err(not_delivered(&e)),
        }
    }
}

/// The request id a callback carries: the event's (Java modules write okapi-common's spelling,
/// `X-Okapi-Request-Id`, as often as the lower-case one; folio-kafka-wrapper matches these names
/// case-insensitively too), or a new one.
fn request_id(headers: &HashMap<String, String>) -> String {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-okapi-request-id"))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Subscribes a module's consumer core to `set`, logging what came of it.
fn subscribe(dispatcher: &Dispatcher, module: &str, set: &BTreeSet<String>) {
    let names: Vec<&str> = set.iter().map(String::as_str).collect();
    match dispatcher.subscribe(&names) {
        Ok(()) => tracing::info!(
            %module,
            topics = names.len(),
            first = ?names.iter().take(3).collect::<Vec<_>>(),
            "delivery consumer subscribed"
        ),
        Err(e) => tracing::error!(%module, error = %e, "subscribe failed"),
    }
}

/// What a callback's answer other than 2xx says: its status, and a `Retry-After` of a 429 or
/// 503.
fn refused(r: &reqwest::Response, event: &Event, sub: &Subscriber) -> Failure {
    let status = r.status();
    let retry_after = matches!(status.as_u16(), 429 | 503)
        .then(|| retry_after(r.headers().get("retry-after")?.to_str().ok()?))
        .flatten();
    Failure {
        message: format!(
            "Error delivering {} event with id '{}' to {}, response status code is {}",
            event.event_type, event.id.0, sub.callback, status
        ),
        retry_after,
        status: Some(status.as_u16()),
    }
}

/// The engine's part of a delivery: who subscribes, the callback, audit rows and metrics.
struct ModuleHandler<'a> {
    engine: &'a Engine,
    /// The subscriber module's name (without version).
    module: &'a str,
}

impl ModuleHandler<'_> {
    /// The subscription this record is delivered to, if the module has one for it: the record's
    /// tenant is valid, the module subscribes to its event type there, and the event is not older
    /// than the subscription.
    fn subscription(&self, received: &ReceivedEvent) -> Option<(TenantId, Subscriber)> {
        let Ok(tenant) = TenantId::parse(&received.tenant) else {
            tracing::error!(module = self.module, topic = %received.topic, tenant = %received.tenant,
                event_id = %received.event.id.0, "record with an invalid tenant id skipped");
            return None;
        };
        let sub = self.engine.registry.subscriber(
            tenant.as_str(),
            &received.event.event_type,
            self.module,
        )?;
        let published = received
            .timestamp
            .and_then(chrono::DateTime::from_timestamp_millis);
        if published.is_some_and(|t| t < sub.since - SINCE_GRACE) {
            return None; // published before the module subscribed
        }
        Some((tenant, sub))
    }
}

impl ModuleHandler<'_> {
    async fn deliver(
        &self,
        received: &ReceivedEvent,
        tenant: TenantId,
        sub: Subscriber,
        attempt: u32,
    ) -> Verdict {
        let engine = self.engine;
        let event = &received.event;
        let attempt = attempt as i32;
        let labels = Metrics::event(&event.event_type);
        let audit = |state, attempt, error| {
            engine.audit.record(delivery_row(
                &tenant,
                event,
                &sub.module_id,
                state,
                attempt,
                error,
            ))
        };
        if attempt == 1 {
            audit(AuditState::Received, None, None).await;
        } else {
            engine.metrics.retried.get_or_create(&labels).inc();
        }
        match engine
            .post(&tenant, &sub, event, &received.headers, attempt)
            .await
        {
            Ok(()) => {
                tracing::debug!(%tenant, subscriber = %sub.module_id, event_id = %event.id.0, attempt,
                    offset = received.offset, "delivered");
                engine.metrics.delivered.get_or_create(&labels).inc();
                if let Some(seconds) = since_published(event) {
                    engine
                        .metrics
                        .delivery_latency
                        .get_or_create(&labels)
                        .observe(seconds);
                }
                audit(AuditState::Delivered, Some(attempt), None).await;
                Verdict::Done
            }
            Err(failure) => {
                engine.metrics.delivery_failed.get_or_create(&labels).inc();
                let delivery = &engine.config.delivery;
                let mut retry = failure.retry(delivery.retry_client_errors);
                let mut reason = failure.message;
                if delivery.honour_event_ttl && expired(event, received.timestamp) {
                    reason = format!(
                        "eventTTL of {} minutes has passed; {reason}",
                        event.event_metadata.event_ttl
                    );
                    retry = Retry::Never;
                }
                audit(AuditState::Rejected, Some(attempt), Some(reason.clone())).await;
                Verdict::Failed { reason, retry }
            }
        }
    }
}

/// Seconds from the event's `publishedDate` until now.
fn since_published(event: &Event) -> Option<f64> {
    let published = crate::event::parse_date_time(event.event_metadata.published_date.as_deref()?)?;
    let millis = (Utc::now() - published.with_timezone(&Utc)).num_milliseconds();
    Some(millis.max(0) as f64 / 1000.0)
}

impl Handler for ModuleHandler<'_> {
    async fn attempt(&self, received: &ReceivedEvent, attempt: u32) -> Verdict {
        let Some((tenant, sub)) = self.subscription(received) else {
            return Verdict::Done; // none of this module's business (any more)
        };
        let span = tracing::info_span!("delivery", %tenant, event_type = %received.event.event_type,
            event_id = %received.event.id.0, subscriber = %sub.module_id, attempt);
        self.deliver(received, tenant, sub, attempt)
            .instrument(span)
            .await
    }

    fn subscriber(&self, received: Option<&ReceivedEvent>) -> String {
        received.and_then(|r| self.subscription(r)).map_or_else(
            || self.module.to_owned(),
            |(_, sub)| sub.module_id.to_string(),
        )
    }

    async fn dead_lettered(&self, received: Option<&ReceivedEvent>, reason: &str, _attempts: u32) {
        let Some((received, (tenant, sub))) =
            received.and_then(|r| Some((r, self.subscription(r)?)))
        else {
            return;
        };
        let engine = self.engine;
        engine
            .metrics
            .dead_lettered
            .get_or_create(&Metrics::event(&received.event.event_type))
            .inc();
        engine
            .audit
            .record(delivery_row(
                &tenant,
                &received.event,
                &sub.module_id,
                AuditState::Rejected,
                None,
                Some(format!("dead-lettered: {reason}")),
            ))
            .await;
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

/// A failed callback.
struct Failure {
    message: String,
    retry_after: Option<Duration>,
    /// The subscriber's (or Okapi's) status; none when there was no answer.
    status: Option<u16>,
}

impl Failure {
    /// A 4xx other than 401 (a new login was tried already), 408, 425 and 429 says the
    /// subscriber will not take this event: no retries (unless `retry_client_errors`). Everything
    /// else (5xx, timeouts, connection errors, failed logins) follows the schedule.
    fn retry(&self, retry_client_errors: bool) -> Retry {
        match self.status {
            Some(s)
                if (400..500).contains(&s)
                    && !matches!(s, 401 | 408 | 425 | 429)
                    && !retry_client_errors =>
            {
                Retry::Never
            }
            _ => self.retry_after.map_or(Retry::Schedule, Retry::After),
        }
    }
}

/// Whether the event's time to live (minutes, from its publishedDate or else the record's
/// timestamp) has passed. A TTL of 0 means no limit.
fn expired(event: &Event, timestamp_ms: Option<i64>) -> bool {
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
        .or_else(|| timestamp_ms.and_then(chrono::DateTime::from_timestamp_millis));
    published.is_some_and(|p| Utc::now() > p + chrono::Duration::minutes(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl() {
        let mut e: Event = serde_json::from_value(serde_json::json!({
            "id": "5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f", "eventType": "T",
            "eventMetadata": {"tenantId": "diku", "eventTTL": 1, "publishedBy": "m-1",
                              "publishedDate": crate::event::format_date(Utc::now() - chrono::Duration::minutes(5))}
        }))
        .unwrap();
        assert!(expired(&e, None));
        e.event_metadata.event_ttl = 10;
        assert!(!expired(&e, None));
        e.event_metadata.event_ttl = 0;
        assert!(!expired(&e, None), "0 is no limit");
        e.event_metadata.published_date = None;
        e.event_metadata.event_ttl = 1;
        let old = (Utc::now() - chrono::Duration::minutes(2)).timestamp_millis();
        assert!(
            expired(&e, Some(old)),
            "the record's timestamp when there is no publishedDate"
        );
    }

    fn failure(status: Option<u16>, retry_after: Option<u64>) -> Failure {
        Failure {
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
            status,
        }
    }

    #[test]
    fn client_errors_are_final_unless_configured() {
        for s in [400, 403, 404, 409, 413, 422] {
            assert!(
                matches!(failure(Some(s), None).retry(false), Retry::Never),
                "{s}"
            );
            assert!(
                matches!(failure(Some(s), None).retry(true), Retry::Schedule),
                "{s}"
            );
        }
        for s in [401, 408, 425, 500, 502, 503, 504] {
            assert!(
                matches!(failure(Some(s), None).retry(false), Retry::Schedule),
                "{s}"
            );
        }
        assert!(
            matches!(failure(None, None).retry(false), Retry::Schedule),
            "no answer"
        );
        assert!(matches!(
            failure(Some(429), Some(3)).retry(false),
            Retry::After(d) if d == Duration::from_secs(3)
        ));
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110); at most an hour.
fn retry_after(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let wait = match raw.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(raw)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(Duration::from_secs(3600)))
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn seconds_and_http_dates() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(retry_after("86400"), Some(Duration::from_secs(3600)));
        let soon = std::time::SystemTime::now() + Duration::from_secs(120);
        let wait = retry_after(&httpdate::fmt_http_date(soon)).unwrap();
        assert!(
            wait > Duration::from_secs(110) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }
}
