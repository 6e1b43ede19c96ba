//! The service starts on a database that the Java module (Liquibase) created, and keeps its data.

use std::collections::HashMap;

use serde_json::json;

use crate::helpers::*;

const JAVA_DATABASE: &str = include_str!("../fixtures/java/java-database.sql");
const JAVA_STATEMENTS: &str = include_str!("../fixtures/java/dao-statements.sql");
const JAVA_CHANGESETS: &str = include_str!("../fixtures/java/liquibase-changesets.tsv");

/// The Java module's Liquibase changeSets: (changelog, filename, id, author).
fn java_changesets() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    JAVA_CHANGESETS
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0], f[1], f[2], f[3])
        })
        .collect()
}

fn changelog_schema(changelog: &str) -> &'static str {
    if changelog == "module" {
        "pubsub_config"
    } else {
        "diku_mod_pubsub"
    }
}

/// A database as the Java module leaves it: the fixture's tables and data, and each schema's
/// `databasechangelog` filled the way Liquibase fills it.
async fn java_database() -> TestDb {
    let db = TestDb::create().await;
    let pool = db.pool().await;
    sqlx::raw_sql(JAVA_DATABASE).execute(&pool).await.unwrap();
    for (n, (changelog, file, id, author)) in java_changesets().into_iter().enumerate() {
        sqlx::query(&format!(
            "INSERT INTO {}.databasechangelog (id, author, filename, dateexecuted, orderexecuted, exectype, liquibase) \
             VALUES ($1, $2, $3, now(), $4, 'EXECUTED', '4.19.0')",
            changelog_schema(changelog)
        ))
        .bind(id)
        .bind(author)
        .bind(file)
        .bind(n as i32 + 1)
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    db
}

/// Runs the sections of dao-statements.sql with psql, as the Java module would (`@tenant` ones
/// as the tenant's role); returns each section's output (unaligned, `|`-separated rows).
async fn run_java_statements(db: &TestDb) -> HashMap<String, Vec<String>> {
    let mut outputs = HashMap::new();
    for section in JAVA_STATEMENTS.split("\n-- @").skip(1) {
        let (header, sql) = section.split_once('\n').unwrap();
        let (who, name) = header.split_once(' ').unwrap();
        let sql = match who {
            "tenant" => format!("SET ROLE diku_mod_pubsub;\n{sql}"),
            _ => sql.to_owned(),
        };
        let out = tokio::process::Command::new("psql")
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &db.name,
                "-c",
                &sql,
            ])
            .env("PGHOST", env_or("DB_HOST", "localhost"))
            .env("PGPORT", env_or("DB_PORT", "5432"))
            .env("PGUSER", env_or("DB_USERNAME", "folio_admin"))
            .env("PGPASSWORD", env_or("DB_PASSWORD", "folio_admin"))
            .output()
            .await
            .expect("psql (PostgreSQL's client, installed with the server)");
        assert!(
            out.status.success(),
            "the Java module's statements \"{name}\" failed:\n{sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        outputs.insert(name.to_owned(), lines);
    }
    outputs
}

/// What the Java module needs to take a database over again: every changeSet of its changelogs
/// recorded once (Liquibase runs the others), RMB's `rmb_internal` row, the tenant's role.
async fn assert_java_can_take_over(pool: &sqlx::PgPool) {
    for (changelog, file, id, author) in java_changesets() {
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}.databasechangelog WHERE id = $1 AND author = $2 AND filename = $3",
            changelog_schema(changelog)
        ))
        .bind(id)
        .bind(author)
        .bind(file)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(
            rows, 1,
            "{changelog} changeSet {id} ({file}) recorded {rows} times"
        );
    }
    for schema in ["pubsub_config", "diku_mod_pubsub"] {
        let (total, locked): (i64, bool) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM {schema}.databasechangelog), \
                    (SELECT locked FROM {schema}.databasechangeloglock WHERE id = 1)"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        let listed = java_changesets()
            .into_iter()
            .filter(|c| changelog_schema(c.0) == schema)
            .count();
        assert_eq!(total as usize, listed, "{schema}.databasechangelog");
        assert!(!locked);
    }
    let rmb: (i64, Option<String>) = sqlx::query_as(
        "SELECT count(*), max(jsonb->>'moduleVersion') FROM diku_mod_pubsub.rmb_internal",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(rmb.0, 1, "one rmb_internal row");
    assert!(rmb.1.unwrap().starts_with("mod-pubsub-"));
    let role: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('diku_mod_pubsub', 'diku_mod_pubsub.audit_message', 'INSERT')",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(role, "the tenant's role may write the audit trail");
}

