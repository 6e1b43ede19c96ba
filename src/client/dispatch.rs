//! The consumer core that the delivery engine and [`DirectConsumer`](super::DirectConsumer)
//! share: per-partition queues with an in-flight window each, per-key order, offset tracking,
//! retry scheduling and dead-lettering. Its users add only what one attempt does (a callback
//! through Okapi, or the application's handler) and what they record about it.
//!
//! # How records flow
//!
//! * Every assigned partition gets its own librdkafka queue (split off the consumer queue in the
//!   rebalance callback, before fetching starts) and a reader task. A reader takes a record only
//!   while its partition holds fewer than `max_in_flight` unfinished records, so a partition whose
//!   records fail or are slow stops being read, and librdkafka stops fetching it once its own
//!   per-partition queue is full (`queued.min.messages`, `queued.max.messages.kbytes`). Other
//!   partitions (other tenants and event types: topics are per tenant and event type) are read
//!   as before: no pause, no seek, no head-of-line blocking across partitions.
//! * At most `max_in_flight` attempts run at once across all partitions (a semaphore); a record
//!   waiting for its next attempt holds no such permit and no task, only its place in its
//!   partition's window.
//! * Records with the same key in a partition run one after another, in offset order, retries
//!   included; records with other keys go on meanwhile.
//! * A partition's offset is stored only up to its oldest unfinished record and committed every
//!   500 ms by librdkafka (and at the end of [`Dispatcher::run`]): at least once.
//! * The consumer queue itself is polled continuously (rebalances, errors, and librdkafka's
//!   `max.poll.interval.ms` liveness check), whatever the handlers do, so the group's rebalance
//!   timeout can be short and a crashed member is replaced within the session timeout.
//! * On revocation (another member takes the partition) or stop, waits end at once and their
//!   records are abandoned; attempts that are running finish, but nothing more is committed for a
//!   revoked partition: its new owner starts from the last commit.

// Parts only the delivery engine uses (the server feature).
#![cfg_attr(not(feature = "server"), allow(dead_code))]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{ClientError, ReceivedEvent};
use crate::domain::TenantId;
use crate::event::Event;
use crate::kafka::{
    at_least_once_consumer, dead_letter_headers, record_headers, TopicName, Topics,
};

/// What one attempt came to.
pub(crate) enum Verdict {
    /// Handled (or none of this handler's business): the record is finished.
    Done,
    /// Not handled.
    Failed { reason: String, retry: Retry },
}

/// Whether and when a failed attempt is tried again.
pub(crate) enum Retry {
    /// After the retry schedule's next wait (with jitter); dead-lettered when it is exhausted.
    Schedule,
    /// After this wait (a `Retry-After`), if the schedule has an attempt left.
    After(Duration),
    /// Never: dead-lettered now.
    Never,
}

/// What a user of the core does with a record.
pub(crate) trait Handler {
    /// One attempt; `attempt` counts from 1.
    fn attempt(&self, event: &ReceivedEvent, attempt: u32) -> impl Future<Output = Verdict>;
    /// The subscriber a dead letter names (`pubsub.subscriber`); `None` for a record that is
    /// not an Event envelope.
    fn subscriber(&self, event: Option<&ReceivedEvent>) -> String;
    /// Called once a record is on the dead-letter topic.
    fn dead_lettered(
        &self,
        event: Option<&ReceivedEvent>,
        reason: &str,
        attempts: u32,
    ) -> impl Future<Output = ()>;
}

/// A record for a dead-letter topic.
pub(crate) struct DeadLetterRecord {
    pub topic: TopicName,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

pub(crate) type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), ClientError>> + Send + 'a>>;

/// Where dead letters are written (the service's producer, or the client's).
pub(crate) trait DeadLetterSink: Send + Sync {
    fn write<'a>(&'a self, record: &'a DeadLetterRecord) -> SinkFuture<'a>;
}

/// What a record came to.
enum Outcome {
    /// Handled, or on the dead-letter topic: its offset may be committed.
    Finished,
    /// Given up because its partition was revoked or the consumer stops: handled again later.
    Abandoned,
}

