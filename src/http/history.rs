//! `GET /pubsub/history` and `GET /pubsub/audit-messages/{eventId}/payload` (endpoints 12, 13).

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::extract::Tenant;
use super::AppState;
use crate::audit::AuditState;
use crate::db;
use crate::domain::TenantId;
use crate::error::{AppError, AppResult};
use crate::event::{format_date, parse_date_time};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(history))
        .routes(routes!(payload))
}

pub const DEFAULT_LIMIT: i64 = 1000;
pub const MAX_LIMIT: i64 = 10_000;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// `yyyy-MM-dd`, `yyyy-MM-ddTHH:mm:ss` (UTC), or with an offset (`Z`, `+00:00`, `+0000`),
    /// optionally with fractions of a second (documented as a date-time, the widest form).
    #[param(required = true, format = DateTime)]
    pub start_date: Option<String>,
    /// As `startDate`; a date alone means the whole day (inclusive).
    #[param(required = true, format = DateTime)]
    pub end_date: Option<String>,
    #[param(format = Uuid)]
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    /// Rows to skip (default 0).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 2147483647)]
    pub offset: Option<String>,
    /// Rows to return (default 1000, at most 10000).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 10000)]
    pub limit: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditMessage {
    pub id: Uuid,
    pub event_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    pub tenant_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_by: Option<String>,
    /// `2019-09-15T13:00:00.000+00:00`
    pub audit_date: String,
    pub state: AuditState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Delivery rows: the subscriber module.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber: Option<String>,
    /// Delivery rows: the attempt, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditMessageCollection {
    pub audit_messages: Vec<AuditMessage>,
    /// All rows matching the filters, regardless of `offset` and `limit`.
    pub total_records: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditMessagePayload {
    pub event_id: Uuid,
    /// The event's payload, as published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

const DATE_FORMATS: &str =
    "Supported date formats yyyy-MM-dd, yyyy-MM-dd'T'HH:mm:ss, yyyy-MM-dd'T'HH:mm:ssZZ \
                            (offsets as Z, +00:00 or +0000; fractions of a second allowed)";

/// A query bound: an instant, and whether it was a date alone.
fn parse_bound(raw: &str) -> Option<(DateTime<Utc>, bool)> {
    let raw = raw.trim();
    if let Ok(d) = NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        return Some((d.and_hms_opt(0, 0, 0)?.and_utc(), true));
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some((dt.and_utc(), false));
    }
    parse_date_time(raw).map(|dt| (dt.with_timezone(&Utc), false))
}

fn number(raw: Option<&str>, name: &str, default: i64, max: i64) -> AppResult<i64> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<i64>() {
        Ok(n) if (0..=max).contains(&n) => Ok(n),
        _ => Err(AppError::BadRequest(format!(
            "{name} must be a whole number from 0 to {max}"
        ))),
    }
}

fn ensure_enabled(state: &AppState, tenant: &TenantId) -> AppResult<()> {
    if state.registry.tenant_enabled(tenant) {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "Tenant {tenant} is not enabled for mod-pubsub (POST /_/tenant first)"
        )))
    }
}

/// The audit trail of this tenant between two dates (inclusive), oldest first.
#[utoipa::path(get, path = "/pubsub/history", tag = "audit",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id"), HistoryQuery),
    responses((status = 200, body = AuditMessageCollection),
              (status = 400, description = "Missing or malformed dates or filters", body = String, content_type = "text/plain")))]
async fn history(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Query(q): Query<HistoryQuery>,
) -> AppResult<Json<AuditMessageCollection>> {
    let (Some(start), Some(end)) = (q.start_date.as_deref(), q.end_date.as_deref()) else {
        return Err(AppError::BadRequest(
            "Start date and End date are required query parameters".into(),
        ));
    };
    let (start, _) = parse_bound(start).ok_or_else(|| AppError::BadRequest(DATE_FORMATS.into()))?;
    let (mut end, end_is_date) =
        parse_bound(end).ok_or_else(|| AppError::BadRequest(DATE_FORMATS.into()))?;
    if end_is_date {
        // The whole end day, as the Java module (23:59:59.999).
        end = end + chrono::Duration::days(1) - chrono::Duration::milliseconds(1);
    }
    let event_id =
        match q.event_id.as_deref() {
            None => None,
            Some(raw) => Some(Uuid::parse_str(raw).map_err(|_| {
                AppError::BadRequest(format!("eventId must be a UUID, got '{raw}'"))
            })?),
        };
    let offset = number(q.offset.as_deref(), "offset", 0, i64::from(i32::MAX))?;
    let limit = number(q.limit.as_deref(), "limit", DEFAULT_LIMIT, MAX_LIMIT)?;
    ensure_enabled(&state, &tenant)?;

    let filter = db::audit::HistoryFilter {
        start,
        end,
        event_id,
        event_type: q.event_type.as_deref(),
        correlation_id: q.correlation_id.as_deref(),
        offset,
        limit,
    };
    let (total, rows) = db::audit::history(&state.pool, &tenant, &filter).await?;
    let audit_messages = rows
        .into_iter()
        .map(|r| AuditMessage {
            id: r.id,
            event_id: r.event_id,
            event_type: r.event_type,
            correlation_id: r.correlation_id,
            tenant_id: r.tenant_id,
            created_by: r.created_by,
            published_by: r.published_by,
            audit_date: format_date(r.audit_date.and_utc()),
            state: r.state,
            error_message: r.error_message,
            subscriber: r.subscriber,
            attempt: r.attempt,
        })
        .collect();
    Ok(Json(AuditMessageCollection {
        audit_messages,
        total_records: total,
    }))
}

/// The stored payload of an event (only when payload auditing is on).
#[utoipa::path(get, path = "/pubsub/audit-messages/{eventId}/payload", tag = "audit",
    params(("eventId" = String, Path, format = Uuid), ("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    responses((status = 200, body = AuditMessagePayload),
              (status = 400, description = "Not a UUID", body = String, content_type = "text/plain"),
              (status = 404, body = String, content_type = "text/plain")))]
async fn payload(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(event_id): Path<String>,
) -> AppResult<Json<AuditMessagePayload>> {
    let id = Uuid::parse_str(&event_id)
        .map_err(|_| AppError::BadRequest(format!("eventId must be a UUID, got '{event_id}'")))?;
    ensure_enabled(&state, &tenant)?;
    let Some(stored) = db::audit::payload(&state.pool, &tenant, id).await? else {
        return Err(AppError::NotFound(format!(
            "Couldn't find audit message payload for event {id}"
        )));
    };
    // Rows hold the wrapper {"eventId", "content"} (the Java module's shape): unwrap it instead
    // of returning it double-encoded.
    let content = match stored {
        serde_json::Value::Object(mut m) => match m.remove("content") {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Null) | None => None,
            Some(other) => Some(other.to_string()),
        },
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    };
    Ok(Json(AuditMessagePayload {
        event_id: id,
        content,
    }))
}
