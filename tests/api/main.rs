//! Integration tests: the real service against a real PostgreSQL.

mod helpers;

mod bad_input;
mod event_types;
mod fixtures;
mod health;
mod java_database;
mod openapi;
mod publishers;
mod subscribers;
mod tenant_api;
