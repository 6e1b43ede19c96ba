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

/// Every handler of `md` has a route, and every `/pubsub` and `/_/` route a handler.
fn assert_handlers_routed(md: &Value) {
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
}

#[test]
fn module_descriptor_handlers_and_routes_match() {
    let md: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("descriptors/ModuleDescriptor-template.json")).unwrap(),
    )
    .unwrap();
    assert_handlers_routed(&md);
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

/// `mod-pubsub descriptors` writes what Okapi and Eureka register: this build's id and version,
/// every handler routed, the image and the environment of its launch descriptor.
#[tokio::test]
async fn rendered_descriptors_name_this_build() {
    let out = std::env::temp_dir().join(format!("pubsub-descriptors-{}", uuid::Uuid::new_v4()));
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .args(["descriptors", "--out", out.to_str().unwrap()])
        .args(["--image", "registry.example/mod-pubsub:test"])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let read = |name: &str| -> (String, Value) {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        let doc = serde_json::from_str(&text).unwrap();
        (text, doc)
    };
    let (md_text, md) = read("ModuleDescriptor.json");
    let (dd_text, dd) = read("DeploymentDescriptor.json");
    for text in [&md_text, &dd_text] {
        assert!(!text.contains("${"), "a placeholder is left:\n{text}");
    }
    let id = format!("mod-pubsub-{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(md["id"], id.as_str());
    assert_eq!(dd["srvcId"], id.as_str());
    // Above the Java module's last release (2.17.0), so Okapi sees an upgrade, not a downgrade.
    let major: u32 = env!("CARGO_PKG_VERSION")
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(major >= 3, "version {}", env!("CARGO_PKG_VERSION"));
    assert_handlers_routed(&md);
    let launch = &md["launchDescriptor"];
    assert_eq!(launch["dockerImage"], "registry.example/mod-pubsub:test");
    for d in [&launch["env"], &dd["descriptor"]["env"]] {
        let names: BTreeSet<&str> = d
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        for required in [
            "DB_HOST",
            "DB_DATABASE",
            "KAFKA_HOST",
            "KAFKA_PORT",
            "OKAPI_URL",
            "ENV",
        ] {
            assert!(
                names.contains(required),
                "{required} missing from {names:?}"
            );
        }
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// Every operation of the contract documents what any of them can answer: 400 as text (bad
/// tenant, parameter or body), 503 (PostgreSQL or Kafka away), and with a body 413 and 422; and
/// it declares `X-Okapi-Tenant` required where it takes it.
#[test]
fn every_operation_documents_the_common_answers() {
    let doc: Value = serde_json::to_value(mod_pubsub::http::openapi()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        if !(path.starts_with("/pubsub") || path.starts_with("/_/")) {
            continue;
        }
        for (method, op) in item.as_object().unwrap() {
            let answers = &op["responses"];
            let what = format!("{} {path}", method.to_uppercase());
            assert!(
                answers["400"]["content"]["text/plain"].is_object(),
                "{what}: 400 text/plain"
            );
            assert!(answers["503"].is_object(), "{what}: 503");
            if op.get("requestBody").is_some() {
                assert!(answers["413"].is_object(), "{what}: 413");
                assert!(answers["422"].is_object(), "{what}: 422");
            }
            for p in op["parameters"].as_array().into_iter().flatten() {
                if p["name"] == "X-Okapi-Tenant" {
                    assert_eq!(p["required"], true, "{what}: X-Okapi-Tenant required");
                }
            }
        }
    }
}
