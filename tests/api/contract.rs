//! The API against its own OpenAPI document: schemathesis (PyPI) with every check, a fixed seed
//! and every operation, on a running service with an enabled tenant. Rejections the schema cannot
//! express (rules kept from the Java module) are listed in `schemathesis.toml`.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn the_api_keeps_to_its_openapi_document() {
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| "schemathesis".into());
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let child = tokio::process::Command::new(&bin)
        .args(["--config-file", config, "run"])
        .arg(app.url("/admin/openapi.json"))
        .args(["--url", app.base.as_str()])
        .args(["-H", "X-Okapi-Tenant: diku"])
        .args([
            "--checks",
            "all",
            "--seed",
            "1",
            "--max-examples",
            "20",
            "--no-color",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {bin} ({e}): scripts/test.sh installs it (ensure_schemathesis)")
        });
    let out = finish_process(child, None, Duration::from_secs(300), "schemathesis").await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation of the document was exercised.
    let doc = serde_json::to_value(mod_pubsub::http::openapi()).unwrap();
    let operations: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert!(
        report.contains(&format!("Tested: {operations}")),
        "not every one of the {operations} operations was tested:\n{report}"
    );
}
