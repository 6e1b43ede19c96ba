//! An in-memory view of the publisher registrations and of the enabled tenants, so that
//! `POST /pubsub/publish` needs no database round trip.
//!
//! Every change to `messaging_module` or to a tenant's enablement is announced with
//! `pg_notify('pubsub_registry', <tenant>)` in the same transaction; every instance listens on
//! that channel and reloads the tenant, so a registration made on one instance is honoured by
//! the others within milliseconds. When the listening connection drops, notifications may have
//! been missed, so the whole view is reloaded after reconnecting, and once a minute anyway.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db::{self, registry::Registration};
use crate::domain::{ModuleRole, TenantId};

pub use crate::db::registry::{notify, CHANNEL};
const FULL_RELOAD_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Clone)]
struct TenantView {
    /// event type → (publisher module id → activated)
    publishers: HashMap<Arc<str>, HashMap<Arc<str>, bool>>,
    /// event type → subscribers with a callback
    subscribers: HashMap<Arc<str>, Vec<Subscriber>>,
    enabled: bool,
}

/// One copy of each event type, module id and callback per reload, shared by every tenant's view
/// (at 1,000 tenants of the same modules the view took 8 MiB with a string per row).
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: String) -> Arc<str> {
        if let Some(a) = self.0.get(s.as_str()) {
            return Arc::clone(a);
        }
        let a: Arc<str> = s.into();
        self.0.insert(Arc::clone(&a));
        a
    }
}

/// A subscriber registration the delivery engine pushes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub module_id: Arc<str>,
    pub callback: Arc<str>,
    /// Events published before this are not this subscriber's.
    pub since: chrono::DateTime<chrono::Utc>,
}

impl Subscriber {
    pub fn module_name(&self) -> &str {
        crate::domain::module_name(&self.module_id)
    }
}

/// The publisher check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublisherCheck {
    Registered,
    NotRegistered,
    NotActivated,
}

