//! The direct-Kafka client: registration through the REST API, publishing straight to Kafka,
//! delivered by the engine like an HTTP publish.

use std::path::PathBuf;
use std::time::Duration;

use mod_pubsub::client::{DirectPublisher, MessagingDescriptor, Registrar};

use crate::helpers::*;
use crate::helpers::{delivering_app, FakeOkapi};

#[tokio::test]
async fn a_module_registers_with_the_client_and_publishes_directly_to_kafka() {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "1s").await;
    app.enable_tenant("diku").await;

    // mod-circulation publishes, mod-patron-blocks subscribes: both register with the client.
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messaging-descriptors");
    let circulation = MessagingDescriptor::from_file(&dir.join("mod-circulation.json")).unwrap();
    let patron_blocks =
        MessagingDescriptor::from_file(&dir.join("mod-patron-blocks.json")).unwrap();
    let registrar = Registrar::new(&app.base, "diku", None);
    assert!(registrar
        .register("mod-circulation-24.0.0", &circulation)
        .await
        .unwrap());
    assert!(registrar
        .register("mod-patron-blocks-1.0.0", &patron_blocks)
        .await
        .unwrap());
    // Idempotent, as every enable and upgrade re-registers.
    assert!(registrar
        .register("mod-circulation-24.0.0", &circulation)
        .await
        .unwrap());
    let empty = MessagingDescriptor {
        publications: vec![],
        subscriptions: vec![],
    };
    assert!(!registrar
        .register("mod-nothing-1.0.0", &empty)
        .await
        .unwrap());

    // A module that consumes the topic itself registers without a callback address.
    let direct = MessagingDescriptor {
        publications: vec![],
        subscriptions: vec![mod_pubsub::client::Subscription {
            event_type: "ITEM_CHECKED_OUT".into(),
            callback_address: None,
        }],
    };
    assert!(registrar
        .register("mod-direct-1.0.0", &direct)
        .await
        .unwrap());

    let publisher = DirectPublisher::new(&app.bootstrap(), &app.env["ENV"], "diku").unwrap();
    assert_eq!(
        publisher.topic("ITEM_CHECKED_OUT").unwrap(),
        app.topic("diku", "ITEM_CHECKED_OUT")
    );
    let payload = r#"{"loanId":"l-42"}"#;
    let id = publisher
        .publish(
            "ITEM_CHECKED_OUT",
            "mod-circulation-24.0.0",
            payload,
            Some("l-42"),
        )
        .await
        .unwrap();

    // The engine pushes it to mod-patron-blocks' callback like any HTTP-published event.
    let path = "/automated-patron-blocks/handlers/item-checked-out";
    let got = fake.wait_for(path, 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body, payload);
    assert_eq!(got[0].headers["x-pubsub-event-id"], id);
    // pubsub pushed it to mod-patron-blocks only, never to the direct consumer.
    let rows = app.audit_of("diku", &id, 2).await;
    assert!(rows
        .iter()
        .any(|r| r["subscriber"] == "mod-patron-blocks-1.0.0"));
    assert!(
        rows.iter().all(|r| r["subscriber"] != "mod-direct-1.0.0"),
        "{rows:?}"
    );

    // A registration error is reported, not swallowed.
    let bad = Registrar::new(&app.base, "diku", None);
    let wrong = MessagingDescriptor {
        publications: vec![
            serde_json::json!({"eventType": "ITEM_CHECKED_OUT", "description": "different", "eventTTL": 1}),
        ],
        subscriptions: vec![],
    };
    let err = bad
        .register("mod-circulation-24.0.0", &wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
}

