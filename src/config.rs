//! Configuration from FOLIO's environment variable names, validated once at start-up.
//!
//! Every problem is reported as one line naming the variable and what is wrong with it; secrets
//! are wrapped in [`SecretString`] so that they never reach a log line or a `Debug` dump.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

mod kafka;
pub use kafka::KafkaConfig;

/// A configuration problem: the variable and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    pub var: String,
    pub problem: String,
}

#[derive(Clone)]
pub struct DbConfig {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: SecretString,
    pub database: String,
    pub max_pool_size: u32,
    /// `DB_QUERYTIMEOUT` (ms), applied as PostgreSQL's `statement_timeout`.
    pub query_timeout: Duration,
    /// How long a request waits for a pooled connection before answering 503.
    pub connect_timeout: Duration,
}

#[derive(Clone)]
pub struct SystemUserConfig {
    pub create: bool,
    pub name: String,
    pub password: SecretString,
}

#[derive(Clone)]
pub struct Config {
    pub http_port: u16,
    pub db: DbConfig,
    pub kafka: KafkaConfig,
    /// `ENV`: the prefix of every topic name.
    pub env: String,
    pub okapi_url: url::Url,
    pub system_user: SystemUserConfig,
    /// Largest accepted request body, in bytes (`MAX_REQUEST_SIZE`, default 1 MiB).
    pub max_request_size: usize,
    pub audit: AuditConfig,
    pub delivery: DeliveryConfig,
    /// `SHUTDOWN_TIMEOUT_MS`: how long a stop may take in all, from the signal to exit.
    pub shutdown_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct DeliveryConfig {
    /// Whether this instance delivers to subscribers (`DELIVERY_ENABLED`, default true).
    pub enabled: bool,
    /// Waits between attempts (`DELIVERY_RETRY_SCHEDULE`, default `1s,5s,30s,2m,10m`): one
    /// attempt more than there are waits; then the event is dead-lettered.
    pub retry_schedule: Vec<Duration>,
    /// Whole-request timeout of a callback (`DELIVERY_TIMEOUT_MS`, default 30000).
    pub timeout: Duration,
    /// Connect timeout of a callback (`DELIVERY_CONNECT_TIMEOUT_MS`, default 2000).
    pub connect_timeout: Duration,
    /// librdkafka `fetch.wait.max.ms` of the delivery fetchers (`DELIVERY_FETCH_WAIT_MS`,
    /// default [`DEFAULT_FETCH_WAIT_MS`]): the longest an idle fetch waits. Kafka answers a
    /// fetch as soon as a record arrives, so this costs no latency there. A fetcher holds only
    /// partitions that have records or had some in the last 30 s (the others are parked, see
    /// `client::dispatch`), so a short wait costs few idle fetches (at most ten a second per
    /// fetcher, and a fetcher with nothing to fetch for a minute is closed). Brokers that hold
    /// every fetch to this maximum (tansu) add it to each event's latency and to every wave of
    /// partitions fetched at start-up: the project's scripts set 20 for tansu.
    pub fetch_wait: Duration,
    /// Callbacks at once per subscriber module on this instance, and unfinished records held
    /// per partition (`DELIVERY_MAX_IN_FLIGHT`, default 16).
    pub max_in_flight: usize,
    /// Whether a 4xx other than 401, 408, 425 and 429 is retried like a 5xx
    /// (`DELIVERY_RETRY_CLIENT_ERRORS`, default false: such an event is dead-lettered after its
    /// first attempt).
    pub retry_client_errors: bool,
    /// Whether an event's `eventTTL` bounds its retries (`DELIVERY_HONOUR_EVENT_TTL`, default
    /// false, as the Java module; every event gets at least one attempt either way).
    pub honour_event_ttl: bool,
    /// Session timeout of the delivery consumer groups, also their rebalance timeout
    /// (`DELIVERY_SESSION_TIMEOUT_MS`, default 45000): a crashed instance's partitions move to
    /// the others within it.
    pub session_timeout: Duration,
    /// Partitions a module's consumer fetches at once on this instance
    /// (`DELIVERY_MAX_ACTIVE_PARTITIONS`, default 1000). The others of its share are parked:
    /// librdkafka holds nothing for them until their end offset passes the module's position.
    pub max_active_partitions: usize,
    /// How often the end offsets of a module's parked partitions are read
    /// (`DELIVERY_IDLE_CHECK_MS`, default 1000): the longest an event published through another
    /// instance (or straight to Kafka) waits before its partition is fetched. Events published
    /// through this instance wake their partition at once.
    pub idle_check: Duration,
}

/// Default of `DELIVERY_FETCH_WAIT_MS` ([`DeliveryConfig::fetch_wait`]).
pub const DEFAULT_FETCH_WAIT_MS: u64 = 100;

/// `1s,5s,30s,2m,10m` (humantime durations: ms, s, m, h, …).
const DEFAULT_RETRY_SCHEDULE: &str = "1s,5s,30s,2m,10m";

fn parse_schedule(raw: &str) -> Option<Vec<Duration>> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            humantime::parse_duration(p)
                .ok()
                .filter(|d| *d <= Duration::from_secs(86_400))
        })
        .collect()
}

