//! The command-line clients of the `mod-pubsub` binary: `register`, `publish`, `tail`, `replay`.
//! They use the client library (`mod_pubsub::client`) and the service's own settings: Kafka
//! from `KAFKA_HOST`, `KAFKA_PORT`, `ENV` and the Kafka security variables (the first three
//! overridden by `--kafka-host`, `--kafka-port`, `--env`); pubsub (or Okapi in front of it)
//! from `OKAPI_URL` (`--okapi-url`).

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use serde_json::{json, Value};

use mod_pubsub::client::Okapi;
use mod_pubsub::client::{DirectPublisher, MessagingDescriptor, OutgoingEvent, Registrar};
use mod_pubsub::config::KafkaConfig;
use mod_pubsub::domain::{EventType, ModuleId, TenantId};
use mod_pubsub::kafka::{client_config, record_headers, Topics};

/// Where pubsub's REST API is: directly, or Okapi in front of it.
#[derive(Args, Clone)]
pub struct Rest {
    /// pubsub's base URL, or Okapi's.
    #[arg(long, env = "OKAPI_URL", default_value = "http://localhost:9130")]
    okapi_url: String,
    /// An Okapi token, sent as X-Okapi-Token.
    #[arg(long, env = "OKAPI_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// Kafka: the service's variables (`KAFKA_HOST`, `KAFKA_PORT`, `ENV`, `KAFKA_TOPIC_NAMESPACE`,
/// the security settings), the first three overridden by these flags.
#[derive(Args, Clone)]
pub struct KafkaArgs {
    /// Kafka host(s), e.g. kafka or k1,k2:9093; overrides KAFKA_HOST (default localhost).
    #[arg(long, value_name = "HOSTS")]
    kafka_host: Option<String>,
    /// Kafka port of hosts given without one; overrides KAFKA_PORT (default 9092).
    #[arg(long, value_name = "PORT")]
    kafka_port: Option<String>,
    /// The ENV pubsub runs with (the first part of topic names); overrides ENV (default folio).
    #[arg(long = "env", value_name = "ENV")]
    env: Option<String>,
}

impl KafkaArgs {
    /// `ENV` and the Kafka settings: the environment's, with the flags' overrides; an invalid
    /// value is reported under the flag's name when a flag gave it.
    fn settings(&self) -> anyhow::Result<(String, KafkaConfig)> {
        let overrides = [
            ("KAFKA_HOST", "--kafka-host", &self.kafka_host),
            ("KAFKA_PORT", "--kafka-port", &self.kafka_port),
            ("ENV", "--env", &self.env),
        ];
        let mut vars = mod_pubsub::config::process_env();
        for (var, _, value) in &overrides {
            if let Some(v) = value {
                vars.insert((*var).to_owned(), v.clone());
            }
        }
        mod_pubsub::config::kafka_from_map(&vars).map_err(|e| {
            match overrides
                .iter()
                .find(|(var, _, value)| *var == e.var && value.is_some())
            {
                Some((_, flag, _)) => anyhow!("{flag}: {}", e.problem),
                None => anyhow!("{e}"),
            }
        })
    }
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Register a module's MessagingDescriptor with pubsub (event types, publisher, subscriber),
    /// which creates the Kafka topics. Idempotent.
    #[command(after_help = "Examples:
  mod-pubsub register --descriptor MessagingDescriptor.json --tenant diku --module-id mod-circulation-24.0.0
  OKAPI_URL=http://localhost:8081 mod-pubsub register --descriptor md.json --tenant diku --module-id mod-foo-1.0.0

A subscription without \"callbackAddress\" registers a direct consumer: pubsub records it and creates
the topic but never pushes to it.")]
    Register {
        /// The MessagingDescriptor.json file.
        #[arg(long)]
        descriptor: PathBuf,
        #[arg(long)]
        tenant: String,
        /// The module's id, name and version, e.g. mod-circulation-24.0.0.
        #[arg(long)]
        module_id: String,
        #[command(flatten)]
        rest: Rest,
    },
    /// Publish one event straight to Kafka (or with POST /pubsub/publish with --via-http), with
    /// the topic, envelope, key and headers of pubsub's publish path. Prints the event id.
    #[command(after_help = "Examples:
  mod-pubsub publish --tenant diku --event-type ITEM_CHECKED_OUT --published-by mod-circulation-24.0.0 \\
      --payload '{\"loanId\":\"8b1d…\"}' --key 8b1d…
  mod-pubsub publish --tenant diku --event-type LOAN_CLOSED --published-by mod-circulation-24.0.0 < loan.json
  mod-pubsub publish --via-http --tenant diku --event-type LOAN_CLOSED --published-by mod-circulation-24.0.0 --payload-file loan.json
  mod-pubsub publish --kafka-host kafka --kafka-port 29092 --env folio --tenant diku --event-type LOAN_CLOSED \\
      --published-by mod-circulation-24.0.0 --payload-file loan.json

The publisher must be registered for the event type (register it with `mod-pubsub register`).")]
    Publish {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        event_type: String,
        /// The publishing module's id, e.g. mod-circulation-24.0.0.
        #[arg(long)]
        published_by: String,
        /// The payload (usually JSON); without it or --payload-file the payload is read from stdin.
        #[arg(long, conflicts_with = "payload_file")]
        payload: Option<String>,
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// The Kafka key (events with the same key stay in order); default: the event id.
        #[arg(long)]
        key: Option<String>,
        /// Publish through pubsub's REST API instead of straight to Kafka.
        #[arg(long)]
        via_http: bool,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        rest: Rest,
    },
    /// Print the events of the given types as they arrive, one JSON line each (tenant, topic,
    /// partition, offset, key, headers, event). Reads with a group of its own and commits
    /// nothing, so no module's position moves.
    #[command(after_help = "Examples:
  mod-pubsub tail --tenant diku --event-type ITEM_CHECKED_OUT
  mod-pubsub tail --all-tenants --event-type DI_COMPLETED --event-type DI_ERROR --from-beginning --count 10
  mod-pubsub tail --tenant diku --event-type LOAN_CLOSED | jq .event.eventPayload
  mod-pubsub tail --kafka-host kafka --kafka-port 29092 --env folio --tenant diku --event-type LOAN_CLOSED")]
    #[command(group(clap::ArgGroup::new("tenants").required(true).args(["tenant", "all_tenants"])))]
    Tail {
        /// One tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Every tenant (tenants that appear later are picked up within seconds).
        #[arg(long)]
        all_tenants: bool,
        /// An event type (repeatable).
        #[arg(long = "event-type", required = true)]
        event_types: Vec<String>,
        /// Start at the oldest retained events instead of new ones.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Deliver a subscriber module's events again since a point in time (POST
    /// /pubsub/subscribers/{moduleId}/replay), or, with --dead-letters, redeliver its dead
    /// letters (POST /pubsub/dead-letters/redeliver).
    #[command(after_help = "Examples:
  mod-pubsub replay --tenant diku --module-id mod-patron-blocks-1.0.0 --since 2026-11-26T08:00:00Z
  mod-pubsub replay --tenant diku --module-id mod-patron-blocks --dead-letters
  mod-pubsub replay --tenant diku --dead-letters --event-id 5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f")]
    Replay {
        #[arg(long)]
        tenant: String,
        /// The subscriber module (with or without version).
        #[arg(long, required_unless_present = "dead_letters")]
        module_id: Option<String>,
        /// ISO-8601 date-time with an offset: events published since then are delivered again.
        #[arg(
            long,
            required_unless_present = "dead_letters",
            conflicts_with = "dead_letters"
        )]
        since: Option<String>,
        /// Redeliver dead letters instead (of --module-id, or of every subscriber).
        #[arg(long)]
        dead_letters: bool,
        /// Only this dead letter's event (repeatable; with --dead-letters).
        #[arg(long = "event-id", requires = "dead_letters")]
        event_ids: Vec<String>,
        #[command(flatten)]
        rest: Rest,
    },
}

