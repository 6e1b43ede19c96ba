//! The consumer core that the delivery engine and [`DirectConsumer`](super::DirectConsumer)
//! share: per-partition queues with an in-flight window each, per-key order, offset tracking,
//! retry scheduling and dead-lettering. Its users add only what one attempt does (a callback
//! through Okapi, or the application's handler) and what they record about it.
//!
//! # Which partitions are fetched
//!
//! A module in 1,000 tenants subscribes to 8,000 partitions, and librdkafka holds about 9 KiB and
//! a share of its broker thread's work for every partition a consumer fetches (measured: 70 MiB
//! and most of an idle core at 8,000), however idle. So the group's share and the fetching are
//! split:
//!
//! * The **group member** (one consumer per module) only keeps the membership and commits: the
//!   rebalance callback records which partitions the group gives this instance and completes
//!   the rebalance with an empty librdkafka assignment.
//! * A partition of the share is **parked** until it has work: its position (the committed
//!   offset, or the earliest offset where the group has none) is read when it is given, and the
//!   end offsets of all of them are read together (one ListOffsets per broker) every
//!   `idle_check`. A parked partition whose end offset passes its position, or that the HTTP
//!   publish path of this instance has just written to, becomes **active**: a **fetcher** (a
//!   consumer that never joins the group) is given it at its position. At most `max_active`
//!   partitions are active at once, the longest waiting first.
//! * An active partition goes back to parked when nothing of it is unfinished, no record came for
//!   100 ms (its reader is not in the middle of a batch), and it is at its end offset while others
//!   wait for a slot (or after 30 s without a record). Records that arrive after the end offset
//!   was read are found by the next reading: nothing is skipped, the partition is fetched again.
//! * librdkafka keeps the objects of every topic a client has fetched until the client goes, so a
//!   fetcher that has fetched `max_active` topics retires: it takes nothing new, its partitions
//!   move to a new fetcher once they are drained and at their end offset, and it is closed when
//!   it holds none (a fetcher with nothing active for a minute is closed too). What the instance
//!   holds in librdkafka is bounded by `max_active`, not by the number of tenants.
//!
//! # How records flow
//!
//! * Every active partition gets its own librdkafka queue (split off the fetcher's queue before
//!   fetching starts) and a reader task. A reader takes a record only while its partition holds
//!   fewer than `max_in_flight` unfinished records, so a partition whose records fail or are slow
//!   stops being read, and librdkafka stops fetching it once its own per-partition queue is full
//!   (`queued.min.messages`, `queued.max.messages.kbytes`). Other partitions (other tenants and
//!   event types: topics are per tenant and event type) are read as before: no pause, no seek, no
//!   head-of-line blocking across partitions.
//! * At most `max_in_flight` attempts run at once across all partitions (a semaphore); a record
//!   waiting for its next attempt holds no such permit and no task, only its place in its
//!   partition's window.
//! * Records with the same key in a partition run one after another, in offset order, retries
//!   included; records with other keys go on meanwhile.
//! * A partition's position moves only up to its oldest unfinished record; positions are
//!   committed through the group member every 500 ms (a commit the coordinator refuses is kept
//!   for the next one), before partitions are revoked, and at the end of [`Dispatcher::run`]: at
//!   least once.
//! * The member's queue is polled continuously (rebalances, errors, and librdkafka's
//!   `max.poll.interval.ms` liveness check), whatever the handlers do, so the group's rebalance
//!   timeout can be short and a crashed member is replaced within the session timeout.
//! * On revocation (another member takes the partition), parking or stop, waits end at once and
//!   their records are abandoned; attempts that are running finish, but nothing more is
//!   committed for a revoked partition: its new owner starts from the last commit.

// Parts only the delivery engine uses (the server feature).
#![cfg_attr(not(feature = "server"), allow(dead_code))]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, DefaultConsumerContext, RebalanceProtocol,
    StreamConsumer,
};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::ClientError;
use crate::kafka::{at_least_once_consumer, partition_queue_limits};

mod lookups;
mod offsets;
use lookups::{Lookup, Lookups};
mod pipeline;
use offsets::OffsetTracker;
pub(crate) use pipeline::*;

/// Changes of the group's share, sent from the rebalance callback to [`Dispatcher::run`].
enum Change {
    Owned(Vec<(String, i32)>),
    Disowned(Vec<(String, i32)>),
}

/// Finished positions not yet committed, by partition.
type Dirty = Arc<Mutex<HashMap<(String, i32), i64>>>;

