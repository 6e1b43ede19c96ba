//! The command-line clients of the binary: register, publish (Kafka and HTTP), tail, replay.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::delivery::{delivering_app, FakeOkapi};
use crate::helpers::*;

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `mod-pubsub args…` against `app` (its pubsub URL as OKAPI_URL, its broker and ENV).
async fn cli(app: &TestApp, args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .args(args)
        .env("OKAPI_URL", &app.base)
        .env("KAFKA_HOST", &app.env["KAFKA_HOST"])
        .env("KAFKA_PORT", &app.env["KAFKA_PORT"])
        .env("ENV", &app.env["ENV"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("mod-pubsub {args:?} did not finish"))
        .unwrap();
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[tokio::test]
async fn the_cli_registers_publishes_tails_and_replays() {
    let fake = FakeOkapi::start().await;
    let app = delivering_app(&fake, "1s").await;
    app.enable_tenant("diku").await;
    let fixtures =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messaging-descriptors");
    let descriptor = |name: &str| fixtures.join(name).to_string_lossy().into_owned();

    // register
    for (file, module) in [
        ("mod-circulation.json", "mod-circulation-24.0.0"),
        ("mod-patron-blocks.json", "mod-patron-blocks-1.0.0"),
    ] {
        let out = cli(
            &app,
            &[
                "register",
                "--descriptor",
                &descriptor(file),
                "--tenant",
                "diku",
                "--module-id",
                module,
            ],
            None,
        )
        .await;
        assert!(out.ok, "{}", out.stderr);
        assert!(
            out.stdout.contains(&format!("registered {module}")),
            "{}",
            out.stdout
        );
    }
    let pubs = app
        .get_json("diku", "/pubsub/event-types/ITEM_CHECKED_OUT/publishers")
        .await;
    assert_eq!(
        pubs["messagingModules"][0]["moduleId"],
        "mod-circulation-24.0.0"
    );

    // publish straight to Kafka, and over HTTP with the payload on stdin
    let out = cli(
        &app,
        &[
            "publish",
            "--tenant",
            "diku",
            "--event-type",
            "ITEM_CHECKED_OUT",
            "--published-by",
            "mod-circulation-24.0.0",
            "--payload",
            r#"{"loanId":"l-cli"}"#,
            "--key",
            "l-cli",
        ],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let direct_id = out.stdout.trim().to_owned();
    let out = cli(
        &app,
        &[
            "publish",
            "--via-http",
            "--tenant",
            "diku",
            "--event-type",
            "ITEM_CHECKED_OUT",
            "--published-by",
            "mod-circulation-24.0.0",
        ],
        Some(r#"{"loanId":"l-http"}"#),
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let http_id = out.stdout.trim().to_owned();

    // tail sees both, with envelope, key and headers
    let out = cli(
        &app,
        &[
            "tail",
            "--tenant",
            "diku",
            "--event-type",
            "ITEM_CHECKED_OUT",
            "--from-beginning",
            "--count",
            "2",
        ],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", out.stdout);
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["event"]["id"] == id)
            .unwrap_or_else(|| panic!("{id} not tailed: {lines:?}"))
    };
    let direct = by_id(&direct_id);
    assert_eq!(direct["key"], "l-cli");
    assert_eq!(direct["tenant"], "diku");
    assert_eq!(direct["headers"]["folio.tenantId"], "diku");
    assert_eq!(direct["event"]["eventPayload"], r#"{"loanId":"l-cli"}"#);
    assert_eq!(
        by_id(&http_id)["event"]["eventPayload"],
        r#"{"loanId":"l-http"}"#
    );

    // both were pushed to mod-patron-blocks, which can be replayed
    let path = "/automated-patron-blocks/handlers/item-checked-out";
    fake.wait_for(path, 2, Duration::from_secs(20)).await;
    let out = cli(
        &app,
        &[
            "replay",
            "--tenant",
            "diku",
            "--module-id",
            "mod-patron-blocks-1.0.0",
            "--since",
            "2020-01-01T00:00:00Z",
        ],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let started: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(started["moduleId"], "mod-patron-blocks-1.0.0");
    fake.wait_for(path, 4, Duration::from_secs(20)).await;
    let out = cli(
        &app,
        &["replay", "--tenant", "diku", "--dead-letters"],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    let result: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(result["redelivered"], serde_json::json!([]));
}

#[tokio::test]
async fn the_cli_explains_itself_and_refuses_bad_arguments_with_a_message() {
    let app = TestApp::spawn().await;
    for command in ["register", "publish", "tail", "replay"] {
        let out = cli(&app, &[command, "--help"], None).await;
        assert!(out.ok);
        assert!(
            out.stdout.contains("Examples:")
                && out.stdout.contains(&format!("mod-pubsub {command}")),
            "{command} --help: {}",
            out.stdout
        );
    }
    for (args, expected) in [
        (
            vec![
                "replay",
                "--tenant",
                "diku",
                "--module-id",
                "mod-x-1.0.0",
                "--since",
                "yesterday",
            ],
            "--since",
        ),
        (
            vec![
                "register",
                "--descriptor",
                "/no/such.json",
                "--tenant",
                "diku",
                "--module-id",
                "mod-x-1.0.0",
            ],
            "/no/such.json",
        ),
        (
            vec![
                "publish",
                "--tenant",
                "diku",
                "--event-type",
                "NOT A TYPE",
                "--published-by",
                "m-1.0.0",
                "--payload",
                "{}",
            ],
            "--event-type",
        ),
        (
            vec!["tail", "--tenant", "Diku!", "--event-type", "X"],
            "--tenant",
        ),
        (vec!["publish", "--tenant", "diku"], "--event-type"),
    ] {
        let out = cli(&app, &args, None).await;
        assert!(!out.ok, "{args:?} succeeded");
        assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
    // Publishing for an unregistered publisher over HTTP is refused with pubsub's answer.
    app.enable_tenant("diku").await;
    let out = cli(
        &app,
        &[
            "publish",
            "--via-http",
            "--tenant",
            "diku",
            "--event-type",
            "NOBODY",
            "--published-by",
            "mod-x-1.0.0",
            "--payload",
            "{}",
        ],
        None,
    )
    .await;
    assert!(!out.ok);
    assert!(out.stderr.contains("400"), "{}", out.stderr);
}