pub async fn run(command: ClientCommand) -> anyhow::Result<()> {
    match command {
        ClientCommand::Register {
            descriptor,
            tenant,
            module_id,
            rest,
        } => register(&parse_tenant(&tenant)?, &module_id, &descriptor, rest).await,
        ClientCommand::Publish {
            tenant,
            event_type,
            published_by,
            payload,
            payload_file,
            key,
            via_http,
            kafka,
            rest,
        } => {
            let tenant = parse_tenant(&tenant)?;
            EventType::parse(&event_type).map_err(|e| anyhow!("--event-type: {e}"))?;
            let payload = read_payload(payload, payload_file)?;
            let id = if via_http {
                publish_http(&rest, &tenant, &event_type, &published_by, &payload, key).await?
            } else {
                let mut event = OutgoingEvent::new(&event_type, &published_by, payload);
                event.key = key;
                publish_kafka(&kafka, &tenant, &event).await?
            };
            println!("{id}");
            Ok(())
        }
        ClientCommand::Tail {
            tenant,
            all_tenants: _, // `--tenant` absent means every tenant; clap requires one of them
            event_types,
            from_beginning,
            count,
            kafka,
        } => tail(tenant, event_types, from_beginning, count, &kafka).await,
        ClientCommand::Replay {
            tenant,
            module_id,
            since,
            dead_letters,
            event_ids,
            rest,
        } => {
            let tenant = parse_tenant(&tenant)?;
            let (path, body) = match dead_letters {
                true => redeliver_request(module_id.as_deref(), &event_ids),
                false => replay_request(
                    &module_id.expect("required by clap"),
                    &since.expect("required by clap"),
                )?,
            };
            let answer = rest_post(&rest, &tenant, &path, &body, &[]).await?;
            println!("{answer}");
            Ok(())
        }
    }
}

