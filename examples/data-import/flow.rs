//! FOLIO's data-import flow over pubsub, in one of two transports.
//!
//! mod-data-import reads each file in chunks and emits `DI_RAW_RECORDS_CHUNK_READ`; the parser
//! (mod-source-record-manager) emits `DI_RAW_RECORDS_CHUNK_PARSED`; storage
//! (mod-source-record-storage) emits `DI_PARSED_RECORDS_CHUNK_SAVED`; inventory emits one
//! `DI_COMPLETED` per record, which mod-data-import counts per job.
//!
//! * [`Transport::Http`]: the modules register callback addresses; pubsub's delivery engine
//!   pushes every event to them (through "Okapi", the listener this flow serves), and they
//!   publish with `POST /pubsub/publish`.
//! * [`Transport::Kafka`]: the modules register without callback addresses (direct consumers;
//!   pubsub still creates the topics), then publish with [`DirectPublisher`] and consume with
//!   [`DirectConsumer`].
//!
//! Flow control is back-pressure, not a blocking queue: a reader holds one chunk per file and
//! reads the next once Kafka acknowledged the last; each stage handles at most `max_in_flight`
//! records at once and reads no more of a partition that holds that many unfinished (pubsub's
//! engine does the same with `DELIVERY_MAX_IN_FLIGHT` per module); the topics are the buffers
//! between the stages.
//!
//! Shared by the example's binary (`main.rs`) and the integration test
//! `tests/api/data_import.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use futures::stream::{self, StreamExt};
use mod_pubsub::client::{
    ConsumerOptions, DirectConsumer, DirectPublisher, MessagingDescriptor, OutgoingEvent,
    Registrar, Subscription,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const CHUNK_READ: &str = "DI_RAW_RECORDS_CHUNK_READ";
pub const CHUNK_PARSED: &str = "DI_RAW_RECORDS_CHUNK_PARSED";
pub const CHUNK_SAVED: &str = "DI_PARSED_RECORDS_CHUNK_SAVED";
pub const COMPLETED: &str = "DI_COMPLETED";

/// The modules of the flow: (module id, event type it consumes, callback path, event type it
/// publishes).
const MODULES: [(&str, &str, &str, &str); 4] = [
    (
        "mod-source-record-manager-3.8.0",
        CHUNK_READ,
        "/change-manager/handlers/raw-records-chunk-read",
        CHUNK_PARSED,
    ),
    (
        "mod-source-record-storage-5.8.0",
        CHUNK_PARSED,
        "/source-storage/handlers/parsed-records-chunk",
        CHUNK_SAVED,
    ),
    (
        "mod-inventory-20.2.0",
        CHUNK_SAVED,
        "/inventory/handlers/records-saved",
        COMPLETED,
    ),
    (
        "mod-data-import-3.0.0",
        COMPLETED,
        "/data-import/handlers/completed",
        CHUNK_READ,
    ),
];
const DATA_IMPORT: &str = "mod-data-import-3.0.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Kafka,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub transport: Transport,
    /// pubsub's base URL (registration, tenant init, and publishing on the HTTP transport).
    pub pubsub_url: String,
    /// Kafka's bootstrap servers and the `ENV` pubsub runs with.
    pub bootstrap: String,
    pub env: String,
    pub tenant: String,
    pub files: usize,
    pub records_per_file: usize,
    pub chunk_size: usize,
    /// Records in flight per stage (Kafka transport).
    pub max_in_flight: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub records: usize,
    /// From the first chunk read to the last record completed.
    pub elapsed: Duration,
    /// `DI_COMPLETED` events that arrived for a record already completed (at-least-once).
    pub duplicates: usize,
}

impl Report {
    pub fn records_per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64()
    }
}

