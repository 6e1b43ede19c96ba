//! Prometheus metrics, served as text at `/admin/metrics`.

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabels {
    pub module: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub published: Family<EventLabels, Counter>,
    pub publish_failed: Family<EventLabels, Counter>,
    pub delivered: Family<EventLabels, Counter>,
    /// Failed delivery attempts.
    pub delivery_failed: Family<EventLabels, Counter>,
    /// Attempts after the first.
    pub retried: Family<EventLabels, Counter>,
    pub dead_lettered: Family<EventLabels, Counter>,
    /// Seconds from `publishedDate` to the subscriber's 2xx.
    pub delivery_latency: Family<EventLabels, Histogram>,
    /// Records not yet handled by a delivery consumer group (on the partitions this instance holds).
    pub consumer_lag: Family<GroupLabels, Gauge>,
    /// Per subscriber module, on this instance: records taken from Kafka and not finished.
    pub in_flight: Family<ModuleLabels, Gauge>,
    /// Records waiting for their next attempt.
    pub retrying: Family<ModuleLabels, Gauge>,
    /// Partitions of the module's topics this instance holds.
    pub assigned_partitions: Family<ModuleLabels, Gauge>,
    /// Of those, the partitions being fetched (the others are parked).
    pub active_partitions: Family<ModuleLabels, Gauge>,
    /// Partitions holding a full window (not read until a record finishes).
    pub paused_partitions: Family<ModuleLabels, Gauge>,
    /// Partitions with a record waiting for its next attempt.
    pub retrying_partitions: Family<ModuleLabels, Gauge>,
    /// Age of the oldest unfinished record (0 when none).
    pub oldest_unfinished: Family<ModuleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// When the last attempt failed (Unix seconds; 0 when none has).
    pub last_failure: Family<ModuleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Registered topics the broker does not have yet (set when the metrics are read).
    pub topics_missing: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("pubsub")),
            published: Family::default(),
            publish_failed: Family::default(),
            delivered: Family::default(),
            delivery_failed: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            delivery_latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ])
            }),
            consumer_lag: Family::default(),
            topics_missing: Gauge::default(),
            in_flight: Family::default(),
            retrying: Family::default(),
            assigned_partitions: Family::default(),
            active_partitions: Family::default(),
            paused_partitions: Family::default(),
            retrying_partitions: Family::default(),
            oldest_unfinished: Family::default(),
            last_failure: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "events_published",
                "Events written to Kafka by POST /pubsub/publish",
                m.published.clone(),
            );
            r.register(
                "events_publish_failed",
                "Publishes Kafka did not acknowledge",
                m.publish_failed.clone(),
            );
            r.register(
                "events_delivered",
                "Events a subscriber accepted",
                m.delivered.clone(),
            );
            r.register(
                "delivery_attempts_failed",
                "Delivery attempts that failed",
                m.delivery_failed.clone(),
            );
            r.register(
                "delivery_retries",
                "Delivery attempts after the first",
                m.retried.clone(),
            );
            r.register(
                "events_dead_lettered",
                "Events moved to a dead-letter topic",
                m.dead_lettered.clone(),
            );
            r.register(
                "delivery_latency_seconds",
                "From publishedDate to the subscriber's answer",
                m.delivery_latency.clone(),
            );
            r.register(
                "consumer_lag",
                "Records not yet handled per delivery consumer group",
                m.consumer_lag.clone(),
            );
            r.register(
                "kafka_topics_missing",
                "Registered topics the broker does not have yet (the reconciler creates them)",
                m.topics_missing.clone(),
            );
            r.register(
                "delivery_in_flight",
                "Records taken from Kafka and not finished, per subscriber module",
                m.in_flight.clone(),
            );
            r.register(
                "delivery_retrying",
                "Records waiting for their next delivery attempt, per subscriber module",
                m.retrying.clone(),
            );
            r.register(
                "delivery_assigned_partitions",
                "Partitions this instance holds, per subscriber module",
                m.assigned_partitions.clone(),
            );
            r.register(
                "delivery_active_partitions",
                "Partitions this instance fetches (the others of its share are parked: nothing to deliver), per subscriber module",
                m.active_partitions.clone(),
            );
            r.register(
                "delivery_paused_partitions",
                "Partitions whose in-flight window is full, per subscriber module",
                m.paused_partitions.clone(),
            );
            r.register(
                "delivery_retrying_partitions",
                "Partitions with a record waiting for its next attempt, per subscriber module",
                m.retrying_partitions.clone(),
            );
            r.register(
                "delivery_oldest_unfinished_seconds",
                "Age of the oldest record not yet finished, per subscriber module",
                m.oldest_unfinished.clone(),
            );
            r.register(
                "delivery_last_failure_timestamp_seconds",
                "When a delivery attempt last failed (Unix time), per subscriber module",
                m.last_failure.clone(),
            );
        }
        m
    }
}

impl Metrics {
    pub fn event(event_type: &str) -> EventLabels {
        EventLabels {
            event_type: event_type.to_owned(),
        }
    }

    /// Sets a module's gauges from its consumer's stats.
    pub(crate) fn module_gauges(
        &self,
        labels: &ModuleLabels,
        stats: &crate::client::dispatch::Stats,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let int = |family: &Family<ModuleLabels, Gauge>, v: usize| {
            family.get_or_create(labels).set(v as i64);
        };
        int(&self.in_flight, stats.in_flight.load(Relaxed));
        int(&self.retrying, stats.retrying.load(Relaxed));
        int(
            &self.assigned_partitions,
            stats.assigned_partitions.load(Relaxed),
        );
        int(
            &self.active_partitions,
            stats.active_partitions.load(Relaxed),
        );
        int(
            &self.paused_partitions,
            stats.paused_partitions.load(Relaxed),
        );
        int(
            &self.retrying_partitions,
            stats.retrying_partitions.load(Relaxed),
        );
        self.oldest_unfinished
            .get_or_create(labels)
            .set(stats.oldest_unfinished().map_or(0.0, |d| d.as_secs_f64()));
        self.last_failure.get_or_create(labels).set(
            stats
                .last_failure()
                .map_or(0.0, |(at, _)| at.timestamp_millis() as f64 / 1000.0),
        );
    }

    /// Drops a module's gauges (its consumer stopped on this instance).
    pub fn remove_module(&self, labels: &ModuleLabels) {
        self.in_flight.remove(labels);
        self.retrying.remove(labels);
        self.assigned_partitions.remove(labels);
        self.active_partitions.remove(labels);
        self.paused_partitions.remove(labels);
        self.retrying_partitions.remove(labels);
        self.oldest_unfinished.remove(labels);
        self.last_failure.remove(labels);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}