/// The group member's context: records which partitions the group gives this member, and
/// commits what is finished of a partition before it goes. Nothing is fetched through the
/// member itself (its librdkafka assignment stays empty); fetchers do that.
pub(crate) struct CoreContext {
    changes: mpsc::UnboundedSender<Change>,
    dirty: Dirty,
    /// A periodic commit is on its way. One at a time, each waited for off the dispatcher's
    /// loop: librdkafka completes a rebalance only when no commit is outstanding, so commits
    /// sent back to back without waiting would hold rebalances up indefinitely.
    committing: AtomicBool,
}

impl ClientContext for CoreContext {}

impl ConsumerContext for CoreContext {
    fn rebalance(
        &self,
        base: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let list: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let empty = TopicPartitionList::new();
        let acknowledged = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let _ = self.changes.send(Change::Owned(list));
                // An empty (incremental) assignment completes the rebalance: the partitions are
                // this member's in the group, and fetched by the dispatcher's fetchers.
                if cooperative {
                    base.incremental_assign(&empty)
                } else {
                    base.assign(&empty)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // What is finished is committed before the partitions go, so that their next
                // owner repeats only what was still running here.
                self.commit(base, Some(&list));
                let _ = self.changes.send(Change::Disowned(list));
                if cooperative {
                    base.incremental_unassign(&empty)
                } else {
                    base.unassign()
                }
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = acknowledged {
            tracing::warn!(error = %e, "rebalance not acknowledged");
        }
    }
}

impl CoreContext {
    /// Commits the finished positions (of `only` these partitions, when given; else all);
    /// blocks until the broker answers. What is not committed stays to be committed next time
    /// (a group that is rebalancing refuses commits): were it dropped, a partition that has
    /// nothing more to finish would keep its old offset, and its next owner would repeat
    /// everything since.
    fn commit<C: Consumer<Self>>(&self, consumer: &C, only: Option<&[(String, i32)]>) {
        let taken: Vec<((String, i32), i64)> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
            match only {
                None => dirty.drain().collect(),
                Some(list) => list
                    .iter()
                    .filter_map(|tp| dirty.remove_entry(tp))
                    .collect(),
            }
        };
        if taken.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(taken.len());
        for ((topic, partition), position) in &taken {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*position));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::debug!(error = %e, partitions = taken.len(), "commit failed; kept for the next one");
            // A revoked partition is not kept: it is another member's now.
            if only.is_none() {
                let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                for (tp, position) in taken {
                    dirty.entry(tp).or_insert(position);
                }
            }
        }
    }
}

/// How a [`Dispatcher`]'s consumers are set up.
pub(crate) struct DispatcherOptions {
    pub group: String,
    /// Unfinished records per partition, and attempts at once.
    pub max_in_flight: usize,
    pub fetch_wait: Duration,
    /// `session.timeout.ms`, also the rebalance timeout (`max.poll.interval.ms`): the member's
    /// queue is polled at least every second whatever the handlers do, so a member that stops
    /// answering is replaced within this time.
    pub session_timeout: Duration,
    pub metadata_refresh: Duration,
    /// Partitions fetched at once; the others of this member's share wait, parked.
    pub max_active: usize,
    /// How often the end offsets of this member's partitions are read, to find the parked
    /// ones that have records.
    pub idle_check: Duration,
}

/// Defaults of [`DispatcherOptions::max_active`] and [`DispatcherOptions::idle_check`].
pub(crate) const DEFAULT_MAX_ACTIVE: usize = 1000;
pub(crate) const DEFAULT_IDLE_CHECK: Duration = Duration::from_secs(1);

/// An active partition with nothing unfinished and no new record for this long goes back to
/// parked (sooner when other partitions wait for a fetch slot; see [`Book::park`]).
const LINGER: Duration = Duration::from_secs(30);
/// An active partition that received a record this recently is not parked: its reader may be
/// taking the next record of a batch from librdkafka's queue (parked there, it would be fetched
/// again from the middle of the batch, which tansu does not answer).
const QUIET: Duration = Duration::from_millis(100);
/// How often finished positions are committed.
const COMMIT_EVERY: Duration = Duration::from_millis(500);
/// A fetcher with no active partition for this long is closed (its threads and connection go).
const FETCHER_IDLE: Duration = Duration::from_secs(60);

