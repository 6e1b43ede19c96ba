//! Validated identifiers. Every value that ends up in a SQL identifier, a Kafka topic name or a
//! registry key is parsed into one of these newtypes at the edge (HTTP extractors, serde), so the
//! rest of the code never sees raw input.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value was refused; rendered as the `message` of a FOLIO error naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

macro_rules! string_newtype_serde {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                $ty::parse(&raw).map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

/// A FOLIO tenant id.
///
/// Rule: a lower-case ASCII letter followed by up to 30 lower-case letters, digits or
/// underscores (`^[a-z][a-z0-9_]{0,30}$`). This is what Okapi accepts for tenant ids, it
/// keeps `<tenant>_mod_pubsub` within PostgreSQL's 63-byte identifier limit, and it is a
/// legal component of a Kafka topic name. Anything else is refused with 400 before it can
/// reach SQL, a schema name or a topic name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    pub const MAX_LEN: usize = 31;
    pub const RULE: &'static str =
        "a lower-case letter followed by up to 30 lower-case letters, digits or underscores";

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let mut chars = raw.chars();
        let first_ok = matches!(chars.next(), Some('a'..='z'));
        let rest_ok = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
        if first_ok && rest_ok && raw.len() <= Self::MAX_LEN {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Invalid(format!(
                "Invalid tenant id: it must be {}",
                Self::RULE
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tenant's schema, `<tenant>_mod_pubsub`, as the Java module names it.
    pub fn schema_name(&self) -> String {
        format!("{}_mod_pubsub", self.0)
    }

    /// The schema name as a quoted SQL identifier. Safe by construction: the tenant id only
    /// contains `[a-z0-9_]`.
    pub fn schema_ident(&self) -> String {
        format!("\"{}\"", self.schema_name())
    }
}
string_newtype_serde!(TenantId);

/// An event type such as `ITEM_CHECKED_OUT`.
///
/// Rule: 1 to 100 characters from `[A-Za-z0-9_-]`. The event type becomes the last segment
/// of a Kafka topic name (`{ENV}.{namespace}.{tenant}.{eventType}`), so it may only contain
/// characters Kafka allows and no `.`, which separates the segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(String);

impl EventType {
    pub const MAX_LEN: usize = 100;
    pub const PATTERN: &'static str = "^[A-Za-z0-9_-]{1,100}$";

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let ok = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Invalid(format!("must match \"{}\"", Self::PATTERN)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
string_newtype_serde!(EventType);

/// A module id as Okapi names modules: `<name>-<version>`, e.g. `mod-circulation-24.0.0`.
///
/// Rule: 1 to 255 characters from `[A-Za-z0-9._+-]`, starting with a letter or digit. The
/// version starts at the first `-` that is followed by a digit (Okapi's rule); an id without
/// one is a bare name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(String);

impl ModuleId {
    pub const MAX_LEN: usize = 255;
    pub const PATTERN: &'static str = "^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$";

    pub fn parse(raw: &str) -> Result<Self, Invalid> {
        let mut chars = raw.chars();
        let first_ok = matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric());
        let rest_ok =
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
        if first_ok && rest_ok && raw.len() <= Self::MAX_LEN {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Invalid(format!("must match \"{}\"", Self::PATTERN)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The module name without its version: `mod-circulation` for `mod-circulation-24.0.0`.
    pub fn name(&self) -> &str {
        module_name(&self.0)
    }

    /// Whether `other` (a stored module id, possibly of another version) names the same
    /// module. The Java module used an unanchored regex built from the id; this compares the
    /// parsed names exactly, so `mod-foo-1.0.0` matches `mod-foo-2.3.10` but neither
    /// `mod-foo-bar-1.0.0` nor `xmod-foo-1.0.0`.
    pub fn same_module(&self, other: &str) -> bool {
        module_name(other) == self.name()
    }
}
string_newtype_serde!(ModuleId);

/// The module name of a module id (see [`ModuleId::name`]), for ids read back from storage.
pub fn module_name(id: &str) -> &str {
    let bytes = id.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'-' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
            return &id[..i];
        }
    }
    id
}

/// A UUID as FOLIO's schemas define it: versions 1 to 5, RFC 4122 variant, written
/// `8-4-4-4-12` with hex digits of either case.
pub fn parse_folio_uuid(raw: &str) -> Result<uuid::Uuid, Invalid> {
    let invalid = || Invalid(format!("must match \"{}\"", FOLIO_UUID_PATTERN));
    let shape_ok = raw.len() == 36
        && raw.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if !shape_ok {
        return Err(invalid());
    }
    let id = uuid::Uuid::parse_str(raw).map_err(|_| invalid())?;
    let version_ok = (1..=5).contains(&id.get_version_num());
    let variant_ok = id.get_variant() == uuid::Variant::RFC4122;
    if version_ok && variant_ok {
        Ok(id)
    } else {
        Err(invalid())
    }
}

pub const FOLIO_UUID_PATTERN: &str =
    "^[a-fA-F0-9]{8}-[a-fA-F0-9]{4}-[1-5][a-fA-F0-9]{3}-[89abAB][a-fA-F0-9]{3}-[a-fA-F0-9]{12}$";

/// A FOLIO UUID in a request body (see [`parse_folio_uuid`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FolioUuid(pub uuid::Uuid);

impl Serialize for FolioUuid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for FolioUuid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        parse_folio_uuid(&raw)
            .map(FolioUuid)
            .map_err(serde::de::Error::custom)
    }
}

/// The role of a messaging-module registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(sqlx::Type, utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
#[cfg_attr(
    feature = "server",
    sqlx(type_name = "pubsub_config.module_role_enum", rename_all = "UPPERCASE")
)]
pub enum ModuleRole {
    Publisher,
    Subscriber,
}

impl ModuleRole {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "PUBLISHER" => Some(Self::Publisher),
            "SUBSCRIBER" => Some(Self::Subscriber),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publisher => "PUBLISHER",
            Self::Subscriber => "SUBSCRIBER",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        for ok in [
            "diku",
            "a",
            "fs09000000",
            "t_1",
            "abcdefghijklmnopqrstuvwxyz01234",
        ] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(32);
        for bad in [
            "",
            "Diku",
            "1abc",
            "_a",
            "a;drop schema x",
            "../x",
            "a-b",
            "a b",
            "ä",
            long.as_str(),
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            TenantId::parse("diku").unwrap().schema_ident(),
            "\"diku_mod_pubsub\""
        );
    }

    #[test]
    fn event_types() {
        assert!(EventType::parse("ITEM_CHECKED_OUT").is_ok());
        assert!(
            EventType::parse("DI_INVENTORY_INSTANCE_CREATED_READY_FOR_POST_PROCESSING").is_ok()
        );
        for bad in ["", "a.b", "a b", "a/b", "x'; drop table", &"A".repeat(101)] {
            assert!(EventType::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn module_names_compare_exactly() {
        let m = ModuleId::parse("mod-foo-1.0.0").unwrap();
        assert_eq!(m.name(), "mod-foo");
        assert!(m.same_module("mod-foo-2.3.10"));
        assert!(m.same_module("mod-foo-1.0.0-SNAPSHOT"));
        assert!(!m.same_module("mod-foo-bar-1.0.0"));
        assert!(!m.same_module("xmod-foo-1.0.0"));
        assert!(m.same_module("mod-foo"), "a bare name is the same module");
        let circ = ModuleId::parse("mod-circulation-1.2.3").unwrap();
        assert!(!circ.same_module("mod-circulation-storage-1.2.3"));
        let bare = ModuleId::parse("test-module").unwrap();
        assert!(bare.same_module("test-module"));
        assert!(bare.same_module("test-module-2.0"));
        assert!(ModuleId::parse("mod.foo-1").is_ok());
        for bad in ["", "-x", "a b", "a;b", "mod-foo-1.0(", &"a".repeat(256)] {
            assert!(ModuleId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn folio_uuids() {
        assert!(parse_folio_uuid("5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f").is_ok());
        assert!(parse_folio_uuid("5B3C1A8E-4F3B-4B1E-9C2E-0A1B2C3D4E5F").is_ok());
        // version 0 and 7, wrong variant, no dashes, braces
        for bad in [
            "5b3c1a8e-4f3b-0b1e-9c2e-0a1b2c3d4e5f",
            "5b3c1a8e-4f3b-7b1e-9c2e-0a1b2c3d4e5f",
            "5b3c1a8e-4f3b-4b1e-cc2e-0a1b2c3d4e5f",
            "5b3c1a8e4f3b4b1e9c2e0a1b2c3d4e5f",
            "{5b3c1a8e-4f3b-4b1e-9c2e-0a1b2c3d4e5f}",
            "not-a-uuid",
        ] {
            assert!(parse_folio_uuid(bad).is_err(), "{bad}");
        }
    }
}
