//! Delivery throughput and isolation against baselines measured in the same run, on the same
//! broker.
//!
//! Run with `scripts/bench.sh delivery`. The service runs as its own process.
//!
//! * Throughput: for subscribers that answer after 0, 10 and 100 ms (`BENCH_LATENCIES`), a
//!   backlog of `BENCH_BACKLOG` (default 50,000) 1 KB events is drained by the service's engine
//!   with `DELIVERY_MAX_IN_FLIGHT` = `BENCH_IN_FLIGHT` (default 64), and by a bare loop: an
//!   rdkafka consumer that POSTs with the same number in flight, keeps per-key order and stores
//!   each partition's offset up to its oldest unfinished record (what a good hand-written
//!   consumer does). The old engine's behaviour, one callback at a time per module, is measured
//!   with `DELIVERY_MAX_IN_FLIGHT=1` on a smaller backlog (its rate is steady).
//! * Isolation: publish→callback latency of a healthy tenant at 200 events/s for 10 s, while
//!   the same module answers 500 for another tenant's events (published at the same rate,
//!   retried on the production schedule), against the same run where the other tenant's events
//!   are delivered (the same load without failures), and against the tenant alone.

mod common;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::{bootstrap, envelope_of, payload, raw_producer, Service, Setup, PUBLISHER, TENANT};
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

const FAILING_TENANT: &str = "bench_failing";
/// A second tenant whose events are delivered: the isolation run's load-matched baseline.
const OTHER_TENANT: &str = "bench_other";

/// Arrival time per event id, per path; the sink's latency and the tenant it fails for.
#[derive(Clone, Default)]
struct Sink {
    arrivals: Arc<Mutex<HashMap<String, HashMap<String, Instant>>>>,
    latency_ms: Arc<std::sync::atomic::AtomicU64>,
}

