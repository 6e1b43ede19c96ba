//! `/admin/health` follows the database.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn health_is_200_then_503_when_the_database_goes_away_then_200_again() {
    let app = TestApp::spawn().await;
    let (status, body) = app.health().await;
    assert_eq!(status, 200);
    assert_eq!(body, "OK");

    app.db.take_away().await;

    let body = eventually_every(
        "health reports the database down",
        Duration::from_secs(4),
        Duration::from_millis(100),
        || async {
            let (status, body) = app.health().await;
            (status == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(body)
        },
    )
    .await;
    assert!(body.starts_with("database:"), "{body}");

    // A registry call during the outage is a 503, not a 500.
    let r = app
        .req(reqwest::Method::GET, "/pubsub/event-types")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);

    app.db.give_back().await;
    eventually_every(
        "health recovers",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { (app.health().await.0 == 200).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn invalid_configuration_stops_the_binary_with_one_line_naming_the_variable() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .arg("serve")
        .env_clear()
        .env("SYSTEM_USER_NAME", "pub-sub")
        .env("SYSTEM_USER_PASSWORD", "very-secret-password")
        .env("DB_PORT", "not-a-port")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("DB_PORT"), "{stderr}");
    assert!(!stderr.contains("very-secret-password"));
}

#[tokio::test]
async fn graceful_stop_and_secrets_stay_out_of_logs() {
    let db = TestDb::create().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut env = test_env(&db);
    env.insert("DB_PASSWORD".into(), env_or("DB_PASSWORD", "folio_admin"));
    env.insert("SYSTEM_USER_PASSWORD".into(), "very-secret-password".into());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .args(["serve", "--port", &port.to_string()])
        .env_clear()
        .envs(&env)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    wait_healthy(
        &client,
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(10),
    )
    .await;
    // SIGTERM: the service drains and exits 0.
    let pid = child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "exit status {:?}; the last logs: {}",
        out.status,
        &logs[logs.len().saturating_sub(3000)..]
    );
    assert!(logs.contains("mod-pubsub stopped"), "{logs}");
    assert!(!logs.contains("very-secret-password"), "secret in logs");
    let db_password = env_or("DB_PASSWORD", "folio_admin");
    for leak in [
        format!("password: \"{db_password}\""),
        format!("password={db_password}"),
        format!(":{db_password}@"),
    ] {
        assert!(!logs.contains(&leak), "database password in logs");
    }
    assert!(
        logs.contains("[redacted]"),
        "the configuration is logged with its secrets redacted"
    );
}

/// Every response carries the request's `X-Okapi-Request-Id` (Okapi's, or a new one), which is
/// also in the request's log span and in the Kafka records it writes.
#[tokio::test]
async fn requests_carry_a_request_id() {
    let app = TestApp::spawn().await;
    let r = app
        .req(reqwest::Method::GET, "/pubsub/event-types")
        .header("X-Okapi-Request-Id", "123456/pubsub")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-okapi-request-id"], "123456/pubsub");
    let r = app
        .req(reqwest::Method::GET, "/pubsub/event-types")
        .send()
        .await
        .unwrap();
    let generated = r.headers()["x-okapi-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
}
