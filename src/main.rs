mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use mod_pubsub::domain::TenantId;
use mod_pubsub::{db, Config};

/// FOLIO's publish/subscribe broker, and command-line clients of it.
#[derive(Parser)]
#[command(name = "mod-pubsub", version, about, long_about = None, after_help = "Examples:
  mod-pubsub serve                       # configuration from FOLIO's environment variables
  mod-pubsub migrate --tenant diku
  mod-pubsub register --descriptor MessagingDescriptor.json --tenant diku --module-id mod-foo-1.0.0
  mod-pubsub publish --tenant diku --event-type ITEM_CHECKED_OUT --published-by mod-foo-1.0.0 --payload '{}'
  mod-pubsub tail --tenant diku --event-type ITEM_CHECKED_OUT
  mod-pubsub replay --tenant diku --module-id mod-bar-1.0.0 --since 2026-11-26T08:00:00Z")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate the module schema and serve HTTP (configuration from the environment).
    Serve {
        /// HTTP port; overrides HTTP_PORT (default 8081).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Migrate the module schema `pubsub_config`, and the schemas of the given tenants, then exit.
    Migrate {
        /// Also create or upgrade `<tenant>_mod_pubsub` for this tenant (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Prepare the database for a rollback to the Java module (stop every instance first):
    /// migrate every schema, delete direct-consumer registrations, list tenants whose RMB role is
    /// missing (README, "Rolling back to the Java module").
    PrepareRollback,
    /// Print the OpenAPI document (as committed in api/openapi.json).
    Openapi,
    /// Write ModuleDescriptor.json and DeploymentDescriptor.json for Okapi or Eureka, with this
    /// build's module id (mod-pubsub-<version>) and image.
    Descriptors {
        /// Directory to write them to (created if missing).
        #[arg(long, default_value = "target/descriptors")]
        out: std::path::PathBuf,
        /// The image the ModuleDescriptor's launchDescriptor runs (default folioorg/mod-pubsub:<version>).
        #[arg(long)]
        image: Option<String>,
    },
    #[command(flatten)]
    Client(Box<cli::ClientCommand>),
}

/// Renders both descriptors into `out` and names the files written.
fn write_descriptors(out: &std::path::Path, image: &str) -> std::io::Result<()> {
    let d = mod_pubsub::descriptors::render(image);
    std::fs::create_dir_all(out)?;
    for (name, doc) in [
        ("ModuleDescriptor.json", &d.module),
        ("DeploymentDescriptor.json", &d.deployment),
    ] {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(doc).map_err(std::io::Error::other)?;
        std::fs::write(&path, text + "\n")?;
        println!("{}", path.display());
    }
    Ok(())
}

fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    mod_pubsub::memory::limit_arenas();
    match Cli::parse().command {
        Command::Openapi => {
            println!(
                "{}",
                mod_pubsub::http::openapi()
                    .to_pretty_json()
                    .expect("OpenAPI serialises")
            );
            ExitCode::SUCCESS
        }
        Command::Descriptors { out, image } => {
            let image = image.unwrap_or_else(mod_pubsub::descriptors::default_image);
            match write_descriptors(&out, &image) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let out = out.display();
                    eprintln!("mod-pubsub: cannot write the descriptors to {out}: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Client(command) => {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            match runtime.block_on(cli::run(*command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mod-pubsub: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        command => service_command(command),
    }
}

/// The commands that need the service's configuration: `serve`, `migrate`, `prepare-rollback`.
fn service_command(command: Command) -> ExitCode {
    init_tracing();
    let mut config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mod-pubsub: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async move {
        match command {
            Command::Serve { port } => {
                if let Some(p) = port {
                    config.http_port = p;
                }
                serve(config).await
            }
            Command::Migrate { tenants } => migrate(config, tenants).await,
            Command::PrepareRollback => prepare_rollback(config).await,
            Command::Openapi | Command::Descriptors { .. } | Command::Client(_) => {
                unreachable!("handled by main")
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "mod-pubsub failed");
            eprintln!("mod-pubsub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(?config, "starting");
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], config.http_port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    mod_pubsub::run(config, listener, shutdown).await
}

async fn signal_shutdown(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested, draining");
    token.cancel();
}

async fn prepare_rollback(config: Config) -> anyhow::Result<()> {
    let report = mod_pubsub::prepare_rollback(&config.db).await?;
    println!(
        "direct-consumer registrations deleted (the Java module would POST their events to <okapi>null): {}",
        report.direct_consumers.len()
    );
    for (tenant, module, event_type) in &report.direct_consumers {
        println!("  {tenant} {module} {event_type}");
    }
    if report.schemas_without_role.is_empty() {
        println!("every tenant schema has its RMB role; the database is ready for the Java module");
    } else {
        println!("tenant schemas without the role RMB logs in as; create each as a user with CREATEROLE:");
        for schema in &report.schemas_without_role {
            let tenant = schema.strip_suffix("_mod_pubsub").unwrap_or(schema);
            println!(
                "  CREATE ROLE {schema} PASSWORD '{tenant}' NOSUPERUSER NOCREATEDB INHERIT LOGIN; \
                 GRANT ALL ON SCHEMA {schema} TO {schema}; GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {schema}; \
                 GRANT ALL ON ALL SEQUENCES IN SCHEMA {schema} TO {schema};"
            );
        }
    }
    Ok(())
}

async fn migrate(config: Config, tenants: Vec<String>) -> anyhow::Result<()> {
    let tenants = tenants
        .iter()
        .map(|t| TenantId::parse(t).map_err(|e| anyhow::anyhow!("--tenant {t:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    db::migrate_module(&config.db, mod_pubsub::DB_STARTUP_PATIENCE).await?;
    tracing::info!(schema = db::MODULE_SCHEMA, "module schema migrated");
    for tenant in tenants {
        db::tenants::migrate(&config.db, &tenant, None).await?;
        tracing::info!(schema = tenant.schema_name(), "tenant schema migrated");
    }
    Ok(())
}