/// The settings of a dispatcher's group member, on top of [`at_least_once_consumer`]'s: it
/// only keeps the membership and commits (no fetching: auto-commit is off, offsets are
/// committed from the finished positions). Cooperative rebalancing moves only the partitions
/// that change owner, so a new subscription or a new instance does not interrupt the others.
pub(crate) fn dispatcher_config<'a>(
    cfg: &'a mut ClientConfig,
    options: &DispatcherOptions,
) -> &'a mut ClientConfig {
    let session = options.session_timeout.as_millis().to_string();
    at_least_once_consumer(cfg, &options.group, options.fetch_wait)
        .set("enable.auto.commit", "false")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", &session)
        .set("max.poll.interval.ms", &session)
        .set(
            "heartbeat.interval.ms",
            (options.session_timeout.as_millis() / 10)
                .clamp(500, 3000)
                .to_string(),
        )
        .set(
            "topic.metadata.refresh.interval.ms",
            options.metadata_refresh.as_millis().to_string(),
        )
}

/// The settings of a fetcher: a consumer that never joins a group and fetches the partitions
/// it is given from the positions it is given. (It has a `group.id` of its own, never joined
/// and never committed to, because librdkafka takes incremental assignments only from a
/// consumer with one.) Each partition has its own queue (split before fetching starts), so
/// librdkafka's queue limits ([`partition_queue_limits`]) apply per partition (plus one fetch
/// response of at most `fetch.message.max.bytes`, 1 MiB by default). Its metadata is refreshed
/// at librdkafka's default interval (5 minutes; a leader change shows in fetch errors, which
/// refresh it at once): the group member already refreshes the same topics often, and
/// every refresh of thousands of topics costs allocations (heaptrack: metadata was 64 of 83 MiB
/// of heap at 8,000 topics).
fn fetcher_config(cfg: &mut ClientConfig, options: &DispatcherOptions) -> ClientConfig {
    let mut cfg = cfg.clone();
    cfg.set("group.id", format!("{}.fetcher", options.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "fetch.wait.max.ms",
            options.fetch_wait.as_millis().to_string(),
        );
    partition_queue_limits(&mut cfg);
    cfg
}

/// A consumer group member that hands records to a [`Handler`] through a [`Pipeline`].
pub(crate) struct Dispatcher {
    member: Arc<StreamConsumer<CoreContext>>,
    changes: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
    dirty: Dirty,
    fetch_cfg: ClientConfig,
    max_in_flight: usize,
    max_active: usize,
    idle_check: Duration,
    hints: Mutex<Option<broadcast::Receiver<Arc<str>>>>,
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

/// A partition being fetched.
struct Part {
    generation: u64,
    fetcher: u64,
    reader: tokio::task::JoinHandle<()>,
    /// Fires on revocation, parking or stop: waits end, records are abandoned.
    cancel: CancellationToken,
    window: Arc<Semaphore>,
    offsets: OffsetTracker,
    retrying: Arc<AtomicUsize>,
    last_record: Instant,
}

impl Drop for Part {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.reader.abort();
    }
}

/// A partition of this member's share.
#[derive(Default)]
struct Held {
    /// Where fetching starts: the first record not finished here (the committed offset, or
    /// the partition's earliest offset when the group has none); unknown until read.
    position: Option<i64>,
    /// The end offset last read.
    end: Option<i64>,
    /// The HTTP publish path wrote to it.
    hinted: bool,
    /// Since when it has records and waits for a fetch slot.
    waiting_since: Option<Instant>,
    active: Option<Part>,
}

/// A consumer outside the group that fetches some of the member's partitions. librdkafka keeps
/// the objects of every topic a client ever fetched until the client is destroyed, so a
/// fetcher that has fetched `max_active` topics retires: it takes no new partitions, its
/// partitions move to a new fetcher once drained and at their end, and it is closed when it
/// holds none (a bounded footprint however many tenants a module has).
struct Fetcher {
    consumer: Arc<StreamConsumer>,
    topics: HashSet<String>,
    active: usize,
    retiring: bool,
    idle_since: Instant,
    poller: tokio::task::JoinHandle<()>,
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.poller.abort();
    }
}

/// A topic handle of librdkafka's application API, held while a fetcher takes partitions of
/// topics new to it. A topic a client learns of only through an assignment waits for the
/// client's once-a-second topic scan to ask for its leader, so every wave of new partitions
/// started up to a second late (0.65–0.95 s from assignment to first record in the footprint
/// bench); creating the topic through `rd_kafka_topic_new` asks for the leaders at once.
/// Hand-written FFI because rust-rdkafka exposes topic handles only for producers.
struct TopicHandle(*mut rdkafka::bindings::rd_kafka_topic_t);

