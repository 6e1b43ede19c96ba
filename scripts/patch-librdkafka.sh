#!/usr/bin/env bash
# Opt-in: build this workspace against librdkafka with patches from docs/:
#   scripts/patch-librdkafka.sh [PATCH...]
# (default: docs/librdkafka-idempotent-wakeup.patch and docs/librdkafka-topic-lookup.patch).
#
# Copies the rdkafka-sys crate that Cargo.lock names from Cargo's registry into
# vendor/rdkafka-sys, applies the patches to its bundled librdkafka and points Cargo at the copy
# with [patch.crates-io]. Commit vendor/ and the Cargo.toml change to adopt it; to undo, run
#   git checkout Cargo.toml Cargo.lock && rm -rf vendor/rdkafka-sys
# The README's Performance section and docs/benchmarks.md say what each patch changes and why
# they are not applied.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "${PUBSUB_REPO_ROOT}"

if [[ $# -gt 0 ]]; then
  patch_files=("$@")
else
  patch_files=(docs/librdkafka-idempotent-wakeup.patch docs/librdkafka-topic-lookup.patch)
fi
target="vendor/rdkafka-sys"

if grep -q '^rdkafka-sys = { path = "vendor/rdkafka-sys" }' Cargo.toml; then
  log "Cargo.toml already uses ${target}; nothing to do"
  exit 0
fi
[[ -e "${target}" ]] && die "${target} exists but Cargo.toml does not use it; remove it first"

version="$(awk '/^name = "rdkafka-sys"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)"
[[ -n "${version}" ]] || die "Cargo.lock names no rdkafka-sys"
cargo fetch --locked >/dev/null
source_dir="$(find "${CARGO_HOME:-${HOME}/.cargo}/registry/src" -maxdepth 2 -type d \
  -name "rdkafka-sys-${version}" | head -n 1)"
[[ -n "${source_dir}" ]] || die "rdkafka-sys ${version} is not in Cargo's registry"

log "copying rdkafka-sys ${version} to ${target}"
mkdir -p vendor
cp -a "${source_dir}" "${target}"
for patch_file in "${patch_files[@]}"; do
  log "applying ${patch_file}"
  patch -d "${target}/librdkafka" -p1 --forward < "${patch_file}" \
    || { rm -rf "${target}"; die "${patch_file} does not apply to rdkafka-sys ${version}"; }
done

cat >> Cargo.toml <<'EOF'

# librdkafka with patches from docs/ (scripts/patch-librdkafka.sh).
[patch.crates-io]
rdkafka-sys = { path = "vendor/rdkafka-sys" }
EOF
# Resolves the patch into Cargo.lock (rdkafka-sys from the path, nothing else changes).
cargo metadata --format-version 1 >/dev/null
log "done: cargo build now compiles the patched librdkafka"
