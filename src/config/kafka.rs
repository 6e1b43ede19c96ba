//! Kafka settings from the environment: bootstrap servers, topic naming, timeouts and the
//! security settings FOLIO operators set, translated to librdkafka properties.
//!
//! Security settings are read from two spellings:
//! * the Java module's literal dotted names (`security.protocol`, `ssl.truststore.location`,
//!   `ssl.keystore.location`, `ssl.key.password`, `ssl.endpoint.identification.algorithm`,
//!   `sasl.mechanism`, `sasl.jaas.config`, …), translated to librdkafka's;
//! * shell-friendly `KAFKA_SECURITY_PROTOCOL`, `KAFKA_SSL_*` and `KAFKA_SASL_*` names, which map
//!   one to one onto librdkafka properties (`KAFKA_SSL_CA_LOCATION` → `ssl.ca.location`,
//!   `KAFKA_SASL_MECHANISMS` → `sasl.mechanisms`, …) and win over the dotted ones.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use super::{err, ConfigError, Reader};

#[derive(Clone)]
pub struct KafkaConfig {
    /// `KAFKA_HOST:KAFKA_PORT`; `KAFKA_HOST` may list several hosts (`a,b:9093`), a host
    /// without a port gets `KAFKA_PORT`.
    pub bootstrap_servers: String,
    pub replication_factor: i32,
    pub number_of_partitions: i32,
    /// The second segment of topic names (`KAFKA_TOPIC_NAMESPACE`, default `Default`, as
    /// folio-kafka-wrapper).
    pub namespace: String,
    /// `KAFKA_PRODUCER_TENANT_COLLECTION`: replaces the tenant in topic names.
    pub tenant_collection: Option<String>,
    /// How long a publish waits for the broker's acknowledgement (`KAFKA_PUBLISH_TIMEOUT_MS`).
    pub publish_timeout: Duration,
    /// How long topic creation may take before a declaration answers 503
    /// (`KAFKA_ADMIN_TIMEOUT_MS`).
    pub admin_timeout: Duration,
    /// Nice value (0–19) of librdkafka's threads of the publish producer
    /// (`KAFKA_PRODUCER_THREAD_NICE`); 0 leaves them at the service's priority. See
    /// `kafka::producer` for why.
    pub producer_thread_nice: i32,
    /// librdkafka properties for security, applied to every client.
    pub client_properties: BTreeMap<String, String>,
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let props: BTreeMap<&str, &str> = self
            .client_properties
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if is_secret(k) {
                        "[redacted]"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("replication_factor", &self.replication_factor)
            .field("number_of_partitions", &self.number_of_partitions)
            .field("namespace", &self.namespace)
            .field("tenant_collection", &self.tenant_collection)
            .field("publish_timeout", &self.publish_timeout)
            .field("admin_timeout", &self.admin_timeout)
            .field("producer_thread_nice", &self.producer_thread_nice)
            .field("client_properties", &props)
            .finish()
    }
}

fn is_secret(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || key.ends_with(".pem")
        || key.contains("jaas")
}

const SECURITY_PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];

pub(super) fn read(
    r: &Reader<'_>,
    vars: &HashMap<String, String>,
) -> Result<KafkaConfig, ConfigError> {
    let port = r.number("KAFKA_PORT", 9092u16, 1, u16::MAX)?;
    let host = r.string("KAFKA_HOST", "localhost");
    let mut servers = Vec::new();
    for h in host.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        if h.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(err(
                "KAFKA_HOST",
                format!("must be host names or addresses separated by commas, got \"{host}\""),
            ));
        }
        let has_port = h
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !h.ends_with(']');
        servers.push(if has_port {
            h.to_owned()
        } else {
            format!("{h}:{port}")
        });
    }
    if servers.is_empty() {
        return Err(err("KAFKA_HOST", "must name at least one host"));
    }

    let namespace = r.string("KAFKA_TOPIC_NAMESPACE", "Default");
    if namespace.is_empty()
        || namespace.len() > 64
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(err(
            "KAFKA_TOPIC_NAMESPACE",
            format!("must be 1 to 64 characters from [A-Za-z0-9_-], got \"{namespace}\""),
        ));
    }
    let tenant_collection = r.get("KAFKA_PRODUCER_TENANT_COLLECTION");
    if let Some(tc) = &tenant_collection {
        let mut chars = tc.chars();
        let ok = matches!(chars.next(), Some('A'..='Z'))
            && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && tc.len() <= 31;
        if !ok {
            return Err(err(
                "KAFKA_PRODUCER_TENANT_COLLECTION",
                format!("must match [A-Z][A-Z0-9]{{0,30}}, got \"{tc}\""),
            ));
        }
    }

    Ok(KafkaConfig {
        bootstrap_servers: servers.join(","),
        replication_factor: r.number("REPLICATION_FACTOR", 1i32, 1, i16::MAX as i32)?,
        number_of_partitions: r.number("NUMBER_OF_PARTITIONS", 1i32, 1, 100_000)?,
        namespace,
        tenant_collection,
        publish_timeout: Duration::from_millis(r.number(
            "KAFKA_PUBLISH_TIMEOUT_MS",
            10_000u64,
            100,
            600_000,
        )?),
        admin_timeout: Duration::from_millis(r.number(
            "KAFKA_ADMIN_TIMEOUT_MS",
            10_000u64,
            100,
            600_000,
        )?),
        producer_thread_nice: r.number("KAFKA_PRODUCER_THREAD_NICE", 19i32, 0, 19)?,
        client_properties: security_properties(r, vars)?,
    })
}

