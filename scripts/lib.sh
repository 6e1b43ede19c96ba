# shellcheck shell=bash
#
# Shared helpers for scripts/run.sh and scripts/test.sh. Source this file; do not execute it.
#
#   ensure_postgres       local PostgreSQL reachable with DB_USERNAME/DB_PASSWORD on DB_DATABASE
#   ensure_tansu_binary   tansu 0.6.0 (Kafka-compatible broker) built or found; exports TANSU_BIN
#   ensure_tansu_running  a broker listening on KAFKA_HOST:KAFKA_PORT (reuses whatever listens there)
#   ensure_services       ensure_postgres + ensure_tansu_running (which builds the binary only when
#                         no broker is reachable yet)
#   export_default_env    exports the default runtime environment for the service and the tests
#
# Every function is idempotent and reuses what is already installed or running.

if [[ -n "${PUBSUB_LIB_SOURCED:-}" ]]; then
  return 0
fi
PUBSUB_LIB_SOURCED=1

PUBSUB_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PUBSUB_TOOLS_DIR="${PUBSUB_REPO_ROOT}/.tools"
PUBSUB_CACHE_DIR="${HOME:-/root}/.cache/mod-pubsub"

TANSU_VERSION="0.6.0"
TANSU_FEATURES="dynostore"

# Database defaults (exported so that the service, the tests and psql all agree).
: "${DB_HOST:=127.0.0.1}"
: "${DB_PORT:=5432}"
: "${DB_USERNAME:=folio_admin}"
: "${DB_PASSWORD:=folio_admin}"
: "${DB_DATABASE:=okapi_modules}"
export DB_HOST DB_PORT DB_USERNAME DB_PASSWORD DB_DATABASE

# Kafka defaults.
: "${KAFKA_HOST:=127.0.0.1}"
: "${KAFKA_PORT:=9092}"
export KAFKA_HOST KAFKA_PORT

log() {
  printf '[setup] %s\n' "$*" >&2
}

die() {
  printf '[setup] ERROR: %s\n' "$*" >&2
  exit 1
}

is_root() {
  [[ "$(id -u)" -eq 0 ]]
}

is_local_host() {
  case "$1" in
    127.0.0.1 | localhost | ::1 | 0.0.0.0) return 0 ;;
    *) return 1 ;;
  esac
}

