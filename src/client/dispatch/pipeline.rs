//! One record's way through the core: attempts with retries (an in-flight permit per attempt,
//! none while waiting), then the dead-letter topic. What a user of the core plugs in
//! ([`Handler`], [`DeadLetterSink`]) is defined here too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Message, OwnedMessage};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::super::{ClientError, ReceivedEvent};
use crate::domain::TenantId;
use crate::event::Event;
use crate::kafka::{dead_letter_headers, record_headers, TopicName, Topics};

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
pub(crate) enum Outcome {
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
    /// Partitions the group gives this member.
    pub assigned_partitions: AtomicUsize,
    /// Of those, the partitions being fetched (the others are parked: nothing to do).
    pub active_partitions: AtomicUsize,
    /// Records of the member's partitions not finished: end offsets minus positions.
    pub lag: AtomicI64,
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

    pub(crate) async fn process_in<H: Handler>(
        &self,
        handler: &H,
        msg: &OwnedMessage,
        cancel: &CancellationToken,
        partition_retrying: &AtomicUsize,
    ) -> Outcome {
        let received = match decode(msg) {
            Ok(received) => received,
            Err((headers, reason)) => {
                tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(), %reason, "unreadable record");
                let tenant = headers.get("folio.tenantId").cloned();
                let subscriber = handler.subscriber(None);
                if !self
                    .dead_letter(msg, &headers, tenant, &subscriber, &reason, 0, cancel)
                    .await
                {
                    return Outcome::Abandoned;
                }
                handler.dead_lettered(None, &reason, 0).await;
                return Outcome::Finished;
            }
        };
        let (reason, attempts) = match self
            .attempts(handler, &received, cancel, partition_retrying)
            .await
        {
            Tried::Done => return Outcome::Finished,
            Tried::Abandoned => return Outcome::Abandoned,
            Tried::GaveUp { reason, attempts } => (reason, attempts),
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
                attempts,
                cancel,
            )
            .await
        {
            return Outcome::Abandoned;
        }
        handler
            .dead_lettered(Some(&received), &reason, attempts)
            .await;
        Outcome::Finished
    }

    /// Attempts until one succeeds, the schedule is used up or the handler says never again;
    /// each attempt holds one of the permits, a wait between attempts holds none.
    async fn attempts<H: Handler>(
        &self,
        handler: &H,
        received: &ReceivedEvent,
        cancel: &CancellationToken,
        partition_retrying: &AtomicUsize,
    ) -> Tried {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let verdict = {
                let _permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Tried::Abandoned,
                    permit = self.permits.acquire() => permit.expect("the permits are never closed"),
                };
                handler.attempt(received, attempt).await
            };
            let (reason, retry) = match verdict {
                Verdict::Done => return Tried::Done,
                Verdict::Failed { reason, retry } => (reason, retry),
            };
            self.stats.note_failure(&reason);
            let wait = match (self.retry_schedule.get(attempt as usize - 1), retry) {
                (None, _) | (_, Retry::Never) => {
                    return Tried::GaveUp {
                        reason,
                        attempts: attempt,
                    }
                }
                (Some(_), Retry::After(wait)) => wait,
                (Some(scheduled), Retry::Schedule) => jitter(*scheduled),
            };
            let _retrying = RetryingGuard::new(&self.stats, partition_retrying);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Tried::Abandoned,
                _ = tokio::time::sleep(wait) => {}
            }
        }
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

/// What the attempts at one record came to.
enum Tried {
    Done,
    /// `cancel` fired: the record is handled again later.
    Abandoned,
    /// No attempt is left (or the handler said never): the record goes to the dead letters.
    GaveUp {
        reason: String,
        attempts: u32,
    },
}

/// The record as an Event envelope; its headers and why not if it is none.
#[allow(clippy::result_large_err)]
fn decode(msg: &OwnedMessage) -> Result<ReceivedEvent, (HashMap<String, String>, String)> {
    let headers = record_headers(msg);
    match msg.payload().map(serde_json::from_slice::<Event>) {
        Some(Ok(event)) => Ok(ReceivedEvent {
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
        }),
        Some(Err(e)) => Err((headers, format!("not an Event envelope: {e}"))),
        None => Err((headers, "not an Event envelope: no value".to_owned())),
    }
}

/// ±20 % around `base`.
pub(crate) fn jitter(base: Duration) -> Duration {
    let factor = 0.8 + rand::random::<f64>() * 0.4;
    base.mul_f64(factor)
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
}