/// librdkafka security properties from both spellings (see the module documentation).
fn security_properties(
    r: &Reader<'_>,
    vars: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut props = BTreeMap::new();

    // The Java module's names, each with its Spring spelling as the fallback (as the Java module
    // reads them).
    let java = |name: &str, spring: &str| r.get(name).or_else(|| r.get(spring));
    if let Some(v) = java("security.protocol", "spring.kafka.security.protocol") {
        props.insert("security.protocol".to_owned(), v);
    }
    java_stores(&java, &mut props)?;
    if let Some(p) = java("ssl.key.password", "spring.kafka.ssl.key-password") {
        props.insert("ssl.key.password".into(), p);
    }
    let algorithm = vars
        .get("ssl.endpoint.identification.algorithm")
        .or_else(|| vars.get("spring.kafka.properties.ssl.endpoint.identification.algorithm"));
    if let Some(v) = algorithm {
        // Java uses "" to switch host name verification off.
        let v = v.trim();
        props.insert(
            "ssl.endpoint.identification.algorithm".into(),
            if v.is_empty() {
                "none".into()
            } else {
                v.to_owned()
            },
        );
    }
    if let Some(m) = r.get("sasl.mechanism") {
        props.insert("sasl.mechanisms".into(), m);
    }
    if let Some(jaas) = r.get("sasl.jaas.config") {
        for key in ["username", "password"] {
            if let Some(value) = jaas_value(&jaas, key) {
                props.insert(format!("sasl.{key}"), value);
            }
        }
    }

    shell_names(vars, &mut props);

    if let Some(p) = props.get("security.protocol") {
        if !SECURITY_PROTOCOLS.contains(&p.to_ascii_lowercase().as_str()) {
            return Err(err(
                "security.protocol",
                format!("must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL, got \"{p}\""),
            ));
        }
    }
    Ok(props)
}

/// The Java module's trust store and key store settings: PEM trust stores and PKCS#12 key
/// stores map onto librdkafka's; other kinds are refused with the command that converts them.
fn java_stores(
    java: &dyn Fn(&str, &str) -> Option<String>,
    props: &mut BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    if let Some(location) = java(
        "ssl.truststore.location",
        "spring.kafka.ssl.trust-store-location",
    ) {
        let kind = java("ssl.truststore.type", "spring.kafka.ssl.trust-store-type")
            .unwrap_or_else(|| guess_store_type(&location, "PEM"))
            .to_ascii_uppercase();
        match kind.as_str() {
            "PEM" => {
                props.insert("ssl.ca.location".into(), location);
            }
            other => {
                let pem = with_extension(&location, "pem");
                return Err(err(
                    "ssl.truststore.location",
                    format!("{other} truststores are not supported by librdkafka: convert it to PEM with `keytool -list -rfc -keystore {location} -storepass '<truststore password>' > {pem}`, then set ssl.truststore.location={pem} and ssl.truststore.type=PEM (or KAFKA_SSL_CA_LOCATION={pem})"),
                ));
            }
        }
    }
    if let Some(location) = java(
        "ssl.keystore.location",
        "spring.kafka.ssl.key-store-location",
    ) {
        // JKS is the Java default when no type is given.
        let kind = java("ssl.keystore.type", "spring.kafka.ssl.key-store-type")
            .unwrap_or_else(|| guess_store_type(&location, "JKS"))
            .to_ascii_uppercase();
        if kind != "PKCS12" {
            let p12 = with_extension(&location, "p12");
            return Err(err(
                "ssl.keystore.location",
                format!("{kind} keystores are not supported by librdkafka: convert it to PKCS#12 with `keytool -importkeystore -srckeystore {location} -srcstoretype {kind} -destkeystore {p12} -deststoretype PKCS12` (it asks for the passwords), then set ssl.keystore.location={p12} and ssl.keystore.type=PKCS12; or use KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION for PEM files"),
            ));
        }
        props.insert("ssl.keystore.location".into(), location);
        if let Some(p) = java(
            "ssl.keystore.password",
            "spring.kafka.ssl.key-store-password",
        ) {
            props.insert("ssl.keystore.password".into(), p);
        }
    }
    Ok(())
}

