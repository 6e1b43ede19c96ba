//! HTTP publish throughput against raw Kafka producers, in the same run, on the same broker.
//!
//! Run with `scripts/bench.sh publish` (it starts PostgreSQL and the broker and builds the
//! release binary). The service runs as its own process (`target/release/mod-pubsub`), so its
//! peak RSS is its own. For each concurrency (1, 16, 64) the bench measures, for a fixed time:
//!
//! * HTTP: `POST /pubsub/publish` of a 1 KB payload, each client awaiting its 204 (one keep-alive
//!   connection per client);
//! * (a) a raw rdkafka producer with the service's settings, each task awaiting its ack;
//! * (b) a raw producer pipelining freely (queue everything, then await all acks);
//!
//! (a) and (b) write the records the service writes: the same envelope, a key and the same headers.
//!
//! and prints events/s, the ratios HTTP/(a) and HTTP/(b), and the CPU time per event of the
//! service, of its PostgreSQL backends and of this process (the HTTP load generator during the
//! HTTP case, the producer during (a)). The CPU figures are divided by the number of
//! events measured; they depend much less on what else runs on the machine than events/s do.
//! HTTP and (a) alternate in `BENCH_ROUNDS` slices (default 4) of each case's `BENCH_SECONDS`
//! (default 4), so that drift of the shared machine or the broker hits both alike.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    env_or, envelope, payload, raw_producer, Broker, CpuSample, Service, Setup, EVENT_TYPE,
    PUBLISHER, TENANT,
};
use mod_pubsub::kafka::folio_headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONCURRENCY: [usize; 3] = [1, 16, 64];

/// Every 204 of the run, warm-up included (per-event figures of a profiled service).
static PUBLISHED: AtomicU64 = AtomicU64::new(0);

/// Each case's time is split into this many slices, HTTP and (a) alternating, so that a slow
/// spell of the shared machine or the broker hits both sides alike.
fn rounds() -> u32 {
    env_or("BENCH_ROUNDS", "4").parse().unwrap_or(4).max(1)
}

fn seconds_per_case() -> Duration {
    Duration::from_secs_f64(env_or("BENCH_SECONDS", "4").parse().unwrap_or(4.0))
}

/// The HTTP load generator, as lean as `wrk`: one keep-alive HTTP/1.1 connection per client,
/// each client writing a pre-built request (only the event id's bytes change) and reading the
/// response with `httparse`. It shares the two cores with the service, so every microsecond it
/// spends is taken from the service being measured.
async fn http_case(service: &Service, concurrency: usize, duration: Duration) -> (u64, Duration) {
    const ID: &str = "00000000-0000-0000-0000-000000000000";
    let body = json!({
        "id": ID,
        "eventType": EVENT_TYPE,
        "eventMetadata": {"tenantId": TENANT, "eventTTL": 1, "publishedBy": PUBLISHER},
        "eventPayload": payload(),
    })
    .to_string();
    let addr = service.base.trim_start_matches("http://").to_owned();
    let request = Arc::new(format!(
        "POST /pubsub/publish HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         x-okapi-tenant: {TENANT}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    let id_at = request.find(ID).expect("id in the template");
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (done, addr, request) = (done.clone(), addr.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            tcp.set_nodelay(true).unwrap();
            let mut request = request.as_bytes().to_vec();
            let mut response = Vec::with_capacity(4096);
            while Instant::now() < deadline {
                uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut request[id_at..id_at + ID.len()]);
                tcp.write_all(&request).await.expect("send");
                let (status, body) = read_response(&mut tcp, &mut response).await;
                assert_eq!(status, 204, "{body}");
                done.fetch_add(1, Ordering::Relaxed);
                PUBLISHED.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (done.load(Ordering::Relaxed), start.elapsed())
}

/// Reads one HTTP/1.1 response from a keep-alive connection: its status and (for error
/// messages) its body, which is `Content-Length` long (the service never chunks a response).
async fn read_response(tcp: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    buf.clear();
    loop {
        if tcp.read_buf(buf).await.expect("receive") == 0 {
            panic!("the service closed the connection");
        }
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head) = parsed.parse(buf).expect("an HTTP response") else {
            continue;
        };
        let status = parsed.code.expect("status");
        let length: usize = parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .expect("content-length")
            });
        while buf.len() < head + length {
            if tcp.read_buf(buf).await.expect("receive") == 0 {
                panic!("the service closed the connection");
            }
        }
        assert_eq!(buf.len(), head + length, "one response at a time");
        return (status, String::from_utf8_lossy(&buf[head..]).into_owned());
    }
}

/// `OKAPI_URL` as the service (which inherits this process's environment) writes it in the
/// `x-okapi-url` header.
fn okapi_url() -> String {
    std::env::var("OKAPI_URL")
        .unwrap_or_else(|_| "http://localhost:9130".into())
        .trim_end_matches('/')
        .to_owned()
}

