//! The API against its own OpenAPI document: schemathesis (PyPI) with every check, a fixed seed
//! and every operation, on a running service with an enabled tenant. Rejections the schema cannot
//! express (rules kept from the Java module) are listed in `schemathesis.toml`.

use std::time::Duration;

use crate::helpers::*;

/// The tenant interface, fuzzed in a tenant of its own: a generated `purge: true` drops the
/// tenant's schema, after which every other operation would answer "not enabled".
const TENANT_INTERFACE: &str = "^/_/tenant";

/// Runs schemathesis against `app` as `tenant` with `filter` (operations to include or exclude);
/// returns how many operations it tested.
async fn fuzz(app: &TestApp, tenant: &str, filter: [&str; 2]) -> usize {
    let bin = std::env::var("SCHEMATHESIS_BIN").unwrap_or_else(|_| "schemathesis".into());
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let child = tokio::process::Command::new(&bin)
        .args(["--config-file", config, "run"])
        .arg(app.url("/admin/openapi.json"))
        .args(["--url", app.base.as_str()])
        .args(["-H", &format!("X-Okapi-Tenant: {tenant}")])
        .args(filter)
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
        "schemathesis found failures ({filter:?}):\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no \"Tested:\" line in\n{report}"))
}

#[tokio::test]
async fn the_api_keeps_to_its_openapi_document() {
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;
    let tested = fuzz(&app, "diku", ["--exclude-path-regex", TENANT_INTERFACE]).await
        + fuzz(
            &app,
            "fuzz_tenant",
            ["--include-path-regex", TENANT_INTERFACE],
        )
        .await;
    // Between them the two runs exercised every operation of the document.
    assert_eq!(tested, routes().len());
}
