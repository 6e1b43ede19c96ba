#!/usr/bin/env bash
# Benchmarks against the real services: scripts/bench.sh [publish|delivery|footprint|data_import]
# Starts PostgreSQL and the broker if needed, builds the release binary (the service runs as its
# own process), then runs the bench target, which prints a Markdown table.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${PUBSUB_REPO_ROOT}"

export_default_env
ensure_services
# The data-import bench starts brokers of its own.
ensure_tansu_binary

log "cargo build --release --locked --bins --examples"
cargo build --release --locked --bins --examples
log "cargo bench --locked --bench ${1:-publish}"
cargo bench --locked --bench "${1:-publish}"