#[tokio::test]
async fn starts_on_the_java_modules_tables_and_keeps_their_data() {
    let app = TestApp::spawn_on(java_database().await, |_| {}).await;

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

    // Publishing writes the audit trail into the Java module's tables.
    let event_id = crate::helpers::new_id();
    let r = app
        .post_json(
            TENANT,
            "/pubsub/publish",
            &crate::helpers::event(
                &event_id,
                "ITEM_CHECKED_OUT",
                TENANT,
                "mod-circulation-25.0.0",
                "{\"id\":\"loan-2\"}",
            ),
        )
        .await;
    assert_eq!(r.status(), 204, "{}", text(r).await);
    app.audit_until(TENANT, &event_id, "a PUBLISHED row", |rows| {
        rows.iter().any(|r| r["state"] == "PUBLISHED")
    })
    .await;

    // The Java module can take the database back: its bookkeeping is untouched (nothing recorded
    // twice) and its statements still work on the tables this service extended.
    assert_java_can_take_over(&app.pool).await;
    let out = run_java_statements(&app.db).await;
    assert_eq!(out["rmb-internal"].len(), 1);
    assert!(out["rmb-internal"][0].contains("mod-pubsub-2.17.0"));

    // A restart on the adopted database migrates nothing twice.
    let restarted = app.another_instance().await;
    app.stop().await;
    assert_java_can_take_over(&restarted.pool).await;
    restarted.stop().await;
}