/// Enables the tenant in pubsub (`POST /_/tenant`, then waits for the job).
pub async fn enable_tenant(pubsub_url: &str, tenant: &str) -> Result<(), String> {
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{pubsub_url}/_/tenant"))
        .header("X-Okapi-Tenant", tenant)
        .json(&json!({"module_to": "mod-pubsub-1.0.0"}))
        .send()
        .await
        .map_err(|e| format!("pubsub at {pubsub_url}: {e}"))?;
    if r.status() == StatusCode::NO_CONTENT {
        return Ok(());
    }
    let job: Value = r.json().await.map_err(|e| e.to_string())?;
    let id = job["id"].as_str().ok_or(format!("no tenant job: {job}"))?;
    let done: Value = http
        .get(format!("{pubsub_url}/_/tenant/{id}?wait=60000"))
        .header("X-Okapi-Tenant", tenant)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    match done["error"].as_str() {
        None if done["complete"] == true => Ok(()),
        _ => Err(format!("tenant init failed: {done}")),
    }
}

/// Registers the flow's modules with pubsub, with callback addresses on the HTTP transport and
/// as direct consumers on the Kafka transport. pubsub creates the topics.
pub async fn register(settings: &Settings) -> Result<(), String> {
    let registrar = Registrar::new(&settings.pubsub_url, &settings.tenant, None);
    for (module, consumes, callback, publishes) in MODULES {
        let descriptor = MessagingDescriptor {
            publications: vec![
                json!({"eventType": publishes, "description": publishes, "eventTTL": 1, "signed": false}),
            ],
            subscriptions: vec![Subscription {
                event_type: consumes.to_owned(),
                callback_address: match settings.transport {
                    Transport::Http => Some(callback.to_owned()),
                    Transport::Kafka => None,
                },
            }],
        };
        registrar
            .register(module, &descriptor)
            .await
            .map_err(|e| format!("registering {module}: {e}"))?;
    }
    Ok(())
}

/// How the modules publish.
enum Publisher {
    Http {
        http: reqwest::Client,
        url: String,
        tenant: String,
    },
    Kafka(DirectPublisher),
}