/// Counters and gauges of one consumer, read by metrics and health checks.
#[derive(Default)]
pub(crate) struct Stats {
    /// Records taken from Kafka and not finished (running, waiting for an attempt or behind a
    /// record with their key).
    pub in_flight: AtomicUsize,
    /// Records waiting for their next attempt.
    pub retrying: AtomicUsize,
    /// Partitions whose window is full: not read until a record finishes.
    pub paused_partitions: AtomicUsize,
    /// Partitions with a record waiting for its next attempt.
    pub retrying_partitions: AtomicUsize,
    pub assigned_partitions: AtomicUsize,
    /// How often a partition's window filled.
    pub pauses: AtomicU64,
    pub finished: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Kafka timestamp (ms) of the oldest unfinished record; 0 when there is none.
    pub oldest_unfinished_ms: AtomicI64,
    pub last_failure: Mutex<Option<(DateTime<Utc>, String)>>,
}

impl Stats {
    fn note_failure(&self, reason: &str) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Utc::now(), reason.to_owned()));
    }

    /// Age of the oldest unfinished record.
    pub fn oldest_unfinished(&self) -> Option<Duration> {
        match self.oldest_unfinished_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(
                (Utc::now().timestamp_millis() - ms).max(0) as u64,
            )),
        }
    }

    pub fn last_failure(&self) -> Option<(DateTime<Utc>, String)> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Counts a record waiting for its next attempt while it lives.
struct RetryingGuard<'a>(&'a Stats, &'a AtomicUsize);

impl<'a> RetryingGuard<'a> {
    fn new(stats: &'a Stats, partition: &'a AtomicUsize) -> Self {
        stats.retrying.fetch_add(1, Ordering::Relaxed);
        partition.fetch_add(1, Ordering::Relaxed);
        RetryingGuard(stats, partition)
    }
}

impl Drop for RetryingGuard<'_> {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The retry schedule, the attempt permits and the dead-letter topic of one consumer: what
/// happens to one record, from its first attempt to its outcome. Replays use it on its own.
pub(crate) struct Pipeline {
    pub retry_schedule: Vec<Duration>,
    permits: Semaphore,
    sink: Arc<dyn DeadLetterSink>,
    topics: Topics,
    pub stats: Arc<Stats>,
}

const DEAD_LETTER_FIRST_WAIT: Duration = Duration::from_millis(500);
const DEAD_LETTER_MAX_WAIT: Duration = Duration::from_secs(30);

impl Pipeline {
    pub fn new(
        retry_schedule: Vec<Duration>,
        max_in_flight: usize,
        sink: Arc<dyn DeadLetterSink>,
        topics: Topics,
        stats: Arc<Stats>,
    ) -> Self {
        Pipeline {
            retry_schedule,
            permits: Semaphore::new(max_in_flight.max(1)),
            sink,
            topics,
            stats,
        }
    }

    /// Handles one record: attempts with retries, then the dead-letter topic. Returns whether
    /// the record is finished (`false`: abandoned because `cancel` fired).
    pub async fn process<H: Handler>(
        &self,
        handler: &H,
        msg: &OwnedMessage,
        cancel: &CancellationToken,
    ) -> bool {
        let partition_retrying = AtomicUsize::new(0);
        matches!(
            self.process_in(handler, msg, cancel, &partition_retrying)
                .await,
            Outcome::Finished
        )
    }