/// A rollback: the Java module's statements (its DAOs', RMB's tenant API's, Liquibase's) on a
/// database this service created and wrote to, and this service reading what they wrote.
#[tokio::test]
async fn the_java_modules_statements_work_on_a_database_this_service_created() {
    let app = TestApp::spawn().await;
    register_publisher(&app, TENANT, "ITEM_CHECKED_OUT", "mod-circulation-25.0.0").await;
    let r = app
        .post_json(
            TENANT,
            "/pubsub/event-types/declare/subscriber",
            &subscriber(
                "mod-patron-blocks-1.0.0",
                &[(
                    "ITEM_CHECKED_OUT",
                    "/automated-patron-blocks/handlers/item-checked-out",
                )],
            ),
        )
        .await;
    assert_eq!(r.status(), 201);
    let event_id = crate::helpers::new_id();
    let r = app
        .post_json(
            TENANT,
            "/pubsub/publish",
            &crate::helpers::event(
                &event_id,
                "ITEM_CHECKED_OUT",
                TENANT,
                "mod-circulation-25.0.0",
                "{\"id\":\"loan-1\"}",
            ),
        )
        .await;
    assert_eq!(r.status(), 204, "{}", text(r).await);
    app.audit_of(TENANT, &event_id, 1).await;

    assert_java_can_take_over(&app.pool).await;
    let out = run_java_statements(&app.db).await;
    assert_eq!(out["rmb-tenant-exists"], ["t"]);
    // Liquibase reads every tenant changeSet as ran.
    for (changelog, file, id, author) in java_changesets() {
        if changelog == "tenant" {
            let row = format!("{id}|{author}|{file}");
            assert!(
                out["liquibase-lock"].contains(&row),
                "{row} not in {:?}",
                out["liquibase-lock"]
            );
        }
    }
    // The Java module sees the registrations made through this service.
    assert!(
        out["messaging-module-subscribers"]
            .iter()
            .any(|l| l.contains("mod-patron-blocks-1.0.0")
                && l.contains("/automated-patron-blocks/handlers/item-checked-out")),
        "{:?}",
        out["messaging-module-subscribers"]
    );
    // Its history reads this service's audit rows, with dates LocalDateTime.parse takes.
    let ours: Vec<&String> = out["audit-history"]
        .iter()
        .filter(|l| l.contains(&event_id))
        .collect();
    assert!(!ours.is_empty(), "{:?}", out["audit-history"]);
    for row in ours {
        let date = row.split('|').nth(6).unwrap();
        assert!(
            chrono::NaiveDateTime::parse_from_str(date, "%Y-%m-%d %H:%M:%S%.f").is_ok(),
            "audit_date {date:?} has an offset or another form: {row}"
        );
    }
    assert_eq!(out["audit-history-date"], ["2024-01-01 10:00:00.123"]);

    // This service reads what the Java module wrote.
    let history = app
        .get_json(
            TENANT,
            "/pubsub/history?startDate=2024-01-01&endDate=2024-01-01",
        )
        .await;
    assert_eq!(history["totalRecords"], 1, "{history}");
    assert_eq!(
        history["auditMessages"][0]["auditDate"],
        "2024-01-01T10:00:00.123+00:00"
    );
    assert_eq!(
        history["auditMessages"][0]["eventType"],
        "JAVA_ROLLBACK_CHECK"
    );
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
         DELETE FROM diku_mod_pubsub._sqlx_migrations WHERE version > 20261126000003;
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

/// `mod-pubsub prepare-rollback`, with a database user that may not create roles (the tenant's
/// RMB role cannot be made; tenant enable works all the same): direct consumers (which the Java
/// module would call at `<okapi>null`) deleted, callbacks kept, the tenant without its role
/// listed with the statement that creates it.
#[tokio::test]
async fn prepare_rollback_deletes_direct_consumers_and_names_missing_roles() {
    let db = TestDb::create().await;
    let admin = db.pool().await;
    // Roles belong to the cluster: names of this run's own.
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let user = format!("pubsub_plain_{suffix}");
    let tenant = format!("norole{suffix}");
    sqlx::raw_sql(&format!(
        "CREATE ROLE {user} LOGIN PASSWORD 'plain' NOCREATEROLE; GRANT CREATE ON DATABASE {} TO {user}",
        db.name
    ))
    .execute(&admin)
    .await
    .unwrap();
    let app = TestApp::spawn_on(db, |env| {
        env.insert("DB_USERNAME".into(), user.clone());
        env.insert("DB_PASSWORD".into(), "plain".into());
    })
    .await;
    let job =
        crate::helpers::install(&app, &tenant, json!({"module_to": "mod-pubsub-3.0.0"})).await;
    assert!(job.get("error").is_none(), "{job}");
    let r = app
        .post_json(
            &tenant,
            "/pubsub/event-types/declare/subscriber",
            &json!({"moduleId": "mod-direct-1.0.0", "subscriptionDefinitions": [{"eventType": "ITEM_CHECKED_OUT"}]}),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", text(r).await);
    let r = app
        .post_json(
            &tenant,
            "/pubsub/event-types/declare/subscriber",
            &subscriber(
                "mod-patron-blocks-1.0.0",
                &[("ITEM_CHECKED_OUT", "/handlers/item-checked-out")],
            ),
        )
        .await;
    assert_eq!(r.status(), 201);
    let env = app.env.clone();
    app.stop().await;

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_mod-pubsub"))
        .arg("prepare-rollback")
        .env_clear()
        .envs(&env)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "registrations deleted (the Java module would POST their events to <okapi>null): 1"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  {tenant} mod-direct-1.0.0 ITEM_CHECKED_OUT")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "CREATE ROLE {tenant}_mod_pubsub PASSWORD '{tenant}'"
        )),
        "{stdout}"
    );
    let left: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT module_id, subscriber_callback FROM pubsub_config.messaging_module WHERE role = 'SUBSCRIBER' ORDER BY 1",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(
        left,
        [(
            "mod-patron-blocks-1.0.0".to_owned(),
            Some("/handlers/item-checked-out".to_owned())
        )]
    );
    let role: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(format!("{tenant}_mod_pubsub"))
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(!role);
}
