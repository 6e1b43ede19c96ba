//! The audit trail: rows survive a database outage (queued, retried), old rows are purged.

use std::time::Duration;

use crate::helpers::*;
use crate::helpers::{event, new_id, register_publisher};

#[tokio::test]
async fn audit_rows_wait_for_the_database_instead_of_being_lost() {
    let app = TestApp::spawn().await;
    register_publisher(&app, "diku", "AUDITED", "m-1.0.0").await;

    app.db.take_away().await;

    // Publishing needs no database round trip: it goes on while the database is away.
    let ids: Vec<String> = (0..5).map(|_| new_id()).collect();
    for id in &ids {
        let r = app
            .post_json(
                "diku",
                "/pubsub/publish",
                &event(id, "AUDITED", "diku", "m-1.0.0", "{}"),
            )
            .await;
        assert_eq!(r.status(), 204);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.db.give_back().await;

    for id in &ids {
        let rows = app.audit_of("diku", id, 2).await;
        let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["CREATED", "PUBLISHED"], "{id}");
    }
}

#[tokio::test]
async fn rows_past_retention_are_purged() {
    let app = TestApp::spawn().await;
    app.enable_tenant("diku").await;
    let old_event = new_id();
    let new_event = new_id();
    for (event_id, age_days) in [(&old_event, 40), (&new_event, 1)] {
        sqlx::query(
            "INSERT INTO diku_mod_pubsub.audit_message (id, event_id, event_type, tenant_id, audit_date, state, published_by) \
             VALUES ($1, $2::uuid, 'T', 'diku', (now() AT TIME ZONE 'UTC') - make_interval(days => $3), 'PUBLISHED', 'm-1.0.0')",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(event_id)
        .bind(age_days)
        .execute(&app.pool)
        .await
        .unwrap();
        sqlx::query("INSERT INTO diku_mod_pubsub.audit_message_payload (event_id, content) VALUES ($1::uuid, '{}')")
            .bind(event_id)
            .execute(&app.pool)
            .await
            .unwrap();
    }
    // An instance with a 30-day retention purges at start-up.
    let mut env = app.env.clone();
    env.insert("AUDIT_RETENTION_DAYS".into(), "30".into());
    let _purger = TestApp::spawn_on(app.db.clone(), move |e| *e = env).await;
    let left: Vec<String> = eventually_every(
        "one payload is left after the purge",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let left: Vec<String> = sqlx::query_scalar(
                "SELECT event_id::text FROM diku_mod_pubsub.audit_message_payload ORDER BY 1",
            )
            .fetch_all(&app.pool)
            .await
            .unwrap();
            (left.len() == 1).then_some(left)
        },
    )
    .await;
    assert_eq!(
        left,
        vec![new_event.clone()],
        "the old event's payload goes with its rows"
    );
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT event_id::text FROM diku_mod_pubsub.audit_message")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![new_event]);
}
