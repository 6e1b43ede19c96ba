//! Starts the real service on port 0 against a fresh database on the real PostgreSQL that
//! `scripts/test.sh` provides (`DB_*` environment variables, same defaults as the service).

use std::collections::HashMap;
use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio_util::sync::CancellationToken;

pub mod events;
pub mod kafka;
pub mod okapi;

pub use events::*;
pub use okapi::*;

pub const TENANT: &str = "diku";

/// Writes `stdin` (when given) to a child started with piped standard streams, closes it, and
/// waits up to `limit` for the child's output; `what` names the command in the panic.
pub async fn finish_process(
    mut child: tokio::process::Child,
    stdin: Option<&str>,
    limit: Duration,
    what: &str,
) -> std::process::Output {
    use tokio::io::AsyncWriteExt;
    let mut input = child.stdin.take().expect("stdin piped");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.unwrap();
    }
    drop(input);
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap()
}

pub fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// Connection options of the database server, for `database` (the admin database by default).
pub fn server_options(database: &str) -> PgConnectOptions {
    PgConnectOptions::new()
        .host(&env_or("DB_HOST", "localhost"))
        .port(env_or("DB_PORT", "5432").parse().expect("DB_PORT"))
        .username(&env_or("DB_USERNAME", "folio_admin"))
        .password(&env_or("DB_PASSWORD", "folio_admin"))
        .database(database)
        .disable_statement_logging()
}

/// An empty database of its own for one test. Test databases are not dropped by the tests
/// (two concurrent `DROP DATABASE … WITH (FORCE)` stall each other for a minute); scripts/test.sh
/// drops the `pubsub_test_*` databases before and after the suite.
#[derive(Clone)]
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    /// Refuses new connections to this database and ends the existing ones (an outage).
    pub async fn take_away(&self) {
        let admin = PgPool::connect_with(server_options(&env_or("DB_DATABASE", "okapi_modules")))
            .await
            .unwrap();
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            self.name
        ))
        .execute(&admin)
        .await
        .unwrap();
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.name)
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }

    /// Ends the outage of [`TestDb::take_away`].
    pub async fn give_back(&self) {
        let admin = PgPool::connect_with(server_options(&env_or("DB_DATABASE", "okapi_modules")))
            .await
            .unwrap();
        sqlx::query(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        ))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    }

    pub async fn create() -> TestDb {
        let name = format!("pubsub_test_{}", uuid::Uuid::new_v4().simple());
        let admin_db = env_or("DB_DATABASE", "okapi_modules");
        let mut conn = PgConnection::connect_with(&server_options(&admin_db)).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL (run the tests through scripts/test.sh, which starts it): {e}")
        });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        TestDb { name }
    }

    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new()
            .max_connections(3)
            .connect_with(server_options(&self.name))
            .await
            .expect("test pool")
    }
}

/// The environment the service gets in tests.
pub fn test_env(db: &TestDb) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("DB_HOST", env_or("DB_HOST", "localhost")),
        ("DB_PORT", env_or("DB_PORT", "5432")),
        ("DB_USERNAME", env_or("DB_USERNAME", "folio_admin")),
        ("DB_PASSWORD", env_or("DB_PASSWORD", "folio_admin")),
        ("DB_DATABASE", db.name.clone()),
        ("DB_CONNECTIONTIMEOUT", "2000".into()),
        ("KAFKA_HOST", env_or("KAFKA_HOST", "localhost")),
        ("KAFKA_PORT", env_or("KAFKA_PORT", "9092")),
        ("SYSTEM_USER_NAME", "test-pubsub-username".into()),
        ("SYSTEM_USER_PASSWORD", "test-pubsub-password".into()),
        ("MAX_REQUEST_SIZE", "65536".into()),
        ("AUDIT_RETENTION_DAYS", "0".into()),
        // Delivery tests switch it on, with an Okapi of their own.
        ("DELIVERY_ENABLED", "false".into()),
        // System-user tests switch it on, with an Okapi of their own.
        ("SYSTEM_USER_CREATE", "false".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.insert("OKAPI_URL".into(), "http://127.0.0.1:9130".into());
    // Topics of concurrent tests must not meet on the shared broker.
    env.insert(
        "ENV".into(),
        format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
    );
    env.insert("KAFKA_ADMIN_TIMEOUT_MS".into(), "5000".into());
    // tansu holds every fetch for the full wait (scripts/lib.sh says the same).
    env.insert("DELIVERY_FETCH_WAIT_MS".into(), "20".into());
    env.insert("KAFKA_PUBLISH_TIMEOUT_MS".into(), "5000".into());
    env
}

