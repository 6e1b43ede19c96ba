//! The Event envelope, as mod-pubsub's `event.json` and folio-kafka-wrapper define it: the JSON
//! value of every record on an event topic.

use crate::domain::{EventType, FolioUuid};
use crate::lenient;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    #[cfg_attr(feature = "server", schema(value_type = String, format = Uuid))]
    pub id: FolioUuid,
    #[serde(deserialize_with = "event_type")]
    #[cfg_attr(feature = "server", schema(pattern = "^[A-Za-z0-9_-]{1,100}$"))]
    pub event_type: String,
    pub event_metadata: EventMetadata,
    /// Opaque text, usually JSON-encoded; delivered to subscribers as the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_payload: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventMetadata {
    pub tenant_id: String,
    #[serde(rename = "eventTTL", deserialize_with = "lenient::non_negative_int")]
    #[cfg_attr(feature = "server", schema(minimum = 0, maximum = 2147483647))]
    pub event_ttl: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "server", schema(value_type = Option<String>, format = Uuid))]
    pub original_event_id: Option<FolioUuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher_callback: Option<PublisherCallback>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "date_time"
    )]
    #[cfg_attr(feature = "server", schema(format = DateTime))]
    pub created_date: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "date_time"
    )]
    #[cfg_attr(feature = "server", schema(format = DateTime))]
    pub published_date: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The publishing module's id (name and version); must be registered as publisher.
    pub published_by: String,
}

/// `publisherCallback`; this sub-object allows other properties, which are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PublisherCallback {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// An event type, checked by [`EventType::parse`] and kept as text.
pub(crate) fn event_type<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    EventType::parse(&raw)
        .map(|t| t.as_str().to_owned())
        .map_err(serde::de::Error::custom)
}

/// A date-time as FOLIO writes them: ISO-8601 with an offset (`Z`, `+00:00` or `+0000`),
/// optionally with fractions. Kept as sent; only checked.
fn date_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<String>::deserialize(d)?;
    match v {
        Some(s) if parse_date_time(&s).is_none() => Err(serde::de::Error::custom(
            "must be an ISO-8601 date-time with an offset, e.g. 2019-09-15T13:00:00.000+00:00",
        )),
        other => Ok(other),
    }
}

/// Parses ISO-8601 date-times with an offset (RFC 3339, or `+0000` offsets as Java writes them).
pub fn parse_date_time(s: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .or_else(|| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z").ok())
}

/// Now, formatted as RMB formats dates: `2019-09-15T13:00:00.000+00:00`.
pub fn now_string() -> String {
    format_date(chrono::Utc::now())
}

pub fn format_date(d: chrono::DateTime<chrono::Utc>) -> String {
    // The same text as the format string `%Y-%m-%dT%H:%M:%S%.3f+00:00`, without parsing one.
    d.to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for ok in [
            "2019-09-15T13:00:00.000+00:00",
            "2019-09-15T13:00:00Z",
            "2019-09-15T13:00:00.123456Z",
            "2019-09-15T13:00:00.000+0000",
        ] {
            assert!(parse_date_time(ok).is_some(), "{ok}");
        }
        for bad in ["2019-09-15", "yesterday", "2019-09-15T13:00:00"] {
            assert!(parse_date_time(bad).is_none(), "{bad}");
        }
        assert!(now_string().ends_with("+00:00"));
        let d = chrono::DateTime::parse_from_rfc3339("2019-09-05T03:04:05.006789Z").unwrap();
        assert_eq!(
            format_date(d.with_timezone(&chrono::Utc)),
            "2019-09-05T03:04:05.006+00:00"
        );
    }

    #[test]
    fn envelope_round_trips_and_keeps_callback_extras() {
        let json = r#"{"id":"5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f","eventType":"T","eventMetadata":{"tenantId":"diku","eventTTL":1,"publishedBy":"m-1.0.0","publisherCallback":{"endpoint":"/x","extra":1}},"eventPayload":"{}"}"#;
        let e: Event = serde_json::from_str(json).unwrap();
        let back = serde_json::to_value(&e).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(json).unwrap()
        );
    }
}