impl Publisher {
    /// Publishes `(key, payload)` events and waits until all are acknowledged.
    async fn publish(
        &self,
        event_type: &str,
        module: &str,
        events: Vec<(String, String)>,
    ) -> Result<(), String> {
        match self {
            Publisher::Kafka(p) => {
                let batch: Vec<OutgoingEvent> = events
                    .into_iter()
                    .map(|(key, payload)| OutgoingEvent::new(event_type, module, payload).key(key))
                    .collect();
                for r in p.send_batch(&batch).await {
                    r.map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Publisher::Http { http, url, tenant } => {
                let results: Vec<Result<(), String>> = stream::iter(events)
                    .map(|(key, payload)| async move {
                        let event = json!({
                            "id": uuid::Uuid::new_v4().to_string(),
                            "eventType": event_type,
                            "eventMetadata": {"tenantId": tenant, "eventTTL": 1, "publishedBy": module},
                            "eventPayload": payload,
                        });
                        let r = http
                            .post(url)
                            .header("X-Okapi-Tenant", tenant)
                            .header("X-Pubsub-Partition-Key", key)
                            .json(&event)
                            .send()
                            .await
                            .map_err(|e| e.to_string())?;
                        if r.status() == StatusCode::NO_CONTENT {
                            Ok(())
                        } else {
                            Err(format!("publish answered {}", r.status()))
                        }
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
                results.into_iter().collect()
            }
        }
    }
}

/// What mod-data-import knows of its jobs.
#[derive(Default)]
struct Jobs {
    expected: usize,
    done: HashMap<String, HashSet<String>>,
    completed: usize,
    duplicates: usize,
}

struct Flow {
    publisher: Publisher,
    jobs: Mutex<Jobs>,
    all_done: tokio::sync::Notify,
}

impl Flow {
    /// One stage: what the module consuming `event_type` does with an event's payload.
    async fn handle(&self, event_type: &str, payload: &str) -> Result<(), String> {
        let p: Value = serde_json::from_str(payload).map_err(|e| format!("payload: {e}"))?;
        let job = p["jobId"].as_str().ok_or("no jobId")?.to_owned();
        let (module, _, _, next) = MODULES
            .iter()
            .copied()
            .find(|(_, consumes, _, _)| *consumes == event_type)
            .ok_or("unknown event type")?;
        match event_type {
            CHUNK_READ => {
                let records: Vec<Value> = p["records"]
                    .as_array()
                    .ok_or("no records")?
                    .iter()
                    .map(|raw| parse_record(raw.as_str().unwrap_or_default()))
                    .collect();
                let out = json!({"jobId": job, "chunk": p["chunk"], "records": records});
                self.publisher
                    .publish(next, module, vec![(job, out.to_string())])
                    .await
            }
            CHUNK_PARSED => {
                let mut records = p["records"].as_array().ok_or("no records")?.clone();
                for r in &mut records {
                    r["snapshotId"] = json!(job);
                    r["state"] = json!("ACTUAL");
                }
                let out = json!({"jobId": job, "chunk": p["chunk"], "records": records});
                self.publisher
                    .publish(next, module, vec![(job, out.to_string())])
                    .await
            }
            CHUNK_SAVED => {
                let completed: Vec<(String, String)> = p["records"]
                    .as_array()
                    .ok_or("no records")?
                    .iter()
                    .map(|r| {
                        let out = json!({"jobId": job, "recordId": r["id"], "instanceId": uuid::Uuid::new_v4()});
                        // Records are independent: keyed by record, they spread over partitions
                        // and are handled side by side.
                        (r["id"].as_str().unwrap_or_default().to_owned(), out.to_string())
                    })
                    .collect();
                self.publisher.publish(next, module, completed).await
            }
            COMPLETED => {
                let record = p["recordId"].as_str().ok_or("no recordId")?.to_owned();
                let mut jobs = self.jobs.lock().unwrap();
                if jobs.done.entry(job).or_default().insert(record) {
                    jobs.completed += 1;
                    if jobs.completed == jobs.expected {
                        self.all_done.notify_one();
                    }
                } else {
                    jobs.duplicates += 1;
                }
                Ok(())
            }
            _ => Err(format!("no stage consumes {event_type}")),
        }
    }

    /// mod-data-import reads one file: chunk after chunk, each published before the next is
    /// read.
    async fn read_file(&self, job: String, settings: &Settings) -> Result<(), String> {
        let chunks = settings.records_per_file.div_ceil(settings.chunk_size);
        for chunk in 0..chunks {
            let first = chunk * settings.chunk_size;
            let last = (first + settings.chunk_size).min(settings.records_per_file);
            let records: Vec<String> = (first..last).map(|n| raw_record(&job, n)).collect();
            let payload = json!({"jobId": job, "chunk": chunk, "records": records});
            self.publisher
                .publish(
                    CHUNK_READ,
                    DATA_IMPORT,
                    vec![(job.clone(), payload.to_string())],
                )
                .await?;
        }
        Ok(())
    }
}

/// A MARC-like raw record of about 250 bytes.
fn raw_record(job: &str, n: usize) -> String {
    format!(
        "=LDR  00000nam  2200000   4500|=001  {job}-{n:07}|=245  10$aRecord {n} of an import$cData import example|=260  $aChicago$bFOLIO$c2026|=650  0$aLibraries$xAutomation|=999  ff$i{n}"
    )
}

fn parse_record(raw: &str) -> Value {
    let fields: Vec<Value> = raw
        .split('|')
        .filter_map(|f| f.strip_prefix('='))
        .map(|f| {
            let (tag, rest) = f.split_at(3.min(f.len()));
            json!({"tag": tag, "content": rest.trim()})
        })
        .collect();
    json!({"id": uuid::Uuid::new_v4(), "recordType": "MARC_BIB", "parsedRecord": {"fields": fields}})
}

/// Runs the whole import: registers the modules, starts them, reads the files and waits until
/// every record is completed. On the HTTP transport pubsub must deliver to `okapi` (its
/// `OKAPI_URL` must point there).
pub async fn run(settings: &Settings, okapi: TcpListener) -> Result<Report, String> {
    register(settings).await?;
    let publisher = match settings.transport {
        Transport::Http => Publisher::Http {
            http: reqwest::Client::new(),
            url: format!("{}/pubsub/publish", settings.pubsub_url),
            tenant: settings.tenant.clone(),
        },
        Transport::Kafka => Publisher::Kafka(
            DirectPublisher::new(&settings.bootstrap, &settings.env, &settings.tenant)
                .map_err(|e| e.to_string())?,
        ),
    };
    let expected = settings.files * settings.records_per_file;
    let flow = Arc::new(Flow {
        publisher,
        jobs: Mutex::new(Jobs {
            expected: settings.chunk_size,
            ..Jobs::default()
        }),
        all_done: tokio::sync::Notify::new(),
    });
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    match settings.transport {
        Transport::Http => {
            let mut router = Router::new();
            for (_, consumes, callback, _) in MODULES {
                router = router.route(
                    callback,
                    post(
                        move |State(flow): State<Arc<Flow>>, _: HeaderMap, body: Bytes| async move {
                            let payload = String::from_utf8_lossy(&body);
                            match flow.handle(consumes, &payload).await {
                                Ok(()) => StatusCode::NO_CONTENT,
                                Err(e) => {
                                    eprintln!("{consumes}: {e}");
                                    StatusCode::INTERNAL_SERVER_ERROR
                                }
                            }
                        },
                    ),
                );
            }
            let app = router.with_state(flow.clone());
            let s = stop.clone();
            tasks.spawn(async move {
                axum::serve(okapi, app)
                    .with_graceful_shutdown(s.cancelled_owned())
                    .await
                    .map_err(|e| e.to_string())
            });
        }
        Transport::Kafka => {
            drop(okapi);
            for (module, consumes, _, _) in MODULES {
                let options = ConsumerOptions {
                    max_in_flight: settings.max_in_flight,
                    retry_schedule: vec![Duration::from_millis(200), Duration::from_secs(1)],
                    ..ConsumerOptions::default()
                };
                let name = module.rsplit_once('-').map_or(module, |(n, _)| n);
                let consumer = DirectConsumer::with_options(
                    &settings.bootstrap,
                    &settings.env,
                    name,
                    Some(&settings.tenant),
                    &[consumes],
                    options,
                )
                .map_err(|e| e.to_string())?;
                let (flow, s) = (flow.clone(), stop.clone());
                tasks.spawn(async move {
                    consumer
                        .run(
                            |received| {
                                let flow = flow.clone();
                                async move {
                                    let payload = received.event.event_payload.unwrap_or_default();
                                    flow.handle(consumes, &payload).await
                                }
                            },
                            s,
                        )
                        .await
                        .map_err(|e| e.to_string())
                });
            }
        }
    }

    // A warm-up job of one chunk goes through first, so that both transports start timing
    // with their consumer groups joined and their connections open.
    let warm_up = {
        let done = flow.all_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        let one = Settings {
            records_per_file: settings.chunk_size,
            ..settings.clone()
        };
        tokio::time::timeout(settings.timeout, async {
            flow.read_file(uuid::Uuid::new_v4().to_string(), &one)
                .await?;
            done.await;
            Ok::<(), String>(())
        })
        .await
        .map_err(|_| "the warm-up job did not complete".to_owned())
        .and_then(|r| r)
    };
    let warm_up_records = settings.chunk_size;
    flow.jobs.lock().unwrap().expected = warm_up_records + expected;

    let started = Instant::now();
    let done = flow.all_done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let readers = (0..settings.files).map(|_| {
        let flow = flow.clone();
        async move {
            flow.read_file(uuid::Uuid::new_v4().to_string(), settings)
                .await
        }
    });
    let read = futures::future::try_join_all(readers);
    let outcome = tokio::time::timeout(settings.timeout, async {
        warm_up?;
        read.await?;
        done.await;
        Ok::<(), String>(())
    })
    .await;
    let elapsed = started.elapsed();
    stop.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            eprintln!("module stopped: {e}");
        }
    }
    let jobs = flow.jobs.lock().unwrap();
    match outcome {
        Ok(Ok(())) => Ok(Report {
            records: jobs.completed - warm_up_records,
            elapsed,
            duplicates: jobs.duplicates,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "timed out after {:?}: {} of {expected} records completed",
            settings.timeout,
            jobs.completed.saturating_sub(warm_up_records)
        )),
    }
}
