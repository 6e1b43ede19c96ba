//! The offset lookups of a member's share, run off the dispatcher's loop: where each partition
//! starts (committed offset, else the earliest), and the end offsets that tell which parked
//! partitions have records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::{Book, CoreContext, Dispatcher};

/// Answers of the blocking offset lookups.
pub(super) enum Lookup {
    Positions(Vec<((String, i32), i64)>),
    Ends(Vec<((String, i32), i64)>),
    Failed(&'static str, String),
}

/// Which offset lookups are running, and whether end offsets are wanted again.
#[derive(Default)]
pub(super) struct Lookups {
    pub(super) positions: bool,
    pub(super) ends: bool,
    pub(super) ends_wanted: bool,
}

impl Lookups {
    /// Starts the lookups that are due and not running: positions of partitions that have
    /// none, end offsets of all when wanted.
    pub(super) fn kick(
        &mut self,
        dispatcher: &Dispatcher,
        book: &Book<'_>,
        tx: &mpsc::UnboundedSender<Lookup>,
    ) {
        if !self.positions {
            let unknown = book.unknown();
            if !unknown.is_empty() {
                self.positions = true;
                spawn_lookup(&dispatcher.member, tx, "positions", move |c| {
                    positions(c, &unknown).map(Lookup::Positions)
                });
            }
        }
        if self.ends_wanted && !self.ends && !book.held.is_empty() {
            self.ends = true;
            self.ends_wanted = false;
            let all: Vec<(String, i32)> = book.held.keys().cloned().collect();
            spawn_lookup(&dispatcher.member, tx, "end offsets", move |c| {
                ends(c, &all).map(Lookup::Ends)
            });
        }
    }
}

/// Runs an offset lookup off the dispatcher's loop (broker round trips block).
fn spawn_lookup<F>(
    member: &Arc<StreamConsumer<CoreContext>>,
    tx: &mpsc::UnboundedSender<Lookup>,
    what: &'static str,
    f: F,
) where
    F: FnOnce(&StreamConsumer<CoreContext>) -> KafkaResult<Lookup> + Send + 'static,
{
    let (member, tx) = (Arc::clone(member), tx.clone());
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let answer = f(&member).unwrap_or_else(|e| Lookup::Failed(what, e.to_string()));
        let found = match &answer {
            Lookup::Positions(v) | Lookup::Ends(v) => v.len(),
            Lookup::Failed(..) => 0,
        };
        tracing::debug!(
            what,
            found,
            took_ms = started.elapsed().as_millis() as u64,
            "offsets read"
        );
        let _ = tx.send(answer);
    });
}

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Partitions per offset request. librdkafka matches a request's answers to its partitions by
/// a linear search of the list (`rd_kafka_topic_partition_list_update`), so one request for
/// 8,000 partitions costs 32 million comparisons; sixteen of 500 cost 2 million.
const LOOKUP_CHUNK: usize = 500;

/// Where fetching of these partitions starts: the group's committed offset, or the earliest
/// offset where the group has none.
fn positions<C: ConsumerContext>(
    c: &StreamConsumer<C>,
    tps: &[(String, i32)],
) -> KafkaResult<Vec<((String, i32), i64)>> {
    let mut out = Vec::with_capacity(tps.len());
    for chunk in tps.chunks(LOOKUP_CHUNK) {
        let mut tpl = TopicPartitionList::with_capacity(chunk.len());
        for (t, p) in chunk {
            tpl.add_partition(t, *p);
        }
        let committed = c.committed_offsets(tpl, LOOKUP_TIMEOUT)?;
        let mut none = TopicPartitionList::new();
        for e in committed.elements() {
            match (e.offset(), e.error()) {
                // Not answered: asked again later.
                (_, Err(_)) => {}
                (Offset::Offset(o), Ok(())) => out.push(((e.topic().to_owned(), e.partition()), o)),
                (_, Ok(())) => {
                    none.add_partition_offset(e.topic(), e.partition(), Offset::Beginning)?;
                }
            }
        }
        if none.count() > 0 {
            // `Offset::Beginning` is ListOffsets' "earliest" (-2).
            list_offsets(c, none, &mut out)?;
        }
    }
    Ok(out)
}

/// The end offsets of these partitions ("latest", -1).
fn ends<C: ConsumerContext>(
    c: &StreamConsumer<C>,
    tps: &[(String, i32)],
) -> KafkaResult<Vec<((String, i32), i64)>> {
    let mut out = Vec::with_capacity(tps.len());
    for chunk in tps.chunks(LOOKUP_CHUNK) {
        let mut tpl = TopicPartitionList::with_capacity(chunk.len());
        for (t, p) in chunk {
            tpl.add_partition_offset(t, *p, Offset::End)?;
        }
        list_offsets(c, tpl, &mut out)?;
    }
    Ok(out)
}

/// Asks ListOffsets for `query` (offsets `Offset::End` or `Offset::Beginning`) and adds the
/// partitions that were answered to `out`.
fn list_offsets<C: ConsumerContext>(
    c: &StreamConsumer<C>,
    query: TopicPartitionList,
    out: &mut Vec<((String, i32), i64)>,
) -> KafkaResult<()> {
    for e in c.offsets_for_times(query, LOOKUP_TIMEOUT)?.elements() {
        if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error()) {
            out.push(((e.topic().to_owned(), e.partition()), o));
        }
    }
    Ok(())
}
