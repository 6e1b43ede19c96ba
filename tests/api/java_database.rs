//! The service starts on a database that the Java module (Liquibase) created, and keeps its data.

use serde_json::json;

use crate::helpers::*;

/// The Java module's final tables (behaviour spec §2), as Liquibase left them.
const JAVA_MODULE_SCHEMA: &str = r#"
CREATE SCHEMA pubsub_config;
CREATE TABLE pubsub_config.databasechangelog (id varchar(255) NOT NULL, author varchar(255) NOT NULL, filename varchar(255) NOT NULL);
CREATE TABLE pubsub_config.databasechangeloglock (id integer PRIMARY KEY, locked boolean NOT NULL);
CREATE TYPE pubsub_config.module_role_enum AS ENUM ('PUBLISHER', 'SUBSCRIBER');
CREATE TABLE pubsub_config.event_descriptor (id text PRIMARY KEY, descriptor jsonb NOT NULL);
CREATE TABLE pubsub_config.messaging_module (
  id uuid PRIMARY KEY,
  event_type_id text NOT NULL,
  tenant_id text NOT NULL,
  role pubsub_config.module_role_enum NOT NULL,
  subscriber_callback text,
  module_id text NOT NULL,
  activated boolean NOT NULL DEFAULT true,
  CONSTRAINT fk_event_type_id FOREIGN KEY (event_type_id) REFERENCES pubsub_config.event_descriptor (id)
);
INSERT INTO pubsub_config.event_descriptor VALUES
  ('ITEM_CHECKED_OUT', '{"eventType":"ITEM_CHECKED_OUT","description":"Item was checked out","eventTTL":1,"signed":false,"tmp":false}'),
  ('LOAN_CLOSED', '{"eventType":"LOAN_CLOSED","eventTTL":1,"signed":false,"tmp":true}');
INSERT INTO pubsub_config.messaging_module VALUES
  ('11111111-1111-4111-8111-111111111111', 'ITEM_CHECKED_OUT', 'diku', 'PUBLISHER', '', 'mod-circulation-24.0.0', true),
  ('22222222-2222-4222-8222-222222222222', 'ITEM_CHECKED_OUT', 'diku', 'SUBSCRIBER', '/automated-patron-blocks/handlers/item-checked-out', 'mod-patron-blocks-1.0.0', true),
  ('33333333-3333-4333-8333-333333333333', 'ITEM_CHECKED_OUT', 'diku', 'SUBSCRIBER', '/automated-patron-blocks/handlers/item-checked-out', 'mod-patron-blocks-1.0.0', true);

CREATE SCHEMA diku_mod_pubsub;
CREATE TABLE diku_mod_pubsub.rmb_job (id uuid PRIMARY KEY, jsonb jsonb NOT NULL);
CREATE TYPE diku_mod_pubsub.message_state AS ENUM ('CREATED', 'PUBLISHED', 'RECEIVED', 'DELIVERED', 'REJECTED');
CREATE TABLE diku_mod_pubsub.audit_message_payload (event_id uuid PRIMARY KEY, content jsonb NOT NULL);
CREATE TABLE diku_mod_pubsub.audit_message (
  id uuid PRIMARY KEY,
  event_id uuid NOT NULL,
  event_type text NOT NULL,
  correlation_id text,
  tenant_id text NOT NULL,
  created_by text,
  audit_date timestamp without time zone NOT NULL,
  state diku_mod_pubsub.message_state NOT NULL,
  published_by text NOT NULL,
  error_message text
);
INSERT INTO diku_mod_pubsub.audit_message VALUES
  ('44444444-4444-4444-8444-444444444444', '55555555-5555-4555-8555-555555555555', 'ITEM_CHECKED_OUT', '', 'diku', '',
   '2019-09-15 13:00:00', 'PUBLISHED', 'mod-circulation-24.0.0', '');
"#;

