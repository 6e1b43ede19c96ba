//! A fake Okapi for the tests: subscriber callbacks and the system user's calls, recorded and
//! answered by plan; and the service set up to deliver to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;

use super::*;

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// What a path answers: a status per call (the last one repeats). Keys are `path`,
/// `path@tenant` (calls for that tenant) or `path#body` (calls with that body), the most
/// specific first.
type Plan = HashMap<String, Vec<u16>>;

/// A fake Okapi: subscriber callbacks (any other POST), and the mod-users, mod-login and
/// mod-permissions calls of the system user. Records every request.
#[derive(Clone, Default)]
pub struct FakeOkapi {
    pub received: Arc<Mutex<Vec<Received>>>,
    plan: Arc<Mutex<Plan>>,
    /// Calls so far per plan key (`path`, `path@tenant`, `path#body`).
    answered: Arc<Mutex<HashMap<String, usize>>>,
    /// Bodies returned by GET /users and GET /perms/users/… (else empty / 404).
    pub users: Arc<Mutex<Option<Value>>>,
    pub perms: Arc<Mutex<Option<Value>>>,
    /// Milliseconds every subscriber callback takes.
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Subscriber callbacks being answered now, and the most there were at once.
    pub concurrent: Arc<std::sync::atomic::AtomicUsize>,
    pub peak: Arc<std::sync::atomic::AtomicUsize>,
    pub base: String,
}

impl FakeOkapi {
    pub async fn start() -> FakeOkapi {
        let mut fake = FakeOkapi::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        fake.base = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::any(okapi))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    /// `path` answers these statuses in turn, then the last one forever.
    pub fn answer(&self, path: &str, statuses: &[u16]) {
        self.plan
            .lock()
            .unwrap()
            .insert(path.to_owned(), statuses.to_vec());
    }

    pub fn received_on(&self, path: &str) -> Vec<Received> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Requests on `path` for `tenant`.
    pub fn received_for(&self, path: &str, tenant: &str) -> Vec<Received> {
        self.received_on(path)
            .into_iter()
            .filter(|r| r.headers["x-okapi-tenant"] == tenant)
            .collect()
    }

    /// When each request on `path` arrived.
    pub fn arrivals(&self, path: &str) -> Vec<Instant> {
        self.received_on(path).iter().map(|r| r.at).collect()
    }

    /// `METHOD path` of every request, in order.
    pub fn calls(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    /// Waits until `path` got `count` requests (fails after `timeout`).
    pub async fn wait_for(&self, path: &str, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received_on(path);
            if got.len() >= count {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{path} received {} of {count}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn okapi(
    State(fake): State<FakeOkapi>,
    method: axum::http::Method,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use std::sync::atomic::Ordering::SeqCst;
    let path = format!("/{path}");
    let callback = method == axum::http::Method::POST
        && !path.starts_with("/authn/")
        && !path.starts_with("/perms/")
        && path != "/users";
    let delay = fake.delay_ms.load(SeqCst);
    if callback {
        let now = fake.concurrent.fetch_add(1, SeqCst) + 1;
        fake.peak.fetch_max(now, SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        fake.concurrent.fetch_sub(1, SeqCst);
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let tenant = headers
        .get("x-okapi-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let keys = [
        format!("{path}@{tenant}"),
        format!("{path}#{body}"),
        path.clone(),
    ];
    let planned = {
        let mut received = fake.received.lock().unwrap();
        received.push(Received {
            at: Instant::now(),
            method: method.to_string(),
            path: path.clone(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.clone(),
        });
        drop(received);
        // Every call counts for each of its keys, planned or not, so that a plan set later
        // goes on from the calls made so far.
        let mut answered = fake.answered.lock().unwrap();
        for key in &keys {
            *answered.entry(key.clone()).or_default() += 1;
        }
        let plan = fake.plan.lock().unwrap();
        keys.iter().find_map(|key| {
            let statuses = plan.get(key)?;
            let nth = answered[key];
            Some(statuses[(nth - 1).min(statuses.len() - 1)])
        })
    };
    let nth = fake
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == path)
        .count();
    let status = |default: u16| StatusCode::from_u16(planned.unwrap_or(default)).unwrap();
    if planned == Some(429) {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "slow down",
        )
            .into_response();
    }
    match (method.as_str(), path.as_str()) {
        ("POST", "/authn/login-with-expiry") => (
            status(201),
            [
                (
                    "set-cookie",
                    format!("folioAccessToken=token-{nth}; Max-Age=600; Path=/; HttpOnly"),
                ),
                ("content-type", "application/json".to_owned()),
            ],
            "{}",
        )
            .into_response(),
        ("GET", "/users") => {
            let users = fake
                .users
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(serde_json::json!({"users": [], "totalRecords": 0}));
            (status(200), axum::Json(users)).into_response()
        }
        ("POST", "/users") | ("POST", "/authn/credentials") | ("POST", "/perms/users") => {
            status(201).into_response()
        }
        ("PUT", p) if p.starts_with("/users/") => status(204).into_response(),
        ("PUT", p) if p.starts_with("/perms/users/") => status(200).into_response(),
        ("GET", p) if p.starts_with("/perms/users/") => match fake.perms.lock().unwrap().clone() {
            Some(perms) => (status(200), axum::Json(perms)).into_response(),
            None => (status(404), "Not found").into_response(),
        },
        _ => status(204).into_response(),
    }
}

/// A service with delivery on, pushing to `fake`, retrying after the waits of `schedule`.
pub async fn delivering_app(fake: &FakeOkapi, schedule: &str) -> TestApp {
    delivering_app_with(
        fake,
        &[
            ("DELIVERY_RETRY_SCHEDULE", schedule),
            ("DELIVERY_TIMEOUT_MS", "2000"),
        ],
    )
    .await
}

/// A service on a fresh database with delivery on, pushing to `fake`, with `settings` on top.
pub async fn delivering_app_with(fake: &FakeOkapi, settings: &[(&str, &str)]) -> TestApp {
    let db = TestDb::create().await;
    let mut env: Vec<(String, String)> = vec![
        ("DELIVERY_ENABLED".into(), "true".into()),
        ("OKAPI_URL".into(), fake.base.clone()),
    ];
    env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    TestApp::spawn_on(db, move |e| e.extend(env)).await
}

/// `/admin/metrics`, checked to be Prometheus text.
pub async fn metrics(app: &TestApp) -> String {
    let r = app
        .client
        .get(app.url("/admin/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().await.unwrap()
}