async fn register(
    tenant: &TenantId,
    module_id: &str,
    descriptor: &std::path::Path,
    rest: Rest,
) -> anyhow::Result<()> {
    ModuleId::parse(module_id).map_err(|e| anyhow!("--module-id {module_id:?}: {e}"))?;
    let descriptor = MessagingDescriptor::from_file(descriptor)?;
    let registrar = Registrar::new(&rest.okapi_url, tenant.as_str(), rest.token);
    if registrar.register(module_id, &descriptor).await? {
        println!(
            "registered {module_id} for {tenant}: {} publication(s), {} subscription(s)",
            descriptor.publications.len(),
            descriptor.subscriptions.len()
        );
    } else {
        println!("nothing to register: the descriptor is empty");
    }
    Ok(())
}

/// `--payload`, else the file `--payload-file`, else standard input (unless it is a terminal).
fn read_payload(payload: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    match (payload, file) {
        (Some(p), _) => Ok(p),
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("--payload-file {}", f.display()))
        }
        (None, None) if std::io::stdin().is_terminal() => {
            bail!("no payload: give --payload or --payload-file, or pipe it to stdin")
        }
        (None, None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the payload from stdin")?;
            Ok(s)
        }
    }
}

/// Publishes straight to Kafka; the event's id once the broker acknowledged it.
async fn publish_kafka(
    kafka: &KafkaArgs,
    tenant: &TenantId,
    event: &OutgoingEvent,
) -> anyhow::Result<String> {
    let (env, kafka) = kafka.settings()?;
    let publisher = DirectPublisher::with_topics(
        client_config(&kafka),
        Topics::new(&env, &kafka),
        tenant.as_str(),
    )?;
    publisher.send(event).await.map_err(|e| {
        let timeout = e.is_timeout();
        let e = anyhow!(e);
        if timeout {
            e.context("not acknowledged in time: is Kafka reachable, and does the topic exist? (it is created when a publisher or subscriber of the event type is registered: mod-pubsub register)")
        } else {
            e
        }
    })
}

/// The dead-letter redelivery request: of one subscriber, of some events, or all.
fn redeliver_request(module_id: Option<&str>, event_ids: &[String]) -> (String, Value) {
    let mut body = json!({});
    if let Some(m) = module_id {
        body["subscriber"] = json!(m);
    }
    if !event_ids.is_empty() {
        body["eventIds"] = json!(event_ids);
    }
    ("/pubsub/dead-letters/redeliver".to_owned(), body)
}

/// The replay request of a module since a time.
fn replay_request(module: &str, since: &str) -> anyhow::Result<(String, Value)> {
    if mod_pubsub::event::parse_date_time(since).is_none() {
        bail!("--since {since:?}: must be an ISO-8601 date-time with an offset, e.g. 2026-11-26T08:00:00Z");
    }
    Ok((
        format!("/pubsub/subscribers/{module}/replay"),
        json!({"fromDate": since}),
    ))
}