#[tokio::test]
async fn a_direct_consumer_reads_every_tenant_commits_and_dead_letters_failures() {
    use std::sync::{Arc, Mutex};

    use mod_pubsub::client::DirectConsumer;

    use crate::helpers::{event, new_id};

    let app = TestApp::spawn().await;
    for tenant in ["diku", "other"] {
        crate::helpers::register_publisher(&app, tenant, "DIRECT_EVT", "mod-pub-1.0.0").await;
        let body = serde_json::json!({"moduleId": "mod-direct-1.0.0", "subscriptionDefinitions": [{"eventType": "DIRECT_EVT"}]});
        assert_eq!(
            app.post_json(tenant, "/pubsub/event-types/declare/subscriber", &body)
                .await
                .status(),
            201
        );
    }
    let mut sent = Vec::new();
    for (tenant, payload) in [("diku", "ok-1"), ("other", "ok-2"), ("diku", "fail")] {
        let id = new_id();
        let r = app
            .post_json(
                tenant,
                "/pubsub/publish",
                &event(&id, "DIRECT_EVT", tenant, "mod-pub-1.0.0", payload),
            )
            .await;
        assert_eq!(r.status(), 204);
        sent.push((tenant, id));
    }

    let mut consumer = DirectConsumer::new(
        &app.bootstrap(),
        &app.env["ENV"],
        "mod-direct",
        None,
        &["DIRECT_EVT"],
    )
    .unwrap();
    consumer.retry_schedule = vec![Duration::from_millis(10), Duration::from_millis(10)];
    let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let attempts_on_fail = Arc::new(Mutex::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let (seen2, fails2, stop2) = (seen.clone(), attempts_on_fail.clone(), stop.clone());
    let task = tokio::spawn(async move {
        consumer
            .run(
                move |e| {
                    let (seen, fails) = (seen2.clone(), fails2.clone());
                    async move {
                        let payload = e.event.event_payload.clone().unwrap_or_default();
                        if payload == "fail" {
                            *fails.lock().unwrap() += 1;
                            return Err("handler refused".to_owned());
                        }
                        seen.lock()
                            .unwrap()
                            .push((e.tenant, e.event.id.0.to_string(), payload));
                        Ok(())
                    }
                },
                stop2,
            )
            .await
    });

    let (bootstrap, dlq) = (
        app.bootstrap(),
        format!("{}.Default.diku.mod-pubsub.dead-letters", app.env["ENV"]),
    );
    let dead = tokio::task::spawn_blocking(move || {
        crate::helpers::kafka::read_records(&bootstrap, &dlq, 1, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(dead[0].value["id"], sent[2].1.as_str());
    assert_eq!(dead[0].headers["pubsub.subscriber"], "mod-direct");
    assert_eq!(dead[0].headers["pubsub.reason"], "handler refused");
    assert_eq!(dead[0].headers["pubsub.attempts"], "3");
    assert_eq!(*attempts_on_fail.lock().unwrap(), 3);
    eventually_every(
        "both events handled",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || std::future::ready((seen.lock().unwrap().len() >= 2).then_some(())),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    let mut want = vec![
        ("diku".to_owned(), sent[0].1.clone(), "ok-1".to_owned()),
        ("other".to_owned(), sent[1].1.clone(), "ok-2".to_owned()),
    ];
    want.sort();
    assert_eq!(got, want, "both tenants' events, once each");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// Registers `mod-pub-1.0.0` as publisher and `module` as direct consumer of `event_type`.
async fn register_direct(app: &TestApp, tenant: &str, event_type: &str, module: &str) {
    crate::helpers::register_publisher(app, tenant, event_type, "mod-pub-1.0.0").await;
    let body = serde_json::json!({"moduleId": module, "subscriptionDefinitions": [{"eventType": event_type}]});
    assert_eq!(
        app.post_json(tenant, "/pubsub/event-types/declare/subscriber", &body)
            .await
            .status(),
        201
    );
}

#[tokio::test]
async fn a_batch_is_published_in_order_per_key_and_an_invalid_event_fails_alone() {
    use mod_pubsub::client::OutgoingEvent;

    let app = TestApp::spawn().await;
    register_direct(&app, "diku", "BATCH_EVT", "mod-direct-1.0.0").await;
    let publisher = DirectPublisher::new(&app.bootstrap(), &app.env["ENV"], "diku").unwrap();
    let mut batch: Vec<OutgoingEvent> = (0..50)
        .map(|i| {
            OutgoingEvent::new("BATCH_EVT", "mod-pub-1.0.0", format!("{i}"))
                .key("job-1")
                .correlation_id("job-1")
        })
        .collect();
    batch.insert(10, OutgoingEvent::new("NOT A TYPE", "mod-pub-1.0.0", "x"));
    let results = publisher.send_batch(&batch).await;
    assert_eq!(results.len(), 51);
    let err = results[10].as_ref().unwrap_err().to_string();
    assert!(err.contains("eventType"), "{err}");
    let ids: Vec<String> = results
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 10)
        .map(|(_, r)| r.unwrap())
        .collect();

    let (bootstrap, topic) = (app.bootstrap(), app.topic("diku", "BATCH_EVT"));
    let records = tokio::task::spawn_blocking(move || {
        crate::helpers::kafka::read_records(&bootstrap, &topic, 50, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(records.len(), 50);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.key.as_deref(), Some("job-1"));
        assert_eq!(r.value["eventPayload"], i.to_string(), "in order");
        assert_eq!(r.value["id"], ids[i].as_str());
        assert_eq!(r.value["eventMetadata"]["correlationId"], "job-1");
        assert_eq!(r.headers["folio.tenantId"], "diku");
    }
}

#[tokio::test]
async fn a_direct_consumer_bounds_records_in_flight_keeps_key_order_and_commits_what_it_finished() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use mod_pubsub::client::{ConsumerOptions, DirectConsumer, OutgoingEvent};
    use tokio_util::sync::CancellationToken;

    let app = TestApp::spawn().await;
    register_direct(&app, "diku", "FLOW_EVT", "mod-flow-1.0.0").await;
    let publisher = DirectPublisher::new(&app.bootstrap(), &app.env["ENV"], "diku").unwrap();
    let batch = |from: usize, to: usize| -> Vec<OutgoingEvent> {
        (from..to)
            .map(|i| {
                OutgoingEvent::new("FLOW_EVT", "mod-pub-1.0.0", format!("k{}:{i}", i % 8))
                    .key(format!("k{}", i % 8))
            })
            .collect()
    };
    for r in publisher.send_batch(&batch(0, 80)).await {
        r.unwrap();
    }

    type Seen = Arc<Mutex<Vec<(String, usize)>>>;
    let consume = |seen: Seen, running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>| {
        let options = ConsumerOptions {
            max_in_flight: 4,
            retry_schedule: vec![],
            ..ConsumerOptions::default()
        };
        let consumer = Arc::new(
            DirectConsumer::with_options(
                &app.bootstrap(),
                &app.env["ENV"],
                "mod-flow",
                Some("diku"),
                &["FLOW_EVT"],
                options,
            )
            .unwrap(),
        );
        let stop = CancellationToken::new();
        let (c, s) = (consumer.clone(), stop.clone());
        let task = tokio::spawn(async move {
            c.run(
                move |e| {
                    let (seen, running, peak) = (seen.clone(), running.clone(), peak.clone());
                    async move {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(15)).await;
                        let payload = e.event.event_payload.unwrap_or_default();
                        let (key, n) = payload.split_once(':').unwrap();
                        seen.lock()
                            .unwrap()
                            .push((key.to_owned(), n.parse().unwrap()));
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok::<(), String>(())
                    }
                },
                s,
            )
            .await
        });
        (consumer, stop, task)
    };
    async fn wait_for(seen: &Seen, n: usize) {
        for _ in 0..600 {
            if seen.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("only {} of {n} events handled", seen.lock().unwrap().len());
    }

    let seen: Seen = Arc::default();
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (consumer, stop, task) = consume(seen.clone(), running.clone(), peak.clone());
    wait_for(&seen, 80).await;
    let stats = consumer.stats();
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(consumer); // leaves the group

    // Never more than max_in_flight at once, but records did run side by side.
    let peak = peak.load(Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "peak in flight {peak}");
    assert_eq!(stats.finished, 80);
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    // Every event once, and each key's events in publishing order.
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 80);
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (k, n) in got {
        per_key.entry(k).or_default().push(n);
    }
    for (k, ns) in &per_key {
        let mut sorted = ns.clone();
        sorted.sort();
        assert_eq!(ns, &sorted, "key {k} in order");
        assert_eq!(ns.len(), 10);
    }

    // The group committed everything it finished: a new consumer of the group gets only the
    // events published after the stop.
    for r in publisher.send_batch(&batch(80, 88)).await {
        r.unwrap();
    }
    let seen: Seen = Arc::default();
    let (consumer, stop, task) = consume(seen.clone(), Arc::default(), Arc::default());
    wait_for(&seen, 8).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(consumer);
    let mut got: Vec<usize> = seen.lock().unwrap().iter().map(|(_, n)| *n).collect();
    got.sort();
    assert_eq!(got, (80..88).collect::<Vec<_>>());

    // A partition whose window fills is not read until records finish, then read on: nothing is
    // lost or repeated. Published as one batch: nothing is paused or sought, so the partition is
    // never fetched from inside a record batch (which tansu does not answer).
    for r in publisher.send_batch(&batch(88, 112)).await {
        r.unwrap();
    }
    let seen: Seen = Arc::default();
    let (consumer, stop, task) = consume(seen.clone(), Arc::default(), Arc::default());
    wait_for(&seen, 24).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = consumer.stats();
    stop.cancel();
    task.await.unwrap().unwrap();
    assert!(stats.pauses >= 1, "the window filled: {stats:?}");
    assert!(!stats.paused, "read on: {stats:?}");
    let mut got: Vec<usize> = seen.lock().unwrap().iter().map(|(_, n)| *n).collect();
    got.sort();
    assert_eq!(got, (88..112).collect::<Vec<_>>());
}