/// `KAFKA_SSL_*`, `KAFKA_SASL_*` and `KAFKA_SECURITY_PROTOCOL`: one to one onto librdkafka's
/// names, winning over the dotted ones.
fn shell_names(vars: &HashMap<String, String>, props: &mut BTreeMap<String, String>) {
    let mut upper: Vec<(&String, &String)> = vars
        .iter()
        .filter(|(k, _)| {
            k.starts_with("KAFKA_SSL_")
                || k.starts_with("KAFKA_SASL_")
                || k.as_str() == "KAFKA_SECURITY_PROTOCOL"
        })
        .collect();
    upper.sort();
    for (k, v) in upper {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        let prop = k["KAFKA_".len()..].to_ascii_lowercase().replace('_', ".");
        props.insert(prop, v.to_owned());
    }
}

/// A store's type from its file name, else `default`.
fn guess_store_type(location: &str, default: &str) -> String {
    let lower = location.to_ascii_lowercase();
    if lower.ends_with(".p12") || lower.ends_with(".pfx") {
        "PKCS12".into()
    } else if lower.ends_with(".jks") {
        "JKS".into()
    } else if [".pem", ".crt", ".cer"].iter().any(|e| lower.ends_with(e)) {
        "PEM".into()
    } else {
        default.into()
    }
}

/// `location` with its extension replaced by `ext` (or `ext` added).
fn with_extension(location: &str, ext: &str) -> String {
    std::path::Path::new(location)
        .with_extension(ext)
        .to_string_lossy()
        .into_owned()
}