#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// Store event payloads in `audit_message_payload` (`EVENT_PAYLOAD_AUDIT_ENABLED`, or the
    /// Java module's `event.payload.audit.enabled`; default false).
    pub payload_enabled: bool,
    /// Audit rows older than this are purged (`AUDIT_RETENTION_DAYS`; the default 0 keeps all, as
    /// the Java module does).
    pub retention_days: u32,
    /// How often the purge runs (`AUDIT_PURGE_INTERVAL_MINUTES`, default 60).
    pub purge_interval: Duration,
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DbConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .field("database", &self.database)
            .field("max_pool_size", &self.max_pool_size)
            .field("query_timeout", &self.query_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl fmt::Debug for SystemUserConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SystemUserConfig")
            .field("create", &self.create)
            .field("name", &self.name)
            .field("password", &"[redacted]")
            .finish()
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("http_port", &self.http_port)
            .field("db", &self.db)
            .field("kafka", &self.kafka)
            .field("env", &self.env)
            .field("okapi_url", &self.okapi_url.as_str())
            .field("system_user", &self.system_user)
            .field("max_request_size", &self.max_request_size)
            .field("audit", &self.audit)
            .field("delivery", &self.delivery)
            .finish()
    }
}

struct Reader<'a> {
    vars: &'a HashMap<String, String>,
}

impl Reader<'_> {
    /// The variable's value, with surrounding white space removed; unset and blank are the same.
    fn get(&self, var: &str) -> Option<String> {
        self.vars
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    fn number<T>(&self, var: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(var) else {
            return Ok(default);
        };
        match raw.parse::<T>() {
            Ok(v) if v >= min && v <= max => Ok(v),
            _ => Err(err(
                var,
                format!("must be a whole number from {min} to {max}, got \"{raw}\""),
            )),
        }
    }

    fn bool(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(raw) = self.get(var) else {
            return Ok(default);
        };
        match raw.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(err(var, format!("must be true or false, got \"{raw}\""))),
        }
    }
}

fn err(var: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        var: var.to_owned(),
        problem: problem.into(),
    }
}

fn read_env_name(r: &Reader<'_>) -> Result<String, ConfigError> {
    let env = r.string("ENV", "folio");
    let env_ok = env.len() <= 64
        && env
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !env_ok {
        return Err(err(
            "ENV",
            format!("must be 1 to 64 characters from [A-Za-z0-9_-] (it prefixes Kafka topic names), got \"{env}\""),
        ));
    }
    Ok(env)
}

/// Only `ENV` and the Kafka settings, from a map of environment variables: what the
/// command-line clients (`mod-pubsub publish`, `tail`) need, read from the process environment
/// with the command line's overrides.
pub fn kafka_from_map(
    vars: &HashMap<String, String>,
) -> Result<(String, KafkaConfig), ConfigError> {
    let r = Reader { vars };
    Ok((read_env_name(&r)?, kafka::read(&r, vars)?))
}