impl TopicHandle {
    fn new(consumer: &StreamConsumer, topic: &str) -> Option<Self> {
        let name = std::ffi::CString::new(topic).ok()?;
        // SAFETY: the client outlives the handle (both are owned by the caller's fetcher, and
        // the handle is dropped before `activate` returns); librdkafka copies the name.
        let rkt = unsafe {
            rdkafka::bindings::rd_kafka_topic_new(
                consumer.client().native_ptr(),
                name.as_ptr(),
                std::ptr::null_mut(),
            )
        };
        (!rkt.is_null()).then_some(TopicHandle(rkt))
    }
}

impl Drop for TopicHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from rd_kafka_topic_new and is released once; the topic itself
        // stays with the client's partitions.
        unsafe { rdkafka::bindings::rd_kafka_topic_destroy(self.0) }
    }
}

/// The member's share: which partitions are parked and which are fetched, by which fetcher.
struct Book<'a> {
    held: HashMap<(String, i32), Held>,
    by_topic: HashMap<String, Vec<i32>>,
    fetchers: BTreeMap<u64, Fetcher>,
    next_fetcher: u64,
    generation: u64,
    dispatcher: &'a Dispatcher,
    stats: &'a Arc<Stats>,
    records: mpsc::UnboundedSender<Admitted>,
    stop: &'a CancellationToken,
}

impl<'a> Book<'a> {
    fn new(
        dispatcher: &'a Dispatcher,
        stats: &'a Arc<Stats>,
        records: mpsc::UnboundedSender<Admitted>,
        stop: &'a CancellationToken,
    ) -> Self {
        Book {
            held: HashMap::new(),
            by_topic: HashMap::new(),
            fetchers: BTreeMap::new(),
            next_fetcher: 0,
            generation: 0,
            dispatcher,
            stats,
            records,
            stop,
        }
    }

    /// This instance wrote to `topic`: its parked partitions are fetched now.
    fn wake(&mut self, topic: &str) {
        if self.hint(topic) {
            self.activate();
        }
    }

    /// The fetched partition `adm` came from, if it is still fetched as it was then.
    fn part(&mut self, adm: &Admitted) -> Option<&mut Part> {
        self.held
            .get_mut(&adm.partition())
            .and_then(|h| h.active.as_mut())
            .filter(|p| p.generation == adm.generation)
    }

    fn own(&mut self, list: Vec<(String, i32)>) {
        for (topic, partition) in list {
            tracing::debug!(%topic, partition, "partition owned");
            let parts = self.by_topic.entry(topic.clone()).or_default();
            if !parts.contains(&partition) {
                parts.push(partition);
            }
            self.held.entry((topic, partition)).or_default();
        }
        self.stats
            .assigned_partitions
            .store(self.held.len(), Ordering::Relaxed);
    }

    fn disown(&mut self, list: Vec<(String, i32)>) {
        let mut stopping: BTreeMap<u64, TopicPartitionList> = BTreeMap::new();
        for tp in list {
            tracing::debug!(topic = %tp.0, partition = tp.1, "partition revoked");
            if let Some(parts) = self.by_topic.get_mut(&tp.0) {
                parts.retain(|p| *p != tp.1);
                if parts.is_empty() {
                    self.by_topic.remove(&tp.0);
                }
            }
            if let Some(part) = self.held.remove(&tp).and_then(|h| h.active) {
                let _ = stopping
                    .entry(part.fetcher)
                    .or_default()
                    .add_partition(&tp.0, tp.1);
            }
        }
        self.unassign(stopping);
        self.stats
            .assigned_partitions
            .store(self.held.len(), Ordering::Relaxed);
    }

    /// Stops fetching these partitions (their `Part`s are gone already).
    fn unassign(&mut self, stopping: BTreeMap<u64, TopicPartitionList>) {
        for (id, tpl) in stopping {
            if let Some(f) = self.fetchers.get_mut(&id) {
                if let Err(e) = f.consumer.incremental_unassign(&tpl) {
                    tracing::warn!(error = %e, "fetcher did not stop partitions");
                }
                f.active = f.active.saturating_sub(tpl.count());
                if f.active == 0 {
                    f.idle_since = Instant::now();
                }
            }
        }
        self.count_active();
    }

    fn count_active(&self) {
        let active = self.fetchers.values().map(|f| f.active).sum();
        self.stats
            .active_partitions
            .store(active, Ordering::Relaxed);
    }

    fn hint(&mut self, topic: &str) -> bool {
        let Some(parts) = self.by_topic.get(topic) else {
            return false;
        };
        let mut any = false;
        for p in parts {
            if let Some(h) = self.held.get_mut(&(topic.to_owned(), *p)) {
                if h.active.is_none() {
                    h.hinted = true;
                    any = true;
                }
            }
        }
        any
    }

