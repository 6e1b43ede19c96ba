//! `GET /admin/health`: 200 while PostgreSQL answers, 503 with the reason when it does not.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(metrics))
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Health of the service and its database; further lines name system-user logins that fail
/// and subscriber modules whose deliveries are retrying, paused or recently failed.
#[utoipa::path(get, path = "/admin/health", tag = "admin",
    responses((status = 200, description = "Healthy", body = String, content_type = "text/plain"),
              (status = 503, description = "A dependency is down; the body says which", body = String, content_type = "text/plain")))]
async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let probe = crate::db::ping(&state.pool);
    let problem = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => None,
        Ok(Err(err)) => Some(format!("database: {err}")),
        Err(_) => Some(format!(
            "database: no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    };
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    match problem {
        None => {
            // Deliveries of these tenants wait for their system user (retried with backoff).
            let failures = state.tokens.failures();
            let mut body = "OK".to_owned();
            for (tenant, reason) in failures {
                body.push_str(&format!(
                    "\nsystem user login failing for tenant {tenant}: {reason}"
                ));
            }
            // Registered topics the broker does not have yet (publishing to them answers 503).
            let (missing, shown) = state.kafka.missing_topics(5);
            if missing > 0 {
                let shown: Vec<&str> = shown.iter().map(|t| t.as_str()).collect();
                body.push_str(&format!(
                    "\n{missing} registered topics not created yet (the reconciler retries): {}{}",
                    shown.join(", "),
                    if missing > shown.len() { ", ..." } else { "" }
                ));
            }
            // Subscribers in trouble: records retrying, partitions paused, a recent failure.
            // A subscriber's trouble is not this service's, so the status stays 200.
            for report in state.engine.reports() {
                body.push_str(&format!("\n{report}"));
            }
            (StatusCode::OK, text, body)
        }
        Some(reason) => {
            tracing::warn!(%reason, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, text, reason)
        }
    }
}

/// Prometheus metrics: publishes, deliveries, retries, dead letters per event type, delivery
/// latency, consumer lag per delivery group.
#[utoipa::path(get, path = "/admin/metrics", tag = "admin",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state
        .metrics
        .topics_missing
        .set(state.kafka.missing_topics(0).0 as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
