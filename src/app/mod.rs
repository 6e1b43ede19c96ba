//! The service layer: the sequences of work behind the HTTP contract (and the CLI), on the
//! database, Kafka and the registry view. Handlers extract and validate input, call one function
//! here and render its result in FOLIO's formats.

pub mod registrations;

use sqlx::PgPool;

use crate::kafka::Kafka;
use crate::registry::RegistryCache;

/// What the service layer works on.
#[derive(Clone, Copy)]
pub struct Deps<'a> {
    pub pool: &'a PgPool,
    pub kafka: &'a Kafka,
    pub registry: &'a RegistryCache,
}
