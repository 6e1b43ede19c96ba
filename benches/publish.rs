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

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env_or, envelope, payload, raw_producer, Broker, Service, Setup};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::json;

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn seconds_per_case() -> Duration {
    Duration::from_secs_f64(env_or("BENCH_SECONDS", "4").parse().unwrap_or(4.0))
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

async fn raw_awaiting(bootstrap: &str, topic: &str, concurrency: usize, duration: Duration) -> f64 {
    let producer = raw_producer(bootstrap);
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
                let value = envelope(&uuid::Uuid::new_v4().to_string(), &payload);
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

async fn raw_pipelined(bootstrap: &str, topic: &str, count: usize) -> f64 {
    let producer = raw_producer(bootstrap);
    let payload = payload();
    let start = Instant::now();
    let mut acks = Vec::with_capacity(count);
    for _ in 0..count {
        let key = uuid::Uuid::new_v4().to_string();
        let value = envelope(&uuid::Uuid::new_v4().to_string(), &payload);
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
    if !common::run_as_bench("publish") {
        return;
    }
    // A broker of the bench's own: every run starts on an empty broker (tansu slows down as its
    // memory storage fills, which made runs on a long-used broker incomparable).
    let broker = Broker::start();
    let bootstrap = broker.bootstrap();
    let setup = Setup::new().await;
    let port = broker.port.to_string();
    let service = Service::start(
        &setup,
        &[("KAFKA_HOST", "127.0.0.1"), ("KAFKA_PORT", &port)],
    )
    .await;
    service.register_publisher().await;
    let topic = setup.topic();

    let seconds = seconds_per_case();
    // Warm-up: connections, metadata, producer ids.
    http_case(&service, 4, Duration::from_millis(500)).await;
    raw_awaiting(&bootstrap, &topic, 4, Duration::from_millis(500)).await;

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
        // Interleaved halves (HTTP, raw, raw, HTTP), so a broker that slows down as it fills
        // weighs on both sides alike.
        let half = seconds / 2;
        let h1 = http_case(&service, c, half).await;
        if http_only {
            let h2 = http_case(&service, c, half).await;
            println!("| {c} | {:.0} | | | | |", (h1 + h2) / 2.0);
            continue;
        }
        let a1 = raw_awaiting(&bootstrap, &topic, c, half).await;
        let a2 = raw_awaiting(&bootstrap, &topic, c, half).await;
        let h2 = http_case(&service, c, half).await;
        let (http, awaiting) = ((h1 + h2) / 2.0, (a1 + a2) / 2.0);
        let pipelined = raw_pipelined(
            &bootstrap,
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
        "service peak RSS: {:.1} MiB; broker peak RSS: {:.1} MiB",
        service.peak_rss_mib(),
        broker.peak_rss_mib()
    );

    drop(service);
    drop(broker);
    setup.drop_database().await;
}
