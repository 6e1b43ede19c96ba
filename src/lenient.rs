//! Serde helpers for FOLIO's lenient scalars (Jackson coerces what serde would refuse).

use serde::de::{self, Deserializer, Unexpected, Visitor};
use std::fmt;

/// An integer that may also arrive as a numeric string (Jackson coerces `"1"`), 0 to
/// `i32::MAX`.
pub fn non_negative_int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = i64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            check(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::custom(RANGE))
                .and_then(check)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                check(v as i64)
            } else {
                Err(E::invalid_type(Unexpected::Float(v), &self))
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
            v.trim()
                .parse::<i64>()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
                .and_then(check)
        }
    }
    const RANGE: &str = "must be an integer from 0 to 2147483647";
    fn check<E: de::Error>(v: i64) -> Result<i64, E> {
        if (0..=i64::from(i32::MAX)).contains(&v) {
            Ok(v)
        } else {
            Err(E::custom(RANGE))
        }
    }
    d.deserialize_any(V)
}

/// Optional free text; PostgreSQL cannot store NUL characters, so they are refused here.
pub fn optional_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = <Option<String> as serde::Deserialize>::deserialize(d)?;
    match v {
        Some(s) if s.contains('\0') => Err(de::Error::custom("must not contain NUL characters")),
        other => Ok(other),
    }
}

/// A boolean where `null` means `false` (the schema default).
pub fn bool_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(<Option<bool> as serde::Deserialize>::deserialize(d)?.unwrap_or(false))
}
