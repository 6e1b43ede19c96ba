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
//! and prints events/s, the ratios HTTP/(a) and HTTP/(b), the median and 99th percentile of the
//! time from sending to the answer (the 204, the acknowledgement) of HTTP and (a), and the CPU
//! time per event of the service, of its PostgreSQL backends, of the broker and of this process
//! (the HTTP load generator during the HTTP case, the producer during (a)). The CPU figures are divided by the number of
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
async fn http_case(service: &Service, concurrency: usize, duration: Duration) -> Measured {
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
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (addr, request) = (addr.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            tcp.set_nodelay(true).unwrap();
            let mut request = request.as_bytes().to_vec();
            let mut response = Vec::with_capacity(4096);
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break latencies;
                }
                uuid::Uuid::new_v4()
                    .hyphenated()
                    .encode_lower(&mut request[id_at..id_at + ID.len()]);
                tcp.write_all(&request).await.expect("send");
                let (status, body) = read_response(&mut tcp, &mut response).await;
                assert_eq!(status, 204, "{body}");
                latencies.push(sent.elapsed());
                PUBLISHED.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    Measured::collect(tasks, start).await
}

/// What one slice of a case measured: each event's time from sending to its answer, and the
/// slice's duration.
#[derive(Default)]
struct Measured {
    latencies: Vec<Duration>,
    elapsed: Duration,
}

impl Measured {
    async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Duration>>>, start: Instant) -> Self {
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await.unwrap());
        }
        Measured {
            latencies,
            elapsed: start.elapsed(),
        }
    }

    fn add(&mut self, slice: Measured) {
        self.latencies.extend(slice.latencies);
        self.elapsed += slice.elapsed;
    }

    fn events(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn rate(&self) -> f64 {
        self.events() as f64 / self.elapsed.as_secs_f64()
    }

    /// "p50 / p99" in milliseconds.
    fn percentiles(&mut self) -> String {
        if self.latencies.is_empty() {
            return "-".into();
        }
        let q = common::quantiles(&self.latencies, &[0.5, 0.99]);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!("{:.2} / {:.1}", ms(q[0]), ms(q[1]))
    }
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
) -> Measured {
    let payload = payload();
    let okapi = Arc::new(okapi_url());
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (producer, topic, payload, okapi) = (
            producer.clone(),
            topic.to_owned(),
            payload.clone(),
            okapi.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break latencies;
                }
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
                latencies.push(sent.elapsed());
            }
        }));
    }
    Measured::collect(tasks, start).await
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
    println!("| concurrency | HTTP publish | (a) raw, awaiting each | (b) raw, pipelined | HTTP/(a) | HTTP/(b) | ms p50 / p99: HTTP | (a) | CPU µs/event: service | PostgreSQL | broker (HTTP) | HTTP load generator | (a) producer | broker (a) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let broker_pid = broker.pid();
    let cpu = || CpuSample::now(service.pid(), broker_pid, &setup.database);
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
        let (mut http_run, mut http_cpu) = (Measured::default(), CpuSample::ZERO);
        let (mut raw_run, mut raw_cpu) = (Measured::default(), CpuSample::ZERO);
        for _ in 0..rounds() {
            let before = cpu();
            http_run.add(http_case(&service, c, slice).await);
            http_cpu = http_cpu.plus(cpu().since(before));
            if http_only {
                continue;
            }
            let before = cpu();
            raw_run.add(raw_awaiting(&producer, &topic, c, slice).await);
            raw_cpu = raw_cpu.plus(cpu().since(before));
        }
        let (http, http_events) = (http_run.rate(), http_run.events());
        let (service_us, postgres_us, broker_us, client_us) = (
            per_event(http_cpu.service, http_events),
            per_event(http_cpu.postgres, http_events),
            per_event(http_cpu.broker, http_events),
            per_event(http_cpu.bench, http_events),
        );
        let http_latency = http_run.percentiles();
        if http_only {
            println!("| {c} | {http:.0} | | | | | {http_latency} | | {service_us:.0} | {postgres_us:.0} | {broker_us:.0} | {client_us:.0} | | |");
            continue;
        }
        let (awaiting, raw_events) = (raw_run.rate(), raw_run.events());
        let (producer_us, raw_broker_us) = (
            per_event(raw_cpu.bench, raw_events),
            per_event(raw_cpu.broker, raw_events),
        );
        let raw_latency = raw_run.percentiles();
        let pipelined = raw_pipelined(
            &producer,
            &topic,
            (awaiting * seconds.as_secs_f64()).clamp(5_000.0, 100_000.0) as usize,
        )
        .await;
        println!(
            "| {c} | {http:.0} | {awaiting:.0} | {pipelined:.0} | {:.2} | {:.2} | {http_latency} | {raw_latency} | {service_us:.0} | {postgres_us:.0} | {broker_us:.0} | {client_us:.0} | {producer_us:.0} | {raw_broker_us:.0} |",
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