async fn raw_awaiting(
    producer: &FutureProducer,
    topic: &str,
    concurrency: usize,
    duration: Duration,
) -> (u64, Duration) {
    let done = Arc::new(AtomicU64::new(0));
    let payload = payload();
    let okapi = Arc::new(okapi_url());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (producer, done, topic, payload, okapi) = (
            producer.clone(),
            done.clone(),
            topic.to_owned(),
            payload.clone(),
            okapi.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let key = uuid::Uuid::new_v4().to_string();
                let value = envelope(&uuid::Uuid::new_v4().to_string(), &payload);
                producer
                    .send(
                        FutureRecord::to(&topic)
                            .key(&key)
                            .payload(&value)
                            .headers(folio_headers(TENANT, Some(&okapi))),
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
    (done.load(Ordering::Relaxed), start.elapsed())
}

async fn raw_pipelined(producer: &FutureProducer, topic: &str, count: usize) -> f64 {
    let payload = payload();
    let okapi = okapi_url();
    let start = Instant::now();
    let mut acks = Vec::with_capacity(count);
    for _ in 0..count {
        let key = uuid::Uuid::new_v4().to_string();
        let value = envelope(&uuid::Uuid::new_v4().to_string(), &payload);
        acks.push(
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(&key)
                        .payload(&value)
                        .headers(folio_headers(TENANT, Some(&okapi))),
                )
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
    // A broker of the bench's own: every run starts on an empty broker (tansu keeps every record
    // in memory and slows down as it fills, which made runs on a long-used broker incomparable).
    let broker = Broker::start();
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
    // One raw producer for the run, like the service's: its start (metadata, producer id) is
    // not measured.
    let producer = raw_producer(&broker.bootstrap());
    raw_awaiting(&producer, &topic, 4, Duration::from_millis(500)).await;

    println!(
        "publish throughput, 1 KB payloads, {:.0} s per case (HTTP and (a) alternating in {} slices), events/s",
        seconds.as_secs_f64(),
        rounds()
    );
    println!("| concurrency | HTTP publish | (a) raw, awaiting each | (b) raw, pipelined | HTTP/(a) | HTTP/(b) | CPU µs/event: service | PostgreSQL | HTTP load generator | (a) producer |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cpu = || CpuSample::now(service.pid(), &setup.database);
    let per_event = |d: Duration, events: u64| d.as_secs_f64() * 1e6 / events.max(1) as f64;
    // BENCH_CONCURRENCY=64 runs one concurrency; BENCH_ONLY=http skips the raw producers (profiling).
    let only: Option<usize> = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok());
    let http_only = std::env::var("BENCH_ONLY").is_ok_and(|v| v == "http");
    let slice = seconds / rounds();
    for c in CONCURRENCY
        .into_iter()
        .filter(|c| only.is_none_or(|o| o == *c))
    {
        let (mut http_events, mut http_time, mut http_cpu) = (0, Duration::ZERO, CpuSample::ZERO);
        let (mut raw_events, mut raw_time, mut raw_cpu) = (0, Duration::ZERO, CpuSample::ZERO);
        for _ in 0..rounds() {
            let before = cpu();
            let (n, t) = http_case(&service, c, slice).await;
            (http_events, http_time, http_cpu) = (
                http_events + n,
                http_time + t,
                http_cpu.plus(cpu().since(before)),
            );
            if http_only {
                continue;
            }
            let before = cpu();
            let (n, t) = raw_awaiting(&producer, &topic, c, slice).await;
            (raw_events, raw_time, raw_cpu) = (
                raw_events + n,
                raw_time + t,
                raw_cpu.plus(cpu().since(before)),
            );
        }
        let http = http_events as f64 / http_time.as_secs_f64();
        let (service_us, postgres_us, client_us) = (
            per_event(http_cpu.service, http_events),
            per_event(http_cpu.postgres, http_events),
            per_event(http_cpu.bench, http_events),
        );
        if http_only {
            println!("| {c} | {http:.0} | | | | | {service_us:.0} | {postgres_us:.0} | {client_us:.0} | |");
            continue;
        }
        let awaiting = raw_events as f64 / raw_time.as_secs_f64();
        let producer_us = per_event(raw_cpu.bench, raw_events);
        let pipelined = raw_pipelined(
            &producer,
            &topic,
            (awaiting * seconds.as_secs_f64()).clamp(5_000.0, 100_000.0) as usize,
        )
        .await;
        println!(
            "| {c} | {http:.0} | {awaiting:.0} | {pipelined:.0} | {:.2} | {:.2} | {service_us:.0} | {postgres_us:.0} | {client_us:.0} | {producer_us:.0} |",
            http / awaiting,
            http / pipelined
        );
    }
    println!(
        "service peak RSS: {:.1} MiB; {} HTTP publishes in this run, warm-up included",
        service.peak_rss_mib(),
        PUBLISHED.load(Ordering::Relaxed)
    );

    println!(
        "broker peak RSS: {:.1} MiB",
        broker.pid().map_or(0.0, common::peak_rss_mib)
    );
    drop(service);
    setup.drop_database().await;
    drop(broker);
}
