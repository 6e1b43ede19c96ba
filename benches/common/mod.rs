//! What the benches share: a fresh database, the release service as its own process, the
//! tenant and registrations, a raw producer with the service's settings.

#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};

pub const TENANT: &str = "bench";
pub const EVENT_TYPE: &str = "BENCH_EVENT";
pub const PUBLISHER: &str = "mod-bench-1.0.0";

pub fn env_or(var: &str, default: &str) -> String {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

/// `cargo test --all-targets` runs bench targets too, without `--bench`: nothing to measure then.
pub fn run_as_bench(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        println!("{name} benchmark: run it with scripts/bench.sh {name}");
    }
    yes
}

pub fn bootstrap() -> String {
    format!(
        "{}:{}",
        env_or("KAFKA_HOST", "localhost"),
        env_or("KAFKA_PORT", "9092")
    )
}

/// A database and a topic prefix of the bench's own.
pub struct Setup {
    pub database: String,
    pub env_prefix: String,
    admin: PgConnection,
}

impl Setup {
    async fn delete_topics(&self) {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        let Ok(admin) = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .create::<AdminClient<DefaultClientContext>>()
        else {
            return;
        };
        let prefix = format!("{}.", self.env_prefix);
        let Ok(metadata) = admin
            .inner()
            .fetch_metadata(None, rdkafka::util::Timeout::After(Duration::from_secs(10)))
        else {
            return;
        };
        let ours: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        if ours.is_empty() {
            return;
        }
        let names: Vec<&str> = ours.iter().map(String::as_str).collect();
        match admin.delete_topics(&names, &AdminOptions::new()).await {
            Ok(results) => eprintln!(
                "bench topics deleted: {} of {}",
                results.iter().filter(|r| r.is_ok()).count(),
                names.len()
            ),
            Err(e) => eprintln!(
                "could not delete the {} bench topics {prefix}*: {e}",
                names.len()
            ),
        }
    }

    pub async fn new() -> Setup {
        let database = format!("bench_{}", uuid::Uuid::new_v4().simple());
        let opts = sqlx::postgres::PgConnectOptions::new()
            .host(&env_or("DB_HOST", "localhost"))
            .port(env_or("DB_PORT", "5432").parse().unwrap())
            .username(&env_or("DB_USERNAME", "folio_admin"))
            .password(&env_or("DB_PASSWORD", "folio_admin"))
            .database(&env_or("DB_DATABASE", "okapi_modules"));
        let mut admin = PgConnection::connect_with(&opts)
            .await
            .expect("PostgreSQL (run through scripts/bench.sh)");
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let env_prefix = format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        Setup {
            database,
            env_prefix,
            admin,
        }
    }

    pub fn topic(&self) -> String {
        format!("{}.Default.{TENANT}.{EVENT_TYPE}", self.env_prefix)
    }

    /// Drops the bench's database and deletes its topics (the broker may keep every record in
    /// memory: a bench run writes some 100 MB).
    pub async fn drop_database(mut self) {
        self.delete_topics().await;
        let _ = sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.database
        ))
        .execute(&mut self.admin)
        .await;
    }
}

pub struct Service {
    child: Child,
    pub base: String,
    /// One client for every request (a new client loads the system's root certificates: about
    /// 60 ms of CPU each).
    pub http: reqwest::Client,
}

