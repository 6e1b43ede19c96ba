//! Extractors that validate at the edge and reject in FOLIO's formats.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::config::Config;
use crate::domain::TenantId;
use crate::error::{codes, AppError, ErrorItem};

pub const TENANT_HEADER: &str = "x-okapi-tenant";

/// The request's tenant, from `X-Okapi-Tenant`. Missing → 400 "… Tenant must be set" (as RMB);
/// not a valid [`TenantId`] → 400, and the value goes nowhere.
#[derive(Debug, Clone)]
pub struct Tenant(pub TenantId);

impl<S: Send + Sync> FromRequestParts<S> for Tenant {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(raw) = parts.headers.get(TENANT_HEADER) else {
            return Err(AppError::BadRequest(
                "No X-Okapi-Tenant header. Tenant must be set".into(),
            ));
        };
        let raw = raw.to_str().map_err(|_| {
            AppError::BadRequest(format!(
                "Invalid X-Okapi-Tenant header: it must be {}",
                TenantId::RULE
            ))
        })?;
        TenantId::parse(raw).map(Tenant).map_err(|_| {
            AppError::BadRequest(format!(
                "Invalid X-Okapi-Tenant header: it must be {}",
                TenantId::RULE
            ))
        })
    }
}

/// A JSON body parsed the way RMB does: a wrong content type or malformed JSON → 400
/// `text/plain`; an unknown field, a missing required field, a wrong type or an invalid value
/// → 422 `errors` naming the field; a body over the limit → 413.
#[derive(Debug, Clone)]
pub struct FolioJson<T>(pub T);

impl<S, T> FromRequest<S> for FolioJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let JsonBody(bytes) = JsonBody::from_request(req, state).await?;
        parse_json(&bytes).map(FolioJson)
    }
}

/// The body of a JSON request, not parsed yet: the content type and size checks of
/// [`FolioJson`], for handlers that parse the body themselves (with [`parse_json`] for errors).
#[derive(Debug, Clone)]
pub struct JsonBody(pub Bytes);

impl<S> FromRequest<S> for JsonBody
where
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("");
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(AppError::BadRequest(format!(
                    "Content-Type \"{ct}\" is not supported; send application/json"
                )));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::PayloadTooLarge("Request body is too large".into())
            } else {
                AppError::BadRequest(rejection.body_text())
            }
        })?;
        Ok(JsonBody(bytes))
    }
}

/// Whether the document starts like a JSON object (serde would also read a struct from an array).
pub fn is_json_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Parses and validates a JSON document (see [`FolioJson`]).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    // Fast path: one pass for a valid object. Anything else is parsed again, slowly, to say
    // exactly what is wrong and where.
    if is_json_object(bytes) {
        if let Ok(parsed) = serde_json::from_slice::<T>(bytes) {
            return Ok(parsed);
        }
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| AppError::BadRequest(format!("Malformed JSON: {e}")))?;
    if !value.is_object() {
        return Err(AppError::BadRequest(
            "Malformed JSON: the request body must be a JSON object".into(),
        ));
    }
    serde_path_to_error::deserialize::<_, T>(&value)
        .map_err(|e| AppError::unprocessable(vec![describe(&e, &value)]))
}

/// Turns a serde error at a path into the FOLIO error item that names the field.
fn describe(
    err: &serde_path_to_error::Error<serde_json::Error>,
    doc: &serde_json::Value,
) -> ErrorItem {
    let path = err.path().to_string();
    let path = if path == "." { String::new() } else { path };
    let inner = err.inner().to_string();
    let join = |field: &str| {
        if path.is_empty() {
            field.to_owned()
        } else {
            format!("{path}.{field}")
        }
    };

    if let Some(field) = between(&inner, "missing field `", "`") {
        return ErrorItem::field(join(field), "null", "must not be null", codes::NOT_NULL);
    }
    if let Some(field) = between(&inner, "unknown field `", "`") {
        // The path already ends with the unknown field.
        let key = if path.ends_with(field) {
            path.clone()
        } else {
            join(field)
        };
        return ErrorItem::field(
            key,
            value_at(doc, err.path()),
            format!("Unrecognized field \"{field}\""),
            codes::UNRECOGNIZED,
        );
    }
    let value = value_at(doc, err.path());
    if inner.starts_with("invalid type: null") {
        return ErrorItem::field(path, "null", "must not be null", codes::NOT_NULL);
    }
    if inner.starts_with("must match") {
        return ErrorItem::field(path, value, inner, codes::PATTERN);
    }
    ErrorItem::field(path, value, inner, codes::INVALID_VALUE)
}

fn between<'a>(s: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = s.split_once(start)?.1;
    Some(rest.split_once(end)?.0)
}

/// The offending value as text, for the error's `value` parameter.
fn value_at(doc: &serde_json::Value, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut cur = Some(doc);
    for seg in path.iter() {
        cur = match (seg, cur) {
            (Segment::Seq { index }, Some(v)) => v.get(*index),
            (Segment::Map { key }, Some(v)) => v.get(key.as_str()),
            _ => None,
        };
    }
    match cur {
        None | Some(serde_json::Value::Null) => "null".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            let text = other.to_string();
            if text.len() > 200 {
                format!("{}…", &text[..text.floor_char_boundary(200)])
            } else {
                text
            }
        }
    }
}

/// Where the request says Okapi is (`X-Okapi-Url`), else `OKAPI_URL` (without a trailing `/`).
pub fn okapi_url(headers: &axum::http::HeaderMap, config: &Config) -> String {
    headers
        .get("x-okapi-url")
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || config.okapi_url.as_str().trim_end_matches('/').to_owned(),
            str::to_owned,
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lenient;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        items: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    #[allow(dead_code)]
    struct Inner {
        #[serde(rename = "eventTTL", deserialize_with = "lenient::non_negative_int")]
        ttl: i64,
    }

    fn item(body: &str) -> ErrorItem {
        match parse_json::<Outer>(body.as_bytes()) {
            Err(AppError::Unprocessable(e)) => e.errors[0].clone(),
            other => panic!("expected 422, got {other:?}"),
        }
    }

    #[test]
    fn names_fields_in_errors() {
        let e = item(r#"{"items":[]}"#);
        assert_eq!(e.parameters[0].key, "name");
        assert_eq!(e.message, "must not be null");

        let e = item(r#"{"name":"x","items":[{"eventTTL":1},{"eventTTL":1,"bogus":true}]}"#);
        assert_eq!(e.parameters[0].key, "items[1].bogus");
        assert_eq!(e.parameters[0].value, "true");
        assert_eq!(e.message, "Unrecognized field \"bogus\"");

        let e = item(r#"{"name":"x","items":[{"eventTTL":"abc"}]}"#);
        assert_eq!(e.parameters[0].key, "items[0].eventTTL");
        assert_eq!(e.parameters[0].value, "abc");

        let e = item(r#"{"name":null,"items":[]}"#);
        assert_eq!(e.parameters[0].key, "name");
        assert_eq!(e.message, "must not be null");

        let e = item(r#"{"name":"x","items":[{"eventTTL":-1}]}"#);
        assert_eq!(e.parameters[0].key, "items[0].eventTTL");
    }

    #[test]
    fn accepts_numeric_strings() {
        let o: Outer = parse_json(br#"{"name":"x","items":[{"eventTTL":"7"}]}"#).unwrap();
        assert_eq!(o.items[0].ttl, 7);
    }

    #[test]
    fn malformed_json_is_400() {
        assert!(matches!(
            parse_json::<Outer>(b"{nope"),
            Err(AppError::BadRequest(_))
        ));
    }
}
