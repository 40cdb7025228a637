# shellcheck shell=bash
# Provisioning for the test command: packages to install, and throw-away services to start on
# free loopback ports. Sourced by scripts/test. Each service gets a start function called from
# provision_start and is stopped by provision_stop; everything lives under $AUTOTUNER_TEST_DIR.

# Debian packages the tests need, as "command:package" pairs: the package is installed only when
# the command is missing.
TEST_PACKAGES=(
  "promtool:prometheus"
  "prometheus-alertmanager:prometheus-alertmanager"
  "chromium:chromium"
  "curl:curl"
  "openssl:openssl"
  "redis-server:redis-server"
  "python3:python3-minimal"
  "/usr/lib/postgresql/15/bin/initdb:postgresql-15"
  "/usr/share/postgresql/15/extension/hypopg.control:postgresql-15-hypopg"
  "pgbouncer:pgbouncer"
  "prometheus-node-exporter:prometheus-node-exporter"
  "victoria-metrics:victoria-metrics"
  "systemd-analyze:systemd"
  "adduser:adduser"
  "dpkg-deb:dpkg"
  "/usr/lib/python3/dist-packages/prometheus_client/__init__.py:python3-prometheus-client"
)

ensure_packages() {
  local missing=() pair cmd pkg
  for pair in "${TEST_PACKAGES[@]}"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if [[ $cmd == /* ]]; then
      [ -e "$cmd" ] || missing+=("$pkg")
    else
      command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "all present"
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages (${missing[*]}); run as root to install them" >&2
    return 1
  fi
  echo "installing: ${missing[*]}"
  # Debian starts a package's daemon on install; these tests start their own instances on their
  # own ports, so keep the packaged daemons from starting (policy-rc.d is Debian's switch).
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  local rc=0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq || rc=$?
  if [ "$rc" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" || rc=$?
  fi
  # Removed whatever happened: left behind, it would stop every service start on this machine.
  if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
  return "$rc"
}

# A free TCP port on 127.0.0.1, chosen by the kernel.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

provision_start() {
  AUTOTUNER_TEST_DIR=$(mktemp -d /tmp/autotuner-test.XXXXXX)
  # The database servers run as the postgres user, which must be able to enter it.
  chmod 755 "$AUTOTUNER_TEST_DIR"
  export AUTOTUNER_TEST_DIR
  echo "test directory: $AUTOTUNER_TEST_DIR"
  start_postgres
  start_pgbouncer
  # Redis tests start their own redis-server processes (they stop and freeze them).
}

# Runs a command as the postgres user when we are root (PostgreSQL and PgBouncer refuse to run
# as root), else as ourselves.
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

PG_TEST_PASSWORD=autotuner-test-superuser-pw
PG_MONITOR_PASSWORD=autotuner-test-monitor-pw

# A throw-away PostgreSQL 15 with pg_stat_statements preloaded and HypoPG installed, on a free
# loopback port, password-authenticated over TCP. Exports AUTOTUNER_TEST_PG_URL (superuser, for
# setting up workloads), AUTOTUNER_TEST_PG_MONITOR_URL (a pg_monitor role, what autotuner uses)
# and AUTOTUNER_TEST_PG_BIN (for tests that run a private cluster they can stop).
start_postgres() {
  local bin dir port
  bin=$(ls -d /usr/lib/postgresql/15/bin)
  dir="$AUTOTUNER_TEST_DIR/pg"
  port=$(free_port)
  mkdir -p "$dir"
  printf '%s\n' "$PG_TEST_PASSWORD" >"$dir/pwfile"
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$dir"; fi
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w start -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top -c max_connections=40 -c superuser_reserved_connections=3" >/dev/null
  as_postgres "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 <<SQL
CREATE DATABASE autotuner_test;
CREATE ROLE monitor LOGIN PASSWORD '$PG_MONITOR_PASSWORD' IN ROLE pg_monitor;
\\c autotuner_test
CREATE EXTENSION pg_stat_statements;
CREATE EXTENSION hypopg;
SQL
  export AUTOTUNER_TEST_PG_BIN="$bin"
  export AUTOTUNER_TEST_PG_PORT="$port"
  export AUTOTUNER_TEST_PG_URL="postgres://postgres:$PG_TEST_PASSWORD@127.0.0.1:$port/autotuner_test"
  export AUTOTUNER_TEST_PG_MONITOR_URL="postgres://monitor:$PG_MONITOR_PASSWORD@127.0.0.1:$port/autotuner_test"
  echo "PostgreSQL 15 on 127.0.0.1:$port"
}

# A PgBouncer in front of it, pool size 2 for autotuner_test. Exports AUTOTUNER_TEST_PGBOUNCER_URL
# (its admin console, as the stats user) and AUTOTUNER_TEST_PGBOUNCER_DB_URL (a client of the pool).
start_pgbouncer() {
  local dir="$AUTOTUNER_TEST_DIR/pgbouncer" port
  port=$(free_port)
  mkdir -p "$dir"
  printf '"postgres" "%s"\n"monitor" "%s"\n' "$PG_TEST_PASSWORD" "$PG_MONITOR_PASSWORD" >"$dir/userlist.txt"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
autotuner_test = host=127.0.0.1 port=$AUTOTUNER_TEST_PG_PORT dbname=autotuner_test pool_size=2

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = plain
auth_file = $dir/userlist.txt
admin_users = postgres
stats_users = monitor
pool_mode = session
default_pool_size = 2
max_client_conn = 100
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  if [ "$(id -u)" -eq 0 ]; then chown -R postgres: "$dir"; fi
  as_postgres pgbouncer -d "$dir/pgbouncer.ini"
  local i up=0
  for i in $(seq 1 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then up=1; break; fi
    sleep 0.1
  done
  if [ "$up" -ne 1 ]; then
    echo "PgBouncer did not start; its log:" >&2
    cat "$dir/pgbouncer.log" >&2 || true
    return 1
  fi
  export AUTOTUNER_TEST_PGBOUNCER_URL="postgres://monitor:$PG_MONITOR_PASSWORD@127.0.0.1:$port/pgbouncer"
  export AUTOTUNER_TEST_PGBOUNCER_DB_URL="postgres://postgres:$PG_TEST_PASSWORD@127.0.0.1:$port/autotuner_test"
  echo "PgBouncer on 127.0.0.1:$port"
}

provision_stop() {
  local pidfile
  if [ -n "${AUTOTUNER_TEST_DIR:-}" ] && [ -d "$AUTOTUNER_TEST_DIR/pg/data" ]; then
    as_postgres "${AUTOTUNER_TEST_PG_BIN:-/usr/lib/postgresql/15/bin}/pg_ctl" -D "$AUTOTUNER_TEST_DIR/pg/data" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "${AUTOTUNER_TEST_DIR:-}" ] && [ -d "$AUTOTUNER_TEST_DIR" ]; then
    for pidfile in "$AUTOTUNER_TEST_DIR"/*.pid "$AUTOTUNER_TEST_DIR"/*/*.pid; do
      [ -e "$pidfile" ] || continue
      kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$AUTOTUNER_TEST_DIR"
  fi
}

# Names kept from postgres_exporter so users' dashboards and alerts keep working, although
# promtool's lint would name them otherwise (README "Metrics" lists them with this reason).
PROMTOOL_EXCEPTIONS='^pg_stat_database_[a-z_]+ counter metrics should have "_total" suffix$|^pg_stat_activity_count non-histogram and non-summary metrics should not have "_count" suffix$'

# Builds the binary, runs it on a free port with every collector pointed at the provisioned
# services (and a Redis of its own), waits until the windowed ratios exist, and lints its
# /metrics with promtool. Anything promtool says beyond the listed exceptions fails the run.
check_live_metrics() {
  cargo build --locked --quiet
  local port rport log dir="$AUTOTUNER_TEST_DIR/promtool"
  mkdir -p "$dir"
  port=$(free_port)
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  cat >"$dir/autotuner.yml" <<YML
collectors:
  host: {interval: 1s}
  redis: {interval: 1s}
  postgres: {interval: 1s, window: 5s, include_query_text: true}
  pgbouncer: {interval: 1s}
  http_probe: {interval: 1s}
targets:
  redis: [{name: cache, url: 'redis://127.0.0.1:$rport/'}]
  postgres: [{name: main, url: '$AUTOTUNER_TEST_PG_MONITOR_URL'}]
  pgbouncer: [{name: bouncer, url: '$AUTOTUNER_TEST_PGBOUNCER_URL'}]
  http: [{name: self, url: 'http://127.0.0.1:$port/-/healthy', timeout: 500ms}]
YML
  log="$dir/autotuner.log"
  ./target/debug/autotuner --web.listen-address="127.0.0.1:$port" --config.file="$dir/autotuner.yml" >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/autotuner.pid"
  local ready=0
  for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  if [ "$ready" -ne 1 ]; then
    echo "autotuner did not become ready; its log:" >&2
    cat "$log" >&2
    return 1
  fi
  # Some traffic, then time for the windows to fill, so the ratios are there to be linted.
  redis-cli -p "$rport" get some-key >/dev/null
  psql "$AUTOTUNER_TEST_PG_URL" -qAtc "SELECT 1" >/dev/null
  sleep 3
  curl -fsS "http://127.0.0.1:$port/metrics" >"$dir/metrics.txt"
  local out rc=0 unexpected
  out=$(promtool check metrics <"$dir/metrics.txt" 2>&1) || rc=$?
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unexpected=$(printf '%s\n' "$out" | grep -vE "$PROMTOOL_EXCEPTIONS" | grep -v '^$' || true)
  if [ -n "$unexpected" ]; then
    echo "promtool check metrics reported problems (exit $rc):" >&2
    echo "$unexpected" >&2
    return 1
  fi
  local families
  families=$(grep -c '^# TYPE' "$dir/metrics.txt")
  for want in host_memory_usage_ratio redis_cache_hit_ratio pg_query_mean_latency_seconds pgbouncer_up probe_http_success; do
    grep -q "^$want" "$dir/metrics.txt" || { echo "$want missing from the linted output" >&2; return 1; }
  done
  echo "promtool check metrics: clean apart from the listed exceptions ($families families, $(grep -vc '^#' "$dir/metrics.txt") samples)"
}
