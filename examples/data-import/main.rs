//! FOLIO's data-import flow over pubsub: mod-data-import reads files in chunks
//! (`DI_RAW_RECORDS_CHUNK_READ`), a parser emits `DI_RAW_RECORDS_CHUNK_PARSED`, storage emits
//! `DI_PARSED_RECORDS_CHUNK_SAVED`, inventory emits `DI_COMPLETED` per record. See `flow.rs`.
//!
//! With pubsub running (`scripts/run.sh`, whose `OKAPI_URL` is http://127.0.0.1:9130, where this
//! example listens for pubsub's pushes):
//!
//! ```text
//! cargo run --release --example data-import -- --transport kafka --records 10000 --files 4
//! cargo run --release --example data-import -- --transport http --records 10000 --files 4
//! ```
//!
//! Prints one JSON line: transport, records, seconds, records per second, duplicates and the
//! process's peak RSS.

mod flow;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use flow::{Settings, Transport};

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Http,
    Kafka,
}

/// Runs FOLIO's data-import flow over pubsub's HTTP path or directly over Kafka.
#[derive(Parser)]
#[command(name = "data-import")]
struct Args {
    /// `http`: pubsub pushes to callbacks, modules publish with POST /pubsub/publish;
    /// `kafka`: modules consume and publish directly.
    #[arg(long, value_enum, default_value = "kafka")]
    transport: TransportArg,
    /// Records in all.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Files imported in parallel (the records are split between them).
    #[arg(long, default_value_t = 4)]
    files: usize,
    /// Records per DI_RAW_RECORDS_CHUNK_READ event.
    #[arg(long, default_value_t = 50)]
    chunk_size: usize,
    /// Records in flight per stage on the Kafka transport.
    #[arg(long, default_value_t = 16)]
    max_in_flight: usize,
    /// pubsub's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pubsub_url: String,
    /// Where pubsub's pushes arrive: pubsub's OKAPI_URL must point here.
    #[arg(long, default_value = "127.0.0.1:9130")]
    listen: String,
    /// Kafka's bootstrap servers (default: KAFKA_HOST:KAFKA_PORT, else localhost:9092).
    #[arg(long)]
    kafka: Option<String>,
    /// The ENV pubsub runs with.
    #[arg(long, env = "ENV", default_value = "folio")]
    env: String,
    /// The tenant (default: a new one, so every run has topics and consumer groups of its own).
    #[arg(long)]
    tenant: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if args.files == 0 || args.records < args.files || args.chunk_size == 0 {
        eprintln!(
            "data-import: --records must be at least --files, and both and --chunk-size above 0"
        );
        return ExitCode::from(2);
    }
    let bootstrap = args.kafka.clone().unwrap_or_else(|| {
        format!(
            "{}:{}",
            std::env::var("KAFKA_HOST").unwrap_or_else(|_| "localhost".into()),
            std::env::var("KAFKA_PORT").unwrap_or_else(|_| "9092".into())
        )
    });
    let tenant = args
        .tenant
        .clone()
        .unwrap_or_else(|| format!("di_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    let settings = Settings {
        transport: match args.transport {
            TransportArg::Http => Transport::Http,
            TransportArg::Kafka => Transport::Kafka,
        },
        pubsub_url: args.pubsub_url.trim_end_matches('/').to_owned(),
        bootstrap,
        env: args.env.clone(),
        tenant: tenant.clone(),
        files: args.files,
        records_per_file: args.records / args.files,
        chunk_size: args.chunk_size,
        max_in_flight: args.max_in_flight,
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("data-import: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = flow::enable_tenant(&settings.pubsub_url, &tenant).await {
        eprintln!("data-import: {e}");
        return ExitCode::FAILURE;
    }
    match flow::run(&settings, listener).await {
        Ok(report) => {
            println!(
                "{}",
                serde_json::json!({
                    "transport": settings.transport.name(),
                    "records": report.records,
                    "files": settings.files,
                    "seconds": report.elapsed.as_secs_f64(),
                    "recordsPerSecond": report.records_per_second(),
                    "duplicates": report.duplicates,
                    "peakRssMiB": peak_rss_mib(),
                    "tenant": tenant,
                })
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("data-import: {e}");
            ExitCode::FAILURE
        }
    }
}
