//! The one long-lived idempotent producer of the HTTP publish path.
//!
//! **Thread priority.** Under load, librdkafka's idempotent producer holds a ready batch back
//! while an earlier one is in flight (its in-flight limit of 5 per partition counts messages,
//! not requests), and its broker thread waits for the answer by polling its socket with a zero
//! timeout, over and over (librdkafka 2.12; see the README's Performance section). That loop
//! takes CPU from the threads that do the service's work, and on a small machine from the
//! broker it waits for. The producer is therefore created on a thread whose nice value is
//! `KAFKA_PRODUCER_THREAD_NICE` (default 19): librdkafka's threads of this client inherit it
//! (Linux's nice value is per thread and new threads inherit their creator's), so the loop only
//! gets CPU nobody else wants, while the thread that hands acknowledgements to waiting
//! requests is started from a normal thread and keeps the service's priority. Other Kafka
//! clients of the service (admin, delivery consumers) are untouched.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::oneshot;

use super::{client_config, TopicName};
use crate::config::KafkaConfig;

/// Why a record was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka did not acknowledge the event within {0:?}")]
    Timeout(Duration),
    #[error("the event is larger than the broker accepts")]
    TooLarge,
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    #[error("Kafka: {0}")]
    Kafka(KafkaError),
}

/// A record to write: value, key and headers.
pub struct OutgoingRecord<'a> {
    pub topic: &'a TopicName,
    pub key: &'a str,
    pub value: &'a [u8],
    pub headers: Vec<(&'a str, &'a str)>,
}

/// Producer settings, chosen deliberately (see the README's Kafka section):
/// * `enable.idempotence=true`, `acks=all`: no duplicates from producer retries, no loss on
///   leader change;
/// * `linger.ms=0`: a publish is sent at once; under load librdkafka still batches what queues
///   up while a request is in flight (measured against tansu: ~16k/s at 16 in flight with 0,
///   ~2.6k/s with the default 5 ms when every publish awaits its acknowledgement);
/// * `message.timeout.ms` = `KAFKA_PUBLISH_TIMEOUT_MS`: the bound after which a publish is
///   answered 503;
/// * `message.max.bytes` = `MAX_REQUEST_SIZE` plus room for the envelope and headers;
/// * `topic.metadata.propagation.max.ms` = min(2000, half the publish timeout): a topic that
///   vanished (a wiped broker) is reported before the publish times out, so the publish path
///   can recreate it and retry; failed publishes also wake the topic reconciler.
pub struct EventProducer {
    producer: RwLock<Arc<AckingProducer>>,
    kafka: KafkaConfig,
    max_request_size: usize,
    /// Set by a failed send, cleared by a successful one.
    failing_since: std::sync::Mutex<Option<Instant>>,
}

impl EventProducer {
    pub fn new(kafka: &KafkaConfig, max_request_size: usize) -> Result<Self, KafkaError> {
        let producer = Self::build(kafka, max_request_size)?;
        Ok(EventProducer {
            producer: RwLock::new(Arc::new(producer)),
            kafka: kafka.clone(),
            max_request_size,
            failing_since: std::sync::Mutex::new(None),
        })
    }

    fn build(kafka: &KafkaConfig, max_request_size: usize) -> KafkaResult<AckingProducer> {
        let mut config = client_config(kafka);
        super::idempotent_producer(&mut config)
            .set(
                "message.timeout.ms",
                kafka.publish_timeout.as_millis().to_string(),
            )
            .set(
                "message.max.bytes",
                (max_request_size + 64 * 1024).to_string(),
            )
            .set(
                "topic.metadata.propagation.max.ms",
                (kafka.publish_timeout.as_millis() / 2)
                    .min(2000)
                    .to_string(),
            );
        AckingProducer::start(config, kafka.producer_thread_nice)
    }

