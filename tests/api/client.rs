//! The direct-Kafka client: registration through the REST API, publishing straight to Kafka,
//! delivered by the engine like an HTTP publish.

use std::path::PathBuf;
use std::time::Duration;

use mod_pubsub::client::{DirectPublisher, MessagingDescriptor, Registrar};

use crate::delivery::FakeOkapi;
use crate::helpers::*;

#[tokio::test]
async fn a_module_registers_with_the_client_and_publishes_directly_to_kafka() {
    let fake = FakeOkapi::start().await;
    let db = TestDb::create().await;
    let base = fake.base.clone();
    let app = TestApp::spawn_on(db, move |e| {
        e.insert("DELIVERY_ENABLED".into(), "true".into());
        e.insert("OKAPI_URL".into(), base);
    })
    .await;
    app.enable_tenant("diku").await;

    // mod-circulation publishes, mod-patron-blocks subscribes: both register with the client.
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messaging-descriptors");
    let circulation = MessagingDescriptor::from_file(&dir.join("mod-circulation.json")).unwrap();
    let patron_blocks =
        MessagingDescriptor::from_file(&dir.join("mod-patron-blocks.json")).unwrap();
    let registrar = Registrar::new(&app.base, "diku", None);
    assert!(registrar
        .register("mod-circulation-24.0.0", &circulation)
        .await
        .unwrap());
    assert!(registrar
        .register("mod-patron-blocks-1.0.0", &patron_blocks)
        .await
        .unwrap());
    // Idempotent, as every enable and upgrade re-registers.
    assert!(registrar
        .register("mod-circulation-24.0.0", &circulation)
        .await
        .unwrap());
    let empty = MessagingDescriptor {
        publications: vec![],
        subscriptions: vec![],
    };
    assert!(!registrar
        .register("mod-nothing-1.0.0", &empty)
        .await
        .unwrap());

    // A module that consumes the topic itself registers without a callback address.
    let direct = MessagingDescriptor {
        publications: vec![],
        subscriptions: vec![mod_pubsub::client::Subscription {
            event_type: "ITEM_CHECKED_OUT".into(),
            callback_address: None,
        }],
    };
    assert!(registrar
        .register("mod-direct-1.0.0", &direct)
        .await
        .unwrap());

    let publisher = DirectPublisher::new(&app.bootstrap(), &app.env["ENV"], "diku").unwrap();
    assert_eq!(
        publisher.topic("ITEM_CHECKED_OUT").unwrap(),
        app.topic("diku", "ITEM_CHECKED_OUT")
    );
    let payload = r#"{"loanId":"l-42"}"#;
    let id = publisher
        .publish(
            "ITEM_CHECKED_OUT",
            "mod-circulation-24.0.0",
            payload,
            Some("l-42"),
        )
        .await
        .unwrap();

    // The engine pushes it to mod-patron-blocks' callback like any HTTP-published event.
    let path = "/automated-patron-blocks/handlers/item-checked-out";
    let got = fake.wait_for(path, 1, Duration::from_secs(20)).await;
    assert_eq!(got[0].body, payload);
    assert_eq!(got[0].headers["x-pubsub-event-id"], id);
    // pubsub pushed it to mod-patron-blocks only, never to the direct consumer.
    let rows = app.audit_of("diku", &id, 2).await;
    assert!(rows
        .iter()
        .any(|r| r["subscriber"] == "mod-patron-blocks-1.0.0"));
    assert!(
        rows.iter().all(|r| r["subscriber"] != "mod-direct-1.0.0"),
        "{rows:?}"
    );

    // A registration error is reported, not swallowed.
    let bad = Registrar::new(&app.base, "diku", None);
    let wrong = MessagingDescriptor {
        publications: vec![
            serde_json::json!({"eventType": "ITEM_CHECKED_OUT", "description": "different", "eventTTL": 1}),
        ],
        subscriptions: vec![],
    };
    let err = bad
        .register("mod-circulation-24.0.0", &wrong)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("400"), "{err}");
}