/// A running service.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub pool: PgPool,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub db: TestDb,
    /// The service's environment.
    pub env: HashMap<String, String>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        let db = TestDb::create().await;
        Self::spawn_on(db, |_| {}).await
    }

    /// Starts the service on an existing database, with `tweak` applied to its environment.
    pub async fn spawn_on(db: TestDb, tweak: impl FnOnce(&mut HashMap<String, String>)) -> TestApp {
        init_test_logging();
        let mut env = test_env(&db);
        tweak(&mut env);
        let config = mod_pubsub::Config::from_map(&env).expect("test configuration");
        let service_env = env.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(mod_pubsub::run(config, listener, shutdown.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let pool = db.pool().await;
        let app = TestApp {
            base,
            client,
            pool,
            shutdown,
            handle: Some(handle),
            db,
            env: service_env,
        };
        app.wait_healthy().await;
        app
    }

    async fn wait_healthy(&self) {
        for _ in 0..300 {
            if let Ok(r) = self.client.get(self.url("/admin/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("service did not become healthy");
    }

    /// A second instance of the service on the same database and broker.
    pub async fn another_instance(&self) -> TestApp {
        let env = self.env.clone();
        Self::spawn_on(self.db.clone(), move |e| *e = env).await
    }

    /// The topic of an event type in a tenant, as the service names it.
    pub fn topic(&self, tenant: &str, event_type: &str) -> String {
        let qualifier = self
            .env
            .get("KAFKA_PRODUCER_TENANT_COLLECTION")
            .cloned()
            .unwrap_or_else(|| tenant.to_owned());
        format!("{}.Default.{qualifier}.{event_type}", self.env["ENV"])
    }

    pub fn bootstrap(&self) -> String {
        let host = self.env["KAFKA_HOST"].clone();
        format!("{host}:{}", self.env["KAFKA_PORT"])
    }

    /// Enables the service for a tenant through `_tenant` and waits for the job.
    pub async fn enable_tenant(&self, tenant: &str) {
        install(
            self,
            tenant,
            serde_json::json!({"module_to": "mod-pubsub-1.0.0"}),
        )
        .await;
    }

    /// The audit rows of an event, waiting up to 10 s until there are at least `count`.
    pub async fn audit_of(&self, tenant: &str, event_id: &str, count: usize) -> Vec<Value> {
        self.audit_until(
            tenant,
            event_id,
            &format!("at least {count} rows"),
            |rows| rows.len() >= count,
        )
        .await
    }

    /// The audit rows of an event, waiting up to 10 s until `done` (described by `what`) holds
    /// for them (they are written in the background).
    pub async fn audit_until(
        &self,
        tenant: &str,
        event_id: &str,
        what: &str,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let path =
            format!("/pubsub/history?startDate=2000-01-01&endDate=2100-01-01&eventId={event_id}");
        let mut rows = Vec::new();
        for _ in 0..200 {
            let body = self.get_json(tenant, &path).await;
            rows = body["auditMessages"].as_array().unwrap().clone();
            if done(&rows) {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("audit rows of {event_id}: not {what} within 10 s: {rows:?}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// `GET /admin/health`: its status and text.
    pub async fn health(&self) -> (reqwest::StatusCode, String) {
        let r = self
            .client
            .get(self.url("/admin/health"))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// A request with `X-Okapi-Tenant: diku`.
    pub fn req(&self, method: Method, path: &str) -> RequestBuilder {
        self.req_as(TENANT, method, path)
    }

    pub fn req_as(&self, tenant: &str, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("X-Okapi-Tenant", tenant)
            .header("Accept", "application/json, text/plain")
    }

    pub async fn get_json(&self, tenant: &str, path: &str) -> Value {
        let r = self.req_as(tenant, Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    pub async fn post_json(&self, tenant: &str, path: &str, body: &Value) -> Response {
        self.req_as(tenant, Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, tenant: &str, path: &str) -> Response {
        self.req_as(tenant, Method::DELETE, path)
            .send()
            .await
            .unwrap()
    }

    /// Stops the service gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("service task").expect("service run");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn descriptor(event_type: &str, description: &str, ttl: i64) -> Value {
    serde_json::json!({"eventType": event_type, "description": description, "eventTTL": ttl, "signed": false})
}

pub fn publisher(module_id: &str, descriptors: impl IntoIterator<Item = Value>) -> Value {
    let descriptors: Vec<Value> = descriptors.into_iter().collect();
    serde_json::json!({"moduleId": module_id, "eventDescriptors": descriptors})
}

pub fn subscriber(module_id: &str, defs: &[(&str, &str)]) -> Value {
    let defs: Vec<Value> = defs
        .iter()
        .map(|(t, cb)| serde_json::json!({"eventType": t, "callbackAddress": cb}))
        .collect();
    serde_json::json!({"moduleId": module_id, "subscriptionDefinitions": defs})
}

pub async fn total(app: &TestApp, tenant: &str, path: &str) -> i64 {
    app.get_json(tenant, path).await["totalRecords"]
        .as_i64()
        .expect("totalRecords")
}

pub async fn text(r: Response) -> String {
    r.text().await.unwrap()
}

/// `TEST_LOG=debug scripts/test.sh -- --nocapture` shows the service's logs.
fn init_test_logging() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// Polls `check` every 20 ms until it gives `Some`, failing the test with `what` after `timeout`.
/// Sync checks return `std::future::ready(…)`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_every(what, timeout, Duration::from_millis(20), check).await
}

/// [`eventually`], polling every `every`: for checks that load what they watch (metrics of
/// instances under test, a broker's metadata, a publish).
pub async fn eventually_every<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Waits until the instance at `base` answers `GET /admin/health` with 200 (a process started
/// outside [`TestApp`]).
pub async fn wait_healthy(client: &reqwest::Client, base: &str, timeout: Duration) {
    eventually_every(
        &format!("{base} becomes healthy"),
        timeout,
        Duration::from_millis(50),
        || async {
            let r = client.get(format!("{base}/admin/health")).send().await;
            r.ok().filter(|r| r.status() == 200).map(|_| ())
        },
    )
    .await
}

/// Starts an install job and polls it the way Okapi does; returns the completed job.
pub async fn install(app: &TestApp, tenant: &str, body: Value) -> Value {
    let r = app.post_json(tenant, "/_/tenant", &body).await;
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let job: Value = r.json().await.unwrap();
    assert_eq!(
        location,
        format!("/_/tenant/{}", job["id"].as_str().unwrap())
    );
    assert_eq!(job["tenant"], tenant);
    assert_eq!(job["complete"], false);
    assert_eq!(job["tenantAttributes"]["module_to"], body["module_to"]);
    let r = app
        .req_as(tenant, Method::GET, &format!("{location}?wait=30000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let done: Value = r.json().await.unwrap();
    assert_eq!(done["complete"], true, "{done}");
    assert_eq!(done["id"], job["id"]);
    assert_eq!(app.delete(tenant, &location).await.status(), 204);
    assert_eq!(
        app.req_as(tenant, Method::GET, &location)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    done
}

/// (METHOD, path) of every operation in the generated document.
pub fn routes() -> std::collections::BTreeSet<(String, String)> {
    let doc: Value = serde_json::to_value(mod_pubsub::http::openapi()).unwrap();
    let mut out = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}