    async fn process_in<H: Handler>(
        &self,
        handler: &H,
        msg: &OwnedMessage,
        cancel: &CancellationToken,
        partition_retrying: &AtomicUsize,
    ) -> Outcome {
        let headers = record_headers(msg);
        let received = match msg.payload().map(serde_json::from_slice::<Event>) {
            Some(Ok(event)) => ReceivedEvent {
                tenant: headers
                    .get("folio.tenantId")
                    .cloned()
                    .unwrap_or_else(|| event.event_metadata.tenant_id.clone()),
                topic: msg.topic().to_owned(),
                partition: msg.partition(),
                offset: msg.offset(),
                key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                timestamp: msg.timestamp().to_millis(),
                event,
                headers,
            },
            other => {
                let reason = match other {
                    Some(Err(e)) => format!("not an Event envelope: {e}"),
                    _ => "not an Event envelope: no value".to_owned(),
                };
                tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), %reason, "unreadable record");
                let tenant = headers.get("folio.tenantId").cloned();
                let subscriber = handler.subscriber(None);
                return match self
                    .dead_letter(msg, &headers, tenant, &subscriber, &reason, 0, cancel)
                    .await
                {
                    true => {
                        handler.dead_lettered(None, &reason, 0).await;
                        Outcome::Finished
                    }
                    false => Outcome::Abandoned,
                };
            }
        };

        let mut attempt = 0u32;
        let reason = loop {
            attempt += 1;
            let verdict = {
                let _permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Outcome::Abandoned,
                    permit = self.permits.acquire() => permit.expect("the permits are never closed"),
                };
                handler.attempt(&received, attempt).await
            };
            let (reason, retry) = match verdict {
                Verdict::Done => return Outcome::Finished,
                Verdict::Failed { reason, retry } => (reason, retry),
            };
            self.stats.note_failure(&reason);
            let Some(scheduled) = self.retry_schedule.get(attempt as usize - 1) else {
                break reason;
            };
            let wait = match retry {
                Retry::Never => break reason,
                Retry::After(wait) => wait,
                Retry::Schedule => jitter(*scheduled),
            };
            let _retrying = RetryingGuard::new(&self.stats, partition_retrying);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Outcome::Abandoned,
                _ = tokio::time::sleep(wait) => {}
            }
        };
        let subscriber = handler.subscriber(Some(&received));
        let tenant = Some(received.tenant.clone());
        if !self
            .dead_letter(
                msg,
                &received.headers,
                tenant,
                &subscriber,
                &reason,
                attempt,
                cancel,
            )
            .await
        {
            return Outcome::Abandoned;
        }
        handler
            .dead_lettered(Some(&received), &reason, attempt)
            .await;
        Outcome::Finished
    }

    /// Writes the record to its tenant's dead-letter topic, retrying until it is written or
    /// `cancel` fires (then `false`: the record is handled again later). A record with no valid
    /// tenant (neither header, envelope nor topic name gives one) cannot be filed: it is logged
    /// and counts as finished.
    #[allow(clippy::too_many_arguments)]
    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        headers: &HashMap<String, String>,
        tenant: Option<String>,
        subscriber: &str,
        reason: &str,
        attempts: u32,
        cancel: &CancellationToken,
    ) -> bool {
        let tenant = tenant
            .or_else(|| msg.topic().split('.').nth(2).map(str::to_owned))
            .unwrap_or_default();
        let Ok(tenant) = TenantId::parse(&tenant) else {
            tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), %tenant, %reason,
                "record without a valid tenant cannot be dead-lettered; skipped");
            return true;
        };
        let record = DeadLetterRecord {
            topic: self.topics.dead_letters(&tenant),
            key: msg.key().unwrap_or_default().to_vec(),
            value: msg.payload().unwrap_or_default().to_vec(),
            headers: dead_letter_headers(
                headers,
                subscriber,
                reason,
                attempts,
                (msg.topic(), msg.partition(), msg.offset()),
            ),
        };
        let mut wait = DEAD_LETTER_FIRST_WAIT;
        loop {
            match self.sink.write(&record).await {
                Ok(()) => {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%tenant, subscriber, topic = %record.topic, original_topic = msg.topic(),
                        offset = msg.offset(), reason, "event dead-lettered");
                    return true;
                }
                Err(e) => {
                    tracing::error!(%tenant, subscriber, topic = %record.topic, error = %e, "dead-lettering failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(DEAD_LETTER_MAX_WAIT);
                }
            }
        }
    }
}

/// ±20 % around `base`.
pub(crate) fn jitter(base: Duration) -> Duration {
    let factor = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(factor)
}

/// Assignment changes, sent from the rebalance callback to [`Dispatcher::run`].
enum Change {
    Assigned(Vec<(String, i32, StreamPartitionQueue<CoreContext>)>),
    Revoked(Vec<(String, i32)>),
}

/// Splits every newly assigned partition off the consumer queue before librdkafka starts
/// fetching it (the split is sticky: librdkafka never forwards an application-split queue
/// again), and tells the dispatcher.
pub(crate) struct CoreContext {
    consumer: OnceLock<Weak<StreamConsumer<CoreContext>>>,
    changes: mpsc::UnboundedSender<Change>,
}

