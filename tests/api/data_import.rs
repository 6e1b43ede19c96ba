//! The data-import example's flow (examples/data-import/flow.rs), over pubsub's HTTP
//! publish/push path and over direct Kafka, against one service and broker.

#[path = "../../examples/data-import/flow.rs"]
#[allow(dead_code)]
mod flow;

use std::time::Duration;

use flow::{Settings, Transport};

use crate::helpers::*;

#[tokio::test]
async fn the_data_import_flow_completes_every_record_over_http_and_over_kafka() {
    let okapi = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let okapi_url = format!("http://{}", okapi.local_addr().unwrap());
    let db = TestDb::create().await;
    let app = TestApp::spawn_on(db, move |e| {
        e.insert("DELIVERY_ENABLED".into(), "true".into());
        e.insert("OKAPI_URL".into(), okapi_url);
        e.insert("MAX_REQUEST_SIZE".into(), "1048576".into());
    })
    .await;
    let mut okapi = Some(okapi);
    for (transport, tenant) in [(Transport::Http, "di_http"), (Transport::Kafka, "di_kafka")] {
        let settings = Settings {
            transport,
            pubsub_url: app.base.clone(),
            bootstrap: app.bootstrap(),
            env: app.env["ENV"].clone(),
            tenant: tenant.to_owned(),
            files: 3,
            records_per_file: 120,
            chunk_size: 25,
            max_in_flight: 4,
            timeout: Duration::from_secs(120),
        };
        flow::enable_tenant(&app.base, tenant).await.unwrap();
        // The HTTP transport serves pubsub's pushes on the listener OKAPI_URL points at.
        let listener = match transport {
            Transport::Http => okapi.take().unwrap(),
            Transport::Kafka => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let report = flow::run(&settings, listener)
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: {e}"));
        assert_eq!(
            report.records, 360,
            "{transport:?}: every record of the three files"
        );
        assert_eq!(report.duplicates, 0, "{transport:?}");

        // pubsub knows who consumes what; only the HTTP transport's modules have callbacks.
        for event_type in [
            flow::CHUNK_READ,
            flow::CHUNK_PARSED,
            flow::CHUNK_SAVED,
            flow::COMPLETED,
        ] {
            let subs = app
                .get_json(
                    tenant,
                    &format!("/pubsub/event-types/{event_type}/subscribers"),
                )
                .await;
            let subs = subs["messagingModules"].as_array().unwrap();
            assert_eq!(subs.len(), 1, "{subs:?}");
            let callback = subs[0]["subscriberCallback"].as_str().unwrap_or_default();
            assert_eq!(
                !callback.is_empty(),
                transport == Transport::Http,
                "{event_type}: {subs:?}"
            );
        }
    }
}
