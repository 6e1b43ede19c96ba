//! Interoperability with a Kafka client nobody here wrote: kcat (Debian's package, installed by
//! scripts/test.sh). It reads what pubsub writes and finds folio-kafka-wrapper's Event JSON; what
//! it writes as a Java module on folio-kafka-wrapper would is delivered over HTTP and reaches
//! direct consumers.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mod_pubsub::client::{DirectConsumer, ReceivedEvent};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;
use crate::helpers::{delivering_app, FakeOkapi};
use crate::helpers::{event, new_id, register_publisher};

/// Runs kcat with `args` (and `stdin`), failing the test with kcat's output when it fails.
async fn kcat(args: &[&str], stdin: Option<&str>) -> String {
    let child = tokio::process::Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start kcat ({e}); is it installed and on PATH? scripts/test.sh installs it (ensure_kcat in scripts/lib.sh)")
        });
    let out = finish_process(
        child,
        stdin,
        Duration::from_secs(30),
        &format!("kcat {args:?}"),
    )
    .await;
    assert!(
        out.status.success(),
        "kcat {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Registers `module` as a direct consumer (no callback address) of `event_type`.
async fn direct_subscriber(app: &TestApp, tenant: &str, module: &str, event_type: &str) {
    let body = json!({"moduleId": module, "subscriptionDefinitions": [{"eventType": event_type}]});
    let r = app
        .post_json(tenant, "/pubsub/event-types/declare/subscriber", &body)
        .await;
    assert_eq!(r.status(), 201);
}

/// Collects what a direct consumer of `event_type` in `tenant` receives.
fn consume(
    app: &TestApp,
    module: &str,
    tenant: &str,
    event_type: &str,
) -> (
    Arc<Mutex<Vec<ReceivedEvent>>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let consumer = DirectConsumer::new(
        &app.bootstrap(),
        &app.env["ENV"],
        module,
        Some(tenant),
        &[event_type],
    )
    .unwrap();
    let got: Arc<Mutex<Vec<ReceivedEvent>>> = Arc::default();
    let stop = CancellationToken::new();
    let (g, s) = (got.clone(), stop.clone());
    let task = tokio::spawn(async move {
        consumer
            .run(
                move |e| {
                    g.lock().unwrap().push(e);
                    async { Ok::<(), String>(()) }
                },
                s,
            )
            .await
            .unwrap();
    });
    (got, stop, task)
}

/// A service delivering to a fake Okapi, `publisher` registered for `event_type`, an HTTP
/// subscriber at `callback` and a running direct consumer (`mod-direct`) of it.
async fn java_scenario(
    event_type: &str,
    publisher: &str,
    callback: &str,
) -> (
    FakeOkapi,
    TestApp,
    Arc<Mutex<Vec<ReceivedEvent>>>,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "1s").await;
    register_publisher(&app, "diku", event_type, publisher).await;
    let body = json!({"moduleId": "mod-http-sub-1.0.0",
                      "subscriptionDefinitions": [{"eventType": event_type, "callbackAddress": callback}]});
    assert_eq!(
        app.post_json("diku", "/pubsub/event-types/declare/subscriber", &body)
            .await
            .status(),
        201
    );
    direct_subscriber(&app, "diku", "mod-direct-1.0.0", event_type).await;
    let (got, stop, task) = consume(&app, "mod-direct", "diku", event_type);
    (fake, app, got, stop, task)
}

async fn wait_until(got: &Arc<Mutex<Vec<ReceivedEvent>>>, n: usize) -> Vec<ReceivedEvent> {
    eventually_every(
        &format!("the direct consumer receives {n}"),
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let got = got.lock().unwrap();
            std::future::ready((got.len() >= n).then(|| got.clone()))
        },
    )
    .await
}