/// The process environment (variables whose name or value is not Unicode are left out).
pub fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_map(&process_env())
    }

    /// Reads from a map of environment variables.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let r = Reader { vars };

        let http_port = r.number("HTTP_PORT", 8081u16, 0, u16::MAX)?;

        let db = DbConfig {
            host: r.string("DB_HOST", "localhost"),
            port: r.number("DB_PORT", 5432u16, 1, u16::MAX)?,
            username: r.string("DB_USERNAME", "folio_admin"),
            password: SecretString::from(r.string("DB_PASSWORD", "folio_admin")),
            database: r.string("DB_DATABASE", "okapi_modules"),
            max_pool_size: r.number("DB_MAXPOOLSIZE", 5u32, 1, 1000)?,
            query_timeout: Duration::from_millis(r.number(
                "DB_QUERYTIMEOUT",
                60_000u64,
                1,
                86_400_000,
            )?),
            connect_timeout: Duration::from_millis(r.number(
                "DB_CONNECTIONTIMEOUT",
                5_000u64,
                1,
                600_000,
            )?),
        };

        let kafka = kafka::read(&r, vars)?;
        let env = read_env_name(&r)?;

        let raw_okapi = r.string("OKAPI_URL", "http://localhost:9130");
        let okapi_url = match url::Url::parse(&raw_okapi) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            _ => {
                return Err(err(
                    "OKAPI_URL",
                    format!("must be an http or https URL, got \"{raw_okapi}\""),
                ))
            }
        };

        let system_user = system_user(&r)?;

        let max_request_size =
            r.number("MAX_REQUEST_SIZE", 1_048_576usize, 1024, 100 * 1024 * 1024)?;

        let payload_enabled = match r.get("EVENT_PAYLOAD_AUDIT_ENABLED") {
            Some(_) => r.bool("EVENT_PAYLOAD_AUDIT_ENABLED", false)?,
            None => r.bool("event.payload.audit.enabled", false)?,
        };
        let audit = AuditConfig {
            payload_enabled,
            retention_days: r.number("AUDIT_RETENTION_DAYS", 0u32, 0, 36_500)?,
            purge_interval: Duration::from_secs(
                60 * r.number("AUDIT_PURGE_INTERVAL_MINUTES", 60u64, 1, 10_080)?,
            ),
        };

        let delivery = delivery(&r)?;

        // Kubernetes' default grace period is 30 s: stop within it.
        let shutdown_timeout =
            Duration::from_millis(r.number("SHUTDOWN_TIMEOUT_MS", 25_000u64, 1_000, 600_000)?);

        Ok(Config {
            http_port,
            db,
            kafka,
            env,
            okapi_url,
            system_user,
            max_request_size,
            audit,
            delivery,
            shutdown_timeout,
        })
    }
}

/// `SYSTEM_USER_*`: the credentials are required unless `SYSTEM_USER_CREATE=false`.
fn system_user(r: &Reader<'_>) -> Result<SystemUserConfig, ConfigError> {
    let create = r.bool("SYSTEM_USER_CREATE", true)?;
    let name = r.get("SYSTEM_USER_NAME");
    let password = r.get("SYSTEM_USER_PASSWORD");
    if create {
        let missing: Vec<&str> = [
            ("SYSTEM_USER_NAME", &name),
            ("SYSTEM_USER_PASSWORD", &password),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k)
        .collect();
        if !missing.is_empty() {
            return Err(err(
                &missing.join(", "),
                format!(
                    "Invalid system user credentials. Please provide non-blank values for system variables: [{}] (or set SYSTEM_USER_CREATE=false)",
                    missing.join(", ")
                ),
            ));
        }
    }
    Ok(SystemUserConfig {
        create,
        name: name.unwrap_or_default(),
        password: SecretString::from(password.unwrap_or_default()),
    })
}

