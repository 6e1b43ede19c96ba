#!/usr/bin/env bash
# Start PostgreSQL and a local Kafka-compatible broker (tansu) if needed, build the service, run it.
# Extra arguments are passed to `mod-pubsub serve`, e.g. scripts/run.sh --port 9000
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${PUBSUB_REPO_ROOT}"

export_default_env
ensure_services

log "cargo build --release --locked"
cargo build --release --locked

log "starting target/release/mod-pubsub serve $* (HTTP_PORT=${HTTP_PORT}, Kafka ${KAFKA_HOST}:${KAFKA_PORT}, DB ${DB_HOST}:${DB_PORT}/${DB_DATABASE})"
exec target/release/mod-pubsub serve "$@"