#[tokio::test]
async fn kcat_reads_folio_kafka_wrappers_event_json_from_an_http_publish_and_so_does_a_direct_consumer(
) {
    let app = TestApp::spawn().await;
    register_publisher(&app, "diku", "INTEROP_OUT", "mod-pub-1.0.0").await;
    direct_subscriber(&app, "diku", "mod-direct-1.0.0", "INTEROP_OUT").await;
    let (got, stop, task) = consume(&app, "mod-direct", "diku", "INTEROP_OUT");

    let id = new_id();
    let payload = r#"{"loanId":"l-1","dueDate":"2026-12-01T00:00:00.000+00:00"}"#;
    let r = app
        .req(reqwest::Method::POST, "/pubsub/publish")
        .header("X-Okapi-Request-Id", "req-77")
        .header("X-Okapi-Url", "http://okapi:9130")
        .header("X-Okapi-Token", "secret-token")
        .header("X-Pubsub-Partition-Key", "l-1")
        .json(&event(&id, "INTEROP_OUT", "diku", "mod-pub-1.0.0", payload))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    let topic = app.topic("diku", "INTEROP_OUT");
    let bootstrap = app.bootstrap();
    let line = kcat(
        &[
            "-b",
            &bootstrap,
            "-C",
            "-t",
            &topic,
            "-o",
            "beginning",
            "-c",
            "1",
            "-e",
            "-J",
            "-q",
        ],
        None,
    )
    .await;
    let record: Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(record["key"], "l-1");
    // kcat prints headers as a flat [name, value, name, value, …] list.
    let flat = record["headers"].as_array().expect("headers");
    let headers: std::collections::HashMap<&str, &str> = flat
        .chunks(2)
        .map(|kv| (kv[0].as_str().unwrap(), kv[1].as_str().unwrap()))
        .collect();
    assert_eq!(headers["folio.tenantId"], "diku");
    assert_eq!(headers["x-okapi-tenant"], "diku");
    assert_eq!(headers["x-okapi-url"], "http://okapi:9130");
    assert_eq!(headers["x-okapi-request-id"], "req-77");
    assert!(
        !headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("x-okapi-token")),
        "never the token: {headers:?}"
    );

    // The value is folio-kafka-wrapper's Event JSON: eventPayload a string, eventMetadata with
    // the required fields, nothing else at the top.
    let value: Value = serde_json::from_str(record["payload"].as_str().unwrap()).unwrap();
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["eventMetadata", "eventPayload", "eventType", "id"]);
    assert_eq!(value["id"], id.as_str());
    assert_eq!(value["eventType"], "INTEROP_OUT");
    assert_eq!(value["eventPayload"], payload);
    let meta = &value["eventMetadata"];
    assert_eq!(meta["tenantId"], "diku");
    assert_eq!(meta["eventTTL"], 1);
    assert_eq!(meta["publishedBy"], "mod-pub-1.0.0");
    assert_eq!(meta["correlationId"], "corr-1");
    assert!(
        mod_pubsub::event::parse_date_time(meta["publishedDate"].as_str().unwrap()).is_some(),
        "{meta}"
    );

    // The same event reaches the direct consumer.
    let received = wait_until(&got, 1).await;
    assert_eq!(received[0].event.id.0.to_string(), id);
    assert_eq!(received[0].event.event_payload.as_deref(), Some(payload));
    assert_eq!(received[0].key.as_deref(), Some("l-1"));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn an_event_kcat_writes_as_a_java_module_would_is_pushed_to_http_subscribers_and_reaches_direct_consumers(
) {
    let callback = "/java/handlers/interop";
    let (fake, app, got, stop, task) =
        java_scenario("INTEROP_IN", "mod-java-1.0.0", callback).await;

    // As folio-kafka-wrapper's KafkaProducerRecordBuilder writes it: Jackson's Event JSON (dates
    // as ISO strings, payload a JSON-encoded string), key, folio.tenantId and the Okapi headers.
    let id = new_id();
    let payload = r#"{"jobExecutionId":"6f1e0a2c-8a57-4ad0-9d2c-2b0d7b3a1c11","recordId":"r-9"}"#;
    let published = mod_pubsub::event::now_string();
    let value = json!({
        "id": id,
        "eventType": "INTEROP_IN",
        "eventMetadata": {
            "tenantId": "diku",
            "eventTTL": 1,
            "publishedBy": "mod-java-1.0.0",
            "publishedDate": published,
            "correlationId": "job-9",
        },
        "eventPayload": payload,
    })
    .to_string();
    let topic = app.topic("diku", "INTEROP_IN");
    let bootstrap = app.bootstrap();
    kcat(
        &[
            "-b",
            &bootstrap,
            "-P",
            "-t",
            &topic,
            "-k",
            "r-9",
            "-H",
            "folio.tenantId=diku",
            "-H",
            "x-okapi-tenant=diku",
            "-H",
            "x-okapi-url=http://okapi:9130",
            "-H",
            "x-okapi-token=the-users-token",
            "-H",
            "x-okapi-request-id=req-java-1",
            "-H",
            "jobExecutionId=6f1e0a2c-8a57-4ad0-9d2c-2b0d7b3a1c11",
        ],
        Some(&value),
    )
    .await;

    // pushed to the HTTP subscriber: the payload as the body, the publisher's request id, the
    // event id; not the token the Java module put on the record.
    let pushed = fake.wait_for(callback, 1, Duration::from_secs(20)).await;
    assert_eq!(pushed[0].body, payload);
    assert_eq!(pushed[0].headers["x-okapi-tenant"], "diku");
    assert_eq!(pushed[0].headers["x-okapi-request-id"], "req-java-1");
    assert_eq!(pushed[0].headers["x-pubsub-event-id"], id);
    assert_ne!(
        pushed[0].headers.get("x-okapi-token").map(String::as_str),
        Some("the-users-token")
    );

    // and received by the direct consumer with its headers.
    let received = wait_until(&got, 1).await;
    assert_eq!(received[0].event.id.0.to_string(), id);
    assert_eq!(received[0].event.event_payload.as_deref(), Some(payload));
    assert_eq!(received[0].tenant, "diku");
    assert_eq!(received[0].key.as_deref(), Some("r-9"));
    assert_eq!(
        received[0].headers["jobExecutionId"],
        "6f1e0a2c-8a57-4ad0-9d2c-2b0d7b3a1c11"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn java_records_with_okapi_commons_header_names_no_folio_tenant_id_and_no_published_date_are_delivered(
) {
    // folio-kafka-wrapper's propagateOkapiHeaders keeps the names as the module's header map
    // spells them, usually okapi-common's `X-Okapi-Tenant`, `X-Okapi-Url`, `X-Okapi-Request-Id`;
    // wrapper versions before KAFKAWRAP-38 wrote no `folio.tenantId` header at all.
    let callback = "/java/handlers/case";
    let (fake, app, got, stop, task) =
        java_scenario("INTEROP_CASE", "mod-java-2.0.0", callback).await;

    let id = new_id();
    // Jackson's default date format, with a `+0000` offset.
    let published = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f+0000")
        .to_string();
    let value = json!({
        "id": id,
        "eventType": "INTEROP_CASE",
        "eventMetadata": {"tenantId": "diku", "eventTTL": 1, "publishedBy": "mod-java-2.0.0",
                          "publishedDate": published},
        "eventPayload": "{\"n\":1}",
    })
    .to_string();
    // And as SRM's EventHandlingUtil builds events: no publishedDate (the record's timestamp
    // stands in for it).
    let id2 = new_id();
    let value2 = json!({
        "id": id2,
        "eventType": "INTEROP_CASE",
        "eventMetadata": {"tenantId": "diku", "eventTTL": 1, "publishedBy": "mod-java-2.0.0"},
        "eventPayload": "{\"n\":2}",
    })
    .to_string();
    let (topic, bootstrap) = (app.topic("diku", "INTEROP_CASE"), app.bootstrap());
    kcat(
        &[
            "-b",
            &bootstrap,
            "-P",
            "-t",
            &topic,
            "-k",
            &id,
            "-H",
            "X-Okapi-Tenant=diku",
            "-H",
            "X-Okapi-Url=http://okapi:9130",
            "-H",
            "X-Okapi-Request-Id=req-java-case",
        ],
        // One record per line.
        Some(&format!("{value}\n{value2}\n")),
    )
    .await;

    let pushed = fake.wait_for(callback, 2, Duration::from_secs(20)).await;
    assert_eq!(pushed[0].body, r#"{"n":1}"#);
    assert_eq!(pushed[0].headers["x-okapi-tenant"], "diku");
    assert_eq!(pushed[0].headers["x-pubsub-event-id"], id);
    assert_eq!(
        pushed[0].headers["x-okapi-request-id"], "req-java-case",
        "the publisher's request id, whatever the case of its header name"
    );
    assert_eq!(pushed[1].body, r#"{"n":2}"#);
    assert_eq!(pushed[1].headers["x-pubsub-event-id"], id2);
    let received = wait_until(&got, 2).await;
    assert_eq!(received[0].tenant, "diku");
    assert_eq!(received[0].event.id.0.to_string(), id);
    assert_eq!(received[1].event.id.0.to_string(), id2);
    stop.cancel();
    task.await.unwrap();
}
