//! The per-tenant system user that deliveries authenticate as (behaviour spec §3.7).
//!
//! * At tenant init (unless `SYSTEM_USER_CREATE=false`) the user is created or repaired through
//!   Okapi with the `_tenant` request's `X-Okapi-Url` and token: mod-users, mod-login and
//!   mod-permissions calls in the Java module's order. Unlike the Java module, an existing user
//!   is re-activated and given `type: system`, and permissions are compared as a set.
//! * Deliveries log in with `POST /authn/login-with-expiry` and cache the access token per
//!   tenant until shortly before it expires; a 401 from a subscriber drops the cached token so
//!   the next attempt logs in again. Tokens are never logged.
//! * The last login failure per tenant is kept for `/admin/health`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use crate::config::SystemUserConfig;
use crate::domain::TenantId;

/// The system user's permissions (the Java module's `pubsub-user-permissions.csv`; also
/// `metadata.user.permissions` in the ModuleDescriptor).
pub const PERMISSIONS: [&str; 13] = [
    "pubsub.events.post",
    "audit.pub-sub-handlers.log-record-event.post",
    "remote-storage.pub-sub-handlers.log-record-event.post",
    "circulation.handlers.loan-related-fee-fine-closed.post",
    "circulation.handlers.fee-fine-balance-changed.post",
    "patron-blocks.handlers.fee-fine-balance-changed.post",
    "patron-blocks.handlers.item-checked-out.post",
    "patron-blocks.handlers.item-checked-in.post",
    "patron-blocks.handlers.item-declared-lost.post",
    "patron-blocks.handlers.item-aged-to-lost.post",
    "patron-blocks.handlers.item-claimed-returned.post",
    "patron-blocks.handlers.loan-due-date-changed.post",
    "patron-blocks.handlers.loan-closed.post",
];

/// Why provisioning the system user failed (the `_tenant` job's error message).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("Okapi did not answer: {0}")]
    Unreachable(#[from] reqwest::Error),
    #[error("Unable to update the {user} user: {body}")]
    UpdateUser { user: String, body: String },
    #[error("Failed to create {user} user. Received status code {status}")]
    CreateUser { user: String, status: u16 },
    #[error("Failed to save {user} user credentials. Received status code {status}")]
    SaveCredentials { user: String, status: u16 },
    #[error("Unreadable permissions of {user}: {source}")]
    UnreadablePermissions {
        user: String,
        source: serde_json::Error,
    },
    #[error("Failed to update permissions {permissions} for {user} user. Received status code {status}: {body}")]
    UpdatePermissions {
        permissions: String,
        user: String,
        status: u16,
        body: String,
    },
    #[error("Failed to add permissions {permissions} for {user} user. Received status code {status}: {body}")]
    AddPermissions {
        permissions: String,
        user: String,
        status: u16,
        body: String,
    },
    #[error("Failed to get permissions for {user} user. Received status code {status}: {body}")]
    GetPermissions {
        user: String,
        status: u16,
        body: String,
    },
}

/// Why the system user could not log in.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{user} user was not logged in: {source}")]
    Unreachable {
        user: String,
        source: reqwest::Error,
    },
    #[error("{user} user was not logged in, received status {status}")]
    Refused { user: String, status: u16 },
    #[error("Failed to fetch folioAccessToken from cookies")]
    NoToken,
}

/// A token without `Max-Age` is kept this long.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Okapi as the `_tenant` request reached us.
pub struct OkapiCall<'a> {
    pub okapi: crate::client::Okapi,
    pub tenant: &'a TenantId,
    pub token: Option<&'a str>,
}

impl OkapiCall<'_> {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.okapi
            .request(method, path, self.tenant.as_str(), self.token)
            .header("Accept", "application/json, text/plain")
    }

    async fn send(
        &self,
        r: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String), ProvisionError> {
        let resp = r.send().await?;
        let status = resp.status();
        Ok((status, resp.text().await.unwrap_or_default()))
    }

    /// Sends `body` as JSON; the answer's status and text.
    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<(StatusCode, String), ProvisionError> {
        self.send(self.request(method, path).json(body)).await
    }
}

/// Creates or repairs the system user of a tenant; the error is the job's error message.
pub async fn provision(
    okapi: &OkapiCall<'_>,
    cfg: &SystemUserConfig,
) -> Result<(), ProvisionError> {
    let user_id = ensure_user(okapi, cfg).await?;
    ensure_permissions(okapi, &cfg.name, &user_id).await
}