impl ClientContext for CoreContext {}

impl ConsumerContext for CoreContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else {
                    return;
                };
                let mut queues = Vec::new();
                for e in tpl.elements() {
                    match consumer.split_partition_queue(e.topic(), e.partition()) {
                        Some(q) => queues.push((e.topic().to_owned(), e.partition(), q)),
                        None => tracing::warn!(
                            topic = e.topic(),
                            partition = e.partition(),
                            "partition queue not split; its records come through the consumer queue"
                        ),
                    }
                }
                let _ = self.changes.send(Change::Assigned(queues));
            }
            Rebalance::Revoke(tpl) => {
                // What is finished is committed before the partitions go, so that their next
                // owner repeats only what was still running here (stored offsets never pass an
                // unfinished record).
                if let Err(e) = base.commit_consumer_state(CommitMode::Sync) {
                    tracing::debug!(error = %e, "commit before revocation");
                }
                let revoked = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                let _ = self.changes.send(Change::Revoked(revoked));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// How a [`Dispatcher`]'s consumer is set up.
pub(crate) struct DispatcherOptions {
    pub group: String,
    /// Unfinished records per partition, and attempts at once.
    pub max_in_flight: usize,
    pub fetch_wait: Duration,
    /// `session.timeout.ms`, also the rebalance timeout (`max.poll.interval.ms`): the consumer
    /// queue is polled at least every second whatever the handlers do, so a member that stops
    /// answering is replaced within this time.
    pub session_timeout: Duration,
    pub metadata_refresh: Duration,
}

/// The settings of a dispatcher's consumer, on top of [`at_least_once_consumer`]'s. With
/// split partition queues librdkafka's queue limits apply per partition, so they bound what a
/// partition that is not being read holds: fetching stops at 1,000 records or 1 MiB (plus one
/// fetch response of at most `fetch.message.max.bytes`, 1 MiB by default); a partition below them
/// is fetched again after 10 ms (librdkafka's default of 1 s stalls a fast partition that was
/// drained). Cooperative rebalancing moves only the partitions that change owner, so a new
/// subscription or a new instance does not interrupt the others.
pub(crate) fn dispatcher_config<'a>(
    cfg: &'a mut ClientConfig,
    options: &DispatcherOptions,
) -> &'a mut ClientConfig {
    let session = options.session_timeout.as_millis().to_string();
    at_least_once_consumer(cfg, &options.group, options.fetch_wait)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", &session)
        .set("max.poll.interval.ms", &session)
        .set(
            "heartbeat.interval.ms",
            (options.session_timeout.as_millis() / 10)
                .clamp(500, 3000)
                .to_string(),
        )
        .set("queued.min.messages", "1000")
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.queue.backoff.ms", "10")
        .set(
            "topic.metadata.refresh.interval.ms",
            options.metadata_refresh.as_millis().to_string(),
        )
}

/// A consumer group member that hands records to a [`Handler`] through a [`Pipeline`].
pub(crate) struct Dispatcher {
    consumer: Arc<StreamConsumer<CoreContext>>,
    changes: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
    max_in_flight: usize,
}

/// A record taken from a partition queue, holding its place in the partition's window.
struct Admitted {
    msg: OwnedMessage,
    generation: u64,
    _place: Option<OwnedSemaphorePermit>,
    stats: Arc<Stats>,
}

