# shellcheck shell=bash
# Provisioning for the test command: packages to install, and throw-away services to start on
# free loopback ports. Sourced by scripts/test. Each service gets a start function called from
# provision_start and is stopped by provision_stop; everything lives under $AUTOTUNER_TEST_DIR.

# Debian packages the tests need, as "command:package" pairs: the package is installed only when
# the command is missing.
TEST_PACKAGES=(
  "promtool:prometheus"
  "curl:curl"
  "redis-server:redis-server"
)

ensure_packages() {
  local missing=() pair cmd pkg
  for pair in "${TEST_PACKAGES[@]}"; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
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
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
}

# A free TCP port on 127.0.0.1, chosen by the kernel.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

provision_start() {
  AUTOTUNER_TEST_DIR=$(mktemp -d /tmp/autotuner-test.XXXXXX)
  export AUTOTUNER_TEST_DIR
  echo "test directory: $AUTOTUNER_TEST_DIR"
  # Services are added here by the parts that need them (PostgreSQL, Redis, PgBouncer, ...).
}

provision_stop() {
  local pidfile
  if [ -n "${AUTOTUNER_TEST_DIR:-}" ] && [ -d "$AUTOTUNER_TEST_DIR" ]; then
    for pidfile in "$AUTOTUNER_TEST_DIR"/*.pid; do
      [ -e "$pidfile" ] || continue
      kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$AUTOTUNER_TEST_DIR"
  fi
}

# Builds the binary, runs it on a free port, waits for /-/ready, and lints its /metrics with
# promtool. Exceptions are listed in README "Metrics" with their reason; none so far.
check_live_metrics() {
  cargo build --locked --quiet
  local port log
  port=$(free_port)
  log="$AUTOTUNER_TEST_DIR/autotuner-promtool.log"
  ./target/debug/autotuner --web.listen-address="127.0.0.1:$port" >"$log" 2>&1 &
  local pid=$!
  echo "$pid" >"$AUTOTUNER_TEST_DIR/autotuner-promtool.pid"
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
  curl -fsS "http://127.0.0.1:$port/metrics" >"$AUTOTUNER_TEST_DIR/metrics.txt"
  local out rc=0
  out=$(promtool check metrics <"$AUTOTUNER_TEST_DIR/metrics.txt" 2>&1) || rc=$?
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "promtool check metrics reported problems (exit $rc):" >&2
    echo "$out" >&2
    return 1
  fi
  echo "promtool check metrics: clean ($(grep -vc '^#' "$AUTOTUNER_TEST_DIR/metrics.txt") samples)"
}