    fn positions(&mut self, known: Vec<((String, i32), i64)>) {
        for (tp, position) in known {
            if let Some(h) = self.held.get_mut(&tp) {
                h.position.get_or_insert(position);
            }
        }
    }

    /// Takes the end offsets read: marks parked partitions with records as waiting, and sets
    /// the lag (records not finished).
    fn ends(&mut self, ends: Vec<((String, i32), i64)>) {
        let now = Instant::now();
        for (tp, end) in ends {
            if let Some(h) = self.held.get_mut(&tp) {
                h.end = Some(end);
                if h.active.is_none() && h.position.is_some_and(|p| end > p) {
                    h.waiting_since.get_or_insert(now);
                }
            }
        }
        let lag = self
            .held
            .values()
            .filter_map(|h| Some((h.end? - h.position?).max(0)))
            .sum();
        self.stats.lag.store(lag, Ordering::Relaxed);
    }

    /// Partitions whose position is not known yet.
    fn unknown(&self) -> Vec<(String, i32)> {
        self.held
            .iter()
            .filter(|(_, h)| h.position.is_none())
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// Starts fetching parked partitions that have records (or were written to by this
    /// instance), oldest wait first, while fewer than `max_active` are fetched.
    fn activate(&mut self) {
        let due = self.due();
        if due.is_empty() {
            return;
        }
        let Some(id) = self.fetcher() else {
            return;
        };
        let fetcher = self.fetchers.get_mut(&id).expect("just found or made");
        let _handles: Vec<TopicHandle> = due
            .iter()
            .filter(|((topic, _), _)| !fetcher.topics.contains(topic))
            .filter_map(|((topic, _), _)| TopicHandle::new(&fetcher.consumer, topic))
            .collect();
        let mut tpl = TopicPartitionList::with_capacity(due.len());
        let mut queues = Vec::with_capacity(due.len());
        for ((topic, partition), position) in due {
            match fetcher.consumer.split_partition_queue(&topic, partition) {
                Some(queue) => {
                    let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(position));
                    queues.push((topic, partition, queue));
                }
                None => tracing::warn!(%topic, partition, "partition queue not split"),
            }
        }
        if let Err(e) = fetcher.consumer.incremental_assign(&tpl) {
            tracing::warn!(error = %e, partitions = tpl.count(), "fetcher did not take partitions");
            return;
        }
        fetcher.active += queues.len();
        fetcher
            .topics
            .extend(queues.iter().map(|(topic, _, _)| topic.clone()));
        if fetcher.topics.len() >= self.dispatcher.max_active {
            tracing::debug!(
                fetcher = id,
                topics = fetcher.topics.len(),
                "fetcher retires"
            );
            fetcher.retiring = true;
        }
        for (topic, partition, queue) in queues {
            self.start_reading(id, (topic, partition), queue);
        }
        self.count_active();
    }

    /// Parked partitions to fetch now, with their positions: those with records (or written
    /// to by this instance), longest waiting first, as many as there is room for.
    fn due(&self) -> Vec<((String, i32), i64)> {
        let active: usize = self.fetchers.values().map(|f| f.active).sum();
        let room = self.dispatcher.max_active.saturating_sub(active);
        if room == 0 {
            return Vec::new();
        }
        let now = Instant::now();
        let mut due: Vec<(Instant, (String, i32), i64)> = self
            .held
            .iter()
            .filter(|(_, h)| h.active.is_none())
            .filter_map(|(tp, h)| {
                let position = h.position?;
                let has_records = h.end.is_some_and(|e| e > position);
                (has_records || h.hinted)
                    .then(|| (h.waiting_since.unwrap_or(now), tp.clone(), position))
            })
            .collect();
        due.sort_unstable_by_key(|d| d.0);
        due.truncate(room);
        due.into_iter().map(|(_, tp, p)| (tp, p)).collect()
    }

    /// Starts the reader of a partition that fetcher `id` now fetches into `queue`.
    fn start_reading(
        &mut self,
        id: u64,
        tp: (String, i32),
        queue: StreamPartitionQueue<DefaultConsumerContext>,
    ) {
        self.generation += 1;
        let window = Arc::new(Semaphore::new(self.dispatcher.max_in_flight));
        let reader = tokio::spawn(read(
            queue,
            Arc::clone(&window),
            self.generation,
            self.records.clone(),
            Arc::clone(self.stats),
        ));
        tracing::debug!(topic = %tp.0, partition = tp.1, fetcher = id, "partition fetched");
        let h = self.held.get_mut(&tp).expect("due is held");
        h.hinted = false;
        h.waiting_since = None;
        h.active = Some(Part {
            generation: self.generation,
            fetcher: id,
            reader,
            cancel: self.stop.child_token(),
            window,
            offsets: OffsetTracker::default(),
            retrying: Arc::default(),
            last_record: Instant::now(),
        });
    }

