//! The committed OpenAPI document and the ModuleDescriptor agree with the router.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

use crate::helpers::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn committed_openapi_matches_the_code() {
    let generated = mod_pubsub::http::openapi().to_pretty_json().unwrap();
    let committed = std::fs::read_to_string(repo("api/openapi.json")).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "api/openapi.json is stale: run `cargo run -- openapi > api/openapi.json`"
    );
}

/// (METHOD, path) of every operation in the generated document.
fn routes() -> BTreeSet<(String, String)> {
    let doc: Value = serde_json::to_value(mod_pubsub::http::openapi()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn module_descriptor_handlers_and_routes_match() {
    let md: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("descriptors/ModuleDescriptor-template.json")).unwrap(),
    )
    .unwrap();
    let mut handlers = BTreeSet::new();
    for iface in md["provides"].as_array().unwrap() {
        for h in iface["handlers"].as_array().unwrap() {
            let path = h["pathPattern"]
                .as_str()
                .or(h["path"].as_str())
                .unwrap()
                .to_owned();
            for m in h["methods"].as_array().unwrap() {
                handlers.insert((m.as_str().unwrap().to_owned(), path.clone()));
            }
        }
    }
    let routes = routes();
    for h in &handlers {
        assert!(
            routes.contains(h),
            "ModuleDescriptor handler {h:?} has no route"
        );
    }
    for r in &routes {
        if r.1.starts_with("/pubsub") || r.1.starts_with("/_/") {
            assert!(
                handlers.contains(r),
                "route {r:?} has no handler in the ModuleDescriptor"
            );
        }
    }
    // The system user's permissions are the ones the service grants it.
    let md_user: Vec<&str> = md["metadata"]["user"]["permissions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(md_user, mod_pubsub::system_user::PERMISSIONS);
    // Every handler needs a declared permission.
    let declared: BTreeSet<String> = md["permissionSets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["permissionName"].as_str().unwrap().to_owned())
        .collect();
    for iface in md["provides"].as_array().unwrap() {
        for h in iface["handlers"].as_array().unwrap() {
            for p in h["permissionsRequired"].as_array().into_iter().flatten() {
                assert!(
                    declared.contains(p.as_str().unwrap()),
                    "permission {p} is not declared"
                );
            }
        }
    }
}

#[tokio::test]
async fn openapi_and_swagger_ui_are_served() {
    let app = TestApp::spawn().await;
    let r = app
        .client
        .get(app.url("/admin/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert!(doc["paths"]["/pubsub/event-types"].is_object());
    let r = app
        .client
        .get(app.url("/admin/swagger-ui/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(text(r).await.contains("swagger"));
}
