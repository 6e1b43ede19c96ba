//! The Java module's EventTypeAPITest scenarios, and what this service fixes.

use reqwest::Method;
use serde_json::json;

use crate::helpers::*;

#[tokio::test]
async fn collection_empty_then_one() {
    let app = TestApp::spawn().await;
    let body = app.get_json(TENANT, "/pubsub/event-types").await;
    assert_eq!(body, json!({"eventDescriptors": [], "totalRecords": 0}));

    let r = app
        .post_json(TENANT, "/pubsub/event-types", &descriptor("T1", "one", 1))
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(total(&app, TENANT, "/pubsub/event-types").await, 1);
}

#[tokio::test]
async fn post_then_get_echoes_fields_and_defaults() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &json!({"eventType": "RECORD_CREATED", "description": "d", "eventTTL": 5}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers().get("location"), None);
    let created: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        created,
        json!({"eventType": "RECORD_CREATED", "description": "d", "eventTTL": 5, "signed": false, "tmp": false})
    );

    let got = app
        .get_json(TENANT, "/pubsub/event-types/RECORD_CREATED")
        .await;
    assert_eq!(got, created);
}

#[tokio::test]
async fn unknown_type_is_404_text() {
    let app = TestApp::spawn().await;
    let r = app
        .req(Method::GET, "/pubsub/event-types/NOPE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        text(r).await,
        "Event Descriptor with event type 'NOPE' was not found"
    );
}

#[tokio::test]
async fn empty_object_is_422() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(TENANT, "/pubsub/event-types", &json!({}))
        .await;
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["total_records"], 1);
    assert_eq!(body["errors"][0]["parameters"][0]["key"], "eventType");
    assert_eq!(body["errors"][0]["message"], "must not be null");
}

#[tokio::test]
async fn identical_registration_is_idempotent_and_different_one_is_400() {
    let app = TestApp::spawn().await;
    let d = descriptor("ITEM_CHECKED_OUT", "Item was checked out", 1);
    for _ in 0..2 {
        assert_eq!(
            app.post_json(TENANT, "/pubsub/event-types", &d)
                .await
                .status(),
            201
        );
    }
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &descriptor("ITEM_CHECKED_OUT", "other", 1),
        )
        .await;
    assert_eq!(r.status(), 400);
    let msg = text(r).await;
    assert!(msg.starts_with("Event descriptor for event type 'ITEM_CHECKED_OUT' already exists, but the content is different."), "{msg}");
    assert!(msg.contains("Item was checked out"), "{msg}");
    // null description differs from ""
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &json!({"eventType": "N", "eventTTL": 1}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &json!({"eventType": "N", "eventTTL": 1, "description": ""}),
        )
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn event_ttl_as_numeric_string_is_accepted() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &json!({"eventType": "S", "eventTTL": "1"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/S").await["eventTTL"],
        1
    );
}

#[tokio::test]
async fn put_updates_and_checks_path() {
    let app = TestApp::spawn().await;
    app.post_json(TENANT, "/pubsub/event-types", &descriptor("T", "old", 1))
        .await;
    let r = app
        .req(Method::PUT, "/pubsub/event-types/T")
        .json(&descriptor("T", "new", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["description"], "new");
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/T").await["eventTTL"],
        2
    );

    let r = app
        .req(Method::PUT, "/pubsub/event-types/T")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = app
        .req(Method::PUT, "/pubsub/event-types/MISSING")
        .json(&descriptor("MISSING", "x", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        text(r).await,
        "EventDescriptor with event type 'MISSING' was not updated"
    );
    // The Java module ignored the path; here a mismatch names the field.
    let r = app
        .req(Method::PUT, "/pubsub/event-types/OTHER")
        .json(&descriptor("T", "x", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["parameters"][0]["key"], "eventType");
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/T").await["description"],
        "new"
    );
}

#[tokio::test]
async fn delete_rules() {
    let app = TestApp::spawn().await;
    app.post_json(TENANT, "/pubsub/event-types", &descriptor("GONE", "x", 1))
        .await;
    assert_eq!(
        app.delete(TENANT, "/pubsub/event-types/GONE")
            .await
            .status(),
        204
    );
    let r = app
        .req(Method::GET, "/pubsub/event-types/GONE")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let r = app.delete(TENANT, "/pubsub/event-types/NEVER").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        text(r).await,
        "EventDescriptor with event type name 'NEVER' was not found"
    );

    let d = descriptor("USED", "x", 1);
    app.post_json(TENANT, "/pubsub/event-types", &d).await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("mod-very-important-1.0.0", [d]),
        )
        .await;
    assert_eq!(r.status(), 201);
    // Registrations in any tenant block the deletion of the global descriptor.
    let r = app.delete("other", "/pubsub/event-types/USED").await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        text(r).await,
        "Event type USED cannot be deleted. Modules [mod-very-important-1.0.0] are registered as publishers or subscribers for this event type."
    );
}

#[tokio::test]
async fn temporary_descriptor_is_overwritten_by_the_real_one() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types",
            &json!({"eventType": "TMP", "eventTTL": 1, "tmp": true}),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post_json(TENANT, "/pubsub/event-types", &descriptor("TMP", "real", 7))
        .await;
    assert_eq!(r.status(), 201);
    let got = app.get_json(TENANT, "/pubsub/event-types/TMP").await;
    assert_eq!(
        got,
        json!({"eventType": "TMP", "description": "real", "eventTTL": 7, "signed": false, "tmp": false})
    );
}

#[tokio::test]
async fn concurrent_identical_registrations_all_succeed() {
    let app = TestApp::spawn().await;
    let d = descriptor("RACE", "same", 1);
    let futures: Vec<_> = (0..16)
        .map(|_| app.post_json(TENANT, "/pubsub/event-types", &d))
        .collect();
    for r in futures::future::join_all(futures).await {
        assert_eq!(r.status(), 201);
    }
    assert_eq!(total(&app, TENANT, "/pubsub/event-types").await, 1);
}