/// `DELIVERY_*` and the Java module's `pubsub.delivery.retry.number`.
fn delivery(r: &Reader<'_>) -> Result<DeliveryConfig, ConfigError> {
    let schedule_raw = r.string("DELIVERY_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE);
    let mut retry_schedule = parse_schedule(&schedule_raw).filter(|s| s.len() <= 100).ok_or_else(|| {
        err(
            "DELIVERY_RETRY_SCHEDULE",
            format!("must be a comma-separated list of waits such as 1s,5s,30s,2m,10m (units ms, s, m, h), got \"{schedule_raw}\""),
        )
    })?;
    // The Java module's setting (retries after the first attempt, made at once there): the
    // number of waits of the default schedule, its last wait repeated beyond five.
    const RETRY_NUMBER: &str = "pubsub.delivery.retry.number";
    if r.get("DELIVERY_RETRY_SCHEDULE").is_none() && r.get(RETRY_NUMBER).is_some() {
        let n = r.number(RETRY_NUMBER, 5usize, 0, 100)?;
        let last = *retry_schedule
            .last()
            .expect("the default schedule has waits");
        retry_schedule.resize(n, last);
    }
    Ok(DeliveryConfig {
        enabled: r.bool("DELIVERY_ENABLED", true)?,
        retry_schedule,
        timeout: Duration::from_millis(r.number("DELIVERY_TIMEOUT_MS", 30_000u64, 100, 600_000)?),
        connect_timeout: Duration::from_millis(r.number(
            "DELIVERY_CONNECT_TIMEOUT_MS",
            2_000u64,
            100,
            60_000,
        )?),
        fetch_wait: Duration::from_millis(r.number(
            "DELIVERY_FETCH_WAIT_MS",
            DEFAULT_FETCH_WAIT_MS,
            1,
            5_000,
        )?),
        max_in_flight: r.number("DELIVERY_MAX_IN_FLIGHT", 16usize, 1, 10_000)?,
        retry_client_errors: r.bool("DELIVERY_RETRY_CLIENT_ERRORS", false)?,
        honour_event_ttl: r.bool("DELIVERY_HONOUR_EVENT_TTL", false)?,
        session_timeout: Duration::from_millis(r.number(
            "DELIVERY_SESSION_TIMEOUT_MS",
            45_000u64,
            6_000,
            300_000,
        )?),
        max_active_partitions: r.number(
            "DELIVERY_MAX_ACTIVE_PARTITIONS",
            crate::client::dispatch::DEFAULT_MAX_ACTIVE,
            1,
            1_000_000,
        )?,
        idle_check: Duration::from_millis(r.number(
            "DELIVERY_IDLE_CHECK_MS",
            crate::client::dispatch::DEFAULT_IDLE_CHECK.as_millis() as u64,
            50,
            60_000,
        )?),
    })
}

impl DbConfig {
    pub fn connect_options(&self) -> sqlx::postgres::PgConnectOptions {
        sqlx::postgres::PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.username)
            .password(self.password.expose_secret())
            .database(&self.database)
            .application_name("mod-pubsub")
            // UTC sessions: `audit_date` is a `timestamp without time zone` holding UTC.
            .options([
                (
                    "statement_timeout",
                    self.query_timeout.as_millis().to_string(),
                ),
                ("TimeZone", "UTC".to_owned()),
            ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = [
            ("SYSTEM_USER_NAME", "pub-sub"),
            ("SYSTEM_USER_PASSWORD", "s3cret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            map.insert(k.to_string(), v.to_string());
        }
        Config::from_map(&map)
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_port, 8081);
        assert_eq!(c.env, "folio");
        assert_eq!(c.db.port, 5432);
        assert_eq!(c.db.max_pool_size, 5);
        assert_eq!(c.kafka.bootstrap_servers, "localhost:9092");
        assert_eq!(c.kafka.replication_factor, 1);
        assert_eq!(c.kafka.producer_thread_nice, 19);
        assert_eq!(c.max_request_size, 1_048_576);
        assert!(c.system_user.create);
        assert_eq!(c.delivery.max_in_flight, 16);
        assert!(!c.delivery.retry_client_errors);
        assert!(
            !c.delivery.honour_event_ttl,
            "eventTTL ignored, as the Java module"
        );
        assert_eq!(c.delivery.session_timeout, Duration::from_secs(45));
        assert_eq!(
            c.audit.retention_days, 0,
            "audit rows are kept, as the Java module keeps them, unless a retention is set"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("DB_PORT", "abc"),
            ("DB_PORT", "0"),
            ("HTTP_PORT", "70000"),
            ("KAFKA_PORT", "-1"),
            ("DB_MAXPOOLSIZE", "0"),
            ("REPLICATION_FACTOR", "0"),
            ("NUMBER_OF_PARTITIONS", "x"),
            ("KAFKA_PRODUCER_THREAD_NICE", "20"),
            ("KAFKA_PRODUCER_THREAD_NICE", "-5"),
            ("ENV", "a.b"),
            ("OKAPI_URL", "not a url"),
            ("OKAPI_URL", "ftp://x"),
            ("SYSTEM_USER_CREATE", "yes"),
            ("KAFKA_HOST", "a b"),
            ("DELIVERY_MAX_IN_FLIGHT", "0"),
            ("DELIVERY_RETRY_CLIENT_ERRORS", "1"),
            ("DELIVERY_HONOUR_EVENT_TTL", "yes"),
            ("DELIVERY_SESSION_TIMEOUT_MS", "1000"),
        ] {
            let e = cfg(&[(var, value)]).unwrap_err();
            assert_eq!(e.var, var, "{var}={value}: {e}");
            assert!(e.to_string().starts_with(var));
        }
    }

    #[test]
    fn system_user_credentials_required_unless_disabled() {
        let map: HashMap<String, String> = HashMap::new();
        let e = Config::from_map(&map).unwrap_err();
        assert!(
            e.problem
                .contains("[SYSTEM_USER_NAME, SYSTEM_USER_PASSWORD]"),
            "{e}"
        );
        let e = Config::from_map(&HashMap::from([
            ("SYSTEM_USER_NAME".into(), "x".into()),
            ("SYSTEM_USER_PASSWORD".into(), "   ".into()),
        ]))
        .unwrap_err();
        assert!(e.problem.contains("[SYSTEM_USER_PASSWORD]"), "{e}");
        let c = Config::from_map(&HashMap::from([(
            "SYSTEM_USER_CREATE".into(),
            "false".into(),
        )]))
        .unwrap();
        assert!(!c.system_user.create);
    }

    #[test]
    fn the_java_modules_retry_number_sets_the_schedules_length() {
        let schedule = |pairs: &[(&str, &str)]| cfg(pairs).map(|c| c.delivery.retry_schedule);
        let secs = |s: &[u64]| {
            s.iter()
                .map(|&n| Duration::from_secs(n))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            schedule(&[("pubsub.delivery.retry.number", "2")]).unwrap(),
            secs(&[1, 5])
        );
        assert_eq!(
            schedule(&[("pubsub.delivery.retry.number", "0")]).unwrap(),
            secs(&[]),
            "one attempt, no retries"
        );
        assert_eq!(
            schedule(&[("pubsub.delivery.retry.number", "7")]).unwrap(),
            secs(&[1, 5, 30, 120, 600, 600, 600])
        );
        assert_eq!(
            schedule(&[
                ("pubsub.delivery.retry.number", "2"),
                ("DELIVERY_RETRY_SCHEDULE", "3s")
            ])
            .unwrap(),
            secs(&[3]),
            "the explicit schedule wins"
        );
        assert_eq!(
            schedule(&[("pubsub.delivery.retry.number", "many")])
                .unwrap_err()
                .var,
            "pubsub.delivery.retry.number"
        );
    }

    #[test]
    fn retry_schedules() {
        assert_eq!(
            cfg(&[]).unwrap().delivery.retry_schedule,
            [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec()
        );
        assert_eq!(
            cfg(&[("DELIVERY_RETRY_SCHEDULE", "100ms, 2s,1h")])
                .unwrap()
                .delivery
                .retry_schedule,
            vec![
                Duration::from_millis(100),
                Duration::from_secs(2),
                Duration::from_secs(3600)
            ]
        );
        assert_eq!(
            cfg(&[("DELIVERY_RETRY_SCHEDULE", "")])
                .unwrap()
                .delivery
                .retry_schedule
                .len(),
            5,
            "blank is the default"
        );
        for bad in ["5", "1s,x", "2d", "-1s"] {
            assert_eq!(
                cfg(&[("DELIVERY_RETRY_SCHEDULE", bad)]).unwrap_err().var,
                "DELIVERY_RETRY_SCHEDULE",
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_are_not_in_debug_output() {
        let c = cfg(&[("DB_PASSWORD", "hunter2")]).unwrap();
        let dump = format!("{c:?}");
        assert!(!dump.contains("hunter2"));
        assert!(!dump.contains("s3cret"));
        assert!(dump.contains("[redacted]"));
    }
}
