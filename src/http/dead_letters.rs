//! Dead letters and replay, per tenant: list what could not be delivered, deliver it again,
//! replay a subscriber from a point in time.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{FolioJson, Tenant};
use super::AppState;
use crate::delivery::dead_letters::DeadLetter;
use crate::domain::{parse_folio_uuid, ModuleId};
use crate::error::{AppError, AppResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(redeliver))
        .routes(routes!(replay))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only this subscriber module (any version when given without one).
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")]
    pub subscriber: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterCollection {
    pub dead_letters: Vec<DeadLetter>,
    pub total_records: usize,
}

fn matches_subscriber(letter: &DeadLetter, wanted: Option<&ModuleId>) -> bool {
    wanted.is_none_or(|m| m.as_str() == letter.subscriber || m.same_module(&letter.subscriber))
}

fn subscriber_param(raw: Option<&str>) -> AppResult<Option<ModuleId>> {
    raw.map(|s| {
        ModuleId::parse(s).map_err(|e| AppError::BadRequest(format!("Invalid subscriber: {e}")))
    })
    .transpose()
}

fn kafka_unavailable(e: crate::delivery::dead_letters::DeadLetterError) -> AppError {
    AppError::Unavailable(format!("Kafka: {e}"))
}

/// Events of this tenant that could not be delivered (oldest first).
#[utoipa::path(get, path = "/pubsub/dead-letters", tag = "dead-letters",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id"), DeadLetterQuery),
    responses((status = 200, body = DeadLetterCollection),
              (status = 503, description = "Kafka did not answer", body = String, content_type = "text/plain")))]
async fn list_dead_letters(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Query(q): Query<DeadLetterQuery>,
) -> AppResult<Json<DeadLetterCollection>> {
    let subscriber = subscriber_param(q.subscriber.as_deref())?;
    let letters: Vec<DeadLetter> = state
        .engine
        .dead_letters(&tenant)
        .await
        .map_err(kafka_unavailable)?
        .into_iter()
        .filter(|l| matches_subscriber(l, subscriber.as_ref()))
        .collect();
    Ok(Json(DeadLetterCollection {
        total_records: letters.len(),
        dead_letters: letters,
    }))
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedeliverRequest {
    /// Only dead letters of this subscriber module.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")]
    pub subscriber: Option<String>,
    /// Only these events.
    #[serde(default)]
    #[schema(value_type = Option<Vec<uuid::Uuid>>)]
    pub event_ids: Option<Vec<String>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedeliveryFailure {
    pub event_id: Option<String>,
    pub subscriber: String,
    pub reason: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedeliveryResult {
    /// Event ids the subscriber accepted this time.
    pub redelivered: Vec<String>,
    pub failed: Vec<RedeliveryFailure>,
}

/// Delivers matching dead letters once more, now. The dead-letter topic is not changed: a
/// redelivered event stays listed (its DELIVERED audit row shows it arrived).
#[utoipa::path(post, path = "/pubsub/dead-letters/redeliver", tag = "dead-letters",
    params(("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = RedeliverRequest,
    responses((status = 200, body = RedeliveryResult),
              (status = 422, body = crate::error::Errors),
              (status = 503, description = "Kafka did not answer", body = String, content_type = "text/plain")))]
async fn redeliver(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    FolioJson(body): FolioJson<RedeliverRequest>,
) -> AppResult<Json<RedeliveryResult>> {
    let subscriber = match body.subscriber.as_deref() {
        None => None,
        Some(s) => {
            Some(ModuleId::parse(s).map_err(|e| AppError::invalid_field("subscriber", s, e.0))?)
        }
    };
    let ids = match &body.event_ids {
        None => None,
        Some(ids) => {
            let mut parsed = Vec::with_capacity(ids.len());
            for (i, id) in ids.iter().enumerate() {
                let u = parse_folio_uuid(id)
                    .map_err(|e| AppError::invalid_field(format!("eventIds[{i}]"), id, e.0))?;
                parsed.push(u.to_string());
            }
            Some(parsed)
        }
    };
    let letters = state
        .engine
        .dead_letters(&tenant)
        .await
        .map_err(kafka_unavailable)?;
    let mut result = RedeliveryResult {
        redelivered: vec![],
        failed: vec![],
    };
    for letter in letters
        .iter()
        .filter(|l| matches_subscriber(l, subscriber.as_ref()))
    {
        let id = letter.event_id.clone();
        if let Some(ids) = &ids {
            if !id.as_ref().is_some_and(|i| ids.contains(&i.to_lowercase())) {
                continue;
            }
        }
        match state.engine.redeliver(&tenant, letter).await {
            Ok(()) => result.redelivered.push(id.unwrap_or_default()),
            Err(reason) => result.failed.push(RedeliveryFailure {
                event_id: id,
                subscriber: letter.subscriber.clone(),
                reason: reason.to_string(),
            }),
        }
    }
    tracing::info!(%tenant, redelivered = result.redelivered.len(), failed = result.failed.len(), "dead letters redelivered");
    Ok(Json(result))
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayRequest {
    /// Replay events published at or after this instant (ISO-8601 with an offset).
    #[schema(format = DateTime)]
    pub from_date: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplayStarted {
    pub module_id: String,
    pub from_date: String,
    pub topics: Vec<String>,
}

/// Delivers to a subscriber module again, in the background, every event of its subscriptions in
/// this tenant published since `fromDate` (the module's normal delivery goes on beside it).
#[utoipa::path(post, path = "/pubsub/subscribers/{moduleId}/replay", tag = "dead-letters",
    params(("moduleId" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$"), ("X-Okapi-Tenant" = String, Header, description = "Tenant id")),
    request_body = ReplayRequest,
    responses((status = 202, body = ReplayStarted),
              (status = 400, body = String, content_type = "text/plain"),
              (status = 404, description = "The module subscribes to nothing in this tenant", body = String, content_type = "text/plain"),
              (status = 422, body = crate::error::Errors)))]
async fn replay(
    Tenant(tenant): Tenant,
    State(state): State<AppState>,
    Path(module_id): Path<String>,
    FolioJson(body): FolioJson<ReplayRequest>,
) -> AppResult<(StatusCode, Json<ReplayStarted>)> {
    let module = ModuleId::parse(&module_id)
        .map_err(|e| AppError::BadRequest(format!("Invalid moduleId: {e}")))?;
    let from = crate::event::parse_date_time(&body.from_date)
        .ok_or_else(|| {
            AppError::invalid_field(
                "fromDate",
                &body.from_date,
                "must be an ISO-8601 date-time with an offset",
            )
        })?
        .with_timezone(&chrono::Utc);
    let topics: Vec<String> = state
        .engine
        .subscribed_topics(&tenant, module.name())
        .into_iter()
        .collect();
    if topics.is_empty() {
        return Err(AppError::NotFound(format!(
            "Module {module} subscribes to nothing in tenant {tenant}"
        )));
    }
    let (engine, stop, name, t) = (
        state.engine.clone(),
        state.shutdown.clone(),
        module.name().to_owned(),
        tenant.clone(),
    );
    state.tasks.spawn(async move {
        match engine.replay(&t, &name, from, &stop).await {
            Ok(n) => tracing::info!(tenant = %t, module = %name, records = n, "replay finished"),
            Err(e) => tracing::error!(tenant = %t, module = %name, error = %e, "replay failed"),
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(ReplayStarted {
            module_id: module.to_string(),
            from_date: body.from_date,
            topics,
        }),
    ))
}
