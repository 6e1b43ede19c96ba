//! The service layer: the sequences of work behind the HTTP contract (and the CLI), on the
//! database, Kafka and the registry view. Handlers extract and validate input, call one function
//! here and render its result in FOLIO's formats.

pub mod event_types;
pub mod publishing;
pub mod registrations;
pub mod tenants;

use sqlx::PgPool;

use crate::audit::AuditWriter;
use crate::config::Config;
use crate::delivery::Engine;
use crate::kafka::Kafka;
use crate::metrics::Metrics;
use crate::registry_cache::RegistryCache;

/// What the service layer works on.
#[derive(Clone, Copy)]
pub struct Deps<'a> {
    pub config: &'a Config,
    pub pool: &'a PgPool,
    pub kafka: &'a Kafka,
    pub registry: &'a RegistryCache,
    pub audit: &'a AuditWriter,
    pub metrics: &'a Metrics,
    /// Woken by publishes (their partitions are fetched at once).
    pub engine: &'a Engine,
    /// Calls to Okapi (system user provisioning).
    pub okapi_http: &'a reqwest::Client,
}