impl Service {
    /// Starts `target/release/mod-pubsub serve` with `extra` environment variables.
    pub async fn start(setup: &Setup, extra: &[(&str, &str)]) -> Service {
        let port = free_port();
        // BENCH_SERVICE_BIN runs another build; BENCH_SERVICE_WRAPPER prefixes the command,
        // e.g. `valgrind --tool=callgrind --separate-threads=yes` (profiling).
        let bin = std::env::var("BENCH_SERVICE_BIN").unwrap_or_else(|_| {
            format!("{}/target/release/mod-pubsub", env!("CARGO_MANIFEST_DIR"))
        });
        let wrapper = env_or("BENCH_SERVICE_WRAPPER", "");
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut cmd = Command::new(program);
                cmd.args(words).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        cmd.args(["serve", "--port", &port.to_string()])
            .env("DB_DATABASE", &setup.database)
            .env("DB_MAXPOOLSIZE", "10")
            .env("ENV", &setup.env_prefix)
            .env("SYSTEM_USER_CREATE", "false")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {bin} (build it with cargo build --release): {e}")
        });
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        for _ in 0..2400 {
            if let Ok(r) = client.get(format!("{base}/admin/health")).send().await {
                if r.status() == 200 {
                    return Service {
                        child,
                        base,
                        http: client,
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("service did not start");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.child.id())
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.post_as(TENANT, path, body).await
    }

    pub async fn post_as(&self, tenant: &str, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("X-Okapi-Tenant", tenant)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Enables `tenant` and registers the bench publisher of `event_types` there (one
    /// declaration: a module's declaration replaces its earlier ones).
    pub async fn register_publisher_of(&self, tenant: &str, event_types: &[&str]) {
        let job: Value = self
            .post_as(
                tenant,
                "/_/tenant",
                json!({"module_to": "mod-pubsub-1.0.0"}),
            )
            .await
            .json()
            .await
            .unwrap();
        let r = self
            .http
            .get(format!(
                "{}/_/tenant/{}?wait=30000",
                self.base,
                job["id"].as_str().unwrap()
            ))
            .header("X-Okapi-Tenant", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "tenant job of {tenant}");
        let descriptors: Vec<Value> = event_types
            .iter()
            .map(|t| json!({"eventType": t, "description": "bench", "eventTTL": 1}))
            .collect();
        for d in &descriptors {
            assert_eq!(
                self.post_as(tenant, "/pubsub/event-types", d.clone())
                    .await
                    .status(),
                201,
                "event type in {tenant}"
            );
        }
        let r = self
            .post_as(
                tenant,
                "/pubsub/event-types/declare/publisher",
                json!({"moduleId": PUBLISHER, "eventDescriptors": descriptors}),
            )
            .await;
        assert_eq!(r.status(), 201, "publisher in {tenant}");
    }

    /// Declares `module` as subscriber of `event_type` in `tenant`, pushed to `callback`.
    pub async fn subscribe(&self, tenant: &str, module: &str, event_type: &str, callback: &str) {
        self.subscribe_to(tenant, module, &[event_type], callback)
            .await;
    }

    /// Declares `module` as subscriber of all `event_types` in `tenant` (one declaration: it
    /// replaces the module's earlier ones), pushed to `callback`.
    pub async fn subscribe_to(
        &self,
        tenant: &str,
        module: &str,
        event_types: &[&str],
        callback: &str,
    ) {
        let definitions: Vec<Value> = event_types
            .iter()
            .map(|t| json!({"eventType": t, "callbackAddress": callback}))
            .collect();
        let r = self
            .post_as(
                tenant,
                "/pubsub/event-types/declare/subscriber",
                json!({"moduleId": module, "subscriptionDefinitions": definitions}),
            )
            .await;
        assert_eq!(r.status(), 201, "subscriber {module} in {tenant}");
    }

    /// Removes `module`'s subscription to `event_type` in `tenant`.
    pub async fn unsubscribe(&self, tenant: &str, module: &str, event_type: &str) {
        let r = self
            .http
            .delete(format!(
                "{}/pubsub/event-types/{event_type}/subscribers?moduleId={module}",
                self.base
            ))
            .header("X-Okapi-Tenant", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }

    /// Enables the tenant and registers the bench publisher.
    pub async fn register_publisher(&self) {
        self.register_publisher_of(TENANT, &[EVENT_TYPE]).await;
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

/// The `quantiles` (0–1) of `latencies`, from an HDR histogram in microseconds (3 significant
/// digits); empty input gives zeros.
#[allow(dead_code)]
pub fn quantiles(latencies: &[Duration], quantiles: &[f64]) -> Vec<Duration> {
    // Bounded, because `saturating_record` clamps to the highest trackable value instead of
    // resizing: an auto-resizing histogram (`new(3)`, which starts at 2 µs) recorded every
    // latency as 2 µs.
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .expect("a 3-digit histogram up to an hour");
    for l in latencies {
        h.saturating_record(u64::try_from(l.as_micros()).unwrap_or(u64::MAX).max(1));
    }
    quantiles
        .iter()
        .map(|&q| {
            if h.is_empty() {
                Duration::ZERO
            } else {
                Duration::from_micros(h.value_at_quantile(q))
            }
        })
        .collect()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A number field of `/proc/{pid}/status`, in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A process's peak resident memory (VmHWM) in MiB; zero when it is gone.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_kib(pid, "VmHWM:") as f64 / 1024.0
}

/// The PostgreSQL server's processes; with `database`, only the backends connected to it.
pub fn postgres_pids(database: Option<&str>) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter(|pid| {
            database.is_none_or(|db| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.starts_with("postgres:") && c.split_whitespace().any(|w| w == db)
                })
            })
        })
        .collect()
}

/// Brokers of the bench's own (memory storage, a free port), as the tests start them: every run
/// starts on an empty broker and the broker's peak RSS is the run's.
#[path = "../../tests/api/helpers/kafka.rs"]
#[allow(dead_code)]
mod kafka_util;
#[allow(unused_imports)]
pub use kafka_util::OwnBroker as Broker;

/// CPU time (user + system, all threads) a process has used so far; zero if it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may contain spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU time so far of the PostgreSQL backends connected to `database` (the service's pool).
pub fn postgres_cpu(database: &str) -> Duration {
    postgres_pids(Some(database))
        .into_iter()
        .map(process_cpu)
        .sum()
}

/// CPU used by the service, its PostgreSQL backends and this process (the load generator or
/// the raw producer) between two points.
#[derive(Clone, Copy)]
pub struct CpuSample {
    pub service: Duration,
    pub postgres: Duration,
    pub broker: Duration,
    pub bench: Duration,
}

impl CpuSample {
    pub fn now(service_pid: u32, broker_pid: Option<u32>, database: &str) -> CpuSample {
        CpuSample {
            service: process_cpu(service_pid),
            postgres: postgres_cpu(database),
            broker: broker_pid.map_or(Duration::ZERO, process_cpu),
            bench: process_cpu(std::process::id()),
        }
    }

    pub const ZERO: CpuSample = CpuSample {
        service: Duration::ZERO,
        postgres: Duration::ZERO,
        broker: Duration::ZERO,
        bench: Duration::ZERO,
    };

    pub fn plus(self, other: CpuSample) -> CpuSample {
        CpuSample {
            service: self.service + other.service,
            postgres: self.postgres + other.postgres,
            broker: self.broker + other.broker,
            bench: self.bench + other.bench,
        }
    }

    pub fn since(self, earlier: CpuSample) -> CpuSample {
        CpuSample {
            service: self.service.saturating_sub(earlier.service),
            postgres: self.postgres.saturating_sub(earlier.postgres),
            broker: self.broker.saturating_sub(earlier.broker),
            bench: self.bench.saturating_sub(earlier.bench),
        }
    }
}

/// About 1 KB of payload.
pub fn payload() -> String {
    json!({"loanId": "8b1d3b4e-1c33-4f2a-9a55-3c1e5a0b6f11", "note": "x".repeat(900)}).to_string()
}

/// The service's producer settings (src/kafka/producer.rs).
pub fn raw_producer(bootstrap: &str) -> FutureProducer {
    mod_pubsub::kafka::idempotent_producer(ClientConfig::new().set("bootstrap.servers", bootstrap))
        .create()
        .expect("producer")
}

/// An Event envelope as the service writes it.
pub fn envelope(id: &str, payload: &str) -> Vec<u8> {
    envelope_of(EVENT_TYPE, id, payload)
}

/// An Event envelope of `event_type` as the service writes it.
pub fn envelope_of(event_type: &str, id: &str, payload: &str) -> Vec<u8> {
    envelope_in(TENANT, event_type, id, payload)
}

/// An Event envelope of `event_type` in `tenant` as the service writes it.
pub fn envelope_in(tenant: &str, event_type: &str, id: &str, payload: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "eventType": event_type,
        "eventMetadata": {"tenantId": tenant, "eventTTL": 1, "publishedBy": PUBLISHER,
                          "publishedDate": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3f+00:00").to_string()},
        "eventPayload": payload,
    }))
    .unwrap()
}
