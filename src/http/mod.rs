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
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
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

impl AppState {
    /// What the service layer works on.
    pub fn deps(&self) -> crate::app::Deps<'_> {
        crate::app::Deps {
            config: &self.config,
            pool: &self.pool,
            kafka: &self.kafka,
            registry: &self.registry,
            audit: &self.audit,
            metrics: &self.metrics,
            engine: &self.engine,
            okapi_http: &self.okapi_http,
        }
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
    pub registry: crate::registry_cache::RegistryCache,
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
    documented_routes().1
}

/// The routes and their document, with [`common_answers`] added: what is served and what is
/// committed are the same.
fn documented_routes() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut api) = routes().split_for_parts();
    common_answers(&mut api);
    (router, api)
}

/// What every operation of the contract can answer besides its own statuses, added in one place
/// rather than on each handler: 400 (text/plain) for a missing or invalid `X-Okapi-Tenant` or
/// query parameter, 503 (text/plain) when PostgreSQL or Kafka does not answer, and for
/// operations with a body 400 for a malformed one, 413 above `MAX_REQUEST_SIZE` and 422 in
/// FOLIO's `errors` format naming the field. `X-Okapi-Tenant` is marked required.
fn common_answers(api: &mut utoipa::openapi::OpenApi) {
    for (path, item) in api.paths.paths.iter_mut() {
        if !(path.starts_with("/pubsub") || path.starts_with("/_/")) {
            continue;
        }
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            add_common_answers(op);
        }
    }
}

/// [`common_answers`] of one operation.
fn add_common_answers(op: &mut utoipa::openapi::path::Operation) {
    use utoipa::openapi::path::ParameterIn;
    use utoipa::openapi::{
        schema::Type, Content, ObjectBuilder, Ref, RefOr, Required, Response, ResponseBuilder,
    };
    let plain = || Content::new(Some(ObjectBuilder::new().schema_type(Type::String)));
    let text = |description: &str| -> RefOr<Response> {
        ResponseBuilder::new()
            .description(description)
            .content("text/plain", plain())
            .build()
            .into()
    };
    for p in op.parameters.iter_mut().flatten() {
        if p.parameter_in == ParameterIn::Header && p.name == "X-Okapi-Tenant" {
            p.required = Required::True;
        }
    }
    let has_body = op.request_body.is_some();
    let answers = &mut op.responses.responses;
    match answers.get_mut("400") {
        None => {
            answers.insert(
                "400".into(),
                text("Bad request: a missing or invalid tenant, parameter or body"),
            );
        }
        // A 400 that documents JSON (the publisher declaration's errors) is also sent as text
        // for a malformed request.
        Some(RefOr::T(r)) if !r.content.contains_key("text/plain") => {
            r.content.insert("text/plain".into(), plain());
        }
        Some(_) => {}
    }
    answers
        .entry("503".into())
        .or_insert_with(|| text("PostgreSQL or Kafka did not answer in time"));
    if has_body {
        answers
            .entry("413".into())
            .or_insert_with(|| text("The body is larger than MAX_REQUEST_SIZE"));
        answers.entry("422".into()).or_insert_with(|| {
            ResponseBuilder::new()
                .description("A field of the body is invalid (named in the errors)")
                .content(
                    "application/json",
                    Content::new(Some(Ref::from_schema_name("Errors"))),
                )
                .build()
                .into()
        });
    }
}

pub const OPENAPI_PATH: &str = "/admin/openapi.json";
pub const SWAGGER_UI_PATH: &str = "/admin/swagger-ui";

/// The whole application router.
pub fn app(state: AppState) -> Router {
    let (router, api) = documented_routes();
    let body_limit = state.config.max_request_size;
    router
        .merge(SwaggerUi::new(SWAGGER_UI_PATH).url(OPENAPI_PATH, api))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        // Okapi's request id, or a new one: in the span, the response and the Kafka record.
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

const REQUEST_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-okapi-request-id");

/// One span per request: method, route, tenant and request id, so that a request's log lines
/// (and JSON logs' `span` fields) can be tied together.
fn request_span(req: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    tracing::info_span!(
        "request",
        method = %req.method(),
        route,
        tenant = header("x-okapi-tenant"),
        request_id = header(REQUEST_ID.as_str()),
    )
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