#[derive(Clone)]
pub struct RegistryCache {
    tenants: Arc<RwLock<HashMap<String, Arc<TenantView>>>>,
    /// Bumped after every reload; the delivery engine watches it.
    version: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for RegistryCache {
    fn default() -> Self {
        RegistryCache {
            tenants: Arc::default(),
            version: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

fn add_row(views: &mut HashMap<String, TenantView>, strings: &mut Interner, row: Registration) {
    let Registration {
        tenant_id: tenant,
        event_type_id: event_type,
        role,
        module_id,
        activated,
        subscriber_callback: callback,
        created_date: created,
        ..
    } = row;
    let view = views.entry(tenant).or_default();
    match role {
        ModuleRole::Publisher => {
            view.publishers
                .entry(strings.get(event_type))
                .or_default()
                .insert(strings.get(module_id), activated);
        }
        ModuleRole::Subscriber => {
            if let Some(callback) = callback.filter(|c| !c.is_empty()) {
                if activated {
                    view.subscribers
                        .entry(strings.get(event_type))
                        .or_default()
                        .push(Subscriber {
                            module_id: strings.get(module_id),
                            callback: strings.get(callback),
                            since: created.unwrap_or_default(),
                        });
                }
            }
        }
    }
}

/// Gives the loaded view back the room its maps and lists grew into.
fn shrink(view: &mut TenantView) {
    view.publishers
        .values_mut()
        .for_each(HashMap::shrink_to_fit);
    view.publishers.shrink_to_fit();
    view.subscribers.values_mut().for_each(Vec::shrink_to_fit);
    view.subscribers.shrink_to_fit();
}

impl RegistryCache {
    /// Whether `module_id` (compared exactly, as the Java module does) is a registered publisher of
    /// `event_type` in `tenant`.
    pub fn check_publisher(
        &self,
        tenant: &TenantId,
        event_type: &str,
        module_id: &str,
    ) -> PublisherCheck {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        match tenants
            .get(tenant.as_str())
            .and_then(|t| t.publishers.get(event_type))
            .and_then(|m| m.get(module_id))
        {
            None => PublisherCheck::NotRegistered,
            Some(true) => PublisherCheck::Registered,
            Some(false) => PublisherCheck::NotActivated,
        }
    }

    /// Whether `_tenant` created the tenant's schema (and no purge dropped it).
    pub fn tenant_enabled(&self, tenant: &TenantId) -> bool {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants.get(tenant.as_str()).is_some_and(|t| t.enabled)
    }

    /// Reloads one tenant.
    pub async fn reload_tenant(&self, pool: &PgPool, tenant: &str) -> sqlx::Result<()> {
        let rows = db::registry::tenant_registrations(pool, tenant).await?;
        // A name that is no tenant id has no schema (and is not put into one).
        let enabled = match TenantId::parse(tenant) {
            Ok(t) => db::tenants::schema_exists(pool, &t).await?,
            Err(_) => false,
        };
        let mut views = HashMap::new();
        views.insert(
            tenant.to_owned(),
            TenantView {
                enabled,
                ..Default::default()
            },
        );
        let mut strings = Interner::default();
        for row in rows {
            add_row(&mut views, &mut strings, row);
        }
        let mut view = views.remove(tenant).unwrap_or_default();
        shrink(&mut view);
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant.to_owned(), Arc::new(view));
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Reloads everything.
    pub async fn reload_all(&self, pool: &PgPool) -> sqlx::Result<()> {
        let rows = db::registry::all_registrations(pool).await?;
        let schemas = db::tenants::tenant_schemas(pool).await?;
        let mut views: HashMap<String, TenantView> = HashMap::new();
        for t in schemas.iter().filter_map(|s| s.strip_suffix("_mod_pubsub")) {
            views.entry(t.to_owned()).or_default().enabled = true;
        }
        let mut strings = Interner::default();
        for row in rows {
            add_row(&mut views, &mut strings, row);
        }
        let fresh = views
            .into_iter()
            .map(|(k, mut v)| {
                shrink(&mut v);
                (k, Arc::new(v))
            })
            .collect();
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.version.send_modify(|v| *v += 1);
        Ok(())
    }

    /// A receiver that changes after every reload.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Every (tenant, event type, subscriber) with a callback.
    pub fn all_subscriptions(&self) -> Vec<(String, String, Subscriber)> {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (tenant, view) in tenants.iter() {
            for (event_type, subs) in &view.subscribers {
                for s in subs {
                    out.push((tenant.clone(), event_type.to_string(), s.clone()));
                }
            }
        }
        out
    }

    /// The subscriber of `module_name` for `event_type` in `tenant`, if any.
    pub fn subscriber(
        &self,
        tenant: &str,
        event_type: &str,
        module_name: &str,
    ) -> Option<Subscriber> {
        let tenants = self.tenants.read().unwrap_or_else(|e| e.into_inner());
        tenants
            .get(tenant)?
            .subscribers
            .get(event_type)?
            .iter()
            .find(|s| s.module_name() == module_name)
            .cloned()
    }

    /// Keeps the view current until `shutdown`: LISTEN on the channel (on `listen`, a pool of its
    /// own), reload from `pool` on notifications, fully after reconnects and periodically.
    pub async fn follow(self, pool: PgPool, listen: PgPool, shutdown: CancellationToken) {
        let mut listener: Option<PgListener> = None;
        let mut next_full = tokio::time::Instant::now() + FULL_RELOAD_EVERY;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if listener.is_none() {
                match PgListener::connect_with(&listen).await {
                    Ok(mut l) => match l.listen(CHANNEL).await {
                        Ok(()) => {
                            listener = Some(l);
                            // Whatever changed while we were not listening.
                            if let Err(e) = self.reload_all(&pool).await {
                                tracing::warn!(error = %e, "registry reload failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
                    },
                    Err(e) => tracing::warn!(error = %e, "registry listener cannot connect"),
                }
                if listener.is_none() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            }
            let Some(l) = listener.as_mut() else { continue };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next_full) => {
                    next_full = tokio::time::Instant::now() + FULL_RELOAD_EVERY;
                    if let Err(e) = self.reload_all(&pool).await {
                        tracing::warn!(error = %e, "periodic registry reload failed");
                    }
                }
                received = l.try_recv() => match received {
                    Ok(Some(n)) => {
                        let tenant = n.payload().to_owned();
                        if let Err(e) = self.reload_tenant(&pool, &tenant).await {
                            tracing::warn!(error = %e, %tenant, "registry reload failed; reloading everything");
                            let _ = self.reload_all(&pool).await;
                        }
                    }
                    // The connection was lost and re-established: notifications may be lost.
                    Ok(None) => {
                        if let Err(e) = self.reload_all(&pool).await {
                            tracing::warn!(error = %e, "registry reload after reconnect failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "registry listener failed; reconnecting");
                        listener = None;
                    }
                },
            }
        }
    }
}
