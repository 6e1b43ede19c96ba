//! `POST /pubsub/publish` against the real broker: topics, envelope, key, headers, checks.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::kafka::{partitions_of, read_records};
use crate::helpers::*;

#[tokio::test]
async fn declarations_create_topics_with_the_configured_partitions() {
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, |e| {
        e.insert("NUMBER_OF_PARTITIONS".into(), "3".into());
    })
    .await;
    register_publisher(&app, "diku", "ITEM_CHECKED_OUT", "mod-circulation-1.0.0").await;
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("mod-patron-blocks-1.0.0", &[("LOAN_CLOSED", "/x")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let bootstrap = app.bootstrap();
    for t in ["ITEM_CHECKED_OUT", "LOAN_CLOSED"] {
        let topic = app.topic("diku", t);
        assert!(topic.contains(".Default.diku."), "{topic}");
        assert_eq!(partitions_of(&bootstrap, &topic).await, Some(3), "{topic}");
    }
    // Events with one partition key keep their order on one partition.
    let mut sent: Vec<(String, String)> = Vec::new();
    for i in 0..12 {
        let key = format!("k{}", i % 2);
        let id = new_id();
        let r = app
            .req_as("diku", Method::POST, "/pubsub/publish")
            .header("X-Pubsub-Partition-Key", &key)
            .json(&event(
                &id,
                "ITEM_CHECKED_OUT",
                "diku",
                "mod-circulation-1.0.0",
                "{}",
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        sent.push((key, id));
    }
    let (b, topic) = (bootstrap.clone(), app.topic("diku", "ITEM_CHECKED_OUT"));
    let records =
        tokio::task::spawn_blocking(move || read_records(&b, &topic, 12, Duration::from_secs(20)))
            .await
            .unwrap();
    for key in ["k0", "k1"] {
        let on_key: Vec<&crate::helpers::kafka::Record> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(key))
            .collect();
        assert!(
            on_key.iter().all(|r| r.partition == on_key[0].partition),
            "{key} spans partitions"
        );
        let got: Vec<&str> = on_key
            .iter()
            .map(|r| r.value["id"].as_str().unwrap())
            .collect();
        let want: Vec<&str> = sent
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, id)| id.as_str())
            .collect();
        assert_eq!(got, want, "order of {key}");
    }

    // Another tenant's declaration makes that tenant's topics.
    let r = app
        .post_json(
            "other",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("m-1.0.0", &[("LOAN_CLOSED", "/x")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let topic = app.topic("other", "LOAN_CLOSED");
    assert_eq!(partitions_of(&bootstrap, &topic).await, Some(3));
}

#[tokio::test]
async fn a_published_event_is_on_its_topic_with_envelope_key_and_headers() {
    let app = TestApp::spawn().await;
    register_publisher(&app, "diku", "ITEM_CHECKED_OUT", "mod-circulation-1.0.0").await;
    let id1 = new_id();
    let id2 = new_id();
    let payload = r#"{"loanId":"l1","note":"quotes \" and unicode é"}"#;
    let body = event(
        &id1,
        "ITEM_CHECKED_OUT",
        "diku",
        "mod-circulation-1.0.0",
        payload,
    );
    let r = app
        .req_as("diku", Method::POST, "/pubsub/publish")
        .header("X-Okapi-Request-Id", "req-42")
        .header("X-Okapi-Token", "secret-token")
        .header("X-Okapi-Url", "http://okapi:9130")
        .header("X-Pubsub-Partition-Key", "loan-l1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
    // No subscriber is not an error; without a key header the event id is the key.
    let body2 = event(
        &id2,
        "ITEM_CHECKED_OUT",
        "diku",
        "mod-circulation-1.0.0",
        "{}",
    );
    assert_eq!(
        app.post_json("diku", "/pubsub/publish", &body2)
            .await
            .status(),
        204
    );

    let (bootstrap, topic) = (app.bootstrap(), app.topic("diku", "ITEM_CHECKED_OUT"));
    let records = tokio::task::spawn_blocking(move || {
        read_records(&bootstrap, &topic, 2, Duration::from_secs(20))
    })
    .await
    .unwrap();
    let first = records
        .iter()
        .find(|r| r.value["id"] == id1.as_str())
        .expect("first event");
    let mut expected = body.clone();
    let published = first.value["eventMetadata"]["publishedDate"]
        .as_str()
        .expect("publishedDate filled in")
        .to_owned();
    assert!(
        mod_pubsub::event::parse_date_time(&published).is_some(),
        "{published}"
    );
    expected["eventMetadata"]["publishedDate"] = json!(published);
    assert_eq!(first.value, expected);
    assert_eq!(
        first.value["eventPayload"], payload,
        "payload is passed through as text"
    );
    assert_eq!(first.key.as_deref(), Some("loan-l1"));
    assert_eq!(first.headers["folio.tenantId"], "diku");
    assert_eq!(first.headers["x-okapi-tenant"], "diku");
    assert_eq!(first.headers["x-okapi-url"], "http://okapi:9130");
    assert_eq!(first.headers["x-okapi-request-id"], "req-42");
    assert!(
        first
            .headers
            .keys()
            .all(|k| !k.to_lowercase().contains("token")),
        "{:?}",
        first.headers
    );
    assert!(!format!("{:?}", first).contains("secret-token"));

    let second = records
        .iter()
        .find(|r| r.value["id"] == id2.as_str())
        .expect("second event");
    assert_eq!(second.key.as_deref(), Some(id2.as_str()));
    assert_eq!(
        second.headers["x-okapi-url"], "http://127.0.0.1:9130",
        "OKAPI_URL when the request has none"
    );

    // CREATED then PUBLISHED in the audit trail.
    let rows = app.audit_of("diku", &id1, 2).await;
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["CREATED", "PUBLISHED"]);
    assert_eq!(rows[0]["correlationId"], "corr-1");
    assert_eq!(rows[0]["publishedBy"], "mod-circulation-1.0.0");
    assert_eq!(rows[0]["eventType"], "ITEM_CHECKED_OUT");
}

#[tokio::test]
async fn tenant_collection_topics() {
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, |e| {
        e.insert("KAFKA_PRODUCER_TENANT_COLLECTION".into(), "ALL".into());
    })
    .await;
    register_publisher(&app, "diku", "COLL_EVENT", "m-1.0.0").await;
    let id = new_id();
    assert_eq!(
        app.post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, "COLL_EVENT", "diku", "m-1.0.0", "{}")
        )
        .await
        .status(),
        204
    );
    let topic = app.topic("diku", "COLL_EVENT");
    assert!(topic.contains(".Default.ALL.COLL_EVENT"), "{topic}");
    let bootstrap = app.bootstrap();
    let records = tokio::task::spawn_blocking(move || {
        read_records(&bootstrap, &topic, 1, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(
        records[0].headers["folio.tenantId"], "diku",
        "the tenant travels in a header"
    );
}

/// Nice values of this process's threads named `rdk:broker<node id>`: the broker threads
/// librdkafka starts once it has learned the cluster's brokers (from a librdkafka thread, not
/// from the thread that created the client).
fn learned_broker_thread_nices() -> Vec<i32> {
    let mut nices = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let name = head.split_once('(').unwrap().1;
        let learned = name
            .strip_prefix("rdk:broker")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if learned {
            nices.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
        }
    }
    nices
}

/// The publish producer's librdkafka threads run at `KAFKA_PRODUCER_THREAD_NICE` (7 here, a
/// value no other test uses), including the broker threads started after the client learned
/// the cluster; publishing works as before.
#[tokio::test]
async fn the_publish_producers_threads_run_at_the_configured_priority() {
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, |e| {
        e.insert("KAFKA_PRODUCER_THREAD_NICE".into(), "7".into());
    })
    .await;
    register_publisher(&app, "diku", "NICE_EVENT", "m-1.0.0").await;
    for _ in 0..3 {
        let r = app
            .post_json(
                "diku",
                "/pubsub/publish",
                &event(&new_id(), "NICE_EVENT", "diku", "m-1.0.0", "{}"),
            )
            .await;
        assert_eq!(r.status(), 204);
    }
    let nices = learned_broker_thread_nices();
    assert!(nices.contains(&7), "{nices:?}");
}

#[tokio::test]
async fn rejected_publishes() {
    let app = TestApp::spawn().await;
    register_publisher(&app, "diku", "CHECKED", "mod-circulation-1.0.0").await;

    // Not registered (the Java module's message), audited as REJECTED.
    let id = new_id();
    let r = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, "CHECKED", "diku", "mod-other-1.0.0", "{}"),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        text(r).await,
        "mod-other-1.0.0 is not registered as PUBLISHER for event type CHECKED"
    );
    let rows = app.audit_of("diku", &id, 2).await;
    assert_eq!(rows[1]["state"], "REJECTED");
    assert_eq!(
        rows[1]["errorMessage"],
        "mod-other-1.0.0 is not registered as PUBLISHER for event type CHECKED"
    );

    // Another version of the registered module is not the registered publisher (exact match).
    let r = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&new_id(), "CHECKED", "diku", "mod-circulation-2.0.0", "{}"),
        )
        .await;
    assert_eq!(r.status(), 400);
    // Unregistered event type.
    let r = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(
                &new_id(),
                "OTHER_TYPE",
                "diku",
                "mod-circulation-1.0.0",
                "{}",
            ),
        )
        .await;
    assert_eq!(r.status(), 400);

    // One tenant cannot publish into another's stream.
    app.enable_tenant("other").await;
    let id = new_id();
    let r = app
        .post_json(
            "other",
            "/pubsub/publish",
            &event(&id, "CHECKED", "diku", "mod-circulation-1.0.0", "{}"),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        text(r).await,
        "eventMetadata.tenantId 'diku' does not match the X-Okapi-Tenant header 'other'"
    );
    assert_eq!(app.audit_of("other", &id, 2).await[1]["state"], "REJECTED");

    // A tenant that was never enabled.
    let r = app
        .post_json(
            "nobody",
            "/pubsub/publish",
            &event(
                &new_id(),
                "CHECKED",
                "nobody",
                "mod-circulation-1.0.0",
                "{}",
            ),
        )
        .await;
    assert_eq!(r.status(), 400);
    assert!(text(r).await.contains("not enabled"));

    // Schema violations name the field.
    let good = event(&new_id(), "CHECKED", "diku", "mod-circulation-1.0.0", "{}");
    let mut cases: Vec<(Value, &str)> = Vec::new();
    let mut e = good.clone();
    e["eventMetadata"]
        .as_object_mut()
        .unwrap()
        .remove("publishedBy");
    cases.push((e, "eventMetadata.publishedBy"));
    let mut e = good.clone();
    e["id"] = json!("not-a-uuid");
    cases.push((e, "id"));
    let mut e = good.clone();
    e["eventMetadata"]["surprise"] = json!(1);
    cases.push((e, "eventMetadata.surprise"));
    let mut e = good.clone();
    e["eventPayload"] = json!({"an": "object"});
    cases.push((e, "eventPayload"));
    let mut e = good.clone();
    e["eventMetadata"]["createdDate"] = json!("last tuesday");
    cases.push((e, "eventMetadata.createdDate"));
    let mut e = good.clone();
    e["eventType"] = json!("BAD.TYPE");
    cases.push((e, "eventType"));
    let mut e = good.clone();
    e.as_object_mut().unwrap().remove("eventMetadata");
    cases.push((e, "eventMetadata"));
    for (body, key) in cases {
        let r = app.post_json("diku", "/pubsub/publish", &body).await;
        assert_eq!(r.status(), 422, "{body}");
        let errors: Value = r.json().await.unwrap();
        assert_eq!(errors["errors"][0]["parameters"][0]["key"], key, "{errors}");
    }
    // Larger than MAX_REQUEST_SIZE (64 KiB in tests).
    let big = event(
        &new_id(),
        "CHECKED",
        "diku",
        "mod-circulation-1.0.0",
        &"x".repeat(70_000),
    );
    assert_eq!(
        app.post_json("diku", "/pubsub/publish", &big)
            .await
            .status(),
        413
    );
    // A bad partition key.
    let r = app
        .req(Method::POST, "/pubsub/publish")
        .header("X-Pubsub-Partition-Key", "k".repeat(300))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // And the good one still works.
    assert_eq!(
        app.post_json("diku", "/pubsub/publish", &good)
            .await
            .status(),
        204
    );
}

