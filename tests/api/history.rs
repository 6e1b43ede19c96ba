//! `/pubsub/history`: the Java module's AuditMessageAPITest scenarios, plus time zones, `Z`,
//! fractions, ordering and paging.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::*;

const EVENT_1: &str = "11111111-1111-4111-8111-111111111111";
const EVENT_2: &str = "22222222-2222-4222-8222-222222222222";

async fn seed(app: &TestApp) {
    let rows = [
        (
            "2019-09-15T13:00:00Z",
            EVENT_1,
            "RECORD_CREATED",
            "correlationId_1",
        ),
        (
            "2019-09-21T13:00:00Z",
            EVENT_1,
            "RECORD_UPDATED",
            "correlationId_1",
        ),
        (
            "2019-09-22T13:00:00Z",
            EVENT_2,
            "RECORD_CREATED",
            "correlationId_2",
        ),
        (
            "2019-09-25T13:00:00Z",
            EVENT_2,
            "RECORD_CREATED",
            "correlationId_2",
        ),
        (
            "2019-09-27T11:00:00Z",
            EVENT_2,
            "RECORD_CREATED",
            "correlationId_2",
        ),
        (
            "2019-09-27T22:00:00Z",
            EVENT_2,
            "RECORD_CREATED",
            "correlationId_2",
        ),
        (
            "2019-09-28T20:00:00Z",
            EVENT_2,
            "RECORD_CREATED",
            "correlationId_2",
        ),
    ];
    for (date, event_id, event_type, correlation) in rows {
        sqlx::query(
            "INSERT INTO diku_mod_pubsub.audit_message \
             (id, event_id, event_type, correlation_id, tenant_id, created_by, audit_date, state, published_by, error_message) \
             VALUES ($1, $2::uuid, $3, $4, 'diku', '', $5::timestamptz AT TIME ZONE 'UTC', 'PUBLISHED', 'mod-x-1.0.0', '')",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(event_id)
        .bind(event_type)
        .bind(correlation)
        .bind(date)
        .execute(&app.pool)
        .await
        .unwrap();
    }
}

async fn history(app: &TestApp, query: &str) -> Value {
    app.get_json("diku", &format!("/pubsub/history?{query}"))
        .await
}

async fn count(app: &TestApp, query: &str) -> usize {
    let body = history(app, query).await;
    let n = body["auditMessages"].as_array().unwrap().len();
    assert_eq!(body["totalRecords"], n as i64, "{query}");
    n
}

async fn status(app: &TestApp, query: &str) -> (u16, String) {
    let r = app
        .req_as("diku", Method::GET, &format!("/pubsub/history?{query}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn java_module_history_scenarios() {
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;

    for query in ["", "endDate=2019-09-27", "startDate=2019-09-20"] {
        let (code, body) = status(&app, query).await;
        assert_eq!(code, 400, "{query}");
        assert_eq!(
            body,
            "Start date and End date are required query parameters"
        );
    }
    assert_eq!(
        count(&app, "startDate=2019-09-20&endDate=2019-09-27").await,
        0
    );
    assert_eq!(
        count(
            &app,
            "startDate=2019-09-20T12:00:00&endDate=2019-09-27T12:00:00"
        )
        .await,
        0
    );

    seed(&app).await;
    assert_eq!(
        count(
            &app,
            "startDate=2019-09-20T12:00:00&endDate=2019-09-24T12:00:00"
        )
        .await,
        2
    );
    let body = history(
        &app,
        &format!("startDate=2019-09-14T12:00:00&endDate=2019-09-26T12:00:00&eventId={EVENT_1}"),
    )
    .await;
    assert_eq!(body["totalRecords"], 2);
    assert!(body["auditMessages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["eventId"] == EVENT_1));
    assert_eq!(
        count(
            &app,
            "startDate=2019-09-14T12:00:00&endDate=2019-09-26T12:00:00&eventType=RECORD_CREATED"
        )
        .await,
        3
    );
    assert_eq!(count(&app, "startDate=2019-09-14T12:00:00&endDate=2019-09-26T12:00:00&correlationId=correlationId_2").await, 2);
    assert_eq!(
        count(&app, "startDate=2019-09-27&endDate=2019-09-27").await,
        2,
        "a date alone is the whole day"
    );
    assert_eq!(
        count(&app, "startDate=2019-09-27&endDate=2019-09-28").await,
        3
    );
    assert_eq!(
        count(&app, "startDate=2019-09-27&endDate=2019-09-28T00:00:00").await,
        2,
        "an explicit time is not extended"
    );

    // Rows as the Java module renders them (empty strings kept, dates in RMB's format).
    let body = history(
        &app,
        &format!("startDate=2019-09-15&endDate=2019-09-15&eventId={EVENT_1}"),
    )
    .await;
    let m = &body["auditMessages"][0];
    assert_eq!(m["auditDate"], "2019-09-15T13:00:00.000+00:00");
    assert_eq!(m["state"], "PUBLISHED");
    assert_eq!(m["tenantId"], "diku");
    assert_eq!(m["createdBy"], "");
    assert_eq!(m["errorMessage"], "");
}

#[tokio::test]
async fn offsets_z_fractions_ordering_and_paging() {
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;
    seed(&app).await;

    // `Z`, fractions and offsets (which the Java module rejected) name the same instant.
    for (start, end) in [
        ("2019-09-27T11:00:00Z", "2019-09-27T11:00:00Z"),
        ("2019-09-27T11:00:00.000Z", "2019-09-27T11:00:00.000000Z"),
        ("2019-09-27T13:00:00%2B02:00", "2019-09-27T13:00:00%2B0200"),
        ("2019-09-27T10:00:00-01:00", "2019-09-27T10:00:00-0100"),
    ] {
        assert_eq!(
            count(&app, &format!("startDate={start}&endDate={end}")).await,
            1,
            "{start} {end}"
        );
    }
    // A naive time is UTC.
    assert_eq!(
        count(
            &app,
            "startDate=2019-09-27T11:00:00&endDate=2019-09-27T11:00:00"
        )
        .await,
        1
    );

    // Oldest first; paging keeps totalRecords.
    let all = history(&app, "startDate=2019-01-01&endDate=2019-12-31").await;
    let dates: Vec<&str> = all["auditMessages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["auditDate"].as_str().unwrap())
        .collect();
    let mut sorted = dates.clone();
    sorted.sort();
    assert_eq!(dates, sorted);
    assert_eq!(dates.len(), 7);
    let page = history(
        &app,
        "startDate=2019-01-01&endDate=2019-12-31&offset=2&limit=3",
    )
    .await;
    assert_eq!(page["totalRecords"], 7);
    let page_dates: Vec<&str> = page["auditMessages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["auditDate"].as_str().unwrap())
        .collect();
    assert_eq!(page_dates, dates[2..5]);
    let beyond = history(&app, "startDate=2019-01-01&endDate=2019-12-31&offset=50").await;
    assert_eq!(beyond["totalRecords"], 7);
    assert_eq!(beyond["auditMessages"].as_array().unwrap().len(), 0);

    for (query, start) in [
        (
            "startDate=20190927&endDate=2019-09-28",
            "Supported date formats",
        ),
        (
            "startDate=2019-09-27&endDate=tomorrow",
            "Supported date formats",
        ),
        (
            "startDate=2019-09-27&endDate=2019-09-28&eventId=not-a-uuid",
            "eventId must be a UUID",
        ),
        (
            "startDate=2019-09-27&endDate=2019-09-28&limit=100000",
            "limit must be",
        ),
        (
            "startDate=2019-09-27&endDate=2019-09-28&offset=-1",
            "offset must be",
        ),
    ] {
        let (code, body) = status(&app, query).await;
        assert_eq!(code, 400, "{query}");
        assert!(body.starts_with(start), "{query}: {body}");
    }
}

#[tokio::test]
async fn history_of_a_tenant_that_is_not_enabled_is_400() {
    let app = TestApp::spawn().await;
    let (code, body) = status(&app, "startDate=2019-09-27&endDate=2019-09-28").await;
    assert_eq!(code, 400);
    assert!(body.contains("not enabled"), "{body}");
}
