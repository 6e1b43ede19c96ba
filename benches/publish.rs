//! HTTP publish throughput against raw Kafka producers, in the same run, on the same broker.
//!
//! Run with `scripts/bench.sh publish` (it starts PostgreSQL and the broker and builds the
//! release binary). The service runs as its own process (`target/release/mod-pubsub`), so its
//! peak RSS is its own. For each concurrency (1, 16, 64) the bench measures, for a fixed time:
//!
//! * HTTP: `POST /pubsub/publish` of a 1 KB payload, each client awaiting its 204;
//! * (a) a raw rdkafka producer with the service's settings, each task awaiting its ack;
//! * (b) a raw producer pipelining freely (queue everything, then await all acks).
//!
//! and prints events/s and the ratios HTTP/(a) and HTTP/(b).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde_json::json;
use sqlx::{Connection, PgConnection};

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

fn seconds_per_case() -> Duration {
    Duration::from_secs_f64(env_or("BENCH_SECONDS", "4").parse().unwrap_or(4.0))
}

struct Service {
    child: Child,
    base: String,
}

impl Service {
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

async fn start_service(database: &str, env_prefix: &str) -> Service {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = format!("{}/target/release/mod-pubsub", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(&bin)
        .args(["serve", "--port", &port.to_string()])
        .env("DB_DATABASE", database)
        .env("DB_MAXPOOLSIZE", "10")
        .env("ENV", env_prefix)
        .env("SYSTEM_USER_CREATE", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {bin} (build it with cargo build --release): {e}")
        });
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{base}/admin/health")).send().await {
            if r.status() == 200 {
                return Service { child, base };
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("service did not start");
}

fn payload() -> String {
    let filler = "x".repeat(900);
    json!({"loanId": "8b1d3b4e-1c33-4f2a-9a55-3c1e5a0b6f11", "note": filler}).to_string()
}

async fn http_case(service: &Service, concurrency: usize, duration: Duration) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let payload = payload();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, done, base, payload) = (
            client.clone(),
            done.clone(),
            service.base.clone(),
            payload.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let event = json!({
                    "id": uuid::Uuid::new_v4().to_string(),
                    "eventType": "BENCH_EVENT",
                    "eventMetadata": {"tenantId": "bench", "eventTTL": 1, "publishedBy": "mod-bench-1.0.0"},
                    "eventPayload": payload,
                });
                let r = client
                    .post(format!("{base}/pubsub/publish"))
                    .header("X-Okapi-Tenant", "bench")
                    .json(&event)
                    .send()
                    .await
                    .expect("publish");
                assert_eq!(r.status(), 204, "{}", r.text().await.unwrap_or_default());
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn raw_producer() -> FutureProducer {
    // The service's producer settings (src/kafka/producer.rs).
    ClientConfig::new()
        .set(
            "bootstrap.servers",
            format!(
                "{}:{}",
                env_or("KAFKA_HOST", "localhost"),
                env_or("KAFKA_PORT", "9092")
            ),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()
        .expect("producer")
}

fn envelope(payload: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "eventType": "BENCH_EVENT",
        "eventMetadata": {"tenantId": "bench", "eventTTL": 1, "publishedBy": "mod-bench-1.0.0"},
        "eventPayload": payload,
    }))
    .unwrap()
}

