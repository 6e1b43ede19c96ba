//! The data-import flow end to end (examples/data-import), over pubsub's HTTP publish/push path
//! and over direct Kafka, 10,000 and 100,000 records, in the same run.
//!
//! Run with `scripts/bench.sh data_import`. Every run of the flow gets processes of its own:
//! a tansu broker (memory storage), a database, the release service (`mod-pubsub serve`) and the
//! example's release binary (the four FOLIO modules in one process), so each process's peak RSS
//! belongs to that run. PostgreSQL is shared: its figure is the peak of the sum of its
//! processes' anonymous memory, sampled every 100 ms. Sizes: `BENCH_DI_RECORDS` (default
//! `10000,100000`). Prints a Markdown table and writes the chart `docs/data-import-bench.svg`.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{env_or, free_port, peak_rss_mib, postgres_pids, status_kib, Broker, Service, Setup};
use plotters::prelude::*;
use serde_json::Value;

const FILES: usize = 4;
const CHUNK: usize = 50;

/// Samples the sum of PostgreSQL's processes' anonymous memory until stopped; returns the peak.
struct PgSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl PgSampler {
    fn start() -> PgSampler {
        let (stop, peak_kib) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let sum: u64 = postgres_pids(None)
                    .into_iter()
                    .map(|pid| status_kib(pid, "RssAnon:"))
                    .sum();
                p.fetch_max(sum, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        PgSampler {
            stop,
            peak_kib,
            thread,
        }
    }

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

#[derive(Debug, Clone)]
struct Run {
    transport: String,
    records: usize,
    seconds: f64,
    per_second: f64,
    duplicates: u64,
    rss_modules: f64,
    rss_pubsub: f64,
    rss_tansu: f64,
    rss_postgres: f64,
}

async fn run_flow(transport: &str, records: usize) -> Run {
    let broker = Broker::start();
    let setup = Setup::new().await;
    let okapi_port = free_port();
    let okapi = format!("127.0.0.1:{okapi_port}");
    let (kafka_port, okapi_url) = (broker.port.to_string(), format!("http://{okapi}"));
    let service = Service::start(
        &setup,
        &[
            ("KAFKA_HOST", "127.0.0.1"),
            ("KAFKA_PORT", &kafka_port),
            ("OKAPI_URL", &okapi_url),
            ("DELIVERY_ENABLED", "true"),
        ],
    )
    .await;
    let pg = PgSampler::start();
    let bin = format!(
        "{}/target/release/examples/data-import",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--transport",
        transport,
        "--records",
        &records.to_string(),
        "--files",
        &FILES.to_string(),
        "--chunk-size",
        &CHUNK.to_string(),
        "--pubsub-url",
        &service.base,
        "--listen",
        &okapi,
        "--kafka",
        &format!("127.0.0.1:{kafka_port}"),
        "--env",
        &setup.env_prefix,
    ])
    .stderr(Stdio::inherit());
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{bin} (built by scripts/bench.sh): {e}"));
    let rss_postgres = pg.finish();
    assert!(out.status.success(), "the data-import example failed");
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    let run = Run {
        transport: transport.to_owned(),
        records: report["records"].as_u64().unwrap() as usize,
        seconds: report["seconds"].as_f64().unwrap(),
        per_second: report["recordsPerSecond"].as_f64().unwrap(),
        duplicates: report["duplicates"].as_u64().unwrap(),
        rss_modules: report["peakRssMiB"].as_f64().unwrap(),
        rss_pubsub: service.peak_rss_mib(),
        rss_tansu: broker.pid().map_or(0.0, peak_rss_mib),
        rss_postgres,
    };
    drop(service);
    drop(broker);
    setup.drop_database().await;
    run
}

fn chart(runs: &[Run], path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = runs.iter().map(|r| r.records).collect();
        s.dedup();
        s
    };
    let top = runs.iter().map(|r| r.per_second).fold(0.0, f64::max) * 1.2;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "data-import end to end: records per second",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..(sizes.len() as f64), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(sizes.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < sizes.len() {
                format!("{} records", sizes[i as usize])
            } else {
                String::new()
            }
        })
        .y_desc("records/s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    for (t, (name, color)) in [("http", RED), ("kafka", BLUE)].iter().enumerate() {
        let bars: Vec<(f64, f64)> = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                runs.iter()
                    .find(|r| r.records == *s && r.transport == *name)
                    .map(|r| (i as f64 + 0.12 + 0.38 * t as f64, r.per_second))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, y)| {
                Rectangle::new([(*x, 0.0), (*x + 0.36, *y)], color.mix(0.75).filled())
            }))?
            .label(match *name {
                "http" => "HTTP publish and push through pubsub",
                _ => "direct Kafka (client library)",
            })
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|(x, y)| {
            Text::new(
                format!("{y:.0}"),
                (*x + 0.05, *y + top * 0.02),
                ("sans-serif", 13),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[tokio::main]
async fn main() {
    if !common::run_as_bench("data_import") {
        return;
    }
    let sizes: Vec<usize> = env_or("BENCH_DI_RECORDS", "10000,100000")
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_DI_RECORDS: numbers"))
        .collect();
    let mut runs = Vec::new();
    for &records in &sizes {
        for transport in ["http", "kafka"] {
            eprintln!("data-import: {records} records over {transport} …");
            let run = run_flow(transport, records).await;
            eprintln!("  {:.1} s, {:.0} records/s", run.seconds, run.per_second);
            runs.push(run);
        }
    }
    println!(
        "\n{FILES} files in parallel, {CHUNK} records per chunk; peak RSS in MiB (PostgreSQL: sum of its processes' anonymous memory).\n"
    );
    println!("| records | path | seconds | records/s | direct ÷ HTTP | duplicates | modules | pubsub | tansu | PostgreSQL |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let http = runs
            .iter()
            .find(|h| h.records == r.records && h.transport == "http")
            .map(|h| h.per_second)
            .unwrap_or(f64::NAN);
        let ratio = if r.transport == "kafka" {
            format!("{:.1}×", r.per_second / http)
        } else {
            "1.0×".into()
        };
        println!(
            "| {} | {} | {:.1} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.records,
            if r.transport == "http" {
                "HTTP"
            } else {
                "direct Kafka"
            },
            r.seconds,
            r.per_second,
            ratio,
            r.duplicates,
            r.rss_modules,
            r.rss_pubsub,
            r.rss_tansu,
            r.rss_postgres
        );
    }
    let path = format!("{}/docs/data-import-bench.svg", env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(format!("{}/docs", env!("CARGO_MANIFEST_DIR"))).unwrap();
    match chart(&runs, &path) {
        Ok(()) => println!("\nchart: {path}"),
        Err(e) => eprintln!("chart not written: {e}"),
    }
}
