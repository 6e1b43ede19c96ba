//! Which partitions the delivery engine fetches: only those with events, at most
//! `DELIVERY_MAX_ACTIVE_PARTITIONS` at once, the others parked (issue 16).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::helpers::{delivering_app_with, metrics, FakeOkapi};

const TYPES: [&str; 6] = ["PARK_A", "PARK_B", "PARK_C", "PARK_D", "PARK_E", "PARK_F"];

/// The value of the metric line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// With two fetch slots and six event types (six topics), idle partitions are not fetched,
/// every event is delivered, and no more than two event types are being delivered at any
/// moment: a drained partition makes room for the next. The fetcher retires after four topics
/// (twice the slots), so the last ones are fetched by a second fetcher.
#[tokio::test]
async fn only_partitions_with_events_are_fetched_and_two_slots_serve_six_topics() {
    let fake = FakeOkapi::start().await;
    // Each callback takes a while, so a partition's events overlap only with another active one.
    fake.delay_ms.store(200, Ordering::SeqCst);
    let app = delivering_app_with(
        &fake,
        &[
            ("DELIVERY_MAX_ACTIVE_PARTITIONS", "2"),
            ("DELIVERY_IDLE_CHECK_MS", "200"),
        ],
    )
    .await;
    crate::helpers::register_publisher_of(&app, "diku", &TYPES, "mod-pub-1.0.0").await;
    let defs: Vec<(&str, &str)> = TYPES.iter().map(|t| (*t, "/park")).collect();
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("mod-park-1.0.0", &defs),
        )
        .await;
    assert_eq!(r.status(), 201);

    // The group gives this instance every partition; none is fetched while there is nothing
    // to deliver.
    let assigned = r#"pubsub_delivery_assigned_partitions{module="mod-park"}"#;
    let active = r#"pubsub_delivery_active_partitions{module="mod-park"}"#;
    let app_ref = &app;
    let partitions =
        eventually_every(
            "every partition assigned",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move {
                metric(&metrics(app_ref).await, assigned).filter(|n| *n >= TYPES.len() as f64)
            },
        )
        .await;
    // Two gauge refreshes (every 2 s) later, still nothing fetched.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let text = metrics(&app).await;
    assert_eq!(metric(&text, active), Some(0.0), "{text}");
    assert_eq!(metric(&text, assigned), Some(partitions));

    let mut sent = 0;
    for t in TYPES {
        for i in 0..4 {
            publish_keyed(&app, "diku", t, &format!("{t}-{i}"), "{}").await;
            sent += 1;
        }
    }
    let got = fake.wait_for("/park", sent, Duration::from_secs(60)).await;
    assert_eq!(got.len(), sent);

    // Per event type, from its first callback's arrival to its last one's end.
    let mut spans: BTreeMap<String, (Instant, Instant)> = BTreeMap::new();
    for r in &got {
        let t = r.headers["x-pubsub-event-type"].clone();
        let end = r.at + Duration::from_millis(200);
        let span = spans.entry(t).or_insert((r.at, end));
        span.0 = span.0.min(r.at);
        span.1 = span.1.max(end);
    }
    assert_eq!(spans.len(), TYPES.len());
    let most_at_once = spans
        .values()
        .map(|(start, _)| {
            spans
                .values()
                .filter(|(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most_at_once <= 2,
        "{most_at_once} event types delivered at once with 2 fetch slots: {spans:?}"
    );
}
