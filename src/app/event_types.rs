//! Event types: registering a descriptor (idempotent; a subscriber's temporary one is replaced)
//! and deleting one that no module uses.

use super::Deps;
use crate::db::registry::{self, StoredDescriptor};
use crate::domain::EventType;

/// Why an event type was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A different descriptor is registered for the event type.
    #[error("a different descriptor exists")]
    Different { existing: StoredDescriptor },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Why an event type was not deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("no such event type")]
    NotFound,
    /// Modules are registered for it (named, unless a registration came meanwhile).
    #[error("modules are registered for it")]
    InUse { modules: Vec<String> },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Registers `wanted`: stored if new, kept if equal, replacing a temporary descriptor.
pub async fn register(deps: &Deps<'_>, wanted: &StoredDescriptor) -> Result<(), RegisterError> {
    let mut tx = deps.pool.begin().await?;
    if !registry::insert_descriptor_if_absent(&mut *tx, wanted).await? {
        match registry::find_descriptor_for_update(&mut tx, &wanted.event_type).await? {
            Some(existing) if existing.tmp => {
                registry::update_descriptor(&mut *tx, wanted).await?;
            }
            Some(existing) if existing == *wanted => {}
            Some(existing) => return Err(RegisterError::Different { existing }),
            // Deleted between the insert attempt and the read: insert it now.
            None => registry::insert_descriptor(&mut *tx, wanted).await?,
        }
    }
    tx.commit().await?;
    tracing::info!(event_type = %wanted.event_type, "event type registered");
    Ok(())
}

/// Deletes the event type `name` if no module of any tenant is registered for it.
pub async fn delete(deps: &Deps<'_>, name: &EventType) -> Result<(), DeleteError> {
    let name = name.as_str();
    let mut tx = deps.pool.begin().await?;
    if registry::find_descriptor(&mut *tx, name).await?.is_none() {
        return Err(DeleteError::NotFound);
    }
    let modules = registry::modules_using_event_type(&mut tx, name).await?;
    if !modules.is_empty() {
        return Err(DeleteError::InUse { modules });
    }
    let deleted = match registry::delete_descriptor(&mut tx, name).await {
        Ok(n) => n,
        // A registration came after the check.
        Err(sqlx::Error::Database(db)) if db.constraint() == Some("fk_event_type_id") => {
            return Err(DeleteError::InUse { modules: vec![] })
        }
        Err(e) => return Err(e.into()),
    };
    if deleted != 1 {
        return Err(DeleteError::NotFound);
    }
    tx.commit().await?;
    tracing::info!(event_type = %name, "event type deleted");
    Ok(())
}
