//! Bad input of every kind gets a 4xx in FOLIO's format, never a 5xx.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

const BODY_ENDPOINTS: [(&str, &str); 6] = [
    ("POST", "/pubsub/event-types"),
    ("PUT", "/pubsub/event-types/T"),
    ("POST", "/pubsub/event-types/declare/publisher"),
    ("POST", "/pubsub/event-types/declare/subscriber"),
    ("POST", "/_/tenant"),
    ("PUT", "/pubsub/event-types/OTHER"),
];

const ALL_ENDPOINTS: [(&str, &str); 14] = [
    ("GET", "/pubsub/event-types"),
    ("POST", "/pubsub/event-types"),
    ("GET", "/pubsub/event-types/T"),
    ("PUT", "/pubsub/event-types/T"),
    ("DELETE", "/pubsub/event-types/T"),
    ("POST", "/pubsub/event-types/declare/publisher"),
    ("GET", "/pubsub/event-types/T/publishers"),
    (
        "DELETE",
        "/pubsub/event-types/T/publishers?moduleId=m-1.0.0",
    ),
    ("POST", "/pubsub/event-types/declare/subscriber"),
    ("GET", "/pubsub/event-types/T/subscribers"),
    (
        "DELETE",
        "/pubsub/event-types/T/subscribers?moduleId=m-1.0.0",
    ),
    (
        "DELETE",
        "/pubsub/messaging-modules?moduleId=m-1.0.0&moduleRole=PUBLISHER",
    ),
    ("POST", "/_/tenant"),
    ("GET", "/_/tenant/5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f"),
];

fn method(m: &str) -> Method {
    Method::from_bytes(m.as_bytes()).unwrap()
}

