#!/usr/bin/env bash
# Start PostgreSQL and a local Kafka-compatible broker (tansu) if needed, build the service, run it.
# Extra arguments are passed to `mod-pubsub serve`, e.g. scripts/run.sh --port 9000
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${PUBSUB_REPO_ROOT}"

export_default_env
# Standalone, there is no Okapi to create the system user in: deliveries go without a token.
# Set SYSTEM_USER_CREATE=true (and OKAPI_URL) to run behind a real Okapi.
: "${SYSTEM_USER_CREATE:=false}"
export SYSTEM_USER_CREATE
ensure_services

log "cargo build --release --locked"
cargo build --release --locked

log "starting target/release/mod-pubsub serve $* (HTTP_PORT=${HTTP_PORT}, Kafka ${KAFKA_HOST}:${KAFKA_PORT}, DB ${DB_HOST}:${DB_PORT}/${DB_DATABASE})"
exec target/release/mod-pubsub serve "$@"
