//! Consuming event topics directly, with bounded in-flight records and back-pressure.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::ClientError;
use crate::domain::{EventType, TenantId};
use crate::event::Event;
use crate::kafka::{
    at_least_once_consumer, dead_letter_headers, idempotent_producer, record_headers, Topics,
};

/// An event as a direct consumer receives it.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    /// The tenant (the `folio.tenantId` header, else `eventMetadata.tenantId`).
    pub tenant: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
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
    /// At most this many records are handled at once (folio-kafka-wrapper's load limit);
    /// default 16. With 1, records are handled one after another.
    pub max_in_flight: usize,
    /// While `max_in_flight` records are in flight the consumer takes no more records from
    /// librdkafka, whose prefetch queue (at most 16 MiB) then fills and stops fetching. If that
    /// lasts `pause_after` (default 10 s), the partitions are paused and the consumer goes on
    /// polling, so it stays in its group however long the handlers take.
    pub pause_after: Duration,
    /// Paused partitions resume when fewer than this many records are in flight (default: half
    /// of `max_in_flight`).
    pub resume_below: Option<usize>,
    /// The waits between attempts of a failing handler; after the last one the record goes to
    /// the dead-letter topic. Default 1 s, 5 s, 30 s (four attempts).
    pub retry_schedule: Vec<Duration>,
    /// How long an idle fetch waits at the broker (default 20 ms; see the README's Kafka
    /// settings).
    pub fetch_wait: Duration,
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
            kafka: Vec::new(),
        }
    }
}

/// Consumes event types straight from Kafka. See the [module documentation](super) for an
/// example.
///
/// * Up to `max_in_flight` records are handled at once; records with the same key (in the same
///   partition) are handled one after another, in order.
/// * Back-pressure: while `max_in_flight` records are in flight no more records are taken, so
///   librdkafka's bounded prefetch queue fills and it stops fetching; after `pause_after` the
///   assigned partitions are paused (as folio-kafka-wrapper does at its load limit) and the
///   consumer keeps polling, so it keeps its group membership; they resume when fewer than
///   `resume_below` records are in flight. (librdkafka drops its prefetched records on pause
///   and fetches again from the next record on resume.)
/// * At least once: a partition's offset is stored only up to its oldest record not yet
///   finished, and stored offsets are committed every 500 ms and when [`DirectConsumer::run`]
///   returns. A crash repeats at most the records finished since the last commit.
/// * A failing handler is retried after the waits of `retry_schedule`; then the record goes to
///   the tenant's dead-letter topic (`{env}.Default.{tenant}.mod-pubsub.dead-letters`, with the
///   headers the delivery engine writes, so pubsub's dead-letter endpoints list it) and counts
///   as finished. A record that is not an Event envelope goes there at once.
pub struct DirectConsumer {
    consumer: StreamConsumer,
    producer: FutureProducer,
    topics: Topics,
    module: String,
    /// The waits between attempts (see [`ConsumerOptions::retry_schedule`]).
    pub retry_schedule: Vec<Duration>,
    max_in_flight: usize,
    pause_after: Duration,
    resume_below: usize,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    in_flight: AtomicUsize,
    paused: AtomicBool,
    pauses: AtomicU64,
    finished: AtomicU64,
    dead_lettered: AtomicU64,
}

/// A snapshot of what a [`DirectConsumer`] is doing (for metrics and health checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerStats {
    /// Records admitted and not finished (running, or waiting behind a record with their key).
    pub in_flight: usize,
    /// Whether the partitions are paused now.
    pub paused: bool,
    /// How often the partitions were paused because `max_in_flight` records were in flight.
    pub pauses: u64,
    /// Records finished (handled, or dead-lettered).
    pub finished: u64,
    pub dead_lettered: u64,
}

/// What became of one record.
enum Outcome {
    /// Handled, or written to the dead-letter topic: its offset may be committed.
    Finished,
    /// Given up because the consumer stops: handled again after the restart.
    Abandoned,
    /// The dead-letter topic could not be written: stop the consumer.
    Failed(ClientError),
}

