//! The broker goes away and comes back: publishes answer 503 within the configured time and are
//! audited as REJECTED, declarations are stored and their topics created once the broker is back,
//! and everything works again without a restart.

use std::time::{Duration, Instant};

use crate::helpers::kafka::{partitions_of, CreateRefusingBroker, OwnBroker};
use crate::helpers::*;
use crate::helpers::{event, new_id, register_publisher};

/// The service on a fresh database, talking to the broker on `port` of this machine, with
/// `extra` settings.
async fn app_on(port: u16, extra: &[(&str, &str)]) -> TestApp {
    let db = TestDb::create().await;
    let mut settings: Vec<(String, String)> = vec![
        ("KAFKA_HOST".into(), "127.0.0.1".into()),
        ("KAFKA_PORT".into(), port.to_string()),
    ];
    settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    TestApp::spawn_on(db, move |e| e.extend(settings)).await
}

#[tokio::test]
async fn broker_down_then_back() {
    let mut broker = OwnBroker::start();
    let app = app_on(
        broker.port,
        &[
            ("KAFKA_PUBLISH_TIMEOUT_MS", "2000"),
            ("KAFKA_ADMIN_TIMEOUT_MS", "2000"),
        ],
    )
    .await;
    register_publisher(&app, "diku", "OUTAGE", "m-1.0.0").await;
    assert_eq!(
        app.post_json(
            "diku",
            "/pubsub/publish",
            &event(&new_id(), "OUTAGE", "diku", "m-1.0.0", "{}")
        )
        .await
        .status(),
        204
    );

    broker.stop();

    // Publish: 503 in FOLIO's format within the configured 2 s (plus scheduling slack).
    let id = new_id();
    let started = Instant::now();
    let r = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, "OUTAGE", "diku", "m-1.0.0", "{}"),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(r.status(), 503);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let message = text(r).await;
    assert!(message.starts_with("OUTAGE event to topic"), "{message}");
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    let rows = app.audit_of("diku", &id, 2).await;
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["CREATED", "REJECTED"], "no PUBLISHED row");

    // Declarations while the broker is down (a module's tenant init): stored and 201, as the
    // Java module answered; the topics are created once the broker is back.
    let d = descriptor("OUTAGE_2", "x", 1);
    assert_eq!(
        app.post_json("diku", "/pubsub/event-types", &d)
            .await
            .status(),
        201
    );
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/publisher",
            &publisher("m2-1.0.0", [d.clone()]),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", text(r).await);
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("s-1.0.0", &[("OUTAGE_2", "/cb")]),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", text(r).await);
    assert_eq!(
        total(&app, "diku", "/pubsub/event-types/OUTAGE_2/publishers").await,
        1
    );
    assert_eq!(
        total(&app, "diku", "/pubsub/event-types/OUTAGE_2/subscribers").await,
        1
    );
    // Health and metrics name what is missing.
    let outage_2 = app.topic("diku", "OUTAGE_2");
    let (_, health) = app.health().await;
    assert!(
        health.contains("not created yet") && health.contains(&outage_2),
        "{health}"
    );
    assert!(missing_topics(&app).await >= 1.0);

    // The broker comes back empty (memory storage): publishing works again, the topic is recreated.
    broker.restart();
    let app_ref = &app;
    eventually_every(
        "publishing recovered",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || async move {
            let r = app_ref
                .post_json(
                    "diku",
                    "/pubsub/publish",
                    &event(&new_id(), "OUTAGE", "diku", "m-1.0.0", "{}"),
                )
                .await;
            (r.status() == 204).then_some(())
        },
    )
    .await;
    let bootstrap = broker.bootstrap();
    let topic = app.topic("diku", "OUTAGE");
    assert!(partitions_of(&bootstrap, &topic).await.is_some());
    // The topic declared during the outage is created by the reconciler, and nothing is
    // reported missing any more.
    let (broker_ref, outage_2_ref) = (&broker, &outage_2);
    eventually_every(
        &format!("{outage_2} created after the outage, nothing missing"),
        Duration::from_secs(60),
        Duration::from_millis(500),
        || async move {
            let exists = partitions_of(&broker_ref.bootstrap(), outage_2_ref)
                .await
                .is_some();
            (exists && missing_topics(app_ref).await == 0.0).then_some(())
        },
    )
    .await;
    let (_, health) = app.health().await;
    assert!(!health.contains("not created yet"), "{health}");
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/publisher",
            &publisher("m2-1.0.0", [d]),
        )
        .await;
    assert_eq!(r.status(), 201);
}

