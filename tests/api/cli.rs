//! The command-line clients of the binary: register, publish (Kafka and HTTP), tail, replay.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;
use crate::helpers::{delivering_app, FakeOkapi};

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `mod-pubsub args…` against `app` (its pubsub URL as OKAPI_URL, its broker and ENV), then
/// the variables of `env`; started, with its stdin, stdout and stderr piped.
fn spawn_cli(app: &TestApp, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .args(args)
        .env("OKAPI_URL", &app.base)
        .env("KAFKA_HOST", &app.env["KAFKA_HOST"])
        .env("KAFKA_PORT", &app.env["KAFKA_PORT"])
        .env("ENV", &app.env["ENV"])
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Runs `mod-pubsub args…` against `app` (its pubsub URL as OKAPI_URL, its broker and ENV).
async fn cli(app: &TestApp, args: &[&str], stdin: Option<&str>) -> Out {
    cli_env(app, args, stdin, &[]).await
}

/// [`cli`] with the variables of `env` set after the app's.
async fn cli_env(app: &TestApp, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Out {
    let out = finish_process(
        spawn_cli(app, args, env),
        stdin,
        Duration::from_secs(60),
        &format!("mod-pubsub {args:?}"),
    )
    .await;
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
        assert_refused(&app, &args, expected).await;
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

/// `mod-pubsub publish` of `payload` straight to Kafka; the event id.
async fn publish(app: &TestApp, tenant: &str, event_type: &str, payload: &str) -> String {
    let out = cli(
        app,
        &[
            "publish",
            "--tenant",
            tenant,
            "--event-type",
            event_type,
            "--published-by",
            "mod-pub-1.0.0",
            "--payload",
            payload,
        ],
        None,
    )
    .await;
    assert!(out.ok, "{}", out.stderr);
    out.stdout.trim().to_owned()
}

/// Runs `mod-pubsub args…` and checks that it fails with a message containing `expected`,
/// and without a panic.
async fn assert_refused(app: &TestApp, args: &[&str], expected: &str) {
    let out = cli(app, args, None).await;
    assert!(!out.ok, "{args:?} succeeded");
    assert!(out.stderr.contains(expected), "{args:?}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

/// Publishes `payload` as `event_type` in diku, up to `max` times, until the running `tail`
/// (whose partitions are assigned in the background) prints a line; that line, and the ids
/// sent. The tail must keep running meanwhile.
async fn publish_until_tailed(
    app: &TestApp,
    tail: &mut tokio::process::Child,
    event_type: &str,
    payload: &str,
    max: usize,
) -> (Value, Vec<String>) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut sent = Vec::new();
    let line = loop {
        assert!(sent.len() < max, "tail printed nothing for {sent:?}");
        assert!(tail.try_wait().unwrap().is_none(), "tail exited");
        sent.push(publish(app, "diku", event_type, payload).await);
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
        {
            break line.unwrap().expect("tail ended without a line");
        }
    };
    let line = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (line, sent)
}

#[tokio::test]
async fn tail_follows_new_events_until_it_is_killed_and_leaves_older_ones_alone() {
    let app = TestApp::spawn().await;
    crate::helpers::register_publisher(&app, "diku", "TAILED", "mod-pub-1.0.0").await;
    let old = publish(&app, "diku", "TAILED", r#"{"n":"old"}"#).await;

    // Without --from-beginning or --count: new events, for as long as it runs.
    let mut tail = spawn_cli(
        &app,
        &["tail", "--tenant", "diku", "--event-type", "TAILED"],
        &[],
    );
    let (line, sent) = publish_until_tailed(&app, &mut tail, "TAILED", r#"{"n":"new"}"#, 40).await;
    let id = line["event"]["id"].as_str().unwrap().to_owned();
    assert!(sent.contains(&id), "{id} is none of {sent:?}");
    assert_ne!(id, old, "an event from before the tail started");
    assert_eq!(line["tenant"], "diku");
    assert_eq!(line["topic"], app.topic("diku", "TAILED"));
    assert_eq!(line["key"], id.as_str());
    assert_eq!(line["headers"]["folio.tenantId"], "diku");
    assert_eq!(line["event"]["eventPayload"], r#"{"n":"new"}"#);
    assert_eq!(
        line["event"]["eventMetadata"]["publishedBy"],
        "mod-pub-1.0.0"
    );
    // Still running: it follows until it is stopped.
    assert!(tail.try_wait().unwrap().is_none(), "tail exited by itself");
    tail.kill().await.unwrap();
}

#[tokio::test]
async fn tail_of_all_tenants_and_kafka_flags_over_the_environment() {
    let app = TestApp::spawn().await;
    for tenant in ["diku", "other"] {
        crate::helpers::register_publisher(&app, tenant, "EVERYWHERE", "mod-pub-1.0.0").await;
    }
    let (host, port, env) = (
        app.env["KAFKA_HOST"].clone(),
        app.env["KAFKA_PORT"].clone(),
        app.env["ENV"].clone(),
    );
    // The environment points elsewhere; the flags win.
    let wrong = [
        ("KAFKA_HOST", "nowhere.invalid"),
        ("KAFKA_PORT", "1"),
        ("ENV", "wrong"),
    ];
    let flags = ["--kafka-host", &host, "--kafka-port", &port, "--env", &env];
    let mut ids = Vec::new();
    for tenant in ["diku", "other"] {
        let mut args = vec![
            "publish",
            "--tenant",
            tenant,
            "--event-type",
            "EVERYWHERE",
            "--published-by",
            "mod-pub-1.0.0",
            "--payload",
            "{}",
        ];
        args.extend(flags);
        let out = cli_env(&app, &args, None, &wrong).await;
        assert!(out.ok, "{}", out.stderr);
        ids.push(out.stdout.trim().to_owned());
    }
    let mut args = vec![
        "tail",
        "--all-tenants",
        "--event-type",
        "EVERYWHERE",
        "--from-beginning",
        "--count",
        "2",
    ];
    args.extend(flags);
    let out = cli_env(&app, &args, None, &wrong).await;
    assert!(out.ok, "{}", out.stderr);
    let mut got: Vec<(String, String)> = out
        .stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["tenant"].as_str().unwrap().to_owned(),
                v["event"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("diku".to_owned(), ids[0].clone()),
            ("other".to_owned(), ids[1].clone())
        ]
    );

    // A flag's bad value is reported under the flag's name; neither tenant flag, or both, is refused.
    for (args, expected) in [
        (
            vec![
                "tail",
                "--tenant",
                "diku",
                "--event-type",
                "X",
                "--kafka-port",
                "abc",
            ],
            "--kafka-port",
        ),
        (
            vec![
                "tail",
                "--tenant",
                "diku",
                "--event-type",
                "X",
                "--env",
                "a.b",
            ],
            "--env",
        ),
        (vec!["tail", "--event-type", "X"], "--all-tenants"),
        (
            vec![
                "tail",
                "--tenant",
                "diku",
                "--all-tenants",
                "--event-type",
                "X",
            ],
            "cannot be used with",
        ),
    ] {
        assert_refused(&app, &args, expected).await;
    }
}

#[tokio::test]
async fn tail_waits_for_a_topic_that_does_not_exist_yet() {
    use tokio::io::AsyncBufReadExt;

    let app = TestApp::spawn().await;
    let mut tail = spawn_cli(
        &app,
        &["tail", "--tenant", "diku", "--event-type", "LATER"],
        &[],
    );
    let mut stderr = tokio::io::BufReader::new(tail.stderr.take().unwrap()).lines();
    let waiting = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("does not exist yet") {
                return line;
            }
        }
        panic!("tail ended without saying it waits");
    })
    .await
    .expect("tail says it waits for the topic");
    assert!(waiting.contains(&app.topic("diku", "LATER")), "{waiting}");

    // Registering creates the topic; the tail picks it up and prints what is published then.
    crate::helpers::register_publisher(&app, "diku", "LATER", "mod-pub-1.0.0").await;
    let (line, sent) = publish_until_tailed(&app, &mut tail, "LATER", "{}", 60).await;
    assert!(
        sent.iter().any(|id| line["event"]["id"] == id.as_str()),
        "{line}"
    );
    tail.kill().await.unwrap();
}