    fn current(&self) -> Arc<AckingProducer> {
        Arc::clone(&self.producer.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes one record and waits for the broker's acknowledgement (all in-sync replicas).
    pub async fn send(&self, record: &OutgoingRecord<'_>) -> Result<(i32, i64), PublishError> {
        let producer = self.current();
        let timeout = self.kafka.publish_timeout;
        let sent = tokio::time::timeout(
            timeout + Duration::from_millis(500),
            producer.send(record, timeout),
        )
        .await;
        let result = match sent {
            Err(_) => Err(PublishError::Timeout(timeout)),
            Ok(Ok(delivered)) => Ok(delivered),
            Ok(Err(err)) => {
                self.replace_if_fatal(&producer);
                Err(classify(err, record.topic, timeout))
            }
        };
        let mut failing = self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(_) => *failing = None,
            Err(PublishError::TooLarge) => {}
            Err(_) => {
                failing.get_or_insert_with(Instant::now);
            }
        }
        result
    }

    /// Called when the broker is known to answer again (the reconciler just talked to it). A
    /// producer that kept failing across the outage may hold stale state (a producer id or
    /// topic metadata the restarted broker no longer knows): it is replaced by a fresh one.
    pub fn heal(&self) {
        let failing = *self.failing_since.lock().unwrap_or_else(|e| e.into_inner());
        if failing.is_none_or(|since| since.elapsed() < Duration::from_millis(500)) {
            return;
        }
        if self.replace(&self.current()) {
            *self.failing_since.lock().unwrap_or_else(|e| e.into_inner()) = None;
            tracing::warn!("Kafka producer kept failing while the broker answers; replaced it");
        }
    }

    /// An idempotent producer that hit a fatal error is unusable: build a new one.
    fn replace_if_fatal(&self, failed: &Arc<AckingProducer>) {
        if let Some((code, reason)) = failed.producer.client().fatal_error() {
            tracing::error!(?code, %reason, "Kafka producer hit a fatal error; replacing it");
            self.replace(failed);
        }
    }

    /// Puts a new producer in place of `old`, unless another caller has replaced `old`
    /// already. False when no producer could be built.
    fn replace(&self, old: &Arc<AckingProducer>) -> bool {
        match Self::build(&self.kafka, self.max_request_size) {
            Ok(p) => {
                let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
                if Arc::ptr_eq(&slot, old) {
                    *slot = Arc::new(p);
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "could not create a new Kafka producer");
                false
            }
        }
    }

    /// Waits until queued records are delivered (graceful shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.current().producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "Kafka producer flush incomplete");
        }
    }
}

/// What the acknowledgement thread hands to a waiting `send`: partition and offset, or why not.
type Ack = Result<(i32, i64), KafkaError>;

/// Hands each delivery report to the request waiting for it.
struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<oneshot::Sender<Ack>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        let ack = match result {
            Ok(m) => Ok((m.partition(), m.offset())),
            Err((e, _)) => Err(e.clone()),
        };
        // The request may have given up (timeout, client gone): nobody to tell.
        let _ = waiting.send(ack);
    }
}

/// A librdkafka producer whose own threads run at a lower priority (see the module
/// documentation), and the normal-priority thread that serves its delivery reports.
///
/// Dropping it only tells that thread to stop: the thread holds the last reference to the
/// librdkafka client, so the client's teardown (purge what is left, serve the resulting
/// delivery reports so no request waits forever, join librdkafka's threads; up to about half a
/// second) runs there, never on the thread that dropped it, which may be a request's.
struct AckingProducer {
    producer: Arc<BaseProducer<AckContext>>,
    stop: Arc<AtomicBool>,
}

