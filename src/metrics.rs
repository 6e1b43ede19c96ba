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
