//! Consuming event topics directly, with bounded in-flight records per partition, per-key
//! order, retries and dead letters (the consumer core the delivery engine uses too).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use super::dispatch::{
    DeadLetterRecord, DeadLetterSink, Dispatcher, DispatcherOptions, Handler, Pipeline, Retry,
    SinkFuture, Stats, Verdict,
};
use super::ClientError;
use crate::domain::{EventType, TenantId};
use crate::event::Event;
use crate::kafka::{idempotent_producer, Topics};

/// An event as a direct consumer receives it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// The tenant (the `folio.tenantId` header, else `eventMetadata.tenantId`).
    pub tenant: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    /// The record's Kafka timestamp (ms since the epoch), when it has one.
    pub timestamp: Option<i64>,
    /// The Event envelope.
    pub event: Event,
    pub headers: HashMap<String, String>,
}

/// How a [`DirectConsumer`] consumes.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// The consumer group; default `{env}.{module}`. Every instance of a module uses the same
    /// group, so they share the partitions.
    pub group: Option<String>,
    /// At most this many handler calls run at once (folio-kafka-wrapper's load limit), and at
    /// most this many unfinished records are held per partition; default 16. With 1, records
    /// are handled one after another.
    pub max_in_flight: usize,
    /// No longer used: a partition whose records are not finishing is simply not read (its own
    /// librdkafka queue fills and fetching it stops), and the consumer queue is polled all the
    /// time, so nothing needs pausing. Kept so that existing code compiles.
    pub pause_after: Duration,
    /// No longer used (see `pause_after`).
    pub resume_below: Option<usize>,
    /// The waits between attempts of a failing handler (±20 % jitter); after the last one the
    /// record goes to the dead-letter topic. Default 1 s, 5 s, 30 s (four attempts).
    pub retry_schedule: Vec<Duration>,
    /// How long an idle fetch waits at the broker (default 20 ms; see the README's Kafka
    /// settings).
    pub fetch_wait: Duration,
    /// The group's session timeout, also its rebalance timeout: a member that stops answering
    /// (a crash) is replaced within it. Default 45 s, Kafka's.
    pub session_timeout: Duration,
    /// Extra librdkafka settings (security properties, for instance).
    pub kafka: Vec<(String, String)>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            group: None,
            max_in_flight: 16,
            pause_after: Duration::from_secs(10),
            resume_below: None,
            retry_schedule: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            fetch_wait: Duration::from_millis(20),
            session_timeout: Duration::from_secs(45),
            kafka: Vec::new(),
        }
    }
}

/// Consumes event types straight from Kafka. See the [module documentation](super) for an
/// example.
///
/// * Each assigned partition is read on its own, holding at most `max_in_flight` unfinished
///   records; at most `max_in_flight` handler calls run at once. Records with the same key (in
///   the same partition) are handled one after another, in order; others go on meanwhile.
/// * A partition whose records fail or are slow stops being read when it holds
///   `max_in_flight` records, and librdkafka stops fetching it once its own queue is full (at
///   most 1,000 records or about 2 MiB); the other partitions (other tenants, other event types)
///   go on. Nothing is paused, so nothing is fetched twice.
/// * At least once: a partition's offset is stored only up to its oldest record not yet
///   finished, and stored offsets are committed every 500 ms and when [`DirectConsumer::run`]
///   returns. A crash repeats at most the records finished since the last commit.
/// * A failing handler is retried after the waits of `retry_schedule` (the wait holds no
///   handler slot); then the record goes to the tenant's dead-letter topic
///   (`{env}.Default.{tenant}.mod-pubsub.dead-letters`, with the headers the delivery engine
///   writes, so pubsub's dead-letter endpoints list it) and counts as finished. A record that is
///   not an Event envelope goes there at once. Writing a dead letter is retried until it
///   succeeds or the consumer stops.
pub struct DirectConsumer {
    dispatcher: Dispatcher,
    sink: Arc<ProducerSink>,
    topics: Topics,
    module: String,
    /// The waits between attempts (see [`ConsumerOptions::retry_schedule`]).
    pub retry_schedule: Vec<Duration>,
    max_in_flight: usize,
    stats: Arc<Stats>,
}

/// A snapshot of what a [`DirectConsumer`] is doing (for metrics and health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records taken from Kafka and not finished (running, waiting for a retry or behind a
    /// record with their key).
    pub in_flight: usize,
    /// Whether some partition holds `max_in_flight` unfinished records now (it is not read
    /// until one finishes).
    pub paused: bool,
    /// How often a partition's window filled.
    pub pauses: u64,
    /// Records finished (handled, or dead-lettered).
    pub finished: u64,
    pub dead_lettered: u64,
    /// Records waiting for their next attempt.
    pub retrying: usize,
}

/// Writes dead letters with the consumer's own idempotent producer.
struct ProducerSink(FutureProducer);

impl DeadLetterSink for ProducerSink {
    fn write<'a>(&'a self, record: &'a DeadLetterRecord) -> SinkFuture<'a> {
        Box::pin(async move {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (k, v) in &record.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_str()),
                });
            }
            let out = FutureRecord::to(record.topic.as_str())
                .key(&record.key)
                .payload(&record.value)
                .headers(headers);
            self.0
                .send(out, Timeout::After(Duration::from_secs(30)))
                .await
                .map(|_| ())
                .map_err(|(source, _)| ClientError::Write {
                    topic: record.topic.to_string(),
                    source,
                })
        })
    }
}

