//! The delivery engine: real broker, real service, a fake Okapi (an axum server in the test)
//! that records what subscribers receive.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::kafka::read_records;
use crate::helpers::*;
use crate::helpers::{event, new_id, register_publisher};

async fn subscribe(app: &TestApp, module: &str, event_type: &str, callback: &str) {
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber(module, &[(event_type, callback)]),
        )
        .await;
    assert_eq!(r.status(), 201);
}

async fn publish(app: &TestApp, event_type: &str, payload: &str) -> String {
    let id = new_id();
    let r = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, event_type, "diku", "mod-pub-1.0.0", payload),
        )
        .await;
    assert_eq!(r.status(), 204);
    id
}

fn states(rows: &[Value], subscriber: &str) -> Vec<(String, Option<i64>)> {
    rows.iter()
        .filter(|r| r["subscriber"] == subscriber)
        .map(|r| {
            (
                r["state"].as_str().unwrap().to_owned(),
                r["attempt"].as_i64(),
            )
        })
        .collect()
}

#[tokio::test]
async fn events_are_posted_to_the_callback_with_payload_and_headers() {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "100ms").await;
    register_publisher(&app, "diku", "LOAN_CLOSED", "mod-pub-1.0.0").await;
    subscribe(
        &app,
        "mod-patron-blocks-1.0.0",
        "LOAN_CLOSED",
        "/automated-patron-blocks/handlers/loan-closed",
    )
    .await;

    let payload = r#"{"loanId":"l-1"}"#;
    let id = publish(&app, "LOAN_CLOSED", payload).await;
    let got = fake
        .wait_for(
            "/automated-patron-blocks/handlers/loan-closed",
            1,
            Duration::from_secs(20),
        )
        .await;
    let r = &got[0];
    assert_eq!(r.body, payload, "the payload is the body");
    assert_eq!(r.headers["x-okapi-tenant"], "diku");
    assert_eq!(r.headers["x-okapi-url"], fake.base);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-pubsub-event-id"], id);
    assert_eq!(r.headers["x-pubsub-event-type"], "LOAN_CLOSED");
    assert_eq!(r.headers["x-pubsub-delivery-attempt"], "1");
    assert!(!r.headers["x-okapi-request-id"].is_empty());

    let rows = app.audit_of("diku", &id, 4).await;
    assert_eq!(
        states(&rows, "mod-patron-blocks-1.0.0"),
        [
            ("RECEIVED".to_owned(), None),
            ("DELIVERED".to_owned(), Some(1))
        ]
    );

    let metrics = metrics(&app).await;
    for line in [
        r#"pubsub_events_published_total{event_type="LOAN_CLOSED"} 1"#,
        r#"pubsub_events_delivered_total{event_type="LOAN_CLOSED"} 1"#,
        r#"pubsub_delivery_latency_seconds_count{event_type="LOAN_CLOSED"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from\n{metrics}"
        );
    }
    let group = format!("{}.mod-pubsub.mod-patron-blocks", app.env["ENV"]);
    assert!(
        metrics.contains(&format!(r#"pubsub_consumer_lag{{group="{group}"}}"#)),
        "{metrics}"
    );
}

#[tokio::test]
async fn failures_are_retried_until_delivered() {
    let fake = FakeOkapi::start().await;
    fake.answer("/retry", &[500, 503, 200]);
    let app = delivering_app(&fake, "100ms,100ms,100ms").await;
    register_publisher(&app, "diku", "RETRIED", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "RETRIED", "/retry").await;
    let id = publish(&app, "RETRIED", "{}").await;
    let got = fake.wait_for("/retry", 3, Duration::from_secs(20)).await;
    let attempts: Vec<&str> = got
        .iter()
        .map(|r| r.headers["x-pubsub-delivery-attempt"].as_str())
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    let rows = app.audit_of("diku", &id, 6).await;
    assert_eq!(
        states(&rows, "mod-sub-1.0.0"),
        [
            ("RECEIVED".to_owned(), None),
            ("REJECTED".to_owned(), Some(1)),
            ("REJECTED".to_owned(), Some(2)),
            ("DELIVERED".to_owned(), Some(3))
        ]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fake.received_on("/retry").len(),
        3,
        "no delivery after success"
    );
}

#[tokio::test]
async fn exhausted_events_go_to_the_dead_letter_topic_and_the_next_event_follows() {
    let fake = FakeOkapi::start().await;
    fake.answer("/down", &[500, 500, 500, 204]);
    let app = delivering_app(&fake, "50ms,50ms").await;
    register_publisher(&app, "diku", "DOOMED", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "DOOMED", "/down").await;
    // One key: the second waits for the first.
    let first = publish_keyed(&app, "diku", "DOOMED", "loan-1", r#"{"n":1}"#).await;
    let second = publish_keyed(&app, "diku", "DOOMED", "loan-1", r#"{"n":2}"#).await;

    // Three attempts for the first, then the second is delivered.
    let got = fake.wait_for("/down", 4, Duration::from_secs(20)).await;
    assert!(got[..3]
        .iter()
        .all(|r| r.headers["x-pubsub-event-id"] == first));
    assert_eq!(got[3].headers["x-pubsub-event-id"], second);

    let (bootstrap, topic) = (
        app.bootstrap(),
        format!("{}.Default.diku.mod-pubsub.dead-letters", app.env["ENV"]),
    );
    let dead = tokio::task::spawn_blocking(move || {
        read_records(&bootstrap, &topic, 1, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(dead[0].value["id"], first.as_str());
    assert_eq!(dead[0].headers["pubsub.subscriber"], "mod-sub-1.0.0");
    assert_eq!(dead[0].headers["pubsub.attempts"], "3");
    assert!(
        dead[0].headers["pubsub.reason"].contains("500"),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(dead[0].headers["folio.tenantId"], "diku");

    let rows = app.audit_of("diku", &first, 6).await;
    let last = rows
        .iter()
        .rev()
        .find(|r| r["subscriber"] == "mod-sub-1.0.0")
        .unwrap();
    assert_eq!(last["state"], "REJECTED");
    assert!(
        last["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("dead-lettered: "),
        "{last}"
    );

    let metrics = metrics(&app).await;
    for line in [
        r#"pubsub_events_dead_lettered_total{event_type="DOOMED"} 1"#,
        r#"pubsub_delivery_retries_total{event_type="DOOMED"} 2"#,
        r#"pubsub_delivery_attempts_failed_total{event_type="DOOMED"} 3"#,
        r#"pubsub_events_delivered_total{event_type="DOOMED"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from\n{metrics}"
        );
    }
}

#[tokio::test]
async fn a_failing_subscriber_does_not_hold_up_another() {
    let fake = FakeOkapi::start().await;
    fake.answer("/broken", &[500]);
    let app = delivering_app(&fake, "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s").await;
    register_publisher(&app, "diku", "SHARED", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-broken-1.0.0", "SHARED", "/broken").await;
    subscribe(&app, "mod-healthy-1.0.0", "SHARED", "/healthy").await;
    // One key, so the broken subscriber must keep to the first event.
    for i in 0..20 {
        publish_keyed(&app, "diku", "SHARED", "loan-1", &format!(r#"{{"n":{i}}}"#)).await;
    }
    let got = fake.wait_for("/healthy", 20, Duration::from_secs(20)).await;
    let bodies: Vec<&str> = got.iter().map(|r| r.body.as_str()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    assert_eq!(bodies, expected, "in order, each once");
    // Meanwhile the broken one is still retrying its first event (its group may have joined
    // after the healthy one's finished).
    fake.wait_for("/broken", 1, Duration::from_secs(10)).await;
    let broken = fake.received_on("/broken");
    assert!(
        broken.iter().all(|r| r.body == r#"{"n":0}"#),
        "the broken subscriber keeps its key's order"
    );
}

#[tokio::test]
async fn delivery_resumes_after_a_restart_and_stops_after_unsubscribing() {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "100ms").await;
    register_publisher(&app, "diku", "DURABLE", "mod-pub-1.0.0").await;
    // Published before anyone subscribed: not delivered.
    publish(&app, "DURABLE", r#"{"early":true}"#).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    subscribe(&app, "mod-sub-1.0.0", "DURABLE", "/durable").await;
    let mut sent = Vec::new();
    for _ in 0..5 {
        sent.push(publish(&app, "DURABLE", "{}").await);
    }
    fake.wait_for("/durable", 5, Duration::from_secs(20)).await;

    // A new instance on the same database picks the subscription up from Postgres and goes on
    // from the committed position.
    let second = app.another_instance().await;
    app.stop().await;
    for _ in 0..5 {
        sent.push(publish(&second, "DURABLE", "{}").await);
    }
    let got = fake.wait_for("/durable", 10, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.headers["x-pubsub-event-id"].clone())
        .collect();
    ids.sort();
    ids.dedup();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(
        ids, want,
        "every event, nothing published before the subscription"
    );

    // Unsubscribing stops delivery.
    let r = second
        .delete(
            "diku",
            "/pubsub/event-types/DURABLE/subscribers?moduleId=mod-sub-1.0.0",
        )
        .await;
    assert_eq!(r.status(), 204);
    let late = publish(&second, "DURABLE", "{}").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        fake.received_on("/durable")
            .iter()
            .all(|r| r.headers["x-pubsub-event-id"] != late),
        "an event published after unsubscribing was delivered"
    );
}

#[tokio::test]
async fn dead_letters_can_be_listed_redelivered_and_subscribers_replayed() {
    let fake = FakeOkapi::start().await;
    fake.answer("/flaky", &[500, 500, 204]);
    let app = delivering_app(&fake, "50ms").await;
    register_publisher(&app, "diku", "ADMIN", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "ADMIN", "/flaky").await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let dead = publish(&app, "ADMIN", r#"{"n":"dead"}"#).await;
    // Two attempts (500, 500): dead-lettered.
    let listed: Value = eventually_every(
        "one dead letter listed",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async {
            let listed = app.get_json("diku", "/pubsub/dead-letters").await;
            (listed["totalRecords"] == 1).then_some(listed)
        },
    )
    .await;
    let letter = &listed["deadLetters"][0];
    assert_eq!(letter["eventId"], dead.as_str());
    assert_eq!(letter["subscriber"], "mod-sub-1.0.0");
    assert_eq!(letter["attempts"], "2");
    assert_eq!(letter["event"]["eventPayload"], r#"{"n":"dead"}"#);
    let other = app
        .get_json("diku", "/pubsub/dead-letters?subscriber=mod-other")
        .await;
    assert_eq!(other["totalRecords"], 0);
    let other_tenant = app.get_json("other", "/pubsub/dead-letters").await;
    assert_eq!(other_tenant["totalRecords"], 0);

    // Redelivery: the subscriber now answers 204.
    let r = app
        .post_json(
            "diku",
            "/pubsub/dead-letters/redeliver",
            &serde_json::json!({"eventIds": [dead]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let result: Value = r.json().await.unwrap();
    assert_eq!(result["redelivered"], serde_json::json!([dead]), "{result}");
    let got = fake.received_on("/flaky");
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].headers["x-pubsub-event-id"], dead);
    assert_eq!(got[2].headers["x-pubsub-delivery-attempt"], "3");
    // (Not necessarily the last row: the engine stamps its dead-lettered row after Kafka
    // acknowledged the dead letter, which a loaded machine may do after this redelivery; and
    // audit rows are written in the background, so the row may land after the answer.)
    app.audit_until("diku", &dead, "DELIVERED at attempt 3, among 5", |rows| {
        rows.len() >= 5
            && rows
                .iter()
                .any(|r| r["state"] == "DELIVERED" && r["attempt"] == 3)
    })
    .await;

    // Replay from before the event: delivered again (the subscriber keeps answering 204).
    let r = app
        .post_json(
            "diku",
            "/pubsub/subscribers/mod-sub-1.0.0/replay",
            &serde_json::json!({"fromDate": before.to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    assert_eq!(
        started["topics"],
        serde_json::json!([app.topic("diku", "ADMIN")])
    );
    let got = fake.wait_for("/flaky", 4, Duration::from_secs(20)).await;
    assert_eq!(got[3].headers["x-pubsub-event-id"], dead);
    // From before 1970 (a negative time, which Kafka would read as a special offset): everything.
    let r = app
        .post_json(
            "diku",
            "/pubsub/subscribers/mod-sub-1.0.0/replay",
            &serde_json::json!({"fromDate": "1900-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(r.status(), 202);
    let got = fake.wait_for("/flaky", 5, Duration::from_secs(20)).await;
    assert_eq!(got[4].headers["x-pubsub-event-id"], dead);

    // Bad requests.
    let r = app
        .post_json(
            "diku",
            "/pubsub/subscribers/mod-nobody-1.0.0/replay",
            &serde_json::json!({"fromDate": before.to_rfc3339()}),
        )
        .await;
    assert_eq!(r.status(), 404);
    let r = app
        .post_json(
            "diku",
            "/pubsub/subscribers/mod-sub-1.0.0/replay",
            &serde_json::json!({"fromDate": "yesterday"}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .post_json(
            "diku",
            "/pubsub/dead-letters/redeliver",
            &serde_json::json!({"eventIds": ["nope"]}),
        )
        .await;
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn two_instances_share_the_work_and_deliver_each_event_once() {
    let fake = FakeOkapi::start().await;
    let a = delivering_app_with(
        &fake,
        &[
            ("NUMBER_OF_PARTITIONS", "4"),
            ("DELIVERY_RETRY_SCHEDULE", "100ms"),
        ],
    )
    .await;
    register_publisher(&a, "diku", "SHARED_WORK", "mod-pub-1.0.0").await;
    subscribe(&a, "mod-sub-1.0.0", "SHARED_WORK", "/work").await;
    let b = a.another_instance().await;
    // Let the group settle with both members.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut sent = Vec::new();
    for i in 0..60 {
        let id = new_id();
        let r = a
            .req_as("diku", reqwest::Method::POST, "/pubsub/publish")
            .header("X-Pubsub-Partition-Key", format!("key-{i}"))
            .json(&event(&id, "SHARED_WORK", "diku", "mod-pub-1.0.0", "{}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        sent.push(id);
    }
    fake.wait_for("/work", 60, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got: Vec<String> = fake
        .received_on("/work")
        .iter()
        .map(|r| r.headers["x-pubsub-event-id"].clone())
        .collect();
    got.sort();
    sent.sort();
    assert_eq!(got, sent, "each event exactly once");

    let delivered_by = |m: String| -> u64 {
        m.lines()
            .find(|l| l.starts_with(r#"pubsub_events_delivered_total{event_type="SHARED_WORK"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let (on_a, on_b) = (
        delivered_by(metrics(&a).await),
        delivered_by(metrics(&b).await),
    );
    assert_eq!(on_a + on_b, 60);
    assert!(
        on_a > 0 && on_b > 0,
        "both instances deliver: {on_a} + {on_b}"
    );
}

#[tokio::test]
async fn retry_after_is_honoured_and_hung_callbacks_time_out() {
    let fake = FakeOkapi::start().await;
    fake.answer("/busy", &[429, 204]);
    let app = delivering_app(&fake, "50ms,50ms").await;
    register_publisher(&app, "diku", "BUSY", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "BUSY", "/busy").await;
    publish(&app, "BUSY", "{}").await;
    let got = fake.wait_for("/busy", 2, Duration::from_secs(20)).await;
    assert_eq!(got[1].headers["x-pubsub-delivery-attempt"], "2");
    let times: Vec<Instant> = fake.arrivals("/busy");
    let waited = times[1].duration_since(times[0]);
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 honoured, waited {waited:?} (schedule says 50 ms)"
    );

    // A callback that hangs longer than DELIVERY_TIMEOUT_MS (2 s) is a failed attempt.
    fake.delay_ms
        .store(3000, std::sync::atomic::Ordering::Relaxed);
    let id = publish(&app, "BUSY", "{}").await;
    let rows = app.audit_of("diku", &id, 4).await;
    let rejected = rows
        .iter()
        .find(|r| r["state"] == "REJECTED")
        .expect("a failed attempt");
    assert!(
        rejected["errorMessage"]
            .as_str()
            .unwrap()
            .contains("was not delivered"),
        "{rejected}"
    );
    fake.delay_ms.store(0, std::sync::atomic::Ordering::Relaxed);
}

#[tokio::test]
async fn purging_a_tenant_stops_its_deliveries() {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "50ms").await;
    register_publisher(&app, "diku", "PURGED", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "PURGED", "/purged").await;
    publish(&app, "PURGED", "{}").await;
    fake.wait_for("/purged", 1, Duration::from_secs(20)).await;

    let r = app
        .post_json(
            "diku",
            "/_/tenant",
            &serde_json::json!({"module_from": "mod-pubsub-1.0.0", "purge": true}),
        )
        .await;
    assert_eq!(r.status(), 204);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A module on folio-kafka-wrapper keeps writing to the topic directly.
    let id = new_id();
    let value = serde_json::to_vec(&event(&id, "PURGED", "diku", "mod-pub-1.0.0", "{}")).unwrap();
    let (bootstrap, topic) = (app.bootstrap(), app.topic("diku", "PURGED"));
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let p: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()
            .unwrap();
        p.send(BaseRecord::to(&topic).key(&id).payload(&value))
            .unwrap();
        p.flush(Duration::from_secs(10)).unwrap();
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fake.received_on("/purged").len(),
        1,
        "nothing delivered after the purge"
    );
}

/// A stop keeps to `SHUTDOWN_TIMEOUT_MS` in all, even with a callback that does not answer (its
/// event is not committed, so it is delivered again after the restart).
#[tokio::test]
async fn a_stop_keeps_to_its_deadline_with_a_callback_hanging() {
    let fake = FakeOkapi::start().await;
    fake.delay_ms
        .store(60_000, std::sync::atomic::Ordering::SeqCst);
    let app = delivering_app_with(
        &fake,
        &[
            ("DELIVERY_TIMEOUT_MS", "60000"),
            ("SHUTDOWN_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    register_publisher(&app, "diku", "HANGING", "mod-pub-1.0.0").await;
    subscribe(&app, "mod-sub-1.0.0", "HANGING", "/hanging").await;
    publish(&app, "HANGING", "{}").await;
    eventually_every(
        "the callback started",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let started = fake.concurrent.load(std::sync::atomic::Ordering::SeqCst) > 0;
            std::future::ready(started.then_some(()))
        },
    )
    .await;
    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    // The deadline plus the time a test machine may lose; the callback alone would take 60 s.
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
}
