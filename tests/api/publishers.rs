//! The Java module's PublishersApiTest and MessagingModulesApiTest scenarios.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

async fn register_types(app: &TestApp, ds: &[&Value]) {
    for d in ds {
        assert_eq!(
            app.post_json(TENANT, "/pubsub/event-types", d)
                .await
                .status(),
            201
        );
    }
}

#[tokio::test]
async fn listing_and_replacement() {
    let app = TestApp::spawn().await;
    let t1 = descriptor("TYPE_1", "one", 1);
    let t2 = descriptor("TYPE_2", "two", 1);
    register_types(&app, &[&t1, &t2]).await;
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/TYPE_1/publishers").await,
        0
    );

    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("module-a-1.0.0", [t1.clone()]),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        app.post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("module-b-1.0.0", [t2.clone()])
        )
        .await
        .status(),
        201
    );
    let body = app
        .get_json(TENANT, "/pubsub/event-types/TYPE_1/publishers")
        .await;
    assert_eq!(body["totalRecords"], 1);
    let m = &body["messagingModules"][0];
    assert_eq!(m["eventType"], "TYPE_1");
    assert_eq!(m["moduleId"], "module-a-1.0.0");
    assert_eq!(m["tenantId"], TENANT);
    assert_eq!(m["moduleRole"], "PUBLISHER");
    assert_eq!(m["activated"], true);
    assert_eq!(m["subscriberCallback"], "");

    // A new declaration by the same module (another version) replaces all its types.
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("module-a-2.0.0", [t2.clone()]),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/TYPE_1/publishers").await,
        0
    );
    let body = app
        .get_json(TENANT, "/pubsub/event-types/TYPE_2/publishers")
        .await;
    let ids: Vec<&str> = body["messagingModules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["module-a-2.0.0", "module-b-1.0.0"]);
}

#[tokio::test]
async fn declaration_with_two_types() {
    let app = TestApp::spawn().await;
    let t1 = descriptor("A1", "one", 1);
    let t2 = descriptor("A2", "two", 1);
    register_types(&app, &[&t1, &t2]).await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [t1, t2]),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/A1/publishers").await,
        1
    );
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/A2/publishers").await,
        1
    );
}

#[tokio::test]
async fn similar_module_names_are_not_replaced() {
    let app = TestApp::spawn().await;
    let t = descriptor("LOAN", "x", 1);
    register_types(&app, &[&t]).await;
    for m in [
        "mod-circulation-storage-1.2.3",
        "mod-circulation-1.2.3",
        "xmod-circulation-1.2.3",
    ] {
        let r = app
            .post_json(
                TENANT,
                "/pubsub/event-types/declare/publisher",
                &publisher(m, [t.clone()]),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/LOAN/publishers").await,
        3
    );
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("mod-circulation-2.0.0-SNAPSHOT", [t.clone()]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let body = app
        .get_json(TENANT, "/pubsub/event-types/LOAN/publishers")
        .await;
    let mut ids: Vec<&str> = body["messagingModules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "mod-circulation-2.0.0-SNAPSHOT",
            "mod-circulation-storage-1.2.3",
            "xmod-circulation-1.2.3"
        ]
    );
}

#[tokio::test]
async fn unknown_and_different_descriptors_get_the_json_400() {
    let app = TestApp::spawn().await;
    let known = descriptor("KNOWN", "k", 1);
    register_types(&app, &[&known]).await;

    let cases = [
        (vec![descriptor("UNKNOWN", "u", 1)], 1),
        (vec![known.clone(), descriptor("UNKNOWN", "u", 1)], 1),
        (vec![descriptor("KNOWN", "k", 10)], 1),
        (
            vec![descriptor("KNOWN", "k", 10), descriptor("UNKNOWN", "u", 1)],
            2,
        ),
    ];
    for (descriptors, expected) in cases {
        let r = app
            .post_json(
                TENANT,
                "/pubsub/event-types/declare/publisher",
                &publisher("m-1.0.0", descriptors.clone()),
            )
            .await;
        assert_eq!(r.status(), 400);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["total_records"], expected, "{body}");
        assert!(body["errors"][0]["message"].is_string());
    }
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [descriptor("UNKNOWN", "u", 1)]),
        )
        .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["message"],
        "Event type 'UNKNOWN' does not exist"
    );
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [descriptor("KNOWN", "k", 10)]),
        )
        .await;
    let body: Value = r.json().await.unwrap();
    let msg = body["errors"][0]["message"].as_str().unwrap();
    assert!(msg.starts_with("Publisher descriptor does not match existing descriptor for event type 'KNOWN'. To declare a publisher one should use the following descriptor: "), "{msg}");
    // nothing was stored by the failed declarations
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/KNOWN/publishers").await,
        0
    );
}

