//! `_tenant` 2.0: install and upgrade jobs, disable, purge.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::*;

async fn schema_tables(app: &TestApp, schema: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
    )
    .bind(schema)
    .fetch_all(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn install_creates_the_tenant_schema_and_upgrade_is_idempotent() {
    let app = TestApp::spawn().await;
    let job = install(&app, "diku", json!({"module_to": "mod-pubsub-1.0.0"})).await;
    assert!(job.get("error").is_none(), "{job}");
    let tables = schema_tables(&app, "diku_mod_pubsub").await;
    assert!(tables.contains(&"audit_message".to_owned()), "{tables:?}");
    assert!(
        tables.contains(&"audit_message_payload".to_owned()),
        "{tables:?}"
    );
    let audit_date_type: String = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns WHERE table_schema = 'diku_mod_pubsub' AND table_name = 'audit_message' AND column_name = 'audit_date'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audit_date_type, "timestamp without time zone");

    let job = install(
        &app,
        "diku",
        json!({"module_from": "mod-pubsub-1.0.0", "module_to": "mod-pubsub-1.1.0", "parameters": [{"key": "loadReference", "value": "true"}]}),
    )
    .await;
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(
        job["tenantAttributes"]["parameters"][0]["key"],
        "loadReference"
    );
}

#[tokio::test]
async fn disable_is_204_and_keeps_everything() {
    let app = TestApp::spawn().await;
    install(&app, "diku", json!({"module_to": "mod-pubsub-1.0.0"})).await;
    app.post_json(
        "diku",
        "/pubsub/event-types/declare/subscriber",
        &subscriber("m-1.0.0", &[("D", "/d")]),
    )
    .await;
    let r = app
        .post_json(
            "diku",
            "/_/tenant",
            &json!({"module_from": "mod-pubsub-1.0.0"}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert!(!schema_tables(&app, "diku_mod_pubsub").await.is_empty());
    assert_eq!(
        total(&app, "diku", "/pubsub/event-types/D/subscribers").await,
        1
    );
}

#[tokio::test]
async fn purge_drops_the_schema_and_the_registrations_of_that_tenant_only() {
    let app = TestApp::spawn().await;
    for tenant in ["diku", "other"] {
        install(&app, tenant, json!({"module_to": "mod-pubsub-1.0.0"})).await;
        let r = app
            .post_json(
                tenant,
                "/pubsub/event-types/declare/subscriber",
                &subscriber("m-1.0.0", &[("P", "/p")]),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let r = app
        .post_json(
            "diku",
            "/_/tenant",
            &json!({"module_from": "mod-pubsub-1.0.0", "purge": true}),
        )
        .await;
    assert_eq!(r.status(), 204);
    assert!(schema_tables(&app, "diku_mod_pubsub").await.is_empty());
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'diku_mod_pubsub')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(!exists);
    assert_eq!(
        total(&app, "diku", "/pubsub/event-types/P/subscribers").await,
        0
    );
    assert_eq!(
        total(&app, "other", "/pubsub/event-types/P/subscribers").await,
        1
    );
    assert!(!schema_tables(&app, "other_mod_pubsub").await.is_empty());
    // Purging a tenant that has nothing is fine too.
    let r = app
        .post_json(
            "nobody",
            "/_/tenant",
            &json!({"module_from": "mod-pubsub-1.0.0", "purge": true}),
        )
        .await;
    assert_eq!(r.status(), 204);
}

#[tokio::test]
async fn jobs_belong_to_their_tenant_and_ids_are_validated() {
    let app = TestApp::spawn().await;
    let r = app
        .post_json(
            "diku",
            "/_/tenant",
            &json!({"module_to": "mod-pubsub-1.0.0"}),
        )
        .await;
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    // Another tenant cannot see or delete it.
    assert_eq!(
        app.req_as("other", Method::GET, &location)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(app.delete("other", &location).await.status(), 404);
    let r = app
        .req_as("diku", Method::GET, "/_/tenant/not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .req_as(
            "diku",
            Method::GET,
            "/_/tenant/5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Without wait the job is answered at once, complete or not.
    let started = std::time::Instant::now();
    let r = app
        .req_as("diku", Method::GET, &location)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    // wait is an int64 of at least 0: anything else is a 400, not a silent cut.
    for wait in ["-1", "9223372036854775808", "soon"] {
        let r = app
            .req_as("diku", Method::GET, &format!("{location}?wait={wait}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "wait={wait}");
    }
}

/// Okapi never does it, but retried or scripted `_tenant` calls can: installs and purges of one
/// tenant at once. They take turns: no call answers 500, no job fails half-way, and a purge is
/// final: an install job that had not started yet when it came is dropped with its job row, so it
/// does not bring the schema back.
#[tokio::test]
async fn concurrent_installs_and_purges_of_one_tenant_take_turns() {
    let app = TestApp::spawn().await;
    let enable = json!({"module_to": "mod-pubsub-1.0.0"});
    let purge = json!({"module_from": "mod-pubsub-1.0.0", "purge": true});
    for round in 0..5 {
        let calls = [&enable, &enable, &purge, &enable, &purge, &enable]
            .map(|body| app.post_json("diku", "/_/tenant", body));
        let mut jobs = Vec::new();
        for r in futures::future::join_all(calls).await {
            match r.status().as_u16() {
                201 => jobs.push(r.headers()["location"].to_str().unwrap().to_owned()),
                204 => {}
                other => panic!("round {round}: {other}: {}", r.text().await.unwrap()),
            }
        }
        for location in jobs {
            let r = app
                .req_as("diku", Method::GET, &format!("{location}?wait=30000"))
                .send()
                .await
                .unwrap();
            // A purge after the install deletes its job row: gone is fine, failed is not.
            if r.status() == 404 {
                continue;
            }
            let job: Value = r.json().await.unwrap();
            assert_eq!(job["complete"], true, "round {round}: {job}");
            assert!(job.get("error").is_none(), "round {round}: {job}");
        }
        // Installs right before a purge: the purge has the last word.
        for _ in 0..3 {
            let r = app.post_json("diku", "/_/tenant", &enable).await;
            assert_eq!(r.status(), 201);
        }
        let r = app.post_json("diku", "/_/tenant", &purge).await;
        assert_eq!(
            r.status(),
            204,
            "round {round}: {}",
            r.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            schema_tables(&app, "diku_mod_pubsub").await,
            Vec::<String>::new(),
            "round {round}"
        );
    }
    let job = install(&app, "diku", enable.clone()).await;
    assert!(job.get("error").is_none(), "{job}");
    assert!(schema_tables(&app, "diku_mod_pubsub")
        .await
        .contains(&"audit_message".to_owned()));
}

#[tokio::test]
async fn a_failing_job_reports_its_error() {
    let app = TestApp::spawn().await;
    // Make the migration fail: a table of that name with an incompatible shape.
    sqlx::query("CREATE SCHEMA broken_mod_pubsub")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE broken_mod_pubsub.audit_message (id text)")
        .execute(&app.pool)
        .await
        .unwrap();
    let job = install(&app, "broken", json!({"module_to": "mod-pubsub-1.0.0"})).await;
    let error = job["error"].as_str().expect("the job carries an error");
    assert!(
        error.starts_with("Failed to migrate schema broken_mod_pubsub"),
        "{error}"
    );
}
