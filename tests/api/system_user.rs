//! The system user: provisioned at tenant init through Okapi, logged in for deliveries.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::FakeOkapi;
use crate::helpers::*;
use crate::helpers::{event, new_id, register_publisher};

async fn app_with_system_user(fake: &FakeOkapi, deliver: bool) -> TestApp {
    let db = TestDb::create().await;
    let base = fake.base.clone();
    TestApp::spawn_on(db, move |e| {
        e.insert("SYSTEM_USER_CREATE".into(), "true".into());
        e.insert("OKAPI_URL".into(), base);
        e.insert("DELIVERY_ENABLED".into(), deliver.to_string());
        e.insert("DELIVERY_RETRY_SCHEDULE".into(), "100ms,100ms,100ms".into());
    })
    .await
}

/// Runs a `_tenant` install the way Okapi calls it (with X-Okapi-Url and a token).
async fn install(app: &TestApp, fake: &FakeOkapi) -> Value {
    let r = app
        .req_as("diku", Method::POST, "/_/tenant")
        .header("X-Okapi-Url", &fake.base)
        .header("X-Okapi-Token", "okapi-install-token")
        .json(&json!({"module_to": "mod-pubsub-1.0.0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    app.req_as("diku", Method::GET, &format!("{location}?wait=30000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_new_system_user_is_created_with_credentials_and_permissions() {
    let fake = FakeOkapi::start().await;
    let app = app_with_system_user(&fake, false).await;
    let job = install(&app, &fake).await;
    assert_eq!(job["complete"], true);
    assert!(job.get("error").is_none(), "{job}");
    let calls: Vec<String> = fake
        .calls()
        .iter()
        .map(|c| c.split('?').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        calls[..3],
        ["GET /users", "POST /users", "POST /authn/credentials"]
    );
    assert!(calls[3].starts_with("GET /perms/users/"), "{calls:?}");
    assert_eq!(calls[4], "POST /perms/users");
    let received = fake.received.lock().unwrap().clone();
    let get_users = &received[0];
    assert_eq!(get_users.headers["x-okapi-token"], "okapi-install-token");
    assert_eq!(get_users.headers["x-okapi-tenant"], "diku");
    let user: Value = serde_json::from_str(&received[1].body).unwrap();
    assert_eq!(user["username"], "test-pubsub-username");
    assert_eq!(user["type"], "system");
    assert_eq!(user["active"], true);
    assert_eq!(user["personal"]["lastName"], "System");
    let credentials: Value = serde_json::from_str(&received[2].body).unwrap();
    assert_eq!(credentials["password"], "test-pubsub-password");
    assert_eq!(credentials["userId"], user["id"]);
    assert!(received[3].path.starts_with("/perms/users/"));
    assert_eq!(received[4].method, "POST");
    assert_eq!(received[4].path, "/perms/users");
    let perms: Value = serde_json::from_str(&received[4].body).unwrap();
    assert_eq!(perms["userId"], user["id"]);
    let granted: Vec<&str> = perms["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(granted, mod_pubsub::system_user::PERMISSIONS);
    assert_eq!(received.len(), 5);
}

#[tokio::test]
async fn an_existing_user_is_repaired_and_permissions_compare_as_a_set() {
    let fake = FakeOkapi::start().await;
    let id = "5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f";
    *fake.users.lock().unwrap() =
        Some(json!({"users": [{"id": id, "username": "test-pubsub-username", "active": false}]}));
    let mut reversed: Vec<&str> = mod_pubsub::system_user::PERMISSIONS.to_vec();
    reversed.reverse();
    *fake.perms.lock().unwrap() = Some(json!({"id": "p1", "userId": id, "permissions": reversed}));
    let app = app_with_system_user(&fake, false).await;
    let job = install(&app, &fake).await;
    assert!(job.get("error").is_none(), "{job}");
    let calls: Vec<String> = fake
        .calls()
        .iter()
        .map(|c| c.split('?').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        calls,
        [
            "GET /users",
            &format!("PUT /users/{id}"),
            &format!("GET /perms/users/{id}")
        ]
    );
    let put: Value =
        serde_json::from_str(&fake.received_on(&format!("/users/{id}"))[0].body).unwrap();
    assert_eq!(put["active"], true, "re-activated");
    assert_eq!(put["type"], "system");
    assert_eq!(put["personal"]["lastName"], "System");
}

#[tokio::test]
async fn provisioning_errors_end_up_in_the_job() {
    let fake = FakeOkapi::start().await;
    fake.answer("/users", &[200, 404]);
    // GET /users answers 200 (no user), POST /users 404.
    let app = app_with_system_user(&fake, false).await;
    let job = install(&app, &fake).await;
    assert_eq!(job["complete"], true);
    assert_eq!(
        job["error"],
        "Failed to create test-pubsub-username user. Received status code 404"
    );
    // The schema is there all the same.
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'diku_mod_pubsub')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(exists);
}

#[tokio::test]
async fn deliveries_carry_the_system_users_token_and_log_in_again_after_a_401() {
    let fake = FakeOkapi::start().await;
    fake.answer("/cb", &[204, 401, 204]);
    let app = app_with_system_user(&fake, true).await;
    install(&app, &fake).await;
    register_publisher(&app, "diku", "AUTHED", "mod-pub-1.0.0").await;
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("mod-sub-1.0.0", &[("AUTHED", "/cb")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    for _ in 0..2 {
        let r = app
            .post_json(
                "diku",
                "/pubsub/publish",
                &event(&new_id(), "AUTHED", "diku", "mod-pub-1.0.0", "{}"),
            )
            .await;
        assert_eq!(r.status(), 204);
    }
    let got = fake.wait_for("/cb", 3, Duration::from_secs(20)).await;
    let tokens: Vec<&str> = got
        .iter()
        .map(|r| r.headers["x-okapi-token"].as_str())
        .collect();
    // First delivery logs in (token-1); the second is refused with 401, which costs one login.
    assert_eq!(tokens, ["token-1", "token-1", "token-2"]);
    assert_eq!(fake.received_on("/authn/login-with-expiry").len(), 2);
    let login: Value =
        serde_json::from_str(&fake.received_on("/authn/login-with-expiry")[0].body).unwrap();
    assert_eq!(
        login,
        json!({"username": "test-pubsub-username", "password": "test-pubsub-password"})
    );
}

#[tokio::test]
async fn a_failing_login_is_retried_and_reported_by_health() {
    let fake = FakeOkapi::start().await;
    fake.answer("/authn/login-with-expiry", &[500, 500, 201]);
    let app = app_with_system_user(&fake, true).await;
    install(&app, &fake).await;
    register_publisher(&app, "diku", "LOGIN", "mod-pub-1.0.0").await;
    let r = app
        .post_json(
            "diku",
            "/pubsub/event-types/declare/subscriber",
            &subscriber("mod-sub-1.0.0", &[("LOGIN", "/cb")]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let id = new_id();
    assert_eq!(
        app.post_json(
            "diku",
            "/pubsub/publish",
            &event(&id, "LOGIN", "diku", "mod-pub-1.0.0", "{}")
        )
        .await
        .status(),
        204
    );
    let got = fake.wait_for("/cb", 1, Duration::from_secs(20)).await;
    assert_eq!(
        got[0].headers["x-okapi-token"], "token-3",
        "delivered after the third login"
    );
    let rows = app.audit_of("diku", &id, 6).await;
    let rejected: Vec<&Value> = rows.iter().filter(|r| r["state"] == "REJECTED").collect();
    assert_eq!(rejected.len(), 2);
    assert!(
        rejected[0]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("was not logged in"),
        "{}",
        rejected[0]
    );

    // A 401 drops the token; while logins fail, health says so (and stays 200: the database is fine).
    fake.answer("/cb", &[204, 401]);
    fake.answer("/authn/login-with-expiry", &[500]);
    let other = app
        .post_json(
            "diku",
            "/pubsub/publish",
            &event(&new_id(), "LOGIN", "diku", "mod-pub-1.0.0", "{}"),
        )
        .await;
    assert_eq!(other.status(), 204);
    let reported = eventually_every(
        "health names the failing login",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let (status, reported) = app.health().await;
            assert_eq!(status, 200);
            reported
                .contains("system user login failing for tenant diku")
                .then_some(reported)
        },
    )
    .await;
    assert!(
        reported.contains("system user login failing for tenant diku"),
        "{reported}"
    );
    assert!(!reported.contains("test-pubsub-password"));
}