#[tokio::test]
async fn missing_or_hostile_tenant_is_400_everywhere() {
    let app = TestApp::spawn().await;
    let long = "a".repeat(300);
    let hostile: [Option<&str>; 8] = [
        None,
        Some(""),
        Some("a;drop schema pubsub_config cascade"),
        Some("../x"),
        Some(&long),
        Some("DIKU"),
        Some("x\"y"),
        Some("1abc"),
    ];
    for (m, path) in ALL_ENDPOINTS {
        for tenant in hostile {
            let mut req = app
                .client
                .request(method(m), app.url(path))
                .json(&json!({"module_to": "mod-pubsub-1.0.0"}));
            if let Some(t) = tenant {
                req = req.header("X-Okapi-Tenant", t);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 400, "{m} {path} tenant={tenant:?}");
            assert!(r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain"));
            let body = text(r).await;
            if tenant.is_none() {
                assert!(body.ends_with("Tenant must be set"), "{body}");
            }
        }
    }
    // Nothing reached SQL: the module schema is intact and no tenant schema was created.
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE nspname LIKE '%mod_pubsub%' OR nspname = 'pubsub_config'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(schemas, vec!["pubsub_config".to_owned()]);
}

#[tokio::test]
async fn malformed_bodies_are_4xx_naming_the_field() {
    let app = TestApp::spawn().await;
    // (body, expected status, expected key of the first error for 422)
    let cases: Vec<(&str, u16, Option<&str>)> = vec![
        ("{not json", 400, None),
        ("", 400, None),
        ("[1,2]", 400, None),
        ("\"text\"", 400, None),
        (
            r#"{"eventType":"A","eventTTL":1,"description":"nul\u0000byte"}"#,
            422,
            Some("description"),
        ),
        (
            r#"{"eventType":"A","eventTTL":1,"bogus":1}"#,
            422,
            Some("bogus"),
        ),
        (r#"{"eventType":"A"}"#, 422, Some("eventTTL")),
        (r#"{"eventTTL":1}"#, 422, Some("eventType")),
        (r#"{"eventType":7,"eventTTL":1}"#, 422, Some("eventType")),
        (
            r#"{"eventType":"A","eventTTL":"soon"}"#,
            422,
            Some("eventTTL"),
        ),
        (r#"{"eventType":"A","eventTTL":-5}"#, 422, Some("eventTTL")),
        (r#"{"eventType":"A","eventTTL":1.5}"#, 422, Some("eventTTL")),
        (
            r#"{"eventType":"A","eventTTL":99999999999}"#,
            422,
            Some("eventTTL"),
        ),
        (
            r#"{"eventType":"A","eventTTL":1,"signed":"yes"}"#,
            422,
            Some("signed"),
        ),
        (
            r#"{"eventType":"has space","eventTTL":1}"#,
            422,
            Some("eventType"),
        ),
        (
            r#"{"eventType":"a.b","eventTTL":1}"#,
            422,
            Some("eventType"),
        ),
        (r#"{"eventType":"","eventTTL":1}"#, 422, Some("eventType")),
        (r#"{"eventType":null,"eventTTL":1}"#, 422, Some("eventType")),
    ];
    for (body, status, key) in cases {
        let r = app
            .req(Method::POST, "/pubsub/event-types")
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        if let Some(key) = key {
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["total_records"], 1, "{body}: {e}");
            assert_eq!(e["errors"][0]["parameters"][0]["key"], key, "{body}: {e}");
            assert_eq!(e["errors"][0]["type"], "1");
        }
    }

    let publisher_cases: Vec<(Value, &str)> = vec![
        (json!({"moduleId": "m-1.0.0"}), "eventDescriptors"),
        (json!({"eventDescriptors": []}), "moduleId"),
        (
            json!({"moduleId": "bad module", "eventDescriptors": []}),
            "moduleId",
        ),
        (
            json!({"moduleId": "m;drop", "eventDescriptors": []}),
            "moduleId",
        ),
        (
            json!({"moduleId": "m-1.0.0", "eventDescriptors": {}}),
            "eventDescriptors",
        ),
        (
            json!({"moduleId": "m-1.0.0", "eventDescriptors": [{"eventType": "A"}]}),
            "eventDescriptors[0].eventTTL",
        ),
        (
            json!({"moduleId": "m-1.0.0", "eventDescriptors": [], "extra": true}),
            "extra",
        ),
    ];
    for (body, key) in publisher_cases {
        let r = app
            .post_json(TENANT, "/pubsub/event-types/declare/publisher", &body)
            .await;
        assert_eq!(r.status(), 422, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["errors"][0]["parameters"][0]["key"], key, "{body}: {e}");
    }
    let r = app.post_json(TENANT, "/pubsub/event-types/declare/subscriber", &json!({"moduleId": "m-1.0.0", "subscriptionDefinitions": [{"eventType": "A", "callbackAddress": "/x", "extra": 1}]})).await;
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["errors"][0]["parameters"][0]["key"],
        "subscriptionDefinitions[0].extra"
    );
}

#[tokio::test]
async fn wrong_content_type_and_oversized_bodies() {
    let app = TestApp::spawn().await;
    for (m, path) in BODY_ENDPOINTS {
        let r = app
            .req(method(m), path)
            .header("Content-Type", "text/plain")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{m} {path}");
        // The test service accepts at most 64 KiB.
        let big = json!({"eventType": "A", "eventTTL": 1, "description": "x".repeat(100_000)});
        let r = app.req(method(m), path).json(&big).send().await.unwrap();
        assert_eq!(r.status(), 413, "{m} {path}");
    }
}

#[tokio::test]
async fn sql_metacharacters_in_paths_and_queries_are_harmless() {
    let app = TestApp::spawn().await;
    app.post_json(TENANT, "/pubsub/event-types", &descriptor("SAFE", "x", 1))
        .await;
    app.post_json(
        TENANT,
        "/pubsub/event-types/declare/publisher",
        &publisher("mod-safe-1.0.0", [descriptor("SAFE", "x", 1)]),
    )
    .await;
    let nasty = [
        "x'%20OR%20'1'='1",
        "%25",
        "_",
        "SAFE'--",
        "..%2F..%2Fetc",
        "%00",
    ];
    for n in nasty {
        for (m, path) in [
            ("GET", format!("/pubsub/event-types/{n}")),
            ("GET", format!("/pubsub/event-types/{n}/publishers")),
            ("DELETE", format!("/pubsub/event-types/{n}")),
            (
                "DELETE",
                format!("/pubsub/event-types/SAFE/publishers?moduleId={n}"),
            ),
            (
                "DELETE",
                format!("/pubsub/messaging-modules?moduleId={n}&moduleRole=PUBLISHER"),
            ),
            ("GET", format!("/_/tenant/{n}")),
        ] {
            let r = app.req(method(m), &path).send().await.unwrap();
            assert!(
                r.status().is_client_error() || r.status().is_success(),
                "{m} {path}: {}",
                r.status()
            );
        }
    }
    // LIKE wildcards in a module id delete nothing else.
    for m in ["mod-%25", "mod-_afe-1.0.0", "%25"] {
        let r = app
            .delete(
                TENANT,
                &format!("/pubsub/event-types/SAFE/publishers?moduleId={m}"),
            )
            .await;
        assert!(r.status() == 204 || r.status() == 400, "{m}");
    }
    assert_eq!(
        total(&app, TENANT, "/pubsub/event-types/SAFE/publishers").await,
        1
    );
    assert_eq!(total(&app, TENANT, "/pubsub/event-types").await, 1);
}

#[tokio::test]
async fn unknown_routes_are_404() {
    let app = TestApp::spawn().await;
    let r = app
        .req(Method::GET, "/pubsub/nothing-here")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app
        .req(Method::PATCH, "/pubsub/event-types")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

/// Truncated JSON with a byte that is not UTF-8 (as a client that cut a body short sends it):
/// 400 in FOLIO's format on every endpoint that reads a body, the tenant interface included, and
/// nothing changes.
#[tokio::test]
async fn truncated_and_non_utf8_bodies_are_400_everywhere() {
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;
    let bodies: [&[u8]; 4] = [
        b"{\"eventType\": \"X\xc3(\",",
        b"{\"moduleTo\": \"mod-pubsub-9.9.9\", \"purge\": true",
        b"\xff\xfe{}",
        b"{\"purge\": \"tr\xc3\"}",
    ];
    let endpoints = BODY_ENDPOINTS.iter().copied().chain([
        ("POST", "/pubsub/publish"),
        ("POST", "/pubsub/dead-letters/redeliver"),
        ("POST", "/pubsub/subscribers/mod-x-1.0.0/replay"),
    ]);
    for (m, path) in endpoints {
        for (body, json_type) in bodies.iter().flat_map(|b| [(b, true), (b, false)]) {
            let mut req = app.req_as("diku", method(m), path).body(body.to_vec());
            if json_type {
                req = req.header("content-type", "application/json");
            }
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = text(r).await;
            assert_eq!(
                status, 400,
                "{m} {path} {body:?} (JSON type: {json_type}): {text}"
            );
        }
    }
    // Nothing was disabled or purged: the tenant's schema and its registrations work.
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types",
            &json!({"eventType": "STILL_HERE", "eventTTL": 1}),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", text(r).await);
}

/// Text PostgreSQL cannot store in the tenant job's row (a NUL character) is a 422 naming the
/// field, not a database error.
#[tokio::test]
async fn a_nul_character_in_tenant_attributes_is_422_naming_the_field() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            "diku",
            "/_/tenant",
            &json!({"module_to": "mod-pubsub-3.0.0", "parameters": [{"key": "loadSample", "value": "a\u{0}b"}]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e["errors"][0]["parameters"][0]["key"],
        "parameters[0].value"
    );
}
