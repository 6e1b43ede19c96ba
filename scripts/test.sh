#!/usr/bin/env bash
# Start PostgreSQL and a local Kafka-compatible broker (tansu) if needed, then run the test suite.
# The tests find the services through the DB_* and KAFKA_* environment variables.
# Extra arguments are passed to `cargo test`, e.g. scripts/test.sh -- --nocapture
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${PUBSUB_REPO_ROOT}"

export_default_env
ensure_services
# The Kafka-outage tests start and stop brokers of their own: they need the binary (TANSU_BIN).
ensure_tansu_binary
# The interoperability tests read and write with kcat, a Kafka client nobody here wrote.
ensure_kcat
# The contract test fuzzes the API against its OpenAPI document with schemathesis.
ensure_schemathesis

# Formatting and lints are part of the suite.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null 2>&1 && rustup component add rustfmt clippy
fi
log "cargo fmt --check"
cargo fmt --check || die "cargo fmt --check: run cargo fmt"
log "cargo clippy --locked --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings

# The client library must build on its own, without the server's dependencies.
log "cargo check --locked --lib --no-default-features --features client"
cargo check --locked --lib --no-default-features --features client
server_crates="$(cargo tree --locked --no-default-features --features client -e normal --prefix none \
  | grep -E '^(axum|sqlx|utoipa|prometheus-client|clap) ' || true)"
if [[ -n "${server_crates}" ]]; then
  die "the client feature pulls in server crates: ${server_crates}"
fi

drop_test_databases
log "cargo test --locked --lib --bins --tests $*"
status=0
cargo test --locked --lib --bins --tests "$@" || status=$?
if [[ "${status}" -eq 0 ]]; then
  log "cargo test --locked --doc"
  cargo test --locked --doc || status=$?
fi
drop_test_databases
exit "${status}"
