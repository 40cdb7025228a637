#!/usr/bin/env bash
# Instructions per rule-engine tick, counted by valgrind's callgrind: repeatable to the last
# few per cent whatever else the machine does, where the wall-clock medians of `cargo bench`
# on a shared virtual machine can swing by a factor of two between runs. docs/performance.md
# gives the figures; compare two commits by running this on each.
#
#   scripts/lib/bench/tick_instructions.sh [bench-binary]
#
# Without an argument it builds the engine benchmark (cargo bench --no-run) with symbols kept
# (the release profile strips them, and callgrind finds the tick by its name) and uses it.
set -euo pipefail
cd "$(dirname "$0")/../../.."
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
bin=${1:-}
if [ -z "$bin" ]; then
  bin=$(CARGO_PROFILE_BENCH_DEBUG=line-tables-only CARGO_PROFILE_BENCH_STRIP=none \
    cargo bench --bench engine --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("target",{}).get("name")=="engine" and m.get("executable"): print(m["executable"])' | tail -1)
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for case in "sharing selections" "every selection distinct" "subqueries and histogram_quantile"; do
  # Only what runs inside criterion's timed loop is counted, then divided by the ticks it ran.
  valgrind --tool=callgrind --callgrind-out-file="$out" --toggle-collect='*Bencher*iter*' \
    "$bin" --bench "rule tick: .*$case" --profile-time 3 >/dev/null 2>&1
  python3 - "$out" "$case" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
ids = set()
for l in lines:
    m = re.match(r'c?fn=\((\d+)\)(?: (.*))?', l)
    if m and m.group(2) and re.search(r'Engine.*tick_all', m.group(2)):
        ids.add(m.group(1))
calls = cost = 0
for i, l in enumerate(lines):
    m = re.match(r'cfn=\((\d+)\)', l)
    if m and m.group(1) in ids and lines[i + 1].startswith('calls='):
        calls += int(lines[i + 1].split('=')[1].split()[0])
        cost += int(lines[i + 2].split()[1])
if not calls:
    sys.exit(f"no tick was counted for {sys.argv[2]!r}")
print(f"rule tick, {sys.argv[2]}: {cost / calls / 1e6:.1f} M instructions per tick ({calls} ticks)")
PY
done