/// The system user's id: the existing user re-activated (and made `type: system`), or a new one
/// with its credentials.
async fn ensure_user(
    okapi: &OkapiCall<'_>,
    cfg: &SystemUserConfig,
) -> Result<String, ProvisionError> {
    let query = format!("username==\"{}\"", cql_escape(&cfg.name));
    let url = format!("/users?query={}", utf8_percent(&query));
    let (status, body) = okapi
        .send(okapi.request(reqwest::Method::GET, &url))
        .await?;
    let existing: Option<Value> = (status == StatusCode::OK)
        .then(|| serde_json::from_str::<Value>(&body).ok())
        .flatten()
        .and_then(|v| v["users"].as_array().and_then(|u| u.first().cloned()));
    match existing {
        Some(user) => repair_user(okapi, &cfg.name, user).await,
        None => create_user(okapi, cfg).await,
    }
}

/// Makes an existing user active, `type: system` and gives it a last name, where it lacks any.
async fn repair_user(
    okapi: &OkapiCall<'_>,
    name: &str,
    mut user: Value,
) -> Result<String, ProvisionError> {
    let id = user["id"].as_str().unwrap_or_default().to_owned();
    let blank_last_name = user["personal"]["lastName"]
        .as_str()
        .is_none_or(|s| s.trim().is_empty());
    let inactive = user["active"] != Value::Bool(true);
    let not_system = user["type"] != "system";
    if !(blank_last_name || inactive || not_system) {
        return Ok(id);
    }
    if blank_last_name {
        user["personal"] = json!({"lastName": "System"});
    }
    user["active"] = json!(true);
    user["type"] = json!("system");
    let (status, body) = okapi
        .send_json(reqwest::Method::PUT, &format!("/users/{id}"), &user)
        .await?;
    if status != StatusCode::NO_CONTENT {
        return Err(ProvisionError::UpdateUser {
            user: name.to_owned(),
            body,
        });
    }
    Ok(id)
}

/// A new system user with its credentials.
async fn create_user(
    okapi: &OkapiCall<'_>,
    cfg: &SystemUserConfig,
) -> Result<String, ProvisionError> {
    let name = &cfg.name;
    let id = uuid::Uuid::new_v4().to_string();
    let user = json!({"id": id, "username": name, "active": true, "type": "system", "personal": {"lastName": "System"}});
    let (status, _) = okapi
        .send_json(reqwest::Method::POST, "/users", &user)
        .await?;
    if status != StatusCode::CREATED {
        return Err(ProvisionError::CreateUser {
            user: name.clone(),
            status: status.as_u16(),
        });
    }
    let credentials =
        json!({"username": name, "password": cfg.password.expose_secret(), "userId": id});
    let (status, _) = okapi
        .send_json(reqwest::Method::POST, "/authn/credentials", &credentials)
        .await?;
    if status != StatusCode::CREATED {
        return Err(ProvisionError::SaveCredentials {
            user: name.clone(),
            status: status.as_u16(),
        });
    }
    Ok(id)
}

/// The system user's permissions: PERMISSIONS added to what it has (none removed).
async fn ensure_permissions(
    okapi: &OkapiCall<'_>,
    name: &str,
    user_id: &str,
) -> Result<(), ProvisionError> {
    let (status, body) = okapi
        .send(okapi.request(
            reqwest::Method::GET,
            &format!("/perms/users/{user_id}?indexField=userId"),
        ))
        .await?;
    match status {
        StatusCode::OK => {
            let perm_user: Value = serde_json::from_str(&body).map_err(|source| {
                ProvisionError::UnreadablePermissions {
                    user: name.to_owned(),
                    source,
                }
            })?;
            merge_permissions(okapi, name, perm_user).await
        }
        StatusCode::NOT_FOUND => add_permissions(okapi, name, user_id).await,
        other => Err(ProvisionError::GetPermissions {
            user: name.to_owned(),
            status: other.as_u16(),
            body,
        }),
    }
}

/// Adds the PERMISSIONS it lacks to an existing permission user.
async fn merge_permissions(
    okapi: &OkapiCall<'_>,
    name: &str,
    mut perm_user: Value,
) -> Result<(), ProvisionError> {
    let have: BTreeSet<&str> = perm_user["permissions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if PERMISSIONS.iter().all(|p| have.contains(p)) {
        return Ok(());
    }
    let mut merged: BTreeSet<String> = have.iter().map(|s| s.to_string()).collect();
    merged.extend(PERMISSIONS.iter().map(|s| s.to_string()));
    perm_user["permissions"] = json!(merged);
    let id = perm_user["id"].as_str().unwrap_or_default().to_owned();
    let (status, body) = okapi
        .send_json(
            reqwest::Method::PUT,
            &format!("/perms/users/{id}"),
            &perm_user,
        )
        .await?;
    if status != StatusCode::OK {
        return Err(ProvisionError::UpdatePermissions {
            permissions: PERMISSIONS.join(", "),
            user: name.to_owned(),
            status: status.as_u16(),
            body,
        });
    }
    Ok(())
}