/// `pubsub_kafka_topics_missing`: registered topics the broker does not have yet.
async fn missing_topics(app: &TestApp) -> f64 {
    let text = crate::helpers::metrics(app).await;
    text.lines()
        .find_map(|l| l.strip_prefix("pubsub_kafka_topics_missing "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pubsub_kafka_topics_missing in\n{text}"))
}

#[tokio::test]
async fn start_up_recreates_the_topics_of_a_wiped_broker() {
    let mut broker = OwnBroker::start();
    let app = app_on(broker.port, &[]).await;
    app.enable_tenant("diku").await;
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("s-1.0.0", &[("HEAL_A", "/a"), ("HEAL_B", "/b")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let second = app.another_instance();
    broker.restart(); // wiped
    let bootstrap = broker.bootstrap();
    let topics = [app.topic("diku", "HEAL_A"), app.topic("diku", "HEAL_B")];
    assert_eq!(partitions_of(&bootstrap, &topics[0]).await, None);
    // A (re)started instance reconciles at start-up.
    let _second = second.await;
    for topic in topics {
        let (b, t) = (&bootstrap, &topic);
        eventually_every(
            &format!("{topic} recreated"),
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move { partitions_of(b, t).await.map(|_| ()) },
        )
        .await;
    }
}

/// Topics that exist are fine whatever creating them would answer: with a broker that does not
/// let topics be created (CreateTopics never answered, standing in for a missing CREATE ACL where
/// the operator pre-creates topics), declarations are stored (201), the topic that exists is
/// published to, and only the one that does not exist is reported missing.
#[tokio::test]
async fn existing_topics_are_used_when_creation_is_not_allowed() {
    let broker = CreateRefusingBroker::start().await;
    let app = app_on(broker.port, &[("KAFKA_ADMIN_TIMEOUT_MS", "1000")]).await;
    // The operator's topics (and the tenant's dead-letter topic) exist.
    register_publisher(&app, TENANT, "PRE_CREATED", "mod-pre-created-1.0.0").await;
    broker
        .refuse_creates
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for event_type in ["PRE_CREATED", "NOT_CREATED"] {
        let d = descriptor(event_type, "test event", 1);
        let r = app.post_json(TENANT, "/pubsub/event-types", &d).await;
        assert!(r.status().is_success(), "{}", text(r).await);
        let module = format!("mod-{}-2.0.0", event_type.to_lowercase().replace('_', "-"));
        let r = app
            .post_json(
                TENANT,
                "/pubsub/event-types/declare/publisher",
                &publisher(&module, [d]),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", text(r).await);
    }
    let r = app
        .post_json(
            TENANT,
            "/pubsub/publish",
            &event(
                &new_id(),
                "PRE_CREATED",
                TENANT,
                "mod-pre-created-2.0.0",
                "{}",
            ),
        )
        .await;
    assert_eq!(r.status(), 204, "{}", text(r).await);
    let not_created = app.topic(TENANT, "NOT_CREATED");
    let pre_created = app.topic(TENANT, "PRE_CREATED");
    // After the reconciler's pass (which lists what exists), only the missing topic is reported.
    let (app_ref, missing, present) = (&app, &not_created, &pre_created);
    let body = eventually_every(
        "only the missing topic reported",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async move {
            let (_, body) = app_ref.health().await;
            (body.contains(missing.as_str()) && !body.contains(present.as_str())).then_some(body)
        },
    )
    .await;
    assert!(
        body.contains("1 registered topics not created yet"),
        "{body}"
    );
    let r = app
        .post_json(
            TENANT,
            "/pubsub/publish",
            &event(
                &new_id(),
                "NOT_CREATED",
                TENANT,
                "mod-not-created-2.0.0",
                "{}",
            ),
        )
        .await;
    assert_eq!(r.status(), 503, "{body}");
    app.stop().await;
}

/// A declaration waiting for Kafka holds no database connection: with a pool of one and topic
/// creation that never answers, other requests are served while the declaration waits.
#[tokio::test]
async fn a_declaration_waiting_for_kafka_holds_no_database_connection() {
    let broker = CreateRefusingBroker::start().await;
    let app = app_on(
        broker.port,
        &[("KAFKA_ADMIN_TIMEOUT_MS", "5000"), ("DB_MAXPOOLSIZE", "1")],
    )
    .await;
    app.enable_tenant(TENANT).await;
    let d = descriptor("SLOW_TOPIC", "test event", 1);
    assert_eq!(
        app.post_json(TENANT, "/pubsub/event-types", &d)
            .await
            .status(),
        201
    );
    broker
        .refuse_creates
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let body = publisher("mod-slow-1.0.0", [d]);
    {
        let declaration = app.post_json(TENANT, "/pubsub/event-types/declare/publisher", &body);
        tokio::pin!(declaration);
        // Let the declaration reach Kafka, then ask for something that needs the pool.
        let answered = tokio::select! {
            r = &mut declaration => panic!("the declaration did not wait for Kafka: {}", r.status()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                tokio::select! {
                    r = &mut declaration => panic!("the declaration finished first: {}", r.status()),
                    r = app.req(reqwest::Method::GET, "/pubsub/event-types").send() => r.unwrap(),
                }
            }
        };
        assert_eq!(answered.status(), 200);
        assert_eq!(declaration.await.status(), 201);
    }
    app.stop().await;
}