# export_default_env: the environment run.sh and test.sh give the service / the tests when unset.
export_default_env() {
  : "${ENV:=folio}"
  : "${OKAPI_URL:=http://127.0.0.1:9130}"
  : "${SYSTEM_USER_NAME:=pub-sub}"
  : "${SYSTEM_USER_PASSWORD:=pubsub}"
  : "${HTTP_PORT:=8081}"
  : "${RUST_LOG:=info}"
  # tansu holds every fetch for the full fetch.wait.max.ms (Kafka answers as soon as a record
  # arrives): with the service's default of 500 ms each event would wait that long.
  : "${DELIVERY_FETCH_WAIT_MS:=20}"
  export DB_HOST DB_PORT DB_USERNAME DB_PASSWORD DB_DATABASE
  export KAFKA_HOST KAFKA_PORT ENV OKAPI_URL SYSTEM_USER_NAME SYSTEM_USER_PASSWORD HTTP_PORT RUST_LOG
  export DELIVERY_FETCH_WAIT_MS
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
  local host="$1" port="$2"
  # shellcheck disable=SC2016 # expanded by the inner shell
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------

PUBSUB_APT_UPDATED=""

apt_install() {
  is_root || die "need to install $* but not running as root; run: sudo apt-get install -y $*"
  command -v apt-get >/dev/null 2>&1 || die "need to install $* but apt-get is not available"
  if [[ -z "${PUBSUB_APT_UPDATED}" ]]; then
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    PUBSUB_APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

# The newest installed server version (e.g. 15), or nothing.
pg_server_version() {
  local bin ver best=""
  for bin in /usr/lib/postgresql/*/bin/postgres; do
    [[ -x "${bin}" ]] || continue
    ver="$(basename "$(dirname "$(dirname "${bin}")")")"
    if [[ -z "${best}" ]] || ((ver > best)); then
      best="${ver}"
    fi
  done
  printf '%s' "${best}"
}

# True when the application role can log in over TCP with its password.
pg_app_login_ok() {
  PGPASSWORD="${DB_PASSWORD}" PGCONNECT_TIMEOUT=5 psql -X -q -t -A -w \
    -h "${DB_HOST}" -p "${DB_PORT}" -U "${DB_USERNAME}" -d "${DB_DATABASE}" \
    -c 'select 1' >/dev/null 2>&1
}

# Run psql as the postgres OS user over the local socket (peer authentication).
pg_superuser_psql() {
  (cd / && runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "${DB_PORT}" -d postgres "$@")
}

pg_wait_ready() {
  local i
  for ((i = 0; i < 60; i++)); do
    if pg_isready -q -h "${DB_HOST}" -p "${DB_PORT}" -t 2; then
      return 0
    fi
    sleep 0.5
  done
  die "PostgreSQL is not ready on ${DB_HOST}:${DB_PORT} after 30 s (see /var/log/postgresql/)"
}

ensure_postgres() {
  # Fast path: already running and configured (e.g. a CI service container or an earlier run).
  if command -v psql >/dev/null 2>&1 && pg_app_login_ok; then
    log "PostgreSQL: reusing ${DB_USERNAME}@${DB_HOST}:${DB_PORT}/${DB_DATABASE}"
    return 0
  fi

  if ! is_local_host "${DB_HOST}"; then
    die "cannot log in to PostgreSQL at ${DB_HOST}:${DB_PORT} as ${DB_USERNAME} (db ${DB_DATABASE}), and DB_HOST is not local, so it will not be set up here"
  fi

  # 1. Server binaries.
  if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1 \
    || [[ -z "$(pg_server_version)" ]]; then
    log "PostgreSQL server is not installed"
    apt_install postgresql
  fi
  local ver
  ver="$(pg_server_version)"
  [[ -n "${ver}" ]] || die "no PostgreSQL server found under /usr/lib/postgresql after installation"

  is_root || die "PostgreSQL needs setting up (cluster start / role ${DB_USERNAME} / database ${DB_DATABASE}) and that needs root; re-run as root or create them yourself"

  # 2. Cluster.
  local cluster_line
  cluster_line="$(pg_lsclusters -h 2>/dev/null | awk -v v="${ver}" '$1 == v && $2 == "main"' || true)"
  if [[ -z "${cluster_line}" ]]; then
    log "creating PostgreSQL cluster ${ver}/main on port ${DB_PORT}"
    pg_createcluster --port "${DB_PORT}" "${ver}" main >&2
    cluster_line="$(pg_lsclusters -h | awk -v v="${ver}" '$1 == v && $2 == "main"')"
  fi
  local cl_port cl_status
  cl_port="$(awk '{print $3}' <<<"${cluster_line}")"
  cl_status="$(awk '{print $4}' <<<"${cluster_line}")"
  if [[ "${cl_port}" != "${DB_PORT}" ]]; then
    die "cluster ${ver}/main uses port ${cl_port}, not DB_PORT=${DB_PORT}; set DB_PORT=${cl_port} or change the cluster's port"
  fi
  if [[ "${cl_status}" != online* ]]; then
    log "starting PostgreSQL cluster ${ver}/main"
    pg_ctlcluster "${ver}" main start >&2
  else
    log "PostgreSQL cluster ${ver}/main is already running"
  fi
  pg_wait_ready
  log "PostgreSQL ${ver} is accepting connections on ${DB_HOST}:${DB_PORT}"

  # 3. Role and database. psql variables are quoted by psql itself (:'x' literal, :"x" identifier).
  log "ensuring role ${DB_USERNAME} (LOGIN SUPERUSER) and database ${DB_DATABASE}"
  pg_superuser_psql -v role="${DB_USERNAME}" -v pw="${DB_PASSWORD}" -v db="${DB_DATABASE}" >/dev/null <<'SQL'
SELECT format('CREATE ROLE %I LOGIN SUPERUSER PASSWORD %L', :'role', :'pw')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role')
\gexec
ALTER ROLE :"role" WITH LOGIN SUPERUSER PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db')
\gexec
SQL

  # 4. Password authentication over TCP (Debian's default pg_hba already allows scram on 127.0.0.1).
  if ! pg_app_login_ok; then
    local hba
    hba="$(pg_superuser_psql -t -A -c 'SHOW hba_file')"
    if grep -q '^# added by mod-pubsub scripts/lib.sh' "${hba}"; then
      die "password login as ${DB_USERNAME} over TCP fails although ${hba} already has our rules; check listen_addresses and the server log"
    fi
    log "password login over TCP failed; adding scram-sha-256 rules for 127.0.0.1 and ::1 to ${hba}"
    cp -p "${hba}" "${hba}.bak.mod-pubsub"
    {
      printf '# added by mod-pubsub scripts/lib.sh\n'
      printf 'host    all    all    127.0.0.1/32    scram-sha-256\n'
      printf 'host    all    all    ::1/128         scram-sha-256\n'
      cat "${hba}.bak.mod-pubsub"
    } >"${hba}"
    pg_superuser_psql -c "ALTER SYSTEM SET password_encryption = 'scram-sha-256'" >/dev/null
    pg_superuser_psql -c 'SELECT pg_reload_conf()' >/dev/null
    # Re-hash the password with the (possibly changed) password_encryption.
    pg_superuser_psql -v role="${DB_USERNAME}" -v pw="${DB_PASSWORD}" >/dev/null <<'SQL'
ALTER ROLE :"role" WITH PASSWORD :'pw';
SQL
  fi

  if PGPASSWORD="${DB_PASSWORD}" psql -X -q -t -A -w -h "${DB_HOST}" -p "${DB_PORT}" \
    -U "${DB_USERNAME}" -d "${DB_DATABASE}" -c 'select 1' >/dev/null; then
    log "PostgreSQL ready: ${DB_USERNAME}@${DB_HOST}:${DB_PORT}/${DB_DATABASE}"
  else
    die "still cannot log in as ${DB_USERNAME} to ${DB_HOST}:${DB_PORT}/${DB_DATABASE}"
  fi
}

# ---------------------------------------------------------------------------------------------
# tansu (Kafka-compatible broker used for local runs and tests)
# ---------------------------------------------------------------------------------------------

tansu_cache_bin() {
  printf '%s/tansu-%s/bin/tansu' "${PUBSUB_CACHE_DIR}" "${TANSU_VERSION}"
}

tansu_repo_bin() {
  printf '%s/tansu-%s/bin/tansu' "${PUBSUB_TOOLS_DIR}" "${TANSU_VERSION}"
}

tansu_find_bin() {
  local candidate
  for candidate in "$(tansu_cache_bin)" "$(tansu_repo_bin)"; do
    if [[ -x "${candidate}" ]]; then
      printf '%s' "${candidate}"
      return 0
    fi
  done
  return 1
}

# PIDs of a running `cargo install tansu` (from this or any other clone).
tansu_build_pids() {
  pgrep -f '(^|/)cargo install tansu( |$)' 2>/dev/null || true
}

tansu_wait_for_other_build() {
  local pids waited=0
  pids="$(tansu_build_pids)"
  [[ -n "${pids}" ]] || return 0
  log "a 'cargo install tansu' is already running (pid ${pids//$'\n'/ }); waiting for it instead of starting another"
  while [[ -n "$(tansu_build_pids)" ]]; do
    sleep 10
    waited=$((waited + 10))
    if ((waited % 60 == 0)); then
      log "still waiting for the running tansu build (${waited} s)"
    fi
  done
  log "the running tansu build finished after ~${waited} s"
}

ensure_tansu_binary() {
  local bin
  if bin="$(tansu_find_bin)"; then
    TANSU_BIN="${bin}"
    export TANSU_BIN
    log "tansu ${TANSU_VERSION}: ${TANSU_BIN}"
    return 0
  fi

  tansu_wait_for_other_build
  if bin="$(tansu_find_bin)"; then
    TANSU_BIN="${bin}"
    export TANSU_BIN
    log "tansu ${TANSU_VERSION}: ${TANSU_BIN}"
    return 0
  fi

  command -v cargo >/dev/null 2>&1 || die "tansu ${TANSU_VERSION} is not built and cargo is not on PATH (install Rust via rustup first)"

  local root="${PUBSUB_TOOLS_DIR}/tansu-${TANSU_VERSION}"
  mkdir -p "${PUBSUB_TOOLS_DIR}" "${PUBSUB_CACHE_DIR}"
  # Serialise builds between clones that use flock as well.
  exec 9>"${PUBSUB_CACHE_DIR}/tansu-build.lock"
  flock 9
  if ! bin="$(tansu_find_bin)"; then
    log "building tansu ${TANSU_VERSION} (features: ${TANSU_FEATURES}) into ${root}; this takes ~11 minutes"
    cargo install tansu --version "${TANSU_VERSION}" --locked --features "${TANSU_FEATURES}" \
      --root "${root}" >&2
    bin="$(tansu_repo_bin)"
    [[ -x "${bin}" ]] || die "cargo install finished but ${bin} does not exist"
    # Share the binary with other clones on this machine.
    local cache_bin tmp
    cache_bin="$(tansu_cache_bin)"
    mkdir -p "$(dirname "${cache_bin}")"
    tmp="${cache_bin}.tmp.$$"
    cp "${bin}" "${tmp}"
    mv -f "${tmp}" "${cache_bin}"
    log "copied tansu into ${cache_bin}"
  fi
  flock -u 9
  exec 9>&-

  TANSU_BIN="${bin}"
  export TANSU_BIN
  log "tansu ${TANSU_VERSION}: ${TANSU_BIN}"
}

ensure_tansu_running() {
  if port_open "${KAFKA_HOST}" "${KAFKA_PORT}"; then
    log "Kafka: something already listens on ${KAFKA_HOST}:${KAFKA_PORT}; reusing it"
    return 0
  fi
  if ! is_local_host "${KAFKA_HOST}"; then
    die "nothing listens on ${KAFKA_HOST}:${KAFKA_PORT} and KAFKA_HOST is not local, so no broker will be started here"
  fi

  local run_dir="${PUBSUB_TOOLS_DIR}/run" log_dir="${PUBSUB_TOOLS_DIR}/log"
  local pid_file="${run_dir}/tansu.pid" log_file="${log_dir}/tansu.log"
  mkdir -p "${run_dir}" "${log_dir}"

  # A broker we started earlier that is still coming up: wait for it rather than start a second one.
  local pid="" i
  if [[ -f "${pid_file}" ]]; then
    pid="$(<"${pid_file}")"
    if [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null \
      && [[ "$(tr '\0' ' ' <"/proc/${pid}/cmdline" 2>/dev/null)" == *tansu*":${KAFKA_PORT} "* ]]; then
      log "tansu (pid ${pid}) is running but not listening yet; waiting"
    else
      pid=""
    fi
  fi

  if [[ -z "${pid}" ]]; then
    ensure_tansu_binary
    local url="tcp://127.0.0.1:${KAFKA_PORT}" advertised="tcp://127.0.0.1:${KAFKA_PORT}"
    if [[ "${KAFKA_HOST}" == "localhost" ]]; then
      advertised="tcp://localhost:${KAFKA_PORT}"
    fi
    log "starting tansu broker on ${url} (in-memory storage; topics are lost when it stops), log ${log_file}"
    printf '\n===== %s starting %s broker --listener-url %s\n' "$(date -Is)" "${TANSU_BIN}" "${url}" >>"${log_file}"
    rm -f "${pid_file}"
    # The inner shell records its own pid and then execs tansu, so the pid file holds tansu's pid.
    # shellcheck disable=SC2016 # expanded by the inner shell
    RUST_LOG="${TANSU_RUST_LOG:-warn}" nohup setsid bash -c 'echo "$$" >"$1"; shift; exec "$@"' _ \
      "${pid_file}" "${TANSU_BIN}" broker \
      --listener-url "${url}" \
      --advertised-listener-url "${advertised}" \
      --storage-engine "memory://tansu/" \
      </dev/null >>"${log_file}" 2>&1 &
    pid="$!"
    for ((i = 0; i < 20; i++)); do
      if [[ -s "${pid_file}" ]]; then
        pid="$(<"${pid_file}")"
        break
      fi
      sleep 0.1
    done
    printf '%s\n' "${pid}" >"${pid_file}"
  fi

  for ((i = 0; i < 30; i++)); do
    if port_open "${KAFKA_HOST}" "${KAFKA_PORT}"; then
      log "tansu is listening on ${KAFKA_HOST}:${KAFKA_PORT} (pid ${pid}; stop with: kill ${pid})"
      return 0
    fi
    if ! kill -0 "${pid}" 2>/dev/null; then
      tail -n 20 "${log_file}" >&2 || true
      die "tansu exited during start-up; see ${log_file}"
    fi
    sleep 0.5
  done
  tail -n 20 "${log_file}" >&2 || true
  die "tansu (pid ${pid}) is not listening on ${KAFKA_HOST}:${KAFKA_PORT} after 15 s; see ${log_file}"
}

# ensure_build_deps: what the crate's native dependencies need to build (rdkafka builds
# librdkafka with gcc and make, with OpenSSL for SSL/SASL): installed from Debian when missing.
ensure_build_deps() {
  local missing=()
  command -v gcc >/dev/null 2>&1 || missing+=(gcc)
  command -v make >/dev/null 2>&1 || missing+=(make)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  [[ -f /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
  [[ -f /usr/include/zlib.h ]] || missing+=(zlib1g-dev)
  if ((${#missing[@]} > 0)); then
    apt_install "${missing[@]}"
  fi
}

# kcat (Debian's package): the independent Kafka client of the interoperability tests.
ensure_kcat() {
  command -v kcat >/dev/null 2>&1 || apt_install kcat
}

# schemathesis (PyPI), the contract fuzzer of tests/api/contract.rs, in a virtualenv under
# .tools (Debian's Python refuses system-wide pip installs); exports SCHEMATHESIS_BIN.
SCHEMATHESIS_VERSION="4.32.5"
ensure_schemathesis() {
  local venv="${PUBSUB_REPO_ROOT}/.tools/schemathesis-${SCHEMATHESIS_VERSION}"
  if [[ ! -x "${venv}/bin/schemathesis" ]]; then
    python3 -m venv --help >/dev/null 2>&1 && python3 -c 'import ensurepip' 2>/dev/null \
      || apt_install python3-venv
    log "installing schemathesis ${SCHEMATHESIS_VERSION} into ${venv}"
    rm -rf "${venv}"
    python3 -m venv "${venv}"
    "${venv}/bin/pip" install --quiet "schemathesis==${SCHEMATHESIS_VERSION}" \
      || die "pip install schemathesis==${SCHEMATHESIS_VERSION} failed"
  fi
  SCHEMATHESIS_BIN="${venv}/bin/schemathesis"
  export SCHEMATHESIS_BIN
}

ensure_services() {
  ensure_build_deps
  ensure_postgres
  # Looks for (or builds) the tansu binary only when no broker is reachable yet.
  ensure_tansu_running
}

# drop_test_databases: removes the per-test databases (pubsub_test_*) the integration tests leave.
drop_test_databases() {
  local dbs db
  dbs="$(PGPASSWORD="${DB_PASSWORD}" psql -X -q -t -A -w -h "${DB_HOST}" -p "${DB_PORT}" -U "${DB_USERNAME}" \
    -d "${DB_DATABASE}" -c "SELECT datname FROM pg_database WHERE datname LIKE 'pubsub\_test\_%'" 2>/dev/null || true)"
  for db in ${dbs}; do
    PGPASSWORD="${DB_PASSWORD}" psql -X -q -w -h "${DB_HOST}" -p "${DB_PORT}" -U "${DB_USERNAME}" -d "${DB_DATABASE}" \
      -c "DROP DATABASE IF EXISTS \"${db}\" WITH (FORCE)" >/dev/null 2>&1 || log "could not drop ${db}"
  done
  # Roles outlive the databases: tenant roles (<tenant>_mod_pubsub, created as RMB creates them)
  # and the tests' users without CREATEROLE (pubsub_plain_*); those nothing depends on any more
  # go too (DROP ROLE refuses the others, such as the roles of a service's own database).
  local roles role
  roles="$(PGPASSWORD="${DB_PASSWORD}" psql -X -q -t -A -w -h "${DB_HOST}" -p "${DB_PORT}" -U "${DB_USERNAME}" \
    -d "${DB_DATABASE}" -c "SELECT rolname FROM pg_roles WHERE rolname LIKE '%\_mod\_pubsub' OR rolname LIKE 'pubsub\_plain\_%'" 2>/dev/null || true)"
  for role in ${roles}; do
    PGPASSWORD="${DB_PASSWORD}" psql -X -q -w -h "${DB_HOST}" -p "${DB_PORT}" -U "${DB_USERNAME}" -d "${DB_DATABASE}" \
      -c "DROP ROLE IF EXISTS \"${role}\"" >/dev/null 2>&1 || true
  done
}