#[tokio::test]
async fn delete_by_module_and_empty_declarations() {
    let app = TestApp::spawn().await;
    let t = descriptor("DEL", "x", 1);
    register_types(&app, &[&t]).await;
    app.post_json(
        TENANT,
        "/pubsub/event-types/declare/publisher",
        &publisher("test-module-1.0.0", [t.clone()]),
    )
    .await;
    app.post_json(
        TENANT,
        "/pubsub/event-types/declare/publisher",
        &publisher("keep-module-1.0.0", [t.clone()]),
    )
    .await;

    // An empty declaration changes nothing.
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("test-module-1.0.0", []),
        )
        .await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/DEL/publishers").await,
        2
    );

    // A missing moduleId is 400 (the Java module deleted every publisher of the type).
    let r = app
        .delete(TENANT, "/pubsub/event-types/DEL/publishers")
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/DEL/publishers").await,
        2
    );

    let r = app
        .delete(
            TENANT,
            "/pubsub/event-types/DEL/publishers?moduleId=test-module-1.0.0",
        )
        .await;
    assert_eq!(r.status(), 204);
    let body = app
        .get_json(TENANT, "/pubsub/event-types/DEL/publishers")
        .await;
    assert_eq!(body["totalRecords"], 1);
    assert_eq!(body["messagingModules"][0]["moduleId"], "keep-module-1.0.0");
    // Nothing matched: still 204.
    assert_eq!(
        app.delete(
            TENANT,
            "/pubsub/event-types/DEL/publishers?moduleId=nobody-1.0.0"
        )
        .await
        .status(),
        204
    );
}

#[tokio::test]
async fn duplicate_event_type_in_one_declaration_is_422() {
    let app = TestApp::spawn().await;
    let t = descriptor("DUP", "x", 1);
    register_types(&app, &[&t]).await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("m-1.0.0", [t.clone(), t.clone()]),
        )
        .await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["errors"][0]["parameters"][0]["key"],
        "eventDescriptors[1].eventType"
    );
}

#[tokio::test]
async fn concurrent_declarations_of_one_module_serialise() {
    let app = TestApp::spawn().await;
    let types: Vec<Value> = (0..8)
        .map(|i| descriptor(&format!("C{i}"), "x", 1))
        .collect();
    for t in &types {
        app.post_json(TENANT, "/pubsub/event-types", t).await;
    }
    let bodies: Vec<Value> = (0..8)
        .map(|i| publisher(&format!("racer-1.0.{i}"), [types[i].clone()]))
        .collect();
    let futures: Vec<_> = bodies
        .iter()
        .map(|b| app.post_json(TENANT, "/pubsub/event-types/declare/publisher", b))
        .collect();
    for r in futures::future::join_all(futures).await {
        assert_eq!(r.status(), 201);
    }
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pubsub_config.messaging_module WHERE module_id LIKE 'racer-%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        rows, 1,
        "the last declaration wins, earlier ones are replaced"
    );
}

#[tokio::test]
async fn unregister_module_is_scoped_to_the_tenant() {
    let app = TestApp::spawn().await;
    let t = descriptor("SCOPED", "x", 1);
    register_types(&app, &[&t]).await;
    for tenant in ["tenant_a", "tenant_b"] {
        let r = app
            .post_json(
                tenant,
                "/pubsub/event-types/declare/publisher",
                &publisher("test-module-1.0.0", [t.clone()]),
            )
            .await;
        assert_eq!(r.status(), 201);
        let r = app
            .post_json(
                tenant,
                "/pubsub/event-types/declare/subscriber",
                &subscriber("test-module-1.0.0", &[("SCOPED", "/cb")]),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let r = app
        .delete(
            "tenant_a",
            "/pubsub/messaging-modules?moduleId=test-module-1.0.0&moduleRole=PUBLISHER",
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        total(&app, "tenant_a", "/pubsub/event-types/SCOPED/publishers").await,
        0
    );
    assert_eq!(
        total(&app, "tenant_a", "/pubsub/event-types/SCOPED/subscribers").await,
        1
    );
    assert_eq!(
        total(&app, "tenant_b", "/pubsub/event-types/SCOPED/publishers").await,
        1
    );

    let r = app
        .delete(
            "tenant_a",
            "/pubsub/messaging-modules?moduleId=test-module-1.0.0&moduleRole=SUBSCRIBER",
        )
        .await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        total(&app, "tenant_a", "/pubsub/event-types/SCOPED/subscribers").await,
        0
    );
    assert_eq!(
        total(&app, "tenant_b", "/pubsub/event-types/SCOPED/subscribers").await,
        1
    );
}

#[tokio::test]
async fn unregister_module_parameter_errors() {
    let app = TestApp::spawn().await;
    for (query, message) in [
        ("moduleRole=PUBLISHER", "ModuleId and moduleRole are required query parameters"),
        ("moduleId=m-1.0.0", "ModuleId and moduleRole are required query parameters"),
        (
            "moduleId=m-1.0.0&moduleRole=invalid%20role",
            "Invalid moduleRole was specified: invalid role. Acceptable moduleRole values are: PUBLISHER, SUBSCRIBER.",
        ),
    ] {
        let r = app.req(Method::DELETE, &format!("/pubsub/messaging-modules?{query}")).send().await.unwrap();
        assert_eq!(r.status(), 400, "{query}");
        assert_eq!(text(r).await, message);
    }
}