/// A record's place: records in the same slot are handled in order.
type Slot = (String, i32, Vec<u8>);

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
        let tenant = tenant
            .map(|t| TenantId::parse(t).map_err(|e| ClientError::Invalid(e.0)))
            .transpose()?;
        let mut topics = Vec::new();
        for t in event_types {
            let e = EventType::parse(t)
                .map_err(|e| ClientError::Invalid(format!("eventType: {}", e.0)))?;
            topics.push(naming.subscription(tenant.as_ref(), &e));
        }
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
        let consumer: StreamConsumer = at_least_once_consumer(&mut cfg, &group, options.fetch_wait)
            .set("topic.metadata.refresh.interval.ms", "5000")
            .create()
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&names)
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let producer = idempotent_producer(&mut producer_cfg)
            .create()
            .map_err(|e| ClientError::Kafka(e.to_string()))?;
        let resume_below = options
            .resume_below
            .unwrap_or(options.max_in_flight / 2)
            .clamp(1, options.max_in_flight);
        Ok(DirectConsumer {
            consumer,
            producer,
            topics: naming,
            module: module.to_owned(),
            retry_schedule: options.retry_schedule,
            max_in_flight: options.max_in_flight,
            pause_after: options.pause_after,
            resume_below,
            stats: Stats::default(),
        })
    }

    /// Handles records until `stop` is cancelled; then lets the handlers that are running
    /// finish (waits between retries end at once, and those records are handled again after a
    /// restart), commits and returns. Drop the consumer to leave the group. Returns an error when Kafka fails the consumer or a
    /// dead-letter topic cannot be written.
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
        let mut offsets = OffsetTracker::default();
        let mut running = FuturesUnordered::new();
        // Records that arrived while paused or at the limit, in arrival order.
        let mut backlog: VecDeque<OwnedMessage> = VecDeque::new();
        // The slots with a running record, each with the records waiting behind it.
        let mut running_slots: HashMap<Slot, VecDeque<OwnedMessage>> = HashMap::new();
        // Records admitted and not finished (running or behind).
        let mut admitted = 0usize;
        let mut paused = false;
        // Since when `max_in_flight` records are in flight.
        let mut full_since: Option<tokio::time::Instant> = None;
        let mut stopping = false;
        let mut failure = None;

        loop {
            while admitted < self.max_in_flight && !stopping {
                let Some(msg) = backlog.pop_front() else {
                    break;
                };
                admitted += 1;
                self.stats.in_flight.store(admitted, Ordering::Relaxed);
                match slot_of(&msg) {
                    Some(slot) if running_slots.contains_key(&slot) => {
                        running_slots.entry(slot).or_default().push_back(msg);
                    }
                    slot => {
                        if let Some(slot) = slot {
                            running_slots.insert(slot, VecDeque::new());
                        }
                        running.push(self.handle(&handler, msg, &stop));
                    }
                }
            }
            let at_limit = admitted >= self.max_in_flight;
            match (at_limit, full_since) {
                (true, None) => full_since = Some(tokio::time::Instant::now()),
                (false, Some(_)) => full_since = None,
                _ => {}
            }
            if paused && admitted < self.resume_below && backlog.is_empty() {
                self.set_paused(false);
                paused = false;
            }
            if stopping && running.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled(), if !stopping => stopping = true,
                Some((msg, outcome)) = running.next(), if !running.is_empty() => {
                    match outcome {
                        Outcome::Finished => {
                            self.stats.finished.fetch_add(1, Ordering::Relaxed);
                            if let Some(tpl) = offsets.finish(&msg) {
                                // Fails only for partitions no longer assigned (a rebalance):
                                // their new owner handles the records from the last commit.
                                if let Err(e) = self.consumer.store_offsets(&tpl) {
                                    tracing::debug!(error = %e, "offset not stored");
                                }
                            }
                        }
                        Outcome::Abandoned => {}
                        Outcome::Failed(e) => {
                            failure.get_or_insert(e);
                            stopping = true;
                        }
                    }
                    admitted -= 1;
                    self.stats.in_flight.store(admitted, Ordering::Relaxed);
                    if let Some(slot) = slot_of(&msg) {
                        match running_slots.get_mut(&slot).and_then(VecDeque::pop_front) {
                            Some(next) if !stopping => running.push(self.handle(&handler, next, &stop)),
                            _ => {
                                running_slots.remove(&slot);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(
                    full_since.unwrap_or_else(tokio::time::Instant::now) + self.pause_after
                ), if full_since.is_some() && !paused && !stopping => {
                    self.set_paused(true);
                    paused = true;
                }
                // At the limit, records are taken only while paused (then only rebalances and
                // records of newly assigned partitions arrive; they wait in the backlog).
                received = self.consumer.recv(), if !stopping && (!at_limit || paused) => {
                    let msg = received.map_err(|e| ClientError::Kafka(e.to_string()))?.detach();
                    offsets.seen(&msg);
                    backlog.push_back(msg);
                }
            }
        }
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final commit");
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            in_flight: self.stats.in_flight.load(Ordering::Relaxed),
            paused: self.stats.paused.load(Ordering::Relaxed),
            pauses: self.stats.pauses.load(Ordering::Relaxed),
            finished: self.stats.finished.load(Ordering::Relaxed),
            dead_lettered: self.stats.dead_lettered.load(Ordering::Relaxed),
        }
    }

    fn set_paused(&self, pause: bool) {
        self.stats.paused.store(pause, Ordering::Relaxed);
        if pause {
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
        }
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "no assignment to pause or resume");
                return;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => tracing::debug!(
                module = %self.module,
                partitions = assignment.count(),
                paused = pause,
                "back-pressure"
            ),
            Err(e) => tracing::warn!(error = %e, "pause or resume failed"),
        }
    }

    /// Handles one record: the handler with retries, then the dead-letter topic.
    async fn handle<F, Fut, E>(
        &self,
        handler: &F,
        msg: OwnedMessage,
        stop: &CancellationToken,
    ) -> (OwnedMessage, Outcome)
    where
        F: Fn(ReceivedEvent) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let headers = record_headers(&msg);
        let parsed = msg.payload().map(serde_json::from_slice::<Event>);
        let mut attempts = 0u32;
        let reason = match parsed {
            Some(Ok(event)) => {
                let received = ReceivedEvent {
                    tenant: headers
                        .get("folio.tenantId")
                        .cloned()
                        .unwrap_or_else(|| event.event_metadata.tenant_id.clone()),
                    topic: msg.topic().to_owned(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    event,
                    headers: headers.clone(),
                };
                let mut waits = self.retry_schedule.iter();
                loop {
                    attempts += 1;
                    let reason = match handler(received.clone()).await {
                        Ok(()) => return (msg, Outcome::Finished),
                        Err(e) => e.to_string(),
                    };
                    let Some(wait) = waits.next() else {
                        break reason;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => return (msg, Outcome::Abandoned),
                        _ = tokio::time::sleep(*wait) => {}
                    }
                }
            }
            Some(Err(e)) => format!("not an Event envelope: {e}"),
            None => "not an Event envelope: no value".to_owned(),
        };
        let outcome = match self.dead_letter(&msg, &headers, &reason, attempts).await {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Outcome::Finished
            }
            Err(e) => Outcome::Failed(e),
        };
        (msg, outcome)
    }

    async fn dead_letter(
        &self,
        msg: &OwnedMessage,
        headers: &HashMap<String, String>,
        reason: &str,
        attempts: u32,
    ) -> Result<(), ClientError> {
        let tenant = headers
            .get("folio.tenantId")
            .cloned()
            .or_else(|| msg.topic().split('.').nth(2).map(str::to_owned))
            .unwrap_or_default();
        let tenant = TenantId::parse(&tenant).map_err(|e| {
            ClientError::Invalid(format!("record without a valid tenant ({tenant}): {}", e.0))
        })?;
        let dlq = self.topics.dead_letters(&tenant).to_string();
        let mut out = OwnedHeaders::new();
        for (k, v) in dead_letter_headers(
            headers,
            &self.module,
            reason,
            attempts,
            (msg.topic(), msg.partition(), msg.offset()),
        ) {
            out = out.insert(Header {
                key: &k,
                value: Some(v.as_str()),
            });
        }
        let key = msg.key().unwrap_or_default();
        let record = FutureRecord::to(&dlq)
            .key(key)
            .payload(msg.payload().unwrap_or_default())
            .headers(out);
        tracing::warn!(module = %self.module, topic = msg.topic(), offset = msg.offset(), %reason, "dead-lettered");
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map(|_| ())
            .map_err(|(e, _)| ClientError::Kafka(format!("{dlq}: {e}")))
    }
}