/// The application's handler as the consumer core sees it.
struct FnHandler<'a, F> {
    f: &'a F,
    module: &'a str,
}

impl<F, Fut, E> Handler for FnHandler<'_, F>
where
    F: Fn(ReceivedEvent) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    async fn attempt(&self, event: &ReceivedEvent, _attempt: u32) -> Verdict {
        match (self.f)(event.clone()).await {
            Ok(()) => Verdict::Done,
            Err(e) => Verdict::Failed {
                reason: e.to_string(),
                retry: Retry::Schedule,
            },
        }
    }

    fn subscriber(&self, _: Option<&ReceivedEvent>) -> String {
        self.module.to_owned()
    }

    async fn dead_lettered(&self, _: Option<&ReceivedEvent>, _: &str, _: u32) {}
}

impl DirectConsumer {
    /// `module`: the consuming module's name; `tenant`: one tenant, or `None` for every tenant
    /// (a regular-expression subscription that also picks up tenants enabled later).
    pub fn new(
        bootstrap: &str,
        env: &str,
        module: &str,
        tenant: Option<&str>,
        event_types: &[&str],
    ) -> Result<Self, ClientError> {
        Self::with_options(
            bootstrap,
            env,
            module,
            tenant,
            event_types,
            ConsumerOptions::default(),
        )
    }

    pub fn with_options(
        bootstrap: &str,
        env: &str,
        module: &str,
        tenant: Option<&str>,
        event_types: &[&str],
        options: ConsumerOptions,
    ) -> Result<Self, ClientError> {
        if options.max_in_flight == 0 {
            return Err(ClientError::Invalid(
                "max_in_flight must be at least 1".into(),
            ));
        }
        if event_types.is_empty() {
            return Err(ClientError::Invalid("no event types to consume".into()));
        }
        let naming = Topics::with_defaults(env);
        let topics = subscriptions(&naming, tenant, event_types)?;
        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", bootstrap);
        for (k, v) in &options.kafka {
            cfg.set(k, v);
        }
        let mut producer_cfg = cfg.clone();
        let group = options
            .group
            .clone()
            .unwrap_or_else(|| format!("{env}.{module}"));
        let dispatcher = Dispatcher::new(
            cfg,
            &DispatcherOptions {
                group,
                max_in_flight: options.max_in_flight,
                fetch_wait: options.fetch_wait,
                session_timeout: options.session_timeout,
                metadata_refresh: Duration::from_secs(5),
                max_active: super::dispatch::DEFAULT_MAX_ACTIVE,
                idle_check: super::dispatch::DEFAULT_IDLE_CHECK,
            },
        )?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        dispatcher.subscribe(&names)?;
        let producer = idempotent_producer(&mut producer_cfg)
            .create()
            .map_err(ClientError::Kafka)?;
        Ok(DirectConsumer {
            dispatcher,
            sink: Arc::new(ProducerSink(producer)),
            topics: naming,
            module: module.to_owned(),
            retry_schedule: options.retry_schedule,
            max_in_flight: options.max_in_flight,
            stats: Arc::default(),
        })
    }

    /// Handles records until `stop` is cancelled; then lets the handlers that are running
    /// finish (waits between retries end at once, and those records are handled again after a
    /// restart), commits and returns. Drop the consumer to leave the group. Returns an error
    /// when the consumer is already running.
    pub async fn run<F, Fut, E>(
        &self,
        handler: F,
        stop: CancellationToken,
    ) -> Result<(), ClientError>
    where
        F: Fn(ReceivedEvent) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let pipeline = Pipeline::new(
            self.retry_schedule.clone(),
            self.max_in_flight,
            Arc::clone(&self.sink) as Arc<dyn DeadLetterSink>,
            self.topics.clone(),
            Arc::clone(&self.stats),
        );
        let handler = FnHandler {
            f: &handler,
            module: &self.module,
        };
        self.dispatcher.run(&pipeline, &handler, &stop).await
    }

    pub fn stats(&self) -> ConsumerStats {
        let s = &self.stats;
        ConsumerStats {
            in_flight: s.in_flight.load(Ordering::Relaxed),
            paused: s.paused_partitions.load(Ordering::Relaxed) > 0,
            pauses: s.pauses.load(Ordering::Relaxed),
            finished: s.finished.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            retrying: s.retrying.load(Ordering::Relaxed),
        }
    }
}

/// The topic names (or patterns, for all tenants) of these event types.
fn subscriptions(
    naming: &Topics,
    tenant: Option<&str>,
    event_types: &[&str],
) -> Result<Vec<String>, ClientError> {
    let tenant = tenant
        .map(|t| TenantId::parse(t).map_err(|e| ClientError::Invalid(e.0)))
        .transpose()?;
    event_types
        .iter()
        .map(|t| {
            let e = EventType::parse(t)
                .map_err(|e| ClientError::Invalid(format!("eventType: {}", e.0)))?;
            Ok(naming.subscription(tenant.as_ref(), &e))
        })
        .collect()
}