async fn sink(State(s): State<Sink>, Path(path): Path<String>, headers: HeaderMap) -> StatusCode {
    let latency = s.latency_ms.load(std::sync::atomic::Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    if header("x-okapi-tenant") == FAILING_TENANT {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    s.arrivals
        .lock()
        .unwrap()
        .entry(path)
        .or_default()
        .entry(header("x-pubsub-event-id"))
        .or_insert_with(Instant::now);
    StatusCode::NO_CONTENT
}

impl Sink {
    fn count(&self, path: &str) -> usize {
        self.arrivals
            .lock()
            .unwrap()
            .get(path)
            .map_or(0, HashMap::len)
    }

    async fn wait_count(&self, path: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(path) < n {
            assert!(
                Instant::now() < deadline,
                "{path}: {} of {n}",
                self.count(path)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Events per second between the first and the last arrival on `path`.
    fn rate(&self, path: &str) -> f64 {
        let guard = self.arrivals.lock().unwrap();
        let times: Vec<Instant> = guard[path].values().copied().collect();
        let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
        times.len() as f64 / last.duration_since(*first).as_secs_f64().max(1e-6)
    }
}

fn percentile(latencies: &[Duration], p: f64) -> Duration {
    common::quantiles(latencies, &[p])[0]
}

/// What a careful hand-written consumer does: up to `in_flight` POSTs at once, records of one
/// key one after another, each partition's offset stored up to its oldest unfinished record
/// (committed every 500 ms). The engine's consumer settings, and its fetchers' queue limits
/// (`partition_queue_limits`).
async fn bare_loop(topic: &str, url: &str, n: usize, in_flight: usize) {
    let fetch_wait = Duration::from_millis(
        common::env_or("DELIVERY_FETCH_WAIT_MS", "20")
            .parse()
            .unwrap(),
    );
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap());
    mod_pubsub::kafka::at_least_once_consumer(
        &mut cfg,
        &format!("bare-{}", uuid::Uuid::new_v4()),
        fetch_wait,
    );
    let consumer: StreamConsumer = mod_pubsub::kafka::partition_queue_limits(&mut cfg)
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(in_flight.max(32))
        .build()
        .unwrap();
    let post = |msg: OwnedMessage| {
        let http = http.clone();
        async move {
            let value: serde_json::Value = serde_json::from_slice(msg.payload().unwrap()).unwrap();
            let r = http
                .post(url)
                .header("Content-Type", "application/json")
                .header("X-Okapi-Tenant", TENANT)
                .header("X-Pubsub-Event-Id", value["id"].as_str().unwrap())
                .body(value["eventPayload"].as_str().unwrap().to_owned())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            msg
        }
    };
    let mut running = FuturesUnordered::new();
    let mut waiting: HashMap<Vec<u8>, VecDeque<OwnedMessage>> = HashMap::new();
    let mut open: HashMap<i32, BTreeSet<i64>> = HashMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let (mut held, mut done) = (0usize, 0usize);
    while done < n {
        tokio::select! {
            received = consumer.recv(), if held < in_flight => {
                let msg = received.unwrap().detach();
                held += 1;
                open.entry(msg.partition()).or_default().insert(msg.offset());
                next.insert(msg.partition(), msg.offset() + 1);
                let key = msg.key().unwrap_or_default().to_vec();
                match waiting.get_mut(&key) {
                    Some(queue) => queue.push_back(msg),
                    None => {
                        waiting.insert(key, VecDeque::new());
                        running.push(post(msg));
                    }
                }
            }
            Some(msg) = running.next() => {
                held -= 1;
                done += 1;
                let partition = msg.partition();
                let offsets = open.get_mut(&partition).unwrap();
                offsets.remove(&msg.offset());
                let position = offsets.first().copied().unwrap_or(next[&partition]);
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(msg.topic(), partition, Offset::Offset(position)).unwrap();
                consumer.store_offsets(&tpl).unwrap();
                let key = msg.key().unwrap_or_default().to_vec();
                match waiting.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(following) => running.push(post(following)),
                    None => {
                        waiting.remove(&key);
                    }
                }
            }
        }
    }
}

/// Fills `event_type`'s topic with `n` events, each with its own key.
async fn backlog(setup: &Setup, event_type: &str, n: usize) {
    let topic = format!("{}.Default.{TENANT}.{event_type}", setup.env_prefix);
    let producer = raw_producer(&bootstrap());
    let body = payload();
    let mut acks = Vec::with_capacity(n);
    for _ in 0..n {
        let id = uuid::Uuid::new_v4().to_string();
        let value = envelope_of(event_type, &id, &body);
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
}

/// A registration change with delivery off (so nothing is consumed meanwhile).
async fn registrations(setup: &Setup, change: impl AsyncFnOnce(&Service)) {
    let service = Service::start(setup, &[("DELIVERY_ENABLED", "false")]).await;
    change(&service).await;
    drop(service);
    // Events published before a registration's created_date are not its subscriber's.
    tokio::time::sleep(Duration::from_millis(2500)).await;
}

/// Drains `n` events of `event_type` with the engine; events per second.
async fn drain(
    setup: &Setup,
    okapi: &str,
    sink: &Sink,
    path: &str,
    n: usize,
    in_flight: usize,
) -> f64 {
    let in_flight = in_flight.to_string();
    let service = Service::start(
        setup,
        &[
            ("DELIVERY_ENABLED", "true"),
            ("OKAPI_URL", okapi),
            ("DELIVERY_MAX_IN_FLIGHT", &in_flight),
        ],
    )
    .await;
    sink.wait_count(path, n, Duration::from_secs(1800)).await;
    drop(service);
    sink.rate(path)
}

#[tokio::main]
async fn main() {
    if !common::run_as_bench("delivery") {
        return;
    }
    let events: usize = common::env_or("BENCH_BACKLOG", "50000").parse().unwrap();
    let in_flight: usize = common::env_or("BENCH_IN_FLIGHT", "64").parse().unwrap();
    let latencies: Vec<u64> = common::env_or("BENCH_LATENCIES", "0,10,100")
        .split(',')
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let sink_state = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let okapi = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/{path}", axum::routing::post(sink))
        .with_state(sink_state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let setup = Setup::new().await;
    let types: Vec<String> = latencies.iter().map(|l| format!("BENCH_L{l}")).collect();
    let mut all_types: Vec<&str> = types.iter().map(String::as_str).collect();
    all_types.push("BENCH_ISO");
    registrations(&setup, async |s: &Service| {
        s.register_publisher_of(TENANT, &all_types).await;
        for tenant in [FAILING_TENANT, OTHER_TENANT] {
            s.register_publisher_of(tenant, &["BENCH_ISO"]).await;
        }
    })
    .await;

    let mut rows = Vec::new();
    for (&latency, event_type) in latencies.iter().zip(&types) {
        sink_state
            .latency_ms
            .store(latency, std::sync::atomic::Ordering::Relaxed);
        let (engine_module, serial_module) = (
            format!("mod-sink{latency}-1.0.0"),
            format!("mod-serial{latency}-1.0.0"),
        );
        let (engine_path, bare_path, serial_path) = (
            format!("sink{latency}"),
            format!("bare{latency}"),
            format!("serial{latency}"),
        );
        registrations(&setup, async |s: &Service| {
            s.subscribe(
                TENANT,
                &engine_module,
                event_type,
                &format!("/{engine_path}"),
            )
            .await;
        })
        .await;
        backlog(&setup, event_type, events).await;
        let engine = drain(&setup, &okapi, &sink_state, &engine_path, events, in_flight).await;
        let topic = format!("{}.Default.{TENANT}.{event_type}", setup.env_prefix);
        bare_loop(&topic, &format!("{okapi}/{bare_path}"), events, in_flight).await;
        let bare = sink_state.rate(&bare_path);
        // The old engine: one callback at a time, on a backlog of about 10 s of work.
        let serial_events = (10_000 / latency.max(1) as usize)
            .clamp(100, 10_000)
            .min(events);
        registrations(&setup, async |s: &Service| {
            s.unsubscribe(TENANT, &engine_module, event_type).await;
            s.subscribe(
                TENANT,
                &serial_module,
                event_type,
                &format!("/{serial_path}"),
            )
            .await;
        })
        .await;
        backlog(&setup, event_type, serial_events).await;
        let serial = drain(&setup, &okapi, &sink_state, &serial_path, serial_events, 1).await;
        registrations(&setup, async |s: &Service| {
            s.unsubscribe(TENANT, &serial_module, event_type).await;
        })
        .await;
        eprintln!("{latency} ms: engine {engine:.0}/s, bare {bare:.0}/s, serial {serial:.0}/s");
        rows.push((latency, engine, bare, serial));
    }
    println!(
        "delivery: backlog of {events} 1 KB events, one subscriber module, {in_flight} in flight, events/s"
    );
    println!("| subscriber answers after | engine | bare loop (same in flight, key order, commits) | engine/bare | old serial engine (1 in flight) | engine/serial |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (latency, engine, bare, serial) in rows {
        println!(
            "| {latency} ms | {engine:.0} | {bare:.0} | {:.2} | {serial:.0} | {:.1} |",
            engine / bare,
            engine / serial
        );
    }

    // Isolation: one module subscribed in two tenants; it fails for one of them.
    sink_state
        .latency_ms
        .store(10, std::sync::atomic::Ordering::Relaxed);
    registrations(&setup, async |s: &Service| {
        for tenant in [TENANT, FAILING_TENANT, OTHER_TENANT] {
            s.subscribe(tenant, "mod-iso-1.0.0", "BENCH_ISO", "/iso")
                .await;
        }
    })
    .await;
    let service = Service::start(
        &setup,
        &[("DELIVERY_ENABLED", "true"), ("OKAPI_URL", &okapi)],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the group's partitions assigned
    let (rate_per_s, seconds) = (200u64, 10u64);
    let mut results = Vec::new();
    for second in [None, Some(OTHER_TENANT), Some(FAILING_TENANT)] {
        let n = (rate_per_s * seconds) as usize;
        let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let client = reqwest::Client::new();
        let body = payload();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate_per_s));
        let mut tasks = Vec::new();
        let before = sink_state.count("iso");
        for _ in 0..n {
            tick.tick().await;
            for tenant in std::iter::once(TENANT).chain(second) {
                let id = uuid::Uuid::new_v4().to_string();
                if tenant == TENANT {
                    sent.lock().unwrap().insert(id.clone(), Instant::now());
                }
                let event = json!({"id": id, "eventType": "BENCH_ISO",
                                   "eventMetadata": {"tenantId": tenant, "eventTTL": 1, "publishedBy": PUBLISHER},
                                   "eventPayload": body});
                let (client, base) = (client.clone(), service.base.clone());
                tasks.push(tokio::spawn(async move {
                    let r = client
                        .post(format!("{base}/pubsub/publish"))
                        .header("X-Okapi-Tenant", tenant)
                        .json(&event)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 204);
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let delivered = if second == Some(OTHER_TENANT) {
            2 * n
        } else {
            n
        };
        sink_state
            .wait_count("iso", before + delivered, Duration::from_secs(120))
            .await;
        let mut latencies: Vec<Duration> = {
            let sent = sent.lock().unwrap();
            let got = sink_state.arrivals.lock().unwrap();
            sent.iter()
                .map(|(id, t)| got["iso"][id].duration_since(*t))
                .collect()
        };
        latencies.sort();
        results.push((second, latencies));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!();
    println!(
        "isolation: healthy tenant at {rate_per_s} events/s for {seconds} s, subscriber answers after 10 ms, publish → callback, ms"
    );
    println!("| run | p50 | p99 |");
    println!("|---|---:|---:|");
    for (second, l) in &results {
        let run = match *second {
            None => "the tenant alone",
            Some(OTHER_TENANT) => "another tenant's events delivered too (same rate): baseline",
            Some(_) => "same module answering 500 for another tenant (same rate)",
        };
        println!(
            "| {run} | {:.1} | {:.1} |",
            ms(percentile(l, 0.5)),
            ms(percentile(l, 0.99))
        );
    }
    let p99 = |i: usize| ms(percentile(&results[i].1, 0.99));
    println!(
        "p99 with the failing tenant ÷ baseline (same load, no failures): {:.2}; ÷ the tenant alone: {:.2}",
        p99(2) / p99(1),
        p99(2) / p99(0)
    );
    println!("service peak RSS: {:.1} MiB", service.peak_rss_mib());
    drop(service);
    setup.drop_database().await;
}
