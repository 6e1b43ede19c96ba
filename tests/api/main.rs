//! Integration tests: the real service against a real PostgreSQL.

mod helpers;

mod audit;
mod bad_input;
mod cli;
mod client;
mod contract;
mod crash;
mod data_import;
mod delivery;
mod event_types;
mod fixtures;
mod health;
mod history;
mod interop;
mod isolation;
mod java_database;
mod kafka_outage;
mod openapi;
mod parking;
mod publish;
mod publishers;
mod subscribers;
mod system_user;
mod tenant_api;
