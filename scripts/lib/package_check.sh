# shellcheck shell=bash
# The Debian package, end to end (sourced by scripts/test; needs root): built from the tests'
# binary with scripts/package-deb, installed with dpkg -i, its unit checked with
# `systemd-analyze verify`, the installed binary run as the unit runs it (its user, its
# ExecStart flags, its environment file) and scraped, then purged, leaving nothing behind.
check_package() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "the package check needs root (dpkg -i)" >&2
    return 1
  fi
  cargo build --locked --quiet
  local dir="$AUTOTUNER_TEST_DIR/package" deb port pid unit=/lib/systemd/system/autotuner.service
  mkdir -p "$dir"
  deb=$(scripts/package-deb --binary target/debug/autotuner --out "$dir")
  # A machine of this kind has no autotuner installed; an earlier interrupted run may have left one.
  dpkg --purge autotuner >/dev/null 2>&1 || true
  dpkg -i "$deb"
  systemd-analyze verify "$unit"
  getent passwd autotuner >/dev/null
  [ "$(stat -c '%U:%G %a' /var/lib/autotuner)" = "autotuner:autotuner 750" ]
  [ "$(stat -c '%U:%G %a' /etc/default/autotuner)" = "root:autotuner 640" ]
  autotuner check config /etc/autotuner/autotuner.yml
  autotuner check rules /etc/autotuner/rules/*.yml

  # As the unit runs it: its user, its environment file, its ExecStart with $ARGS expanded
  # (the listen address on a free loopback port).
  port=$(free_port)
  local exec_start
  exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
  (
    set -a
    # shellcheck disable=SC1091
    . /etc/default/autotuner
    set +a
    ARGS="--web.listen-address=127.0.0.1:$port"
    cd /
    # shellcheck disable=SC2086
    exec runuser -u autotuner -- ${exec_start//\$ARGS/$ARGS}
  ) >"$dir/autotuner.log" 2>&1 &
  pid=$!
  local ok=0
  for _ in $(seq 1 100); do
    if curl -fsS -o "$dir/metrics.txt" "http://127.0.0.1:$port/metrics" 2>/dev/null \
      && grep -q '^autotuner_build_info' "$dir/metrics.txt"; then ok=1; break; fi
    sleep 0.1
  done
  if [ "$ok" -ne 1 ]; then
    cat "$dir/autotuner.log" >&2
    kill "$pid" 2>/dev/null || true
    dpkg --purge autotuner >/dev/null 2>&1 || true
    echo "the installed autotuner did not serve /metrics" >&2
    return 1
  fi
  # It ran as its own user and wrote its state where the unit says.
  [ "$(ps -o user= -p "$(pgrep -P "$pid" -x autotuner || echo "$pid")" | tr -d ' ')" = autotuner ] || \
    [ "$(stat -c %U /var/lib/autotuner/audit.jsonl 2>/dev/null)" = autotuner ]
  # The installed rules are loaded (batch_size's is skipped: the package declares no knob).
  curl -fsS -o "$dir/rules.json" "http://127.0.0.1:$port/api/v1/rules"
  grep -q '"HighMemory"' "$dir/rules.json"
  kill "$pid"
  wait "$pid" 2>/dev/null || true

  dpkg --purge autotuner
  local left
  for left in /usr/bin/autotuner "$unit" /etc/autotuner /etc/default/autotuner /var/lib/autotuner /usr/share/autotuner; do
    if [ -e "$left" ]; then
      echo "left after purge: $left" >&2
      return 1
    fi
  done
  echo "package: built, installed, verified, served /metrics as user autotuner, purged"
}
