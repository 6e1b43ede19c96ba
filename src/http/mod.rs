//! The HTTP service: one router per resource, merged here, with the OpenAPI document built from
//! the same routes.

pub mod dead_letters;
pub mod event_types;
pub mod extract;
pub mod health;
pub mod history;
pub mod messaging_modules;
pub mod publish;
pub mod publishers;
pub mod registrations;
pub mod subscribers;
pub mod tenant;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use sqlx::PgPool;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;

/// What every handler can reach: one reference-counted [`Services`], so that axum's clone of
/// the state for each request is one atomic increment rather than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The service's shared parts.
pub struct Services {
    pub pool: PgPool,
    pub config: Arc<Config>,
    /// Background work (tenant jobs) that graceful shutdown waits for.
    pub tasks: TaskTracker,
    pub kafka: Arc<crate::kafka::Kafka>,
    pub registry: crate::registry::RegistryCache,
    pub audit: crate::audit::AuditWriter,
    /// HTTP client for calls to Okapi (system user provisioning).
    pub okapi_http: reqwest::Client,
    pub tokens: Arc<crate::system_user::Tokens>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub engine: Arc<crate::delivery::Engine>,
    /// Cancelled when the service stops (replays end with it).
    pub shutdown: tokio_util::sync::CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mod-pubsub",
        description = "FOLIO's publish/subscribe broker: event types, publisher and subscriber registrations, \
                       publishing and delivery over Kafka. Drop-in for the Java module's REST contract.",
        license(name = "Apache-2.0")
    ),
    tags(
        (name = "event-types", description = "Event descriptors (global)"),
        (name = "publishers", description = "Publisher registrations (per tenant)"),
        (name = "subscribers", description = "Subscriber registrations (per tenant)"),
        (name = "messaging-modules", description = "Unregistering a module"),
        (name = "publish", description = "Publishing events"),
        (name = "audit", description = "The audit trail (per tenant)"),
        (name = "dead-letters", description = "Dead-lettered events, redelivery and replay"),
        (name = "tenant", description = "Okapi _tenant interface 2.0"),
        (name = "admin", description = "Health and operations")
    ),
    components(schemas(crate::error::Errors, crate::error::ErrorItem, crate::error::Parameter))
)]
struct ApiDoc;

fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(event_types::router())
        .merge(publishers::router())
        .merge(subscribers::router())
        .merge(messaging_modules::router())
        .merge(publish::router())
        .merge(history::router())
        .merge(dead_letters::router())
        .merge(tenant::router())
        .merge(health::router())
}

/// The OpenAPI document, generated from the routes (committed as `api/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

pub const OPENAPI_PATH: &str = "/admin/openapi.json";
pub const SWAGGER_UI_PATH: &str = "/admin/swagger-ui";

/// The whole application router.
pub fn app(state: AppState) -> Router {
    let (router, api) = routes().split_for_parts();
    let body_limit = state.config.max_request_size;
    router
        .merge(SwaggerUi::new(SWAGGER_UI_PATH).url(OPENAPI_PATH, api))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Not found",
    )
        .into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "Internal Server Error",
    )
        .into_response()
}