impl AckingProducer {
    fn start(config: ClientConfig, nice: i32) -> KafkaResult<AckingProducer> {
        let producer: BaseProducer<AckContext> = if nice == 0 {
            config.create_with_context(AckContext)?
        } else {
            // librdkafka starts its threads in rd_kafka_new and from those threads: all of
            // them inherit the nice value of the thread that creates the client.
            std::thread::Builder::new()
                .name("kafka-producer-start".into())
                .spawn(move || {
                    lower_this_threads_priority(nice);
                    config.create_with_context(AckContext)
                })
                .map_err(|e| KafkaError::ClientCreation(format!("cannot start a thread: {e}")))?
                .join()
                .unwrap_or_else(|_| {
                    Err(KafkaError::ClientCreation(
                        "creating the producer panicked".into(),
                    ))
                })?
        };
        let producer = Arc::new(producer);
        let stop = Arc::new(AtomicBool::new(false));
        // Started from this (normal-priority) thread, so it keeps the service's priority:
        // it wakes the requests waiting for their acknowledgements.
        {
            let (producer, stop) = (Arc::clone(&producer), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("kafka-acks".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        producer.poll(Duration::from_millis(100));
                    }
                })
                .map_err(|e| KafkaError::ClientCreation(format!("cannot start a thread: {e}")))?;
        }
        Ok(AckingProducer { producer, stop })
    }

    /// Queues the record and waits for its delivery report. A full local queue is retried
    /// until `timeout`, as rdkafka's `FutureProducer` does.
    async fn send(&self, record: &OutgoingRecord<'_>, timeout: Duration) -> Ack {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let (tx, rx) = oneshot::channel();
        let mut queued = BaseRecord::with_opaque_to(record.topic.as_str(), Box::new(tx))
            .key(record.key)
            .payload(record.value)
            .headers(headers);
        let give_up = Instant::now() + timeout;
        loop {
            match self.producer.send(queued) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < give_up =>
                {
                    queued = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
        // A dropped sender means the producer went away with the record (shutdown).
        rx.await.unwrap_or(Err(KafkaError::Canceled))
    }
}

impl Drop for AckingProducer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Raises the calling thread's nice value (lowers its priority). Linux keeps a nice value per
/// thread, so `setpriority(PRIO_PROCESS, 0, …)` changes only the caller; raising it needs no
/// privilege. Elsewhere the value is per process, so nothing is done.
fn lower_this_threads_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority has no memory-safety preconditions.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        if rc != 0 {
            tracing::warn!(
                nice,
                error = %std::io::Error::last_os_error(),
                "could not lower the Kafka producer threads' priority"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    tracing::debug!(
        nice,
        "thread priorities are per process here; left unchanged"
    );
}

fn classify(err: KafkaError, topic: &TopicName, timeout: Duration) -> PublishError {
    match err.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::QueueFull,
        ) => PublishError::Timeout(timeout),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => PublishError::TooLarge,
        Some(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => PublishError::UnknownTopic(topic.to_string()),
        _ => PublishError::Kafka(err),
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;

    /// Name and nice value from a thread's `stat` line, "tid (name) state …": the nice value
    /// is field 19, the 17th after the name.
    fn name_and_nice(stat: &str) -> (String, i32) {
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1.to_owned();
        (
            name,
            rest.split_whitespace().nth(16).unwrap().parse().unwrap(),
        )
    }

    /// This process's threads: (thread id, name, nice value).
    fn threads() -> Vec<(u32, String, i32)> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue; // the thread ended meanwhile
            };
            let (name, nice) = name_and_nice(&stat);
            found.push((tid, name, nice));
        }
        found
    }

    fn kafka(nice: i32) -> KafkaConfig {
        KafkaConfig {
            // Nothing listens there: librdkafka starts its threads anyway.
            bootstrap_servers: "127.0.0.1:9".into(),
            replication_factor: 1,
            number_of_partitions: 1,
            namespace: "Default".into(),
            tenant_collection: None,
            publish_timeout: Duration::from_secs(1),
            admin_timeout: Duration::from_secs(1),
            producer_thread_nice: nice,
            client_properties: BTreeMap::new(),
        }
    }

    /// The threads a new producer started, by name, with their nice values.
    fn started_by(nice: i32) -> (EventProducer, Vec<(String, i32)>) {
        let before: HashSet<u32> = threads().into_iter().map(|(tid, ..)| tid).collect();
        let producer = EventProducer::new(&kafka(nice), 1 << 20).unwrap();
        // A Rust thread names itself once it runs: wait for the acknowledgement thread's name.
        let give_up = Instant::now() + Duration::from_secs(5);
        loop {
            let new: Vec<(String, i32)> = threads()
                .into_iter()
                .filter(|(tid, ..)| !before.contains(tid))
                .map(|(_, name, nice)| (name, nice))
                .collect();
            if new.iter().any(|(name, _)| name == "kafka-acks") || Instant::now() > give_up {
                return (producer, new);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The nice value of the test's own thread (0 unless the tests run under `nice`).
    fn own_nice() -> i32 {
        name_and_nice(&std::fs::read_to_string("/proc/thread-self/stat").unwrap()).1
    }

    #[test]
    fn librdkafka_threads_run_at_the_configured_nice_and_acknowledgements_do_not() {
        let base = own_nice();
        let (_producer, started) = started_by(19);
        // rd_kafka_new starts at least its main thread and a broker thread. Other tests may
        // start Kafka clients meanwhile, but none of theirs runs at nice 19.
        let low: Vec<&String> = started
            .iter()
            .filter(|(_, nice)| *nice == 19)
            .map(|(name, _)| name)
            .collect();
        assert!(low.len() >= 2, "{started:?}");
        assert!(low.iter().any(|n| n.as_str() == "rdk:main"), "{started:?}");
        let acks: Vec<i32> = started
            .iter()
            .filter(|(name, _)| name == "kafka-acks")
            .map(|(_, nice)| *nice)
            .collect();
        assert_eq!(acks, [base], "{started:?}");

        let (_producer, started) = started_by(0);
        assert!(
            started.iter().any(|(name, _)| name == "rdk:main"),
            "{started:?}"
        );
        assert!(started.iter().all(|(_, nice)| *nice == base), "{started:?}");
    }
}