    /// The fetcher that takes new partitions, made when there is none.
    fn fetcher(&mut self) -> Option<u64> {
        if let Some((id, _)) = self.fetchers.iter().rev().find(|(_, f)| !f.retiring) {
            return Some(*id);
        }
        let consumer: StreamConsumer = match self.dispatcher.fetch_cfg.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a fetcher");
                return None;
            }
        };
        let consumer = Arc::new(consumer);
        // Its own queue carries only errors (every partition's records go to its own queue).
        let poller = tokio::spawn({
            let consumer = Arc::clone(&consumer);
            async move {
                loop {
                    match consumer.recv().await {
                        Ok(m) => tracing::warn!(
                            topic = m.topic(),
                            partition = m.partition(),
                            "record outside its partition queue; fetched again later"
                        ),
                        Err(e) => tracing::warn!(error = %e, "fetcher error"),
                    }
                }
            }
        });
        self.next_fetcher += 1;
        self.fetchers.insert(
            self.next_fetcher,
            Fetcher {
                consumer,
                topics: HashSet::new(),
                active: 0,
                retiring: false,
                idle_since: Instant::now(),
                poller,
            },
        );
        Some(self.next_fetcher)
    }

    /// Parks drained partitions: nothing unfinished, no record for `quiet`, at their end offset,
    /// and either their fetcher retires, or other partitions wait for a slot, or nothing came
    /// for [`LINGER`]. (A partition of a retiring fetcher that is not at its end yet stays: it
    /// may have a fetch on its way, and parking it would fetch it all over again elsewhere.)
    /// Closes fetchers left with nothing to fetch.
    fn park(&mut self) {
        let quiet = QUIET;
        let waiting = self
            .held
            .values()
            .any(|h| h.active.is_none() && h.waiting_since.is_some());
        let retiring: HashSet<u64> = self
            .fetchers
            .iter()
            .filter(|(_, f)| f.retiring)
            .map(|(id, _)| *id)
            .collect();
        let mut stopping: BTreeMap<u64, TopicPartitionList> = BTreeMap::new();
        for ((topic, partition), h) in self.held.iter_mut() {
            let Some(part) = &h.active else { continue };
            let idle = part.last_record.elapsed();
            let drained = part.offsets.open.is_empty()
                && part.retrying.load(Ordering::Relaxed) == 0
                && idle >= quiet;
            if !drained {
                continue;
            }
            let at_end = match (h.position, h.end) {
                (Some(p), Some(e)) => p >= e,
                _ => false,
            };
            if at_end && (retiring.contains(&part.fetcher) || waiting || idle >= LINGER) {
                let _ = stopping
                    .entry(part.fetcher)
                    .or_default()
                    .add_partition(topic, *partition);
                tracing::debug!(%topic, partition, "partition parked");
                h.active = None;
            }
        }
        if !stopping.is_empty() {
            self.unassign(stopping);
        }
        self.fetchers
            .retain(|_, f| f.active > 0 || !(f.retiring || f.idle_since.elapsed() >= FETCHER_IDLE));
    }

    /// Stops fetching everything.
    fn close(&mut self) {
        for h in self.held.values_mut() {
            h.active = None;
        }
        self.fetchers.clear();
        self.count_active();
    }
}