/// Publishes on `app` until it answers `status`, failing after a second.
async fn answers_within_a_second(app: &TestApp, status: u16, what: &str) {
    let started = Instant::now();
    loop {
        let r = app
            .post_json(
                "diku",
                "/pubsub/publish",
                &event(&new_id(), "MULTI", "diku", "m-1.0.0", "{}"),
            )
            .await;
        if r.status() == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{what} after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_registration_on_one_instance_is_honoured_by_another_within_a_second() {
    let a = TestApp::spawn().await;
    let b = a.another_instance().await;
    a.enable_tenant("diku").await;
    let d = descriptor("MULTI", "x", 1);
    assert_eq!(
        a.post_json("diku", "/pubsub/event-types", &d)
            .await
            .status(),
        201
    );
    // B has seen nothing yet.
    let r = b
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&new_id(), "MULTI", "diku", "m-1.0.0", "{}"),
        )
        .await;
    assert_eq!(r.status(), 400);

    assert_eq!(
        a.post_json(
            "diku",
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [d])
        )
        .await
        .status(),
        201
    );
    answers_within_a_second(&b, 204, "instance B still refuses").await;

    // Unregistering on A is honoured by B as well.
    assert_eq!(
        a.delete(
            "diku",
            "/pubsub/messaging-modules?moduleId=m-1.0.0&moduleRole=PUBLISHER"
        )
        .await
        .status(),
        204
    );
    answers_within_a_second(&b, 400, "instance B still accepts").await;

    // The same through DELETE …/publishers?moduleId=.
    let d = descriptor("MULTI", "x", 1);
    let r = a
        .post_json(
            "diku",
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [d]),
        )
        .await;
    assert_eq!(r.status(), 201);
    answers_within_a_second(&b, 204, "instance B still refuses after re-registration").await;
    let r = a
        .delete(
            "diku",
            "/pubsub/event-types/MULTI/publishers?moduleId=m-1.0.0",
        )
        .await;
    assert_eq!(r.status(), 204);
    answers_within_a_second(
        &b,
        400,
        "instance B still accepts after DELETE …/publishers",
    )
    .await;
}

#[tokio::test]
async fn payload_audit_stores_the_payload_once_without_double_encoding() {
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, |e| {
        e.insert("EVENT_PAYLOAD_AUDIT_ENABLED".into(), "true".into());
    })
    .await;
    register_publisher(&app, "diku", "WITH_PAYLOAD", "m-1.0.0").await;
    let id = new_id();
    let payload = r#"{"a":"b","n":[1,2]}"#;
    assert_eq!(
        app.post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, "WITH_PAYLOAD", "diku", "m-1.0.0", payload)
        )
        .await
        .status(),
        204
    );
    app.audit_of("diku", &id, 2).await;
    let body = app
        .get_json("diku", &format!("/pubsub/audit-messages/{id}/payload"))
        .await;
    assert_eq!(body, json!({"eventId": id, "content": payload}));

    let r = app
        .req_as(
            "diku",
            Method::GET,
            &format!("/pubsub/audit-messages/{}/payload", new_id()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(text(r)
        .await
        .starts_with("Couldn't find audit message payload for event"));
    let r = app
        .req_as(
            "diku",
            Method::GET,
            "/pubsub/audit-messages/not-a-uuid/payload",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
