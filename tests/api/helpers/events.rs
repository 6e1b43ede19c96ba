//! Events and publishers for the tests.

use serde_json::{json, Value};

use super::*;

pub fn event(id: &str, event_type: &str, tenant: &str, published_by: &str, payload: &str) -> Value {
    json!({
        "id": id,
        "eventType": event_type,
        "eventMetadata": {"tenantId": tenant, "eventTTL": 1, "publishedBy": published_by, "correlationId": "corr-1"},
        "eventPayload": payload
    })
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Enables the tenant and registers `module` as publisher of `event_type`.
pub async fn register_publisher(app: &TestApp, tenant: &str, event_type: &str, module: &str) {
    register_publisher_of(app, tenant, &[event_type], module).await;
}

/// Enables `tenant` and registers `module` as publisher of all `event_types` (one declaration:
/// a module's declaration replaces its earlier ones).
pub async fn register_publisher_of(
    app: &TestApp,
    tenant: &str,
    event_types: &[&str],
    module: &str,
) {
    app.enable_tenant(tenant).await;
    let descriptors: Vec<Value> = event_types
        .iter()
        .map(|t| descriptor(t, "test event", 1))
        .collect();
    for d in &descriptors {
        assert_eq!(
            app.post_json(tenant, "/pubsub/event-types", d)
                .await
                .status(),
            201
        );
    }
    let r = app
        .post_json(
            tenant,
            "/pubsub/event-types/declare/publisher",
            &publisher(module, descriptors),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// Publishes with the partition key `key`: events with one key are delivered in order.
pub async fn publish_keyed(
    app: &TestApp,
    tenant: &str,
    event_type: &str,
    key: &str,
    payload: &str,
) -> String {
    let id = new_id();
    let r = app
        .req_as(tenant, reqwest::Method::POST, "/pubsub/publish")
        .header("X-Pubsub-Partition-Key", key)
        .json(&event(&id, event_type, tenant, "mod-pub-1.0.0", payload))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    id
}