#[tokio::test]
async fn starts_on_the_java_modules_tables_and_keeps_their_data() {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    sqlx::raw_sql(JAVA_MODULE_SCHEMA)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let app = TestApp::spawn_on(db, |_| {}).await;

    let types = app.get_json(TENANT, "/pubsub/event-types").await;
    assert_eq!(types["totalRecords"], 2);
    assert_eq!(
        app.get_json(TENANT, "/pubsub/event-types/ITEM_CHECKED_OUT")
            .await,
        json!({"eventType": "ITEM_CHECKED_OUT", "description": "Item was checked out", "eventTTL": 1, "signed": false, "tmp": false})
    );
    let pubs = app
        .get_json(TENANT, "/pubsub/event-types/ITEM_CHECKED_OUT/publishers")
        .await;
    assert_eq!(pubs["totalRecords"], 1);
    assert_eq!(
        pubs["messagingModules"][0]["id"],
        "11111111-1111-4111-8111-111111111111"
    );
    // The duplicate subscriber row the Java module allowed was folded into one.
    let subs = app
        .get_json(TENANT, "/pubsub/event-types/ITEM_CHECKED_OUT/subscribers")
        .await;
    assert_eq!(subs["totalRecords"], 1);

    // The unique registration key now exists.
    let has_key: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'messaging_module_registration_key')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(has_key);

    // Re-registering the Java module's publisher with a new version replaces its row.
    let d = descriptor("ITEM_CHECKED_OUT", "Item was checked out", 1);
    assert_eq!(
        app.post_json(TENANT, "/pubsub/event-types", &d)
            .await
            .status(),
        201
    );
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/publisher",
            &publisher("mod-circulation-25.0.0", [d]),
        )
        .await;
    assert_eq!(r.status(), 201);
    let pubs = app
        .get_json(TENANT, "/pubsub/event-types/ITEM_CHECKED_OUT/publishers")
        .await;
    assert_eq!(pubs["totalRecords"], 1);
    assert_eq!(
        pubs["messagingModules"][0]["moduleId"],
        "mod-circulation-25.0.0"
    );

    // Start-up upgraded the Java module's tenant schema without a `_tenant` call: history reads
    // the Java module's row (its `timestamp` kept, read as UTC) and the new columns are there.
    let history = app
        .get_json(
            TENANT,
            "/pubsub/history?startDate=2019-09-15&endDate=2019-09-15",
        )
        .await;
    assert_eq!(history["totalRecords"], 1, "{history}");
    assert_eq!(
        history["auditMessages"][0]["auditDate"],
        "2019-09-15T13:00:00.000+00:00"
    );
    let (audit_date_type, subscriber_column): (String, bool) = sqlx::query_as(
        "SELECT data_type::text, EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'diku_mod_pubsub' AND table_name = 'audit_message' AND column_name = 'subscriber') \
         FROM information_schema.columns WHERE table_schema = 'diku_mod_pubsub' AND table_name = 'audit_message' AND column_name = 'audit_date'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(audit_date_type, "timestamp without time zone");
    assert!(subscriber_column);
    let rmb_job_kept: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = 'diku_mod_pubsub' AND table_name = 'rmb_job')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(rmb_job_kept);

    // A restart on the now-adopted database migrates nothing twice.
    app.stop().await;
}

/// A tenant schema migrated by 3.0.0 before this change (`audit_date` converted to `timestamptz`,
/// its first migration recorded with that file's checksum) goes back to the Java module's
/// `timestamp` at the next start, keeping the instants, without a `_tenant` call.
#[tokio::test]
async fn a_schema_with_timestamptz_audit_dates_goes_back_at_start_up() {
    let app = TestApp::spawn().await;
    app.enable_tenant(TENANT).await;
    sqlx::raw_sql(
        "ALTER TABLE diku_mod_pubsub.audit_message ALTER COLUMN audit_date TYPE timestamptz USING audit_date AT TIME ZONE 'UTC';
         UPDATE diku_mod_pubsub._sqlx_migrations SET checksum = decode('3c1245ea03108121f825713a73d4238792abbb9e80cca96f31e8aa1b98a47f9111a9e9135b6ea9b72a404330fd536a82', 'hex') WHERE version = 20261126000001;
         DELETE FROM diku_mod_pubsub._sqlx_migrations WHERE version = 20261202000001;
         INSERT INTO diku_mod_pubsub.audit_message (id, event_id, event_type, tenant_id, audit_date, state, published_by)
           VALUES ('44444444-4444-4444-8444-444444444444', '55555555-5555-4555-8555-555555555555', 'T', 'diku', '2019-09-15T13:00:00+02:00', 'PUBLISHED', 'm-1.0.0');",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let restarted = app.another_instance().await;
    app.stop().await;
    let (data_type, date): (String, String) = sqlx::query_as(
        "SELECT (SELECT data_type::text FROM information_schema.columns WHERE table_schema = 'diku_mod_pubsub' AND table_name = 'audit_message' AND column_name = 'audit_date'),
                (SELECT audit_date::text FROM diku_mod_pubsub.audit_message)",
    )
    .fetch_one(&restarted.pool)
    .await
    .unwrap();
    assert_eq!(data_type, "timestamp without time zone");
    assert_eq!(date, "2019-09-15 11:00:00");
    restarted.stop().await;
}
