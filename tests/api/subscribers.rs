//! The Java module's SubscribersApiTest scenarios.

use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn subscribe_list_replace_and_delete() {
    let app = TestApp::spawn().await;
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/S1/subscribers").await,
        0
    );

    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &subscriber("test-module-14.0.0", &[("S1", "/call-me")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &subscriber("another-test-module-1.10.0", &[("S2", "/other")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let body = app
        .get_json(TENANT, "/pubsub/event-types/S1/subscribers")
        .await;
    assert_eq!(body["totalRecords"], 1);
    assert_eq!(body["messagingModules"][0]["eventType"], "S1");
    assert_eq!(body["messagingModules"][0]["moduleRole"], "SUBSCRIBER");
    assert_eq!(
        body["messagingModules"][0]["subscriberCallback"],
        "/call-me"
    );

    // The same module (another version) re-subscribes to another type: replacement.
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &subscriber("test-module-14.23.1", &[("S2", "/call-me")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/S1/subscribers").await,
        0
    );
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/S2/subscribers").await,
        2
    );

    let r = app
        .delete(
            TENANT,
            "/pubsub/event-types/S2/subscribers?moduleId=test-module-14.23.1",
        )
        .await;
    assert_eq!(r.status(), 204);
    let body = app
        .get_json(TENANT, "/pubsub/event-types/S2/subscribers")
        .await;
    assert_eq!(body["totalRecords"], 1);
    assert_eq!(
        body["messagingModules"][0]["moduleId"],
        "another-test-module-1.10.0"
    );
}

#[tokio::test]
async fn subscribing_to_unknown_types_creates_temporary_descriptors() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &subscriber("m-1.0.0", &[("NEW_1", "/a"), ("NEW_2", "/b")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let d = app.get_json(TENANT, "/pubsub/event-types/NEW_1").await;
    assert_eq!(
        d,
        json!({"eventType": "NEW_1", "eventTTL": 1, "signed": false, "tmp": true})
    );

    // The publisher's real descriptor overwrites the temporary one, then it can declare.
    let real = descriptor("NEW_1", "real", 3);
    assert_eq!(
        app.post_json(TENANT, "/pubsub/event-types", &real)
            .await
            .status(),
        201
    );
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("pub-1.0.0", [real]),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/NEW_1").await["tmp"],
        false
    );
    // An existing real descriptor is not replaced by a later subscription.
    app.post_json(
        TENANT,
        "/pubsub/event-types/declare/subscriber",
        &subscriber("late-1.0.0", &[("NEW_1", "/c")]),
    )
    .await;
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/NEW_1").await["description"],
        "real"
    );
}

#[tokio::test]
async fn snapshot_module_ids_and_empty_declaration() {
    let app = TestApp::spawn().await;
    app.post_json(
        TENANT,
        "/pubsub/event-types/declare/subscriber",
        &subscriber("test-module-1.0.0-SNAPSHOT", &[("SNAP", "/x")]),
    )
    .await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &json!({"moduleId": "test-module-1.0.0-SNAPSHOT", "subscriptionDefinitions": []}),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/SNAP/subscribers").await,
        1
    );
    let r = app
        .delete(
            TENANT,
            "/pubsub/event-types/SNAP/subscribers?moduleId=test-module-1.0.0-SNAPSHOT",
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/SNAP/subscribers").await,
        0
    );
}

#[tokio::test]
async fn invalid_definitions_are_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases: [(Value, &str); 4] = [
        (
            subscriber("m-1.0.0", &[("OK", "/a"), ("OK", "/b")]),
            "subscriptionDefinitions[1].eventType",
        ),
        (
            subscriber("m-1.0.0", &[("OK", "no-slash")]),
            "subscriptionDefinitions[0].callbackAddress",
        ),
        (
            subscriber("m-1.0.0", &[("BAD.TYPE", "/a")]),
            "subscriptionDefinitions[0].eventType",
        ),
        (
            json!({"moduleId": "m-1.0.0", "subscriptionDefinitions": [{"eventType": "X", "callbackAddress": 7}]}),
            "subscriptionDefinitions[0].callbackAddress",
        ),
    ];
    for (body, key) in cases {
        let r = app
            .post_json(TENANT, "/pubsub/event-types/declare/subscriber", &body)
            .await;
        assert_eq!(r.status(), 422, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["errors"][0]["parameters"][0]["key"], key, "{e}");
    }
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types").await,
        0,
        "nothing stored"
    );
}

#[tokio::test]
async fn a_subscription_without_callback_is_a_direct_consumer() {
    let app = TestApp::spawn().await;
    let body = json!({"moduleId": "mod-direct-1.0.0", "subscriptionDefinitions": [{"eventType": "DIRECT"}, {"eventType": "DIRECT_2", "callbackAddress": null}]});
    let r = app
        .post_json(TENANT, "/pubsub/event-types/declare/subscriber", &body)
        .await;
    assert_eq!(r.status(), 201);
    let listed = app
        .get_json(TENANT, "/pubsub/event-types/DIRECT/subscribers")
        .await;
    assert_eq!(listed["totalRecords"], 1);
    let m = &listed["messagingModules"][0];
    assert_eq!(m["moduleId"], "mod-direct-1.0.0");
    assert!(m.get("subscriberCallback").is_none(), "{m}");
    let stored: Option<String> = sqlx::query_scalar("SELECT subscriber_callback FROM pubsub_config.messaging_module WHERE event_type_id = 'DIRECT'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(stored, None);
}