async fn raw_awaiting(topic: &str, concurrency: usize, duration: Duration) -> f64 {
    let producer = raw_producer();
    let done = Arc::new(AtomicU64::new(0));
    let payload = payload();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (producer, done, topic, payload) = (
            producer.clone(),
            done.clone(),
            topic.to_owned(),
            payload.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let key = uuid::Uuid::new_v4().to_string();
                let value = envelope(&payload);
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Timeout::After(Duration::from_secs(10)),
                    )
                    .await
                    .expect("ack");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn raw_pipelined(topic: &str, count: usize) -> f64 {
    let producer = raw_producer();
    let payload = payload();
    let start = Instant::now();
    let mut acks = Vec::with_capacity(count);
    for _ in 0..count {
        let key = uuid::Uuid::new_v4().to_string();
        let value = envelope(&payload);
        acks.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&value))
                .map_err(|_| "queue full")
                .unwrap(),
        );
    }
    for a in acks {
        a.await.expect("delivery").expect("ack");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: nothing to measure then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("publish benchmark: run it with scripts/bench.sh publish");
        return;
    }
    let database = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin_opts = sqlx::postgres::PgConnectOptions::new()
        .host(&env_or("DB_HOST", "localhost"))
        .port(env_or("DB_PORT", "5432").parse().unwrap())
        .username(&env_or("DB_USERNAME", "folio_admin"))
        .password(&env_or("DB_PASSWORD", "folio_admin"));
    let mut admin = PgConnection::connect_with(
        &admin_opts
            .clone()
            .database(&env_or("DB_DATABASE", "okapi_modules")),
    )
    .await
    .expect("PostgreSQL (run through scripts/bench.sh)");
    sqlx::query(&format!("CREATE DATABASE {database}"))
        .execute(&mut admin)
        .await
        .unwrap();

    let env_prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let service = start_service(&database, &env_prefix).await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        client
            .post(format!("{}{path}", service.base))
            .header("X-Okapi-Tenant", "bench")
            .json(&body)
            .send()
    };
    let job: serde_json::Value = post("/_/tenant", json!({"module_to": "mod-pubsub-1.0.0"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    client
        .get(format!(
            "{}/_/tenant/{}?wait=30000",
            service.base,
            job["id"].as_str().unwrap()
        ))
        .header("X-Okapi-Tenant", "bench")
        .send()
        .await
        .unwrap();
    let d = json!({"eventType": "BENCH_EVENT", "description": "bench", "eventTTL": 1});
    assert_eq!(
        post("/pubsub/event-types", d.clone())
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        post(
            "/pubsub/event-types/declare/publisher",
            json!({"moduleId": "mod-bench-1.0.0", "eventDescriptors": [d]})
        )
        .await
        .unwrap()
        .status(),
        201
    );
    let topic = format!("{env_prefix}.Default.bench.BENCH_EVENT");

    let seconds = seconds_per_case();
    // Warm-up: connections, metadata, producer ids.
    http_case(&service, 4, Duration::from_millis(500)).await;
    raw_awaiting(&topic, 4, Duration::from_millis(500)).await;

    println!(
        "publish throughput, 1 KB payloads, {:.0} s per case, events/s",
        seconds.as_secs_f64()
    );
    println!("| concurrency | HTTP publish | (a) raw, awaiting each | (b) raw, pipelined | HTTP/(a) | HTTP/(b) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    // BENCH_CONCURRENCY=64 runs one concurrency; BENCH_ONLY=http skips the raw producers (profiling).
    let only: Option<usize> = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok());
    let http_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "http");
    for c in CONCURRENCY
        .into_iter()
        .filter(|c| only.is_none_or(|o| o == *c))
    {
        let http = http_case(&service, c, seconds).await;
        if http_only {
            println!("| {c} | {http:.0} | | | | |");
            continue;
        }
        let awaiting = raw_awaiting(&topic, c, seconds).await;
        let pipelined = raw_pipelined(
            &topic,
            (awaiting * seconds.as_secs_f64()).clamp(5_000.0, 100_000.0) as usize,
        )
        .await;
        println!(
            "| {c} | {http:.0} | {awaiting:.0} | {pipelined:.0} | {:.2} | {:.2} |",
            http / awaiting,
            http / pipelined
        );
    }
    println!(
        "service peak RSS: {:.1} MiB",
        service.peak_rss_kib() as f64 / 1024.0
    );

    drop(service);
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .execute(&mut admin)
        .await;
}