/// `username="x"` out of a JAAS line such as
/// `org.apache.kafka.common.security.plain.PlainLoginModule required username="x" password="y";`
fn jaas_value(jaas: &str, key: &str) -> Option<String> {
    let start = jaas.find(&format!("{key}=\""))? + key.len() + 2;
    let end = jaas[start..].find('"')? + start;
    Some(jaas[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(pairs: &[(&str, &str)]) -> Result<KafkaConfig, ConfigError> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read(&Reader { vars: &vars }, &vars)
    }

    #[test]
    fn spring_kafka_names_are_the_fallback_of_the_java_names() {
        let props = |pairs: &[(&str, &str)]| kafka(pairs).map(|k| k.client_properties);
        let p = props(&[
            ("spring.kafka.security.protocol", "SSL"),
            ("spring.kafka.ssl.trust-store-location", "/certs/ca.pem"),
            ("spring.kafka.ssl.trust-store-type", "PEM"),
            ("spring.kafka.ssl.key-store-location", "/certs/client.p12"),
            ("spring.kafka.ssl.key-store-password", "ks"),
            ("spring.kafka.ssl.key-password", "k"),
            (
                "spring.kafka.properties.ssl.endpoint.identification.algorithm",
                "",
            ),
        ])
        .unwrap();
        assert_eq!(p["security.protocol"], "SSL");
        assert_eq!(p["ssl.ca.location"], "/certs/ca.pem");
        assert_eq!(p["ssl.keystore.location"], "/certs/client.p12");
        assert_eq!(p["ssl.keystore.password"], "ks");
        assert_eq!(p["ssl.key.password"], "k");
        assert_eq!(p["ssl.endpoint.identification.algorithm"], "none");
        // The Java module's own names win over the Spring ones.
        let p = props(&[
            ("security.protocol", "SASL_SSL"),
            ("spring.kafka.security.protocol", "SSL"),
        ])
        .unwrap();
        assert_eq!(p["security.protocol"], "SASL_SSL");
    }

    #[test]
    fn jks_stores_stop_the_start_with_the_keytool_command() {
        let e = kafka(&[
            ("ssl.truststore.location", "/certs/trust.jks"),
            ("ssl.truststore.password", "tp"),
        ])
        .unwrap_err();
        assert_eq!(e.var, "ssl.truststore.location");
        assert!(
            e.problem.contains(
                "keytool -list -rfc -keystore /certs/trust.jks -storepass '<truststore password>' > /certs/trust.pem"
            ),
            "{e}"
        );
        assert!(!e.problem.contains("tp"), "no password in the message: {e}");
        // JKS is the Java default when no type is given.
        let e =
            kafka(&[("spring.kafka.ssl.key-store-location", "/certs/client.store")]).unwrap_err();
        assert_eq!(e.var, "ssl.keystore.location");
        assert!(
            e.problem.contains("keytool -importkeystore -srckeystore /certs/client.store -srcstoretype JKS -destkeystore /certs/client.p12 -deststoretype PKCS12"),
            "{e}"
        );
    }

    #[test]
    fn bootstrap_servers() {
        assert_eq!(kafka(&[]).unwrap().bootstrap_servers, "localhost:9092");
        assert_eq!(
            kafka(&[("KAFKA_HOST", "k1,k2:9093"), ("KAFKA_PORT", "9094")])
                .unwrap()
                .bootstrap_servers,
            "k1:9094,k2:9093"
        );
        assert_eq!(
            kafka(&[("KAFKA_HOST", "a b")]).unwrap_err().var,
            "KAFKA_HOST"
        );
    }

    #[test]
    fn java_and_shell_security_names() {
        let c = kafka(&[
            ("security.protocol", "SASL_SSL"),
            ("ssl.truststore.location", "/certs/ca.pem"),
            ("ssl.truststore.type", "PEM"),
            ("ssl.keystore.location", "/certs/client.p12"),
            ("ssl.keystore.password", "kspass"),
            ("ssl.endpoint.identification.algorithm", ""),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.jaas.config", r#"org.apache.kafka.common.security.scram.ScramLoginModule required username="pubsub" password="pw";"#),
            ("KAFKA_SSL_CA_LOCATION", "/other/ca.pem"),
        ])
        .unwrap();
        let p = &c.client_properties;
        assert_eq!(p["security.protocol"], "SASL_SSL");
        assert_eq!(p["ssl.ca.location"], "/other/ca.pem", "KAFKA_* wins");
        assert_eq!(p["ssl.keystore.location"], "/certs/client.p12");
        assert_eq!(p["ssl.keystore.password"], "kspass");
        assert_eq!(p["ssl.endpoint.identification.algorithm"], "none");
        assert_eq!(p["sasl.mechanisms"], "SCRAM-SHA-512");
        assert_eq!(p["sasl.username"], "pubsub");
        assert_eq!(p["sasl.password"], "pw");
        let dump = format!("{c:?}");
        assert!(
            !dump.contains("kspass") && !dump.contains("\"pw\""),
            "{dump}"
        );
    }

    #[test]
    fn java_keystores_are_refused_with_a_hint() {
        let e = kafka(&[("ssl.truststore.location", "/certs/truststore.jks")]).unwrap_err();
        assert_eq!(e.var, "ssl.truststore.location");
        assert!(e.problem.contains("PEM"));
        let e = kafka(&[("ssl.keystore.location", "/k.jks")]).unwrap_err();
        assert_eq!(e.var, "ssl.keystore.location");
        let e = kafka(&[("KAFKA_SECURITY_PROTOCOL", "tls")]).unwrap_err();
        assert_eq!(e.var, "security.protocol");
    }

    #[test]
    fn tenant_collection_and_namespace() {
        assert_eq!(
            kafka(&[("KAFKA_PRODUCER_TENANT_COLLECTION", "ALL")])
                .unwrap()
                .tenant_collection
                .as_deref(),
            Some("ALL")
        );
        for bad in ["all", "1A", "A-B", "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456"] {
            assert_eq!(
                kafka(&[("KAFKA_PRODUCER_TENANT_COLLECTION", bad)])
                    .unwrap_err()
                    .var,
                "KAFKA_PRODUCER_TENANT_COLLECTION"
            );
        }
        assert_eq!(kafka(&[]).unwrap().namespace, "Default");
        assert_eq!(
            kafka(&[("KAFKA_TOPIC_NAMESPACE", "a.b")]).unwrap_err().var,
            "KAFKA_TOPIC_NAMESPACE"
        );
    }
}