impl Admitted {
    fn new(
        msg: OwnedMessage,
        generation: u64,
        place: Option<OwnedSemaphorePermit>,
        stats: &Arc<Stats>,
    ) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Admitted {
            msg,
            generation,
            _place: place,
            stats: Arc::clone(stats),
        }
    }

    fn partition(&self) -> (String, i32) {
        (self.msg.topic().to_owned(), self.msg.partition())
    }

    /// Records with a key are ordered by (topic, partition, key); records without one are not.
    fn slot(&self) -> Option<Slot> {
        self.msg.key().map(|k| {
            (
                self.msg.topic().to_owned(),
                self.msg.partition(),
                k.to_vec(),
            )
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

type Slot = (String, i32, Vec<u8>);

/// An assigned partition.
struct Part {
    generation: u64,
    reader: Option<tokio::task::JoinHandle<()>>,
    /// Fires on revocation or stop: waits end, records are abandoned.
    cancel: CancellationToken,
    window: Arc<Semaphore>,
    offsets: OffsetTracker,
    retrying: Arc<AtomicUsize>,
}

impl Drop for Part {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl Dispatcher {
    /// Creates the consumer (`cfg` has the bootstrap servers and security settings); subscribe
    /// with [`Dispatcher::subscribe`].
    pub fn new(mut cfg: ClientConfig, options: &DispatcherOptions) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let context = CoreContext {
            consumer: OnceLock::new(),
            changes: tx,
        };
        let consumer: StreamConsumer<CoreContext> = dispatcher_config(&mut cfg, options)
            .create_with_context(context)
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let consumer = Arc::new(consumer);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        Ok(Dispatcher {
            consumer,
            changes: Mutex::new(Some(rx)),
            max_in_flight: options.max_in_flight.max(1),
        })
    }

    /// Subscribes to these topics (names or `^`-patterns), replacing the current subscription.
    pub fn subscribe(&self, topics: &[&str]) -> Result<(), ClientError> {
        self.consumer
            .subscribe(topics)
            .map_err(|e| ClientError::Kafka(e.to_string()))
    }

    pub fn consumer(&self) -> &Arc<StreamConsumer<CoreContext>> {
        &self.consumer
    }

    /// Handles records until `stop` fires; then lets running attempts finish (waits end at
    /// once: those records are handled again after a restart), commits and returns.
    pub async fn run<H: Handler>(
        &self,
        pipeline: &Pipeline,
        handler: &H,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let mut changes = self
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| ClientError::Invalid("the consumer is already running".into()))?;
        let stats = &pipeline.stats;
        let (tx, mut records) = mpsc::unbounded_channel::<Admitted>();
        let mut parts: HashMap<(String, i32), Part> = HashMap::new();
        // Slots with a running record, each with the records waiting behind it.
        let mut slots: HashMap<Slot, VecDeque<Admitted>> = HashMap::new();
        let mut running = FuturesUnordered::new();
        let mut generation = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;

        let start = |adm: Admitted, (cancel, retrying): (CancellationToken, Arc<AtomicUsize>)| async move {
            let outcome = pipeline
                .process_in(handler, &adm.msg, &cancel, &retrying)
                .await;
            (adm, outcome)
        };

        loop {
            if stopping && running.is_empty() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    for part in parts.values() {
                        part.cancel.cancel();
                        if let Some(reader) = &part.reader {
                            reader.abort();
                        }
                    }
                    for waiting in slots.values_mut() {
                        waiting.clear();
                    }
                    while records.try_recv().is_ok() {}
                }
                Some((adm, outcome)) = next_finished(&mut running), if !running.is_empty() => {
                    let current = parts
                        .get_mut(&adm.partition())
                        .filter(|p| p.generation == adm.generation);
                    match (outcome, current) {
                        (Outcome::Finished, Some(part)) => {
                            stats.finished.fetch_add(1, Ordering::Relaxed);
                            if let Some(position) = part.offsets.finish(adm.msg.offset()) {
                                let mut tpl = TopicPartitionList::new();
                                let stored = tpl
                                    .add_partition_offset(adm.msg.topic(), adm.msg.partition(), Offset::Offset(position))
                                    .and_then(|()| self.consumer.store_offsets(&tpl));
                                // Fails only for a partition no longer assigned: its new owner
                                // starts from the last commit.
                                if let Err(e) = stored {
                                    tracing::debug!(error = %e, "offset not stored");
                                }
                            }
                        }
                        (Outcome::Finished, None) => {
                            stats.finished.fetch_add(1, Ordering::Relaxed);
                        }
                        (Outcome::Abandoned, _) => {}
                    }
                    if let Some(slot) = adm.slot() {
                        let waiting = slots.get_mut(&slot);
                        let next = waiting.and_then(|w| loop {
                            match w.pop_front() {
                                Some(n) if parts.get(&n.partition()).is_some_and(|p| p.generation == n.generation) => break Some(n),
                                Some(_) => continue, // of a revoked assignment: dropped
                                None => break None,
                            }
                        });
                        match next {
                            Some(n) if !stopping => {
                                let handles = handles(&parts, &n);
                                running.push(start(n, handles));
                            }
                            _ => {
                                slots.remove(&slot);
                            }
                        }
                    }
                }
                Some(change) = changes.recv() => match change {
                    Change::Assigned(queues) => {
                        for (topic, partition, queue) in queues {
                            generation += 1;
                            let window = Arc::new(Semaphore::new(self.max_in_flight));
                            let reader = (!stopping).then(|| tokio::spawn(read(
                                queue,
                                Arc::clone(&window),
                                generation,
                                tx.clone(),
                                Arc::clone(stats),
                            )));
                            tracing::debug!(%topic, partition, "partition assigned");
                            parts.insert((topic, partition), Part {
                                generation,
                                reader,
                                cancel: stop.child_token(),
                                window,
                                offsets: OffsetTracker::default(),
                                retrying: Arc::default(),
                            });
                        }
                        stats.assigned_partitions.store(parts.len(), Ordering::Relaxed);
                    }
                    Change::Revoked(revoked) => {
                        for tp in &revoked {
                            tracing::debug!(topic = %tp.0, partition = tp.1, "partition revoked");
                            parts.remove(tp);
                        }
                        for waiting in slots.values_mut() {
                            waiting.retain(|a| parts.get(&a.partition()).is_some_and(|p| p.generation == a.generation));
                        }
                        stats.assigned_partitions.store(parts.len(), Ordering::Relaxed);
                    }
                },
                Some(adm) = records.recv(), if !stopping => {
                    let Some(part) = parts
                        .get_mut(&adm.partition())
                        .filter(|p| p.generation == adm.generation)
                    else {
                        continue; // of a revoked assignment
                    };
                    part.offsets.seen(adm.msg.offset(), adm.msg.timestamp().to_millis());
                    if let Some(adm) = queue_or_start(adm, &mut slots) {
                        let handles = handles(&parts, &adm);
                        running.push(start(adm, handles));
                    }
                }
                received = self.consumer.recv(), if !stopping => match received {
                    // Only a partition whose queue could not be split sends records here.
                    Ok(msg) => {
                        let msg = msg.detach();
                        let tp = (msg.topic().to_owned(), msg.partition());
                        let part = parts.entry(tp).or_insert_with(|| {
                            generation += 1;
                            Part {
                                generation,
                                reader: None,
                                cancel: stop.child_token(),
                                window: Arc::new(Semaphore::new(self.max_in_flight)),
                                offsets: OffsetTracker::default(),
                                retrying: Arc::default(),
                            }
                        });
                        part.offsets.seen(msg.offset(), msg.timestamp().to_millis());
                        let adm = Admitted::new(msg, part.generation, None, stats);
                        if let Some(adm) = queue_or_start(adm, &mut slots) {
                            let handles = handles(&parts, &adm);
                            running.push(start(adm, handles));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "consumer error"),
                },
                // Also makes the loop poll the consumer queue at least once a second.
                _ = tick.tick() => refresh(stats, &parts),
            }
        }
        refresh(stats, &parts);
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
        // The readers own the partition queues (and so references to the consumer): let them
        // go before returning, so that dropping the consumer leaves the group at once.
        for part in parts.values_mut() {
            if let Some(reader) = part.reader.take() {
                reader.abort();
                let _ = reader.await;
            }
        }
        drop(parts);
        *self.changes.lock().unwrap_or_else(|e| e.into_inner()) = Some(changes);
        Ok(())
    }
}

/// The next record whose processing ended (typed, so that the caller's futures need no name).
async fn next_finished<F: Future<Output = (Admitted, Outcome)>>(
    running: &mut FuturesUnordered<F>,
) -> Option<(Admitted, Outcome)> {
    running.next().await
}

/// Queues `adm` behind the running record with its key, or gives it back to be started now.
fn queue_or_start(
    adm: Admitted,
    slots: &mut HashMap<Slot, VecDeque<Admitted>>,
) -> Option<Admitted> {
    match adm.slot() {
        Some(slot) => match slots.get_mut(&slot) {
            Some(waiting) => {
                waiting.push_back(adm);
                None
            }
            None => {
                slots.insert(slot, VecDeque::new());
                Some(adm)
            }
        },
        None => Some(adm),
    }
}

/// What a record's processing needs of its partition: the token that abandons it, and the
/// partition's count of records waiting for a retry. A record of a partition no longer assigned
/// gets a cancelled token.
fn handles(
    parts: &HashMap<(String, i32), Part>,
    adm: &Admitted,
) -> (CancellationToken, Arc<AtomicUsize>) {
    match parts
        .get(&adm.partition())
        .filter(|p| p.generation == adm.generation)
    {
        Some(p) => (p.cancel.clone(), Arc::clone(&p.retrying)),
        None => {
            let cancelled = CancellationToken::new();
            cancelled.cancel();
            (cancelled, Arc::default())
        }
    }
}

/// The gauges computed from the partitions.
fn refresh(stats: &Stats, parts: &HashMap<(String, i32), Part>) {
    let paused = parts
        .values()
        .filter(|p| p.window.available_permits() == 0)
        .count();
    let retrying = parts
        .values()
        .filter(|p| p.retrying.load(Ordering::Relaxed) > 0)
        .count();
    let oldest = parts.values().filter_map(|p| p.offsets.oldest()).min();
    stats.paused_partitions.store(paused, Ordering::Relaxed);
    stats.retrying_partitions.store(retrying, Ordering::Relaxed);
    stats
        .oldest_unfinished_ms
        .store(oldest.unwrap_or(0), Ordering::Relaxed);
}

/// Reads one partition's queue while its window has room.
async fn read(
    queue: StreamPartitionQueue<CoreContext>,
    window: Arc<Semaphore>,
    generation: u64,
    tx: mpsc::UnboundedSender<Admitted>,
    stats: Arc<Stats>,
) {
    loop {
        let place = match Arc::clone(&window).try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                stats.pauses.fetch_add(1, Ordering::Relaxed);
                match Arc::clone(&window).acquire_owned().await {
                    Ok(place) => place,
                    Err(_) => return,
                }
            }
        };
        match queue.recv().await {
            Ok(msg) => {
                let adm = Admitted::new(msg.detach(), generation, Some(place), &stats);
                if tx.send(adm).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "partition queue error");
                drop(place);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Which offsets of a partition are received and not finished, so the committed position
/// never passes a record that is still being handled.
#[derive(Default)]
struct OffsetTracker {
    /// Offsets received and not finished, with their Kafka timestamps (ms; or when received).
    open: BTreeMap<i64, i64>,
    /// One past the highest offset received.
    next: Option<i64>,
    /// The position last stored.
    stored: i64,
}

impl OffsetTracker {
    fn seen(&mut self, offset: i64, timestamp: Option<i64>) {
        if self.next.is_none() {
            self.stored = offset;
        }
        let at = timestamp.unwrap_or_else(|| Utc::now().timestamp_millis());
        self.open.insert(offset, at);
        self.next = Some(self.next.unwrap_or(offset).max(offset + 1));
    }

    /// Marks the record finished; returns the partition's new position when it moved.
    fn finish(&mut self, offset: i64) -> Option<i64> {
        self.open.remove(&offset);
        let position = self
            .open
            .keys()
            .next()
            .copied()
            .or(self.next)
            .unwrap_or(self.stored);
        if position <= self.stored {
            return None;
        }
        self.stored = position;
        Some(position)
    }

    /// The timestamp of the oldest unfinished record.
    fn oldest(&self) -> Option<i64> {
        self.open.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_never_passes_an_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.seen(o, Some(1000 + o));
        }
        assert_eq!(t.oldest(), Some(1010));
        // 11 and 12 finish first: 10 is still open, nothing to store.
        assert_eq!(t.finish(11), None);
        assert_eq!(t.finish(12), None);
        // 10 finishes: the position moves to 13, the oldest open record.
        assert_eq!(t.finish(10), Some(13));
        assert_eq!(t.oldest(), Some(1013));
        assert_eq!(t.finish(13), Some(14));
        assert_eq!(t.oldest(), None);
        // Nothing open: finishing again moves nothing.
        assert_eq!(t.finish(13), None);
    }

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
}