impl Dispatcher {
    /// Creates the group member (`cfg` has the bootstrap servers and security settings);
    /// subscribe with [`Dispatcher::subscribe`].
    pub fn new(mut cfg: ClientConfig, options: &DispatcherOptions) -> Result<Self, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let dirty = Dirty::default();
        let context = CoreContext {
            changes: tx,
            dirty: Arc::clone(&dirty),
            committing: AtomicBool::new(false),
        };
        let fetch_cfg = fetcher_config(&mut cfg, options);
        let member: StreamConsumer<CoreContext> = dispatcher_config(&mut cfg, options)
            .create_with_context(context)
            .map_err(ClientError::Kafka)?;
        Ok(Dispatcher {
            member: Arc::new(member),
            changes: Mutex::new(Some(rx)),
            dirty,
            fetch_cfg,
            max_in_flight: options.max_in_flight.max(1),
            max_active: options.max_active.max(1),
            idle_check: options.idle_check.max(Duration::from_millis(50)),
            hints: Mutex::new(None),
        })
    }

    /// Subscribes to these topics (names or `^`-patterns), replacing the current subscription.
    pub fn subscribe(&self, topics: &[&str]) -> Result<(), ClientError> {
        self.member.subscribe(topics).map_err(ClientError::Kafka)
    }

    /// Names of topics this instance just wrote to: their parked partitions are fetched at once
    /// instead of at the next end-offset reading.
    pub fn hints(&self, topics: broadcast::Receiver<Arc<str>>) {
        *self.hints.lock().unwrap_or_else(|e| e.into_inner()) = Some(topics);
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
        let mut hints = self.hints.lock().unwrap_or_else(|e| e.into_inner()).take();
        let stats = &pipeline.stats;
        let (tx, mut records) = mpsc::unbounded_channel::<Admitted>();
        let (lookups_tx, mut lookups) = mpsc::unbounded_channel::<Lookup>();
        let mut run = Run {
            book: Book::new(self, stats, tx, stop),
            slots: HashMap::new(),
            lookups: Lookups::default(),
            lookups_tx,
            stopping: false,
        };
        let mut running = FuturesUnordered::new();
        let mut tick = interval(Duration::from_millis(250));
        // As librdkafka's auto-commit did: every commit a group coordinator refuses while it
        // rebalances (tansu answers UNKNOWN_MEMBER_ID then) makes librdkafka drop its member id
        // and rejoin as a new member, so commits are not made more often than this.
        let mut commit_tick = interval(COMMIT_EVERY);
        let mut check = interval(self.idle_check);
        let start = |adm: Admitted, (cancel, retrying): (CancellationToken, Arc<AtomicUsize>)| async move {
            let outcome = pipeline
                .process_in(handler, &adm.msg, &cancel, &retrying)
                .await;
            (adm, outcome)
        };

        while !(run.stopping && running.is_empty()) {
            let stopping = run.stopping;
            tokio::select! {
                _ = stop.cancelled(), if !stopping => run.stop(&mut records),
                Some((adm, outcome)) = next_finished(&mut running), if !running.is_empty() => {
                    if let Some(next) = run.finished(adm, outcome) {
                        let handles = handles(&run.book, &next);
                        running.push(start(next, handles));
                    }
                }
                Some(change) = changes.recv() => run.change(change),
                Some(lookup) = lookups.recv() => run.lookup(lookup),
                hint = next_hint(&mut hints), if hints.is_some() && !stopping => match hint {
                    Ok(topic) => run.book.wake(&topic),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => hints = None,
                },
                Some(adm) = records.recv(), if !stopping => {
                    if let Some(adm) = run.record(adm) {
                        let handles = handles(&run.book, &adm);
                        running.push(start(adm, handles));
                    }
                }
                // Drives the rebalance callback; the member fetches nothing itself.
                received = self.member.recv(), if !stopping => {
                    if let Err(e) = received {
                        tracing::warn!(error = %e, "consumer error");
                    }
                }
                _ = check.tick(), if !stopping => {
                    run.lookups.ends_wanted = true;
                    run.kick();
                }
                _ = commit_tick.tick() => commit_in_background(&self.member),
                // Also makes the loop poll the member's queue at least four times a second.
                _ = tick.tick() => {
                    if !stopping {
                        run.book.park();
                        run.book.activate();
                    }
                    refresh(stats, &run.book.held);
                }
            }
        }
        refresh(stats, &run.book.held);
        self.commit_all();
        run.book.close();
        drop(run);
        *self.changes.lock().unwrap_or_else(|e| e.into_inner()) = Some(changes);
        Ok(())
    }
}

impl Dispatcher {
    /// Commits every position finished and not committed yet, and waits for the answer.
    fn commit_all(&self) {
        let all: Vec<(String, i32)> = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        self.member.context().commit(&*self.member, Some(&all));
    }
}

/// A timer whose missed ticks are not made up for.
fn interval(every: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// What one [`Dispatcher::run`] holds besides its timers and running attempts.
struct Run<'a> {
    book: Book<'a>,
    /// Slots with a running record, each with the records waiting behind it.
    slots: HashMap<Slot, VecDeque<Admitted>>,
    lookups: Lookups,
    lookups_tx: mpsc::UnboundedSender<Lookup>,
    stopping: bool,
}

