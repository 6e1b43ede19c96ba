//! Registrations: publisher and subscriber declarations and their deletion. Each is one
//! sequence: Kafka first (topics created, or reported missing), then one short transaction that
//! serialises on the (tenant, role, module) lock, replaces the module's rows and announces the
//! change, then this instance's registry view reloads (the others follow the announcement).

use uuid::Uuid;

use super::Deps;
use crate::db::registry::{self, Registration, StoredDescriptor};
use crate::domain::{EventType, ModuleId, ModuleRole, TenantId};

/// Why a declaration was not stored.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// Event types of a publisher declaration that are not registered, or registered with
    /// another descriptor.
    #[error("{} event descriptors do not match", .0.len())]
    Descriptors(Vec<DescriptorMismatch>),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// One event type a publisher declaration got wrong.
#[derive(Debug)]
pub enum DescriptorMismatch {
    Unknown(String),
    Different { existing: StoredDescriptor },
}

/// What a declaration registers for one event type.
pub struct Entry {
    pub event_type: String,
    /// The subscriber's Okapi path; `None` for publishers' rows (stored as `''`, as the Java
    /// module did) and for direct consumers.
    pub callback: Option<String>,
}

/// Declares `module` as publisher of `descriptors` in `tenant`, replacing its earlier declaration
/// (any version). Every descriptor must equal the registered one.
pub async fn declare_publisher(
    deps: &Deps<'_>,
    tenant: &TenantId,
    module: &ModuleId,
    descriptors: &[StoredDescriptor],
) -> Result<usize, RegistrationError> {
    let names: Vec<&str> = descriptors.iter().map(|d| d.event_type.as_str()).collect();
    let existing = registry::find_descriptors(deps.pool, &names).await?;
    let mismatches: Vec<DescriptorMismatch> = descriptors
        .iter()
        .filter_map(
            |wanted| match existing.iter().find(|e| e.event_type == wanted.event_type) {
                None => Some(DescriptorMismatch::Unknown(wanted.event_type.clone())),
                Some(e) if e != wanted => Some(DescriptorMismatch::Different {
                    existing: e.clone(),
                }),
                Some(_) => None,
            },
        )
        .collect();
    if !mismatches.is_empty() {
        return Err(RegistrationError::Descriptors(mismatches));
    }
    let entries: Vec<Entry> = names
        .iter()
        .map(|&t| Entry {
            event_type: t.to_owned(),
            callback: Some(String::new()),
        })
        .collect();
    replace(deps, tenant, ModuleRole::Publisher, module, &entries, &[]).await
}

/// Declares `module` as subscriber in `tenant`, replacing its earlier declaration (any version).
/// Unknown event types get a temporary descriptor that the publisher's registration overwrites.
pub async fn declare_subscriber(
    deps: &Deps<'_>,
    tenant: &TenantId,
    module: &ModuleId,
    entries: &[Entry],
) -> Result<usize, RegistrationError> {
    let placeholders: Vec<StoredDescriptor> = entries
        .iter()
        .map(|e| StoredDescriptor {
            event_type: e.event_type.clone(),
            description: None,
            event_ttl: 1,
            signed: false,
            tmp: true,
        })
        .collect();
    replace(
        deps,
        tenant,
        ModuleRole::Subscriber,
        module,
        entries,
        &placeholders,
    )
    .await
}

/// Creates the topics of `entries` (and the tenant's dead-letter topic), then replaces the
/// module's rows in one transaction. Returns how many rows were replaced.
async fn replace(
    deps: &Deps<'_>,
    tenant: &TenantId,
    role: ModuleRole,
    module: &ModuleId,
    entries: &[Entry],
    placeholders: &[StoredDescriptor],
) -> Result<usize, RegistrationError> {
    ensure_topics(deps, tenant, entries.iter().map(|e| e.event_type.as_str())).await;
    let mut tx = deps.pool.begin().await?;
    for placeholder in placeholders {
        if registry::insert_descriptor_if_absent(&mut *tx, placeholder).await? {
            tracing::info!(event_type = %placeholder.event_type, "temporary event descriptor created for a subscriber");
        }
    }
    registry::lock_module(&mut tx, tenant, role, module).await?;
    let replaced = registry::delete_module_rows(&mut tx, tenant, role, module, None).await?;
    for e in entries {
        let row = Registration {
            id: Uuid::new_v4(),
            event_type_id: e.event_type.clone(),
            tenant_id: tenant.to_string(),
            role,
            subscriber_callback: e.callback.clone(),
            module_id: module.to_string(),
            activated: true,
            // The first registration's date is kept: delivery starts with events from then on.
            created_date: replaced
                .iter()
                .find(|r| r.event_type_id == e.event_type)
                .and_then(|r| r.created_date),
        };
        registry::insert_registration(&mut tx, &row).await?;
    }
    registry::notify(&mut *tx, tenant).await?;
    tx.commit().await?;
    registry_changed(deps, tenant).await;
    let event_types: Vec<&str> = entries.iter().map(|e| e.event_type.as_str()).collect();
    tracing::info!(%tenant, role = role.as_str(), module = %module, ?event_types, replaced = replaced.len(), "module declared");
    Ok(replaced.len())
}

/// Deletes `module`'s registrations (any version) in `role`, for one event type or all of them.
/// Returns how many rows went.
pub async fn delete(
    deps: &Deps<'_>,
    tenant: &TenantId,
    role: ModuleRole,
    module: &ModuleId,
    event_type: Option<&EventType>,
) -> Result<usize, RegistrationError> {
    let mut tx = deps.pool.begin().await?;
    registry::lock_module(&mut tx, tenant, role, module).await?;
    let deleted = registry::delete_module_rows(
        &mut tx,
        tenant,
        role,
        module,
        event_type.map(EventType::as_str),
    )
    .await?;
    registry::notify(&mut *tx, tenant).await?;
    tx.commit().await?;
    registry_changed(deps, tenant).await;
    tracing::info!(%tenant, role = role.as_str(), module = %module, event_type = event_type.map(EventType::as_str), deleted = deleted.len(), "registrations deleted");
    Ok(deleted.len())
}

/// Creates the topics of `event_types` in `tenant` (and its dead-letter topic). When Kafka does
/// not answer within `KAFKA_ADMIN_TIMEOUT_MS` or refuses, the declaration goes on: the topics are
/// reported missing (`/admin/health`, `pubsub_kafka_topics_missing`) until the reconciler has
/// created them (a topic that exists is fine whatever the ACLs say about creating it), and
/// publishing to them answers 503 meanwhile. A module's tenant init accepts only 201, and the
/// Java module answered it.
async fn ensure_topics<'a>(
    deps: &Deps<'_>,
    tenant: &TenantId,
    event_types: impl IntoIterator<Item = &'a str>,
) {
    let mut topics = deps.kafka.topic_set(tenant, event_types);
    topics.insert(deps.kafka.topics.dead_letters(tenant));
    if let Err(e) = deps.kafka.admin.ensure(&topics).await {
        tracing::warn!(%tenant, error = %e, topics = topics.len(), "topics not created yet; the declaration is stored and the reconciler retries");
        deps.kafka.topics_still_missing(topics);
    }
}

/// After a committed change: this instance sees it at once (the others through NOTIFY).
pub async fn registry_changed(deps: &Deps<'_>, tenant: &TenantId) {
    if let Err(e) = deps
        .registry
        .reload_tenant(deps.pool, tenant.as_str())
        .await
    {
        tracing::warn!(%tenant, error = %e, "registry reload failed; the listener will catch up");
    }
}
