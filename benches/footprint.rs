//! Footprint of one instance as subscriptions grow: one subscriber module with 8 subscriptions
//! in each of N tenants (mod-patron-blocks' shape), and optionally more modules.
//!
//! Run with `scripts/bench.sh footprint`. The service runs as its own process (the release
//! binary). For each tenant count in `BENCH_TENANTS` (default `1,100,1000`), tenants are added
//! (over the HTTP API, delivery off) until there are that many, one event is written to every
//! subscribed topic, and a fresh instance is started with delivery on. Printed per count:
//!
//! * start-up until delivering: from spawning the process until every one of those events
//!   reached its callback (so every subscription of every module delivers); partitions that
//!   are new since the previous count have no committed offset yet;
//! * the same after a restart (an upgrade, a rescheduled pod): the instance is stopped, one more
//!   event is written to every subscribed topic, and a fresh instance started; every partition
//!   has a commit now;
//! * RSS (now and peak; and of the same instance with delivery off, which is what the
//!   registrations and the service itself take), threads and TCP connections to the broker, 5 s after that;
//! * CPU the idle instance uses over 10 s (what fetching many empty partitions costs).
//!
//! The delivery consumers run with the service's default `DELIVERY_FETCH_WAIT_MS` (100;
//! `BENCH_FETCH_WAIT_MS` changes it). The first count is the baseline: the table gives each figure's growth against it.
//! `BENCH_MODULES` (default 1) adds subscriber modules that subscribe to the same 8 event
//! types in the first tenant only (the rest of a FOLIO install).

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use common::{
    bootstrap, env_or, envelope_in, payload, process_cpu, raw_producer, status_kib, Service, Setup,
};
use futures::stream::{self, StreamExt};
use rdkafka::producer::FutureRecord;

const TYPES: [&str; 8] = [
    "ITEM_CHECKED_OUT",
    "ITEM_CHECKED_IN",
    "ITEM_DECLARED_LOST",
    "ITEM_AGED_TO_LOST",
    "ITEM_CLAIMED_RETURNED",
    "LOAN_DUE_DATE_CHANGED",
    "FEE_FINE_BALANCE_CHANGED",
    "LOAN_CLOSED",
];
const MODULE: &str = "mod-patron-blocks-1.0.0";

/// (callback path, event id) of every delivery.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<HashSet<(String, String)>>>);

async fn sink(State(s): State<Sink>, uri: Uri, headers: HeaderMap) -> StatusCode {
    if let Some(id) = headers
        .get("x-pubsub-event-id")
        .and_then(|v| v.to_str().ok())
    {
        s.0.lock()
            .unwrap()
            .insert((uri.path().to_owned(), id.to_owned()));
    }
    StatusCode::NO_CONTENT
}

/// Each module's callback.
fn callback(module: &str) -> String {
    format!("/{module}/handlers/events")
}

fn tenant(i: usize) -> String {
    format!("fp_t{i:04}")
}

/// The modules that subscribe in the `i`-th tenant: all of them in the first, the first module
/// (mod-patron-blocks) everywhere.
fn subscribers(modules: &[String], i: usize) -> &[String] {
    if i == 0 {
        modules
    } else {
        &modules[..1]
    }
}

/// Enables `tenant`, registers the publisher of the 8 types and `modules` as subscribers.
async fn register(service: &Service, tenant: &str, modules: &[String]) {
    service.register_publisher_of(tenant, &TYPES).await;
    for module in modules {
        service
            .subscribe_to(tenant, module, &TYPES, &callback(module))
            .await;
    }
}

/// TCP connections of `pid` to the broker's port (its sockets, matched in /proc/net/tcp*).
fn broker_connections(pid: u32, port: u16) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| {
                let link = std::fs::read_link(e.ok()?.path()).ok()?;
                let link = link.to_str()?;
                Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|cols| cols.len() > 9)
        .filter(|cols| {
            let remote_port = cols[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            remote_port == Some(port) && cols[3] == "01" && inodes.contains(&cols[9])
        })
        .count()
}