/// Records with a key are ordered by (topic, partition, key); records without one are not.
fn slot_of(msg: &OwnedMessage) -> Option<Slot> {
    msg.key()
        .map(|k| (msg.topic().to_owned(), msg.partition(), k.to_vec()))
}

/// Which offsets of each partition are received and not finished, so the committed position
/// never passes a record that is still being handled.
#[derive(Default)]
struct OffsetTracker {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Default)]
struct Partition {
    /// Offsets received and not finished (with how often they were received: after a
    /// rebalance a record can arrive again while its first copy is still running).
    open: BTreeMap<i64, u32>,
    /// One past the highest offset received.
    next: i64,
    /// The position last stored.
    stored: i64,
}

impl OffsetTracker {
    fn seen(&mut self, msg: &OwnedMessage) {
        let p = self
            .partitions
            .entry((msg.topic().to_owned(), msg.partition()))
            .or_insert_with(|| Partition {
                stored: msg.offset(),
                ..Partition::default()
            });
        *p.open.entry(msg.offset()).or_default() += 1;
        p.next = p.next.max(msg.offset() + 1);
    }

    /// Marks the record finished; returns the partition's new position when it moved.
    fn finish(&mut self, msg: &OwnedMessage) -> Option<TopicPartitionList> {
        let p = self
            .partitions
            .get_mut(&(msg.topic().to_owned(), msg.partition()))?;
        if let Some(n) = p.open.get_mut(&msg.offset()) {
            *n -= 1;
            if *n == 0 {
                p.open.remove(&msg.offset());
            }
        }
        let position = p.open.keys().next().copied().unwrap_or(p.next);
        if position <= p.stored {
            return None;
        }
        p.stored = position;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(msg.topic(), msg.partition(), Offset::Offset(position))
            .ok()?;
        Some(tpl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn msg(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn position(tpl: Option<TopicPartitionList>) -> Option<i64> {
        tpl.map(|t| t.elements()[0].offset().to_raw().unwrap())
    }

    #[test]
    fn the_position_never_passes_an_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.seen(&msg(0, o));
        }
        t.seen(&msg(1, 5));
        // 11 and 12 finish first: 10 is still open, nothing to store.
        assert_eq!(position(t.finish(&msg(0, 11))), None);
        assert_eq!(position(t.finish(&msg(0, 12))), None);
        // 10 finishes: the position moves to 13, the oldest open record.
        assert_eq!(position(t.finish(&msg(0, 10))), Some(13));
        assert_eq!(position(t.finish(&msg(0, 13))), Some(14));
        // Partitions are independent.
        assert_eq!(position(t.finish(&msg(1, 5))), Some(6));
    }

    #[test]
    fn a_record_received_twice_stays_open_until_both_copies_finish() {
        let mut t = OffsetTracker::default();
        t.seen(&msg(0, 3));
        t.seen(&msg(0, 4));
        t.seen(&msg(0, 3)); // again, after a rebalance
        assert_eq!(position(t.finish(&msg(0, 4))), None);
        assert_eq!(position(t.finish(&msg(0, 3))), None);
        assert_eq!(position(t.finish(&msg(0, 3))), Some(5));
    }
}
