//! Delivery throughput and latency against bare loops, in the same run, on the same broker.
//!
//! Run with `scripts/bench.sh delivery`. The service runs as its own process.
//!
//! * Throughput: a backlog of `BENCH_BACKLOG` (default 50,000) 1 KB events is drained to a fast
//!   local subscriber (an axum server in this process) by the service's delivery engine, and by a
//!   bare loop: an rdkafka consumer that POSTs each record and commits, one at a time (the
//!   engine's concurrency per subscriber).
//! * Latency at a fixed rate (200 events/s for 10 s): HTTP publish to callback, against raw
//!   produce to consume.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::{
    bootstrap, envelope, payload, raw_producer, Service, Setup, EVENT_TYPE, PUBLISHER, TENANT,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::ClientConfig;
use serde_json::json;

/// Arrival time per event id, per path.
type Arrivals = Arc<Mutex<HashMap<String, HashMap<String, Instant>>>>;

async fn sink(
    State(arrivals): State<Arrivals>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> StatusCode {
    let id = headers
        .get("x-pubsub-event-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    arrivals
        .lock()
        .unwrap()
        .entry(path)
        .or_default()
        .entry(id)
        .or_insert_with(Instant::now);
    StatusCode::NO_CONTENT
}

fn count(arrivals: &Arrivals, path: &str) -> usize {
    arrivals.lock().unwrap().get(path).map_or(0, HashMap::len)
}

async fn wait_count(arrivals: &Arrivals, path: &str, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while count(arrivals, path) < n {
        assert!(
            Instant::now() < deadline,
            "{path}: {} of {n}",
            count(arrivals, path)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Events per second between the first and the last arrival on `path`.
fn rate(arrivals: &Arrivals, path: &str) -> f64 {
    let guard = arrivals.lock().unwrap();
    let times: Vec<Instant> = guard[path].values().copied().collect();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    times.len() as f64 / last.duration_since(*first).as_secs_f64().max(1e-6)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A one-at-a-time consumer that POSTs every record to `url` and stores its offset (committed
/// every 500 ms, as the engine does).
async fn bare_loop(topic: &str, url: &str, n: usize) {
    // The engine's consumer settings.
    let fetch_wait = Duration::from_millis(
        common::env_or("DELIVERY_FETCH_WAIT_MS", "20")
            .parse()
            .unwrap(),
    );
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap());
    let consumer: StreamConsumer = mod_pubsub::kafka::at_least_once_consumer(
        &mut cfg,
        &format!("bare-{}", uuid::Uuid::new_v4()),
        fetch_wait,
    )
    .create()
    .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let http = reqwest::Client::new();
    for _ in 0..n {
        let msg = consumer.recv().await.unwrap();
        let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
        let r = http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Pubsub-Event-Id", value["id"].as_str().unwrap())
            .body(value["eventPayload"].as_str().unwrap().to_owned())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        consumer.store_offset_from_message(&msg).unwrap();
    }
}

#[tokio::main]
async fn main() {
    if !common::run_as_bench("delivery") {
        return;
    }
    let backlog: usize = common::env_or("BENCH_BACKLOG", "50000").parse().unwrap();
    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let okapi = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(sink))
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let setup = Setup::new().await;
    let topic = setup.topic();
    {
        // Register with delivery off, then fill the backlog.
        let service = Service::start(&setup, &[("DELIVERY_ENABLED", "false")]).await;
        service.register_publisher().await;
        let r = service
            .post(
                "/pubsub/event-types/declare/subscriber",
                json!({"moduleId": "mod-sink-1.0.0", "subscriptionDefinitions": [{"eventType": EVENT_TYPE, "callbackAddress": "/sink"}]}),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await; // after the registration's created_date
    let producer = raw_producer(&bootstrap());
    let body = payload();
    let mut acks = Vec::with_capacity(backlog);
    for _ in 0..backlog {
        let id = uuid::Uuid::new_v4().to_string();
        let value = envelope(&id, &body);
        acks.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&id).payload(&value))
                .map_err(|_| "queue")
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }

    // The engine drains the backlog.
    let service = Service::start(
        &setup,
        &[("DELIVERY_ENABLED", "true"), ("OKAPI_URL", &okapi)],
    )
    .await;
    wait_count(&arrivals, "sink", backlog, Duration::from_secs(600)).await;
    let engine = rate(&arrivals, "sink");
    // The bare loop drains the same backlog.
    bare_loop(&topic, &format!("{okapi}/bare"), backlog).await;
    let bare = rate(&arrivals, "bare");

    println!("delivery: backlog of {backlog} 1 KB events, one subscriber, events/s");
    println!("| engine | bare loop (consume, POST, commit) | engine/bare |");
    println!("|---:|---:|---:|");
    println!("| {engine:.0} | {bare:.0} | {:.2} |", engine / bare);

    // Latency at a fixed rate: HTTP publish → callback, against raw produce → consume.
    let (rate_per_s, seconds) = (200u64, 10u64);
    let n = (rate_per_s * seconds) as usize;
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate_per_s));
    let mut tasks = Vec::new();
    for _ in 0..n {
        tick.tick().await;
        let id = uuid::Uuid::new_v4().to_string();
        sent.lock().unwrap().insert(id.clone(), Instant::now());
        let event = json!({"id": id, "eventType": EVENT_TYPE,
                           "eventMetadata": {"tenantId": TENANT, "eventTTL": 1, "publishedBy": PUBLISHER},
                           "eventPayload": body});
        let (client, base) = (client.clone(), service.base.clone());
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/pubsub/publish"))
                .header("X-Okapi-Tenant", TENANT)
                .json(&event)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 204);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    wait_count(&arrivals, "sink", backlog + n, Duration::from_secs(120)).await;
    let http_latencies = {
        let sent = sent.lock().unwrap();
        let got = arrivals.lock().unwrap();
        let mut l: Vec<Duration> = sent
            .iter()
            .map(|(id, t)| got["sink"][id].duration_since(*t))
            .collect();
        l.sort();
        l
    };

    // Raw: a consumer from the end of the topic, a producer at the same rate.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", format!("latency-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let raw_sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let raw_got: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let got = raw_got.clone();
    let consuming = tokio::spawn(async move {
        loop {
            let msg = consumer.recv().await.unwrap();
            let key = String::from_utf8_lossy(msg.key().unwrap_or_default()).into_owned();
            got.lock().unwrap().insert(key, Instant::now());
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await; // partition assignment
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate_per_s));
    for _ in 0..n {
        tick.tick().await;
        let id = uuid::Uuid::new_v4().to_string();
        let value = envelope(&id, &body);
        raw_sent.lock().unwrap().insert(id.clone(), Instant::now());
        producer
            .send(
                FutureRecord::to(&topic).key(&id).payload(&value),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while raw_got.lock().unwrap().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consuming.abort();
    let raw_latencies = {
        let sent = raw_sent.lock().unwrap();
        let got = raw_got.lock().unwrap();
        let mut l: Vec<Duration> = sent
            .iter()
            .filter_map(|(id, t)| Some(got.get(id)?.duration_since(*t)))
            .collect();
        l.sort();
        l
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!("latency at {rate_per_s} events/s for {seconds} s, ms");
    println!("| path | p50 | p99 |");
    println!("|---|---:|---:|");
    println!(
        "| HTTP publish → subscriber callback | {:.1} | {:.1} |",
        ms(percentile(&http_latencies, 0.5)),
        ms(percentile(&http_latencies, 0.99))
    );
    println!(
        "| raw produce → consume ({} of {n} seen) | {:.1} | {:.1} |",
        raw_latencies.len(),
        ms(percentile(&raw_latencies, 0.5)),
        ms(percentile(&raw_latencies, 0.99))
    );
    println!("service peak RSS: {:.1} MiB", service.peak_rss_mib());
    drop(service);
    setup.drop_database().await;
}