/// Writes one event into every subscribed topic of the first `count` tenants; returns the
/// (callback, event id) deliveries they must cause.
async fn publish_everywhere(
    setup: &Setup,
    producer: &rdkafka::producer::FutureProducer,
    body: &str,
    modules: &[String],
    count: usize,
) -> HashSet<(String, String)> {
    let mut expected = HashSet::new();
    let mut acks = Vec::new();
    for i in 0..count {
        let t = tenant(i);
        for event_type in TYPES {
            let id = uuid::Uuid::new_v4().to_string();
            let topic = format!("{}.Default.{t}.{event_type}", setup.env_prefix);
            let value = envelope_in(&t, event_type, &id, body);
            acks.push(
                producer
                    .send_result(FutureRecord::to(&topic).key(&id).payload(&value))
                    .map_err(|_| "queue")
                    .unwrap(),
            );
            for m in subscribers(modules, i) {
                expected.insert((callback(m), id.clone()));
            }
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    expected
}

/// Starts an instance with `env` and waits until every one of `expected` reached its callback;
/// returns it and the time from spawning the process.
async fn start_until_delivered(
    setup: &Setup,
    env: &[(&str, &str)],
    sink: &Sink,
    expected: &HashSet<(String, String)>,
    count: usize,
) -> (Service, Duration) {
    let started = Instant::now();
    let service = Service::start(setup, env).await;
    let deadline = started + Duration::from_secs(600);
    loop {
        let got = sink.0.lock().unwrap().intersection(expected).count();
        if got == expected.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{count} tenants: {got} of {} delivered",
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (service, started.elapsed())
}

struct Row {
    tenants: usize,
    topics: usize,
    startup: Duration,
    restart: Duration,
    rss: f64,
    peak: f64,
    rss_without_delivery: f64,
    threads: u64,
    connections: usize,
    idle_cpu: f64,
}

#[tokio::main]
async fn main() {
    if !common::run_as_bench("footprint") {
        return;
    }
    let counts: Vec<usize> = env_or("BENCH_TENANTS", "1,100,1000")
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    let modules: Vec<String> = (0..env_or("BENCH_MODULES", "1").parse::<usize>().unwrap())
        .map(|i| match i {
            0 => MODULE.to_owned(),
            i => format!("mod-other{i}-1.0.0"),
        })
        .collect();
    // The service's default (what a deployment on Kafka runs), not the scripts' 20 ms for
    // tansu: tansu holds each fetch this long, so every wave of partitions fetched at start-up
    // includes one such wait.
    let fetch_wait = env_or(
        "BENCH_FETCH_WAIT_MS",
        &mod_pubsub::config::DEFAULT_FETCH_WAIT_MS.to_string(),
    );
    let kafka_port: u16 = env_or("KAFKA_PORT", "9092").parse().unwrap();

    let sink_state = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let okapi = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(axum::routing::post(sink))
        .with_state(sink_state.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let setup = Setup::new().await;
    let producer = raw_producer(&bootstrap());
    let body = payload();
    let mut registered = 0usize;
    let mut rows = Vec::new();
    for &count in &counts {
        // Registrations up to `count` tenants, with delivery off.
        if registered < count {
            let started = Instant::now();
            let service = Service::start(&setup, &[("DELIVERY_ENABLED", "false")]).await;
            let service = &service;
            let modules = &modules;
            stream::iter(registered..count)
                .map(
                    |i| async move { register(service, &tenant(i), subscribers(modules, i)).await },
                )
                .buffer_unordered(4)
                .collect::<Vec<()>>()
                .await;
            eprintln!(
                "registered tenants {registered}..{count} in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            registered = count;
            // Events published before a registration's created_date are not its subscriber's.
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        let expected = publish_everywhere(&setup, &producer, &body, &modules, count).await;
        // The same instance with delivery off: what the registrations themselves cost.
        let idle = Service::start(&setup, &[("DELIVERY_ENABLED", "false")]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_without_delivery = status_kib(idle.pid(), "VmRSS:") as f64 / 1024.0;
        drop(idle);
        let delivering = [
            ("DELIVERY_ENABLED", "true"),
            ("OKAPI_URL", okapi.as_str()),
            ("DELIVERY_FETCH_WAIT_MS", fetch_wait.as_str()),
        ];
        let (service, startup) =
            start_until_delivered(&setup, &delivering, &sink_state, &expected, count).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pid = service.pid();
        let (rss, peak) = (
            status_kib(pid, "VmRSS:") as f64 / 1024.0,
            status_kib(pid, "VmHWM:") as f64 / 1024.0,
        );
        let threads = status_kib(pid, "Threads:");
        let connections = broker_connections(pid, kafka_port);
        let cpu_before = process_cpu(pid);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle_cpu = (process_cpu(pid) - cpu_before).as_secs_f64() / 10.0;
        // A restart (what an upgrade or a rescheduled pod does): every partition has a commit.
        drop(service);
        let expected = publish_everywhere(&setup, &producer, &body, &modules, count).await;
        let (service, restart) =
            start_until_delivered(&setup, &delivering, &sink_state, &expected, count).await;
        drop(service);
        let row = Row {
            tenants: count,
            topics: count * TYPES.len(),
            startup,
            restart,
            rss,
            peak,
            rss_without_delivery,
            threads,
            connections,
            idle_cpu,
        };
        eprintln!(
            "{count} tenants: delivering after {:.1} s (after a restart {:.1} s), RSS {rss:.1} MiB (peak {peak:.1}; {rss_without_delivery:.1} with delivery off), {threads} threads, {connections} broker connections, idle CPU {:.0} %",
            startup.as_secs_f64(),
            restart.as_secs_f64(),
            idle_cpu * 100.0
        );
        rows.push(row);
    }
    println!(
        "footprint: {} subscriber module(s); {MODULE} subscribes to 8 event types in every tenant",
        modules.len()
    );
    println!("| tenants | topics subscribed | start-up until every subscription delivered | the same after a restart | RSS MiB (peak) | RSS with delivery off | threads | broker connections | idle CPU (one core = 100 %) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} s | {:.1} s | {:.1} ({:.1}) | {:.1} | {} | {} | {:.0} % |",
            r.tenants,
            r.topics,
            r.startup.as_secs_f64(),
            r.restart.as_secs_f64(),
            r.rss,
            r.peak,
            r.rss_without_delivery,
            r.threads,
            r.connections,
            r.idle_cpu * 100.0
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        println!(
            "growth from {} to {} tenants: RSS ×{:.2}, threads {:+}, broker connections {:+}, start-up ×{:.1}",
            first.tenants,
            last.tenants,
            last.rss / first.rss,
            last.threads as i64 - first.threads as i64,
            last.connections as i64 - first.connections as i64,
            last.startup.as_secs_f64() / first.startup.as_secs_f64()
        );
    }
    if env_or("BENCH_KEEP", "") == "1" {
        eprintln!(
            "kept: DB_DATABASE={} ENV={}",
            setup.database, setup.env_prefix
        );
    } else {
        setup.drop_database().await;
    }
}
