//! mod-pubsub: FOLIO's publish/subscribe broker, and a client library for modules that publish
//! to and consume from its Kafka topics directly.
//!
//! # Features
//!
//! - `server` (default): the service. `run` starts it on a listener the caller binds, so tests
//!   start the real server on port 0.
//! - `client`: only [`client`] (register through pubsub's REST API, publish to and consume from
//!   Kafka directly) with [`domain`], [`event`] and [`kafka`]'s topic names, without the
//!   server's dependencies (no axum, sqlx, utoipa):
//!
//! ```toml
//! [dependencies]
//! mod-pubsub = { git = "…", default-features = false, features = ["client"] }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "server")]
pub mod app;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod db;
#[cfg(feature = "server")]
pub mod delivery;
#[cfg(feature = "server")]
pub mod descriptors;
pub mod domain;
#[cfg(feature = "server")]
pub mod error;
pub mod event;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "client")]
pub mod kafka;
pub mod lenient;
#[cfg(feature = "server")]
pub mod memory;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod registry_cache;
#[cfg(feature = "server")]
pub mod system_user;

#[cfg(feature = "server")]
mod service;
#[cfg(feature = "server")]
pub use service::*;