/// A new permission user with PERMISSIONS.
async fn add_permissions(
    okapi: &OkapiCall<'_>,
    name: &str,
    user_id: &str,
) -> Result<(), ProvisionError> {
    let perm_user = json!({"id": uuid::Uuid::new_v4().to_string(), "userId": user_id, "permissions": PERMISSIONS});
    let (status, body) = okapi
        .send_json(reqwest::Method::POST, "/perms/users", &perm_user)
        .await?;
    if status != StatusCode::CREATED {
        return Err(ProvisionError::AddPermissions {
            permissions: PERMISSIONS.join(", "),
            user: name.to_owned(),
            status: status.as_u16(),
            body,
        });
    }
    Ok(())
}

/// CQL string escaping: backslash and double quote.
fn cql_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn utf8_percent(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Per-tenant access tokens of the system user.
pub struct Tokens {
    cfg: SystemUserConfig,
    okapi: crate::client::Okapi,
    cache: Mutex<HashMap<String, (String, Instant)>>,
    failures: Mutex<HashMap<String, String>>,
    /// One login at a time per tenant: concurrent deliveries that find no token wait for the
    /// login in progress instead of each logging in.
    logins: Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
}

impl Tokens {
    pub fn new(cfg: SystemUserConfig, okapi_url: &str, http: reqwest::Client) -> Self {
        Tokens {
            cfg,
            okapi: crate::client::Okapi::new(http, okapi_url),
            cache: Mutex::default(),
            failures: Mutex::default(),
            logins: Mutex::default(),
        }
    }

    fn cached(&self, tenant: &TenantId) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(tenant.as_str())
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(token, _)| token.clone())
    }

    /// The token to send, `None` when the system user is disabled (`SYSTEM_USER_CREATE=false`).
    pub async fn token(&self, tenant: &TenantId) -> Result<Option<String>, LoginError> {
        if !self.cfg.create {
            return Ok(None);
        }
        if let Some(token) = self.cached(tenant) {
            return Ok(Some(token));
        }
        let gate = std::sync::Arc::clone(
            self.logins
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(tenant.to_string())
                .or_default(),
        );
        let _one_login = gate.lock().await;
        // Another delivery may have logged in while this one waited.
        if let Some(token) = self.cached(tenant) {
            return Ok(Some(token));
        }
        match self.login(tenant).await {
            Ok((token, lifetime)) => {
                // Renew at 80 % of the lifetime, before Okapi would refuse it.
                let until = Instant::now() + lifetime.mul_f64(0.8);
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(tenant.to_string(), (token.clone(), until));
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(tenant.as_str());
                Ok(Some(token))
            }
            Err(e) => {
                tracing::warn!(%tenant, user = %self.cfg.name, error = %e, "system user login failed");
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(tenant.to_string(), e.to_string());
                Err(e)
            }
        }
    }

    /// Forgets the tenant's token (a subscriber answered 401).
    pub fn invalidate(&self, tenant: &TenantId) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tenant.as_str());
    }

    /// Tenants whose last login failed, with the reason.
    pub fn failures(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort();
        v
    }

    async fn login(&self, tenant: &TenantId) -> Result<(String, Duration), LoginError> {
        let name = &self.cfg.name;
        let resp = self
            .okapi
            .request(
                reqwest::Method::POST,
                "/authn/login-with-expiry",
                tenant.as_str(),
                None,
            )
            .json(&json!({"username": name, "password": self.cfg.password.expose_secret()}))
            .send()
            .await
            .map_err(|source| LoginError::Unreachable {
                user: name.clone(),
                source,
            })?;
        if resp.status() != StatusCode::CREATED {
            return Err(LoginError::Refused {
                user: name.clone(),
                status: resp.status().as_u16(),
            });
        }
        let token = resp
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| cookie::Cookie::parse(v.to_str().ok()?).ok())
            .find(|c| c.name() == "folioAccessToken");
        if let Some(c) = token {
            let lifetime = c
                .max_age()
                .and_then(|d| u64::try_from(d.whole_seconds()).ok())
                .filter(|s| *s > 0)
                .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
            return Ok((c.value().to_owned(), lifetime));
        }
        Err(LoginError::NoToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cql_queries_are_escaped_and_encoded() {
        assert_eq!(cql_escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(
            utf8_percent("username==\"pub sub\""),
            "username%3D%3D%22pub%20sub%22"
        );
    }
}