impl Run<'_> {
    /// Stops fetching; waiting records are dropped (handled again after a restart).
    fn stop(&mut self, records: &mut mpsc::UnboundedReceiver<Admitted>) {
        self.stopping = true;
        self.book.close();
        for waiting in self.slots.values_mut() {
            waiting.clear();
        }
        while records.try_recv().is_ok() {}
    }

    /// Takes an attempt's outcome: a finished record moves its partition's position. Returns
    /// the record of its slot to start next.
    fn finished(&mut self, adm: Admitted, outcome: Outcome) -> Option<Admitted> {
        if matches!(outcome, Outcome::Finished) {
            self.book.stats.finished.fetch_add(1, Ordering::Relaxed);
            let tp = adm.partition();
            let moved = self
                .book
                .part(&adm)
                .and_then(|part| part.offsets.finish(adm.msg.offset()));
            if let Some(position) = moved {
                if let Some(h) = self.book.held.get_mut(&tp) {
                    h.position = Some(position);
                }
                let dirty = &self.book.dispatcher.dirty;
                dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(tp, position);
            }
        }
        let slot = adm.slot()?;
        let book = &mut self.book;
        let next = self.slots.get_mut(&slot).and_then(|w| loop {
            match w.pop_front() {
                Some(n) if book.part(&n).is_some() => break Some(n),
                Some(_) => continue, // of a partition no longer fetched: dropped
                None => break None,
            }
        });
        match next {
            Some(n) if !self.stopping => Some(n),
            _ => {
                self.slots.remove(&slot);
                None
            }
        }
    }

    /// The group gave or took partitions.
    fn change(&mut self, change: Change) {
        match change {
            Change::Owned(list) => {
                self.book.own(list);
                self.kick();
            }
            Change::Disowned(list) => {
                self.book.disown(list);
                let book = &mut self.book;
                for waiting in self.slots.values_mut() {
                    waiting.retain(|a| book.part(a).is_some());
                }
            }
        }
    }

    /// An offset lookup answered.
    fn lookup(&mut self, lookup: Lookup) {
        match lookup {
            Lookup::Positions(known) => {
                self.lookups.positions = false;
                self.book.positions(known);
                // Whether they have records is the next question.
                self.lookups.ends_wanted = true;
            }
            Lookup::Ends(ends) => {
                self.lookups.ends = false;
                self.book.ends(ends);
                if !self.stopping {
                    self.book.activate();
                }
            }
            Lookup::Failed(what, e) => {
                match what {
                    "positions" => self.lookups.positions = false,
                    _ => self.lookups.ends = false,
                }
                tracing::debug!(error = %e, "{what} not read");
            }
        }
        if !self.stopping {
            self.kick();
        }
    }

    /// A record fetched: returns it when it may start now (its slot is free).
    fn record(&mut self, adm: Admitted) -> Option<Admitted> {
        let part = self.book.part(&adm)?; // None: of a partition no longer fetched
        part.last_record = Instant::now();
        part.offsets
            .seen(adm.msg.offset(), adm.msg.timestamp().to_millis());
        queue_or_start(adm, &mut self.slots)
    }

    fn kick(&mut self) {
        self.lookups
            .kick(self.book.dispatcher, &self.book, &self.lookups_tx);
    }
}

/// Commits what is finished, off the dispatcher's loop, unless a commit is on its way.
fn commit_in_background(member: &Arc<StreamConsumer<CoreContext>>) {
    let context = member.context();
    if context
        .dirty
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty()
        || context.committing.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let member = Arc::clone(member);
    tokio::task::spawn_blocking(move || {
        member.context().commit(&*member, None);
        member.context().committing.store(false, Ordering::Release);
    });
}

async fn next_hint(
    hints: &mut Option<broadcast::Receiver<Arc<str>>>,
) -> Result<Arc<str>, broadcast::error::RecvError> {
    match hints {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
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
/// partition's count of records waiting for a retry. A record of a partition no longer fetched
/// gets a cancelled token.
fn handles(book: &Book<'_>, adm: &Admitted) -> (CancellationToken, Arc<AtomicUsize>) {
    match book
        .held
        .get(&adm.partition())
        .and_then(|h| h.active.as_ref())
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
fn refresh(stats: &Stats, held: &HashMap<(String, i32), Held>) {
    let parts = || held.values().filter_map(|h| h.active.as_ref());
    let paused = parts()
        .filter(|p| p.window.available_permits() == 0)
        .count();
    let retrying = parts()
        .filter(|p| p.retrying.load(Ordering::Relaxed) > 0)
        .count();
    let oldest = parts().filter_map(|p| p.offsets.oldest()).min();
    stats.paused_partitions.store(paused, Ordering::Relaxed);
    stats.retrying_partitions.store(retrying, Ordering::Relaxed);
    stats
        .oldest_unfinished_ms
        .store(oldest.unwrap_or(0), Ordering::Relaxed);
}

/// Reads one partition's queue while its window has room.
async fn read<C: ConsumerContext + 'static>(
    queue: StreamPartitionQueue<C>,
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