fn parse_tenant(raw: &str) -> anyhow::Result<TenantId> {
    TenantId::parse(raw).map_err(|e| anyhow!("--tenant {raw:?}: {e}"))
}

/// POSTs to pubsub's REST API; the answer's body, or an error naming the status and body.
async fn rest_post(
    rest: &Rest,
    tenant: &TenantId,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> anyhow::Result<String> {
    let okapi = Okapi::new(
        reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?,
        &rest.okapi_url,
    );
    let url = format!("{}{path}", okapi.url());
    let mut request = okapi
        .request(
            reqwest::Method::POST,
            path,
            tenant.as_str(),
            rest.token.as_deref(),
        )
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("POST {url} answered {status}: {text}");
    }
    Ok(text)
}

async fn publish_http(
    rest: &Rest,
    tenant: &TenantId,
    event_type: &str,
    published_by: &str,
    payload: &str,
    key: Option<String>,
) -> anyhow::Result<String> {
    let id = uuid::Uuid::new_v4().to_string();
    let event = json!({
        "id": id,
        "eventType": event_type,
        "eventMetadata": {"tenantId": tenant.as_str(), "eventTTL": 1, "publishedBy": published_by},
        "eventPayload": payload,
    });
    let key_header: Vec<(&str, &str)> = key
        .as_deref()
        .map(|k| ("X-Pubsub-Partition-Key", k))
        .into_iter()
        .collect();
    rest_post(rest, tenant, "/pubsub/publish", &event, &key_header).await?;
    Ok(id)
}

/// One record as `tail` prints it: a JSON line with the tenant, where it is, its headers and
/// the event (the value as text if it is not JSON).
fn tail_line<M: Message>(msg: &M) -> Value {
    let headers = record_headers(msg);
    let value = msg.payload().unwrap_or_default();
    let event: Value = serde_json::from_slice(value)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(value).into_owned()));
    let tenant = headers.get("folio.tenantId").cloned().or_else(|| {
        event["eventMetadata"]["tenantId"]
            .as_str()
            .map(str::to_owned)
    });
    json!({
        "tenant": tenant,
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "key": msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        "headers": headers,
        "event": event,
    })
}

async fn tail(
    tenant: Option<String>,
    event_types: Vec<String>,
    from_beginning: bool,
    count: Option<usize>,
    kafka: &KafkaArgs,
) -> anyhow::Result<()> {
    let (env, kafka) = kafka.settings()?;
    let topics = Topics::new(&env, &kafka);
    let tenant = tenant.map(|t| parse_tenant(&t)).transpose()?;
    let mut subscriptions = Vec::new();
    for t in &event_types {
        let e = EventType::parse(t).map_err(|e| anyhow!("--event-type {t:?}: {e}"))?;
        subscriptions.push(topics.subscription(tenant.as_ref(), &e));
    }
    // A group of its own that commits nothing: tailing never moves anyone's position.
    let group = format!("{env}.mod-pubsub-tail.{}", uuid::Uuid::new_v4().simple());
    let consumer: StreamConsumer = client_config(&kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            if from_beginning { "earliest" } else { "latest" },
        )
        .set("fetch.wait.max.ms", "100")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .create()
        .context("Kafka consumer")?;
    let names: Vec<&str> = subscriptions.iter().map(String::as_str).collect();
    consumer.subscribe(&names).context("subscribing")?;
    eprintln!("tailing {}", subscriptions.join(", "));
    let mut seen = 0;
    let mut warned_missing = false;
    loop {
        let received = tokio::select! {
            m = consumer.recv() => m,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let msg = match received {
            Ok(m) => m,
            // A topic that does not exist yet: pubsub creates it when a publisher or subscriber
            // of the event type is registered; the consumer picks it up then.
            Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                if !warned_missing {
                    eprintln!("waiting: {} does not exist yet (it is created when a publisher or subscriber of the event type is registered)", subscriptions.join(", "));
                    warned_missing = true;
                }
                continue;
            }
            Err(e) => return Err(anyhow!("Kafka: {e}")),
        };
        println!("{}", tail_line(&msg));
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}
