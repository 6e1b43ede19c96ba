//! Real FOLIO MessagingDescriptor files (tests/fixtures/messaging-descriptors, copied from the
//! shared reference material), registered the way the Java client does it: every publication
//! POSTed to /pubsub/event-types, then the publisher declaration, then the subscriber one.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::helpers::*;

fn fixtures() -> Vec<(String, Value)> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messaging-descriptors");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("fixtures directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let body: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (format!("{name}-1.0.0"), body)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 6, "expected the six fixture files");
    out
}

/// What the Java client's registerModule does.
async fn register(app: &TestApp, tenant: &str, module_id: &str, md: &Value) {
    let publications = md["publications"].as_array().unwrap();
    let subscriptions = md["subscriptions"].as_array().unwrap();
    if !publications.is_empty() {
        let posts: Vec<_> = publications
            .iter()
            .map(|p| app.post_json(tenant, "/pubsub/event-types", p))
            .collect();
        for r in futures::future::join_all(posts).await {
            assert_eq!(r.status(), 201, "{module_id}: event type");
        }
        let r = app
            .post_json(
                tenant,
                "/pubsub/event-types/declare/publisher",
                &json!({"moduleId": module_id, "eventDescriptors": publications}),
            )
            .await;
        assert_eq!(
            r.status(),
            201,
            "{module_id}: publisher: {}",
            r.text().await.unwrap()
        );
    }
    if !subscriptions.is_empty() {
        let r = app
            .post_json(
                tenant,
                "/pubsub/event-types/declare/subscriber",
                &json!({"moduleId": module_id, "subscriptionDefinitions": subscriptions}),
            )
            .await;
        assert_eq!(r.status(), 201, "{module_id}: subscriber");
    }
}

fn module_ids(body: &Value) -> Vec<String> {
    let mut ids: Vec<String> = body["messagingModules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["moduleId"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn every_fixture_registers_for_two_tenants_then_unregisters() {
    let app = TestApp::spawn().await;
    let fixtures = fixtures();
    let tenants = ["tenant_one", "tenant_two"];
    for tenant in tenants {
        for (module_id, md) in &fixtures {
            register(&app, tenant, module_id, md).await;
        }
        // Re-registration (every enable or upgrade) is idempotent.
        for (module_id, md) in &fixtures {
            register(&app, tenant, module_id, md).await;
        }
    }

    // Every publication and subscription is listed, per tenant, exactly once.
    for tenant in tenants {
        for (module_id, md) in &fixtures {
            for p in md["publications"].as_array().unwrap() {
                let t = p["eventType"].as_str().unwrap();
                let body = app
                    .get_json(tenant, &format!("/pubsub/event-types/{t}/publishers"))
                    .await;
                assert_eq!(
                    module_ids(&body).iter().filter(|m| *m == module_id).count(),
                    1,
                    "{tenant} {t} {module_id}"
                );
                assert!(body["messagingModules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|m| m["tenantId"] == tenant));
                let d = app
                    .get_json(tenant, &format!("/pubsub/event-types/{t}"))
                    .await;
                assert_eq!(
                    d["tmp"], false,
                    "{t} is a real descriptor after its publisher registered"
                );
                assert_eq!(d["description"], p["description"]);
            }
            for s in md["subscriptions"].as_array().unwrap() {
                let t = s["eventType"].as_str().unwrap();
                let body = app
                    .get_json(tenant, &format!("/pubsub/event-types/{t}/subscribers"))
                    .await;
                let mine: Vec<&Value> = body["messagingModules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["moduleId"] == module_id.as_str())
                    .collect();
                assert_eq!(mine.len(), 1, "{tenant} {t} {module_id}");
                assert_eq!(mine[0]["subscriberCallback"], s["callbackAddress"]);
            }
        }
    }
    let total_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pubsub_config.messaging_module")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let per_tenant: usize = fixtures
        .iter()
        .map(|(_, md)| {
            md["publications"].as_array().unwrap().len()
                + md["subscriptions"].as_array().unwrap().len()
        })
        .sum();
    assert_eq!(total_rows as usize, 2 * per_tenant);

    // Unregister everything in tenant one the way the Java client does; tenant two keeps all.
    for (module_id, _) in &fixtures {
        for role in ["PUBLISHER", "SUBSCRIBER"] {
            let r = app
                .delete(
                    "tenant_one",
                    &format!("/pubsub/messaging-modules?moduleId={module_id}&moduleRole={role}"),
                )
                .await;
            assert_eq!(r.status(), 204);
        }
    }
    let left: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tenant_id, count(*) FROM pubsub_config.messaging_module GROUP BY tenant_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(left, vec![("tenant_two".to_owned(), per_tenant as i64)]);
}

#[tokio::test]
async fn tenants_cannot_see_or_delete_each_others_registrations() {
    let app = TestApp::spawn().await;
    let (module_id, md) = fixtures()
        .into_iter()
        .find(|(m, _)| m.starts_with("mod-circulation"))
        .unwrap();
    register(&app, "tenant_a", &module_id, &md).await;
    let t = md["publications"][0]["eventType"]
        .as_str()
        .unwrap()
        .to_owned();
    let s = md["subscriptions"][0]["eventType"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(
        total(
            &app,
            "tenant_b",
            &format!("/pubsub/event-types/{t}/publishers")
        )
        .await,
        0
    );
    assert_eq!(
        total(
            &app,
            "tenant_b",
            &format!("/pubsub/event-types/{s}/subscribers")
        )
        .await,
        0
    );

    for path in [
        format!("/pubsub/event-types/{t}/publishers?moduleId={module_id}"),
        format!("/pubsub/event-types/{s}/subscribers?moduleId={module_id}"),
        format!("/pubsub/messaging-modules?moduleId={module_id}&moduleRole=PUBLISHER"),
        format!("/pubsub/messaging-modules?moduleId={module_id}&moduleRole=SUBSCRIBER"),
    ] {
        assert_eq!(app.delete("tenant_b", &path).await.status(), 204);
    }
    assert_eq!(
        total(
            &app,
            "tenant_a",
            &format!("/pubsub/event-types/{t}/publishers")
        )
        .await,
        1
    );
    assert_eq!(
        total(
            &app,
            "tenant_a",
            &format!("/pubsub/event-types/{s}/subscribers")
        )
        .await,
        1
    );
}
