//! The one error type of the HTTP layer. It renders FOLIO's formats: `text/plain` for 400, 404,
//! 413, 500 and 503 (as RMB modules do) and the `errors` JSON for 422 and for the one JSON 400
//! of the publisher declaration.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// FOLIO's `errors` schema (raml-util `errors.schema`); note the snake_case `total_records`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Errors {
    pub errors: Vec<ErrorItem>,
    pub total_records: usize,
}

/// One FOLIO error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorItem {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Parameter>,
}

/// A `{key, value}` pair naming the offending field and its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Parameter {
    pub key: String,
    pub value: String,
}

impl ErrorItem {
    /// A validation error for one field, as RMB renders JSR-303 violations.
    pub fn field(
        key: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
        code: &str,
    ) -> Self {
        Self {
            message: message.into(),
            kind: "1".into(),
            code: code.into(),
            parameters: vec![Parameter {
                key: key.into(),
                value: value.into(),
            }],
        }
    }

    /// An error with a message only (the publisher declaration's 400 items).
    pub fn message(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: "1".into(),
            code: "-1".into(),
            parameters: vec![],
        }
    }
}

impl From<Vec<ErrorItem>> for Errors {
    fn from(errors: Vec<ErrorItem>) -> Self {
        let total_records = errors.len();
        Self {
            errors,
            total_records,
        }
    }
}

/// Codes used in 422 items, the JSR-303 message templates RMB puts there.
pub mod codes {
    pub const NOT_NULL: &str = "javax.validation.constraints.NotNull.message";
    pub const PATTERN: &str = "javax.validation.constraints.Pattern.message";
    pub const UNRECOGNIZED: &str = "-1";
    pub const INVALID_VALUE: &str = "-1";
    pub const DUPLICATE: &str = "-1";
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400 `text/plain`.
    #[error("{0}")]
    BadRequest(String),
    /// 400 with the `errors` JSON (only the publisher declaration answers like this).
    #[error("bad request: {0:?}")]
    BadRequestErrors(Errors),
    /// 404 `text/plain`.
    #[error("{0}")]
    NotFound(String),
    /// 413 `text/plain`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 422 with the `errors` JSON naming the fields.
    #[error("unprocessable: {0:?}")]
    Unprocessable(Errors),
    /// 503 `text/plain`: a dependency did not answer.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

pub type AppResult<T> = Result<T, AppError>;

impl AppError {
    pub fn unprocessable(items: Vec<ErrorItem>) -> Self {
        Self::Unprocessable(items.into())
    }

    pub fn invalid_field(
        key: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::unprocessable(vec![ErrorItem::field(
            key,
            value,
            message,
            codes::INVALID_VALUE,
        )])
    }
}

pub use crate::db::is_unavailable;

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

fn json_errors(status: StatusCode, errors: Errors) -> Response {
    (status, axum::Json(errors)).into_response()
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::BadRequest(m) => text(StatusCode::BAD_REQUEST, m),
            AppError::BadRequestErrors(e) => json_errors(StatusCode::BAD_REQUEST, e),
            AppError::NotFound(m) => text(StatusCode::NOT_FOUND, m),
            AppError::PayloadTooLarge(m) => text(StatusCode::PAYLOAD_TOO_LARGE, m),
            AppError::Unprocessable(e) => json_errors(StatusCode::UNPROCESSABLE_ENTITY, e),
            AppError::Unavailable(m) => {
                tracing::warn!(reason = %m, "dependency unavailable");
                text(StatusCode::SERVICE_UNAVAILABLE, m)
            }
            AppError::Database(err) if is_unavailable(&err) => {
                tracing::error!(error = %err, "database unavailable");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Database is unavailable, try again later".into(),
                )
            }
            AppError::Database(sqlx::Error::Database(db))
                if db.code().is_some_and(|c| c.starts_with("22")) =>
            {
                // A data exception (e.g. a NUL character PostgreSQL cannot store) is bad input.
                tracing::info!(error = %db, "database refused a value");
                json_errors(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    vec![ErrorItem::field(
                        "",
                        "",
                        format!("Invalid value: {}", db.message()),
                        codes::INVALID_VALUE,
                    )]
                    .into(),
                )
            }
            AppError::Database(err) => {
                tracing::error!(error = %err, "database error");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal Server Error".into(),
                )
            }
            AppError::Internal(err) => {
                tracing::error!(error = format!("{err:#}"), "internal error");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal Server Error".into(),
                )
            }
        }
    }
}
