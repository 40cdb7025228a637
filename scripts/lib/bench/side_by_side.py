#!/usr/bin/env python3
"""Side-by-side benchmark: autotuner against Debian's node_exporter, postgres_exporter and
redis_exporter, on loopback, on the same PostgreSQL and Redis, in one run.

Started by scripts/bench, which installs the packages, provisions PostgreSQL (scripts/lib/
provision.sh: pg_stat_statements, a pg_monitor role) and builds the release binary. This script
starts a Redis of its own, the three exporters and autotuner on free loopback ports, keeps a
pgbench and a Redis load running while it measures, and writes a JSON file, a Markdown snippet
and a plain table. Python standard library only; the concurrent load comes from wrk.

For each target, in rounds that alternate between the targets after a warm-up:
- series and bytes per scrape (uncompressed text, as a plain GET gets it);
- scrape latency, sequential on one kept-alive connection: min, median, p99;
- with 8 concurrent clients (wrk -t2 -c8, a Lua hook reads wrk's own histogram): scrapes per
  second, and latency min, median, p99;
- CPU per scrape: the on-CPU time of every thread of the target process over the sequential
  scrapes (/proc/<pid>/task/*/schedstat, nanoseconds) divided by their number, cross-checked
  with utime+stime from /proc/<pid>/stat (every thread, ended ones included, but in 10 ms
  ticks; used instead when a thread ended during a batch); and utime+stime over the wrk runs
  divided by the requests served. The clients' own CPU is never counted;
- CPU per minute while nobody scrapes it (autotuner collects and evaluates rules on its own
  schedule; the exporters do nothing until scraped);
- resident memory (VmRSS) after start and warm-up, and after all the scraping;
- the PostgreSQL server's CPU spent on monitoring: with pgbench stopped and each PostgreSQL
  client alone (the other SIGSTOPped), the on-CPU time of the server processes serving that
  client's connections, found in pg_stat_activity by application_name (postgres_exporter's
  connection string sets `application_name=bench_postgres_exporter`; autotuner names its own
  `autotuner`). Backends that appear during the window count whole (connection set-up
  included). postgres_exporter is scraped once a second and the figure scaled to a 15 s
  interval; autotuner is measured between two completed collections at its default 5 s
  interval, then restarted with 15 s.
And autotuner's own: an alert delivered to its Alertmanager webhook receiver until a rule's
webhook action arrives at a listener here; a rule file saved until GET /api/v1/rules/{name}
serves it; scrape latency while PostgreSQL is normal, hung (every server process SIGSTOPped)
and stopped (pg_ctl stop); with --soak, resident memory over a long run.
"""

import argparse
import datetime
import http.client
import http.server
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOKEN = "bench-operate-token-0123456789"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PGEXP_APP = "bench_postgres_exporter"
# Variables that would add targets to autotuner or change its logging behind our back.
SCRUB_ENV = ("REDIS_URL", "DATABASE_URL", "AUTOTUNER_REDIS_URL", "AUTOTUNER_POSTGRES_URL",
             "AUTOTUNER_PGBOUNCER_URL", "AUTOTUNER_CONFIG_FILE", "AUTOTUNER_RULES_DIR",
             "AUTOTUNER_DATA_DIR", "AUTOTUNER_WEB_TOKENS_FILE", "AUTOTUNER_WEB_CONFIG_FILE",
             "AUTOTUNER_PLAYBOOKS_FILE", "RUST_LOG")

WRK_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nBENCH {"requests":%d,"duration_us":%d,"errors":%d,"min_us":%d,"p50_us":%d,' ..
    '"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency.min, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def say(*a):
    print(*a, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_http(port, path="/metrics", timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if http_get(port, path, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} within {timeout}s")


def stat_cpu_s(pid):
    """utime+stime of the whole process (every thread, exited ones included), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu_ns(pid):
    """On-CPU time of each live thread of pid, in nanoseconds (schedstat): {tid: ns}."""
    out = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                out[task] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def sched_cpu_ns(pid):
    """On-CPU time of every live thread of pid, in nanoseconds."""
    return sum(thread_cpu_ns(pid).values())


def thread_delta_ns(before, after):
    """CPU between two thread_cpu_ns readings (a thread born in between counts whole) and
    how many threads ended in between (their time since `before` is lost)."""
    return (sum(v - before.get(t, 0) for t, v in after.items()),
            sum(1 for t in before if t not in after))


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def machine_busy(seconds=3.0):
    """Share of all CPUs busy over `seconds` (from /proc/stat), 0..1."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


class Target:
    """One process serving /metrics."""

    def __init__(self, name, port, proc):
        self.name, self.port, self.proc = name, port, proc
        self.latencies = []
        self.cpu_s = 0.0      # /proc/<pid>/stat utime+stime over the sequential batches
        self.cpu_ns = 0       # schedstat over the same
        self.threads_ended = 0  # threads that ended during a batch (schedstat misses them)
        self.scrapes = 0
        self.result = {}

    @property
    def pid(self):
        return self.proc.pid

    def batch(self, n, pace=None):
        """n scrapes on one kept-alive connection, back to back or `pace` seconds apart;
        returns the latencies (s) and adds the process's CPU over them to the totals."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        out = []
        s0, n0 = stat_cpu_s(self.pid), thread_cpu_ns(self.pid)
        nxt = time.perf_counter()
        for _ in range(n):
            if pace:
                nxt += pace
                time.sleep(max(0.0, nxt - time.perf_counter()))
            t = time.perf_counter()
            c.request("GET", "/metrics")
            r = c.getresponse()
            r.read()
            out.append(time.perf_counter() - t)
            if r.status != 200:
                raise RuntimeError(f"{self.name} answered {r.status}")
        self.cpu_s += stat_cpu_s(self.pid) - s0
        ns, ended = thread_delta_ns(n0, thread_cpu_ns(self.pid))
        self.cpu_ns += ns
        self.threads_ended += ended
        self.scrapes += n
        c.close()
        return out


class Sink(http.server.BaseHTTPRequestHandler):
    """The webhook listener: records when each action arrives (perf_counter)."""

    arrivals = []

    def do_POST(self):
        t = time.perf_counter()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Sink.arrivals.append((t, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Psql:
    """One long-lived psql session (superuser), so that looking backends up costs one
    connection, not one per question."""

    def __init__(self, url):
        self.p = subprocess.Popen(
            ["stdbuf", "-oL", "psql", url, "-X", "-A", "-t", "-q"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, bufsize=1)

    def query(self, sql):
        self.p.stdin.write(sql.strip().rstrip(";") + ";\n\\echo __end__\n")
        self.p.stdin.flush()
        lines = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("psql session ended")
            line = line.rstrip("\n")
            if line == "__end__":
                return lines
            if line:
                lines.append(line)

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.work = tempfile.mkdtemp(prefix="autotuner-bench-")
        os.chmod(self.work, 0o755)
        self.procs = []
        self.pg_url = os.environ["AUTOTUNER_TEST_PG_URL"]
        self.mon_url = os.environ["AUTOTUNER_TEST_PG_MONITOR_URL"]
        self.pg_bin = os.environ["AUTOTUNER_TEST_PG_BIN"]
        self.pg_data = os.path.join(os.environ["AUTOTUNER_TEST_DIR"], "pg", "data")
        self.pgbench = os.path.join(self.pg_bin, "pgbench")
        self.loads = []
        self.stopped_pids = []
        self.report = {}

    # -- processes ---------------------------------------------------------------------------

    def start(self, cmd, env=None, log=None, cwd=None, scrub=False):
        base = dict(os.environ)
        if scrub:
            for k in SCRUB_ENV:
                base.pop(k, None)
        p = subprocess.Popen(cmd, env={**base, **(env or {})}, cwd=cwd,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=log or subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGTERM):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, sig)
            except OSError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def cleanup(self):
        # A hung PostgreSQL is let go first: a stopped postmaster would not stop.
        self.signal_pids(self.stopped_pids, signal.SIGCONT)
        for p in list(reversed(self.procs)):
            self.stop(p)
        shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def signal_pids(pids, sig):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass  # a short-lived child (an autovacuum worker) gone since

    # -- load --------------------------------------------------------------------------------

    def start_loads(self):
        """pgbench (4 clients, 200 transactions/s in all) and about 300 Redis commands/s
        (hits, misses, writes): the statistics the collectors read keep moving."""
        self.loads = [self.start([self.pgbench, "-n", "-c", "4", "-j", "2", "-R", "200",
                                  "-T", "100000", self.pg_url])]
        for cmd in (["GET", "key:__rand_int__"], ["GET", "missing:key"],
                    ["INCR", "counter:bench"]):
            # redis-cli repeats the command forever, sleeping 10 ms in between.
            self.loads.append(self.start(["redis-cli", "-p", str(self.rport), "-r", "-1",
                                          "-i", "0.01"] + cmd))

    def stop_loads(self):
        for p in self.loads:
            self.stop(p)
        self.loads = []

    # -- autotuner ---------------------------------------------------------------------------

    def write_config(self, pg_interval="5s"):
        with open(self.config, "w") as f:
            f.write(f"""# written by scripts/bench
collectors:
  postgres: {{interval: {pg_interval}}}
actions:
  mode: enforce
  # The probe rule acts once per repetition; the default buckets (10/min, 5/min per webhook
  # host) would otherwise decide how many repetitions are measured.
  rate_limits:
    global: {{count: 100000, per: 1m}}
    per_target: {{count: 100000, per: 1m}}
knobs:
  batch_size: {{initial: 1000, min: 100, max: 5000}}
targets:
  postgres: [{{name: main, url: '{self.mon_url}'}}]
  redis: [{{name: cache, url: 'redis://127.0.0.1:{self.rport}/'}}]
""")

    def write_rules(self, rules_dir, tick=None):
        """The shipped rules, every group's interval set to `tick` when given."""
        os.makedirs(rules_dir, exist_ok=True)
        shipped = os.path.join(ROOT, "rules")
        for name in sorted(os.listdir(shipped)):
            if name.endswith((".yml", ".yaml")):
                with open(os.path.join(shipped, name)) as f:
                    text = f.read()
                if tick:
                    text = re.sub(r"(?m)^(\s+interval:\s*)\S+", rf"\g<1>{tick}", text)
                with open(os.path.join(rules_dir, name), "w") as f:
                    f.write(text)

    def add_probe_rule(self):
        """The rule of the action-latency measurement, added to the running set."""
        with open(os.path.join(self.rules, ".bench_probe.tmp"), "w") as f:
            f.write(f"""groups:
  - name: bench_probe
    interval: 1s
    rules:
      - name: BenchProbe
        expr: autotuner_alert{{alertname="BenchProbe"}}
        on_absent: clear
        mode: enforce
        actions:
          - webhook: {{ url: "http://127.0.0.1:{self.sink_port}/hook", retries: 0 }}
""")
        os.rename(os.path.join(self.rules, ".bench_probe.tmp"),
                  os.path.join(self.rules, "bench_probe.yml"))
        deadline = time.time() + 10
        while self.api("GET", "/api/v1/rules/BenchProbe")[0] != 200:
            if time.time() > deadline:
                raise RuntimeError("the probe rule was not loaded; see autotuner.log")
            time.sleep(0.05)

    def start_autotuner(self, rules_dir=None):
        log = open(os.path.join(self.work, "autotuner.log"), "ab")
        p = self.start([self.args.binary, f"--web.listen-address=127.0.0.1:{self.aport}",
                        f"--config.file={self.config}", f"--rules.dir={rules_dir or self.rules}",
                        f"--data.dir={self.data}"],
                       env={"AUTOTUNER_OPERATE_TOKEN": TOKEN}, log=log, cwd=self.work,
                       scrub=True)
        log.close()
        wait_http(self.aport, "/-/ready")
        return p

    def restart_autotuner(self, rules_dir=None):
        self.stop(self.auto.proc)
        self.auto.proc = self.start_autotuner(rules_dir)

    def api(self, method, path, body=None):
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.aport}{path}",
            data=None if body is None else json.dumps(body).encode(), method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def auto_metric(self, name, labels=""):
        _, body = http_get(self.aport, "/metrics")
        pat = re.escape(name) + (r"\{[^}]*" + re.escape(labels) + r"[^}]*\}" if labels
                                 else r"(?:\{[^}]*\})?")
        m = re.search(rf"^{pat} (\S+)$", body.decode(), re.M)
        return m.group(1) if m else None

    def pg_last_success(self):
        v = self.auto_metric("autotuner_collector_last_success_timestamp_seconds",
                             'collector="postgres/main"')
        return float(v) if v else None

    def after_next_pg_collection(self, limit=40):
        """Waits until autotuner's PostgreSQL collector completes a run; its timestamp."""
        first = self.pg_last_success()
        deadline = time.time() + limit
        while time.time() < deadline:
            time.sleep(0.05)
            now = self.pg_last_success()
            if now is not None and now != first:
                return now
        raise RuntimeError("autotuner's PostgreSQL collector did not complete a run")

    # -- the run -----------------------------------------------------------------------------

    def setup(self):
        q = self.quick
        busy = machine_busy()
        self.report["machine_busy_before"] = round(busy, 3)
        if busy > 0.15:
            say(f"warning: the machine was {busy:.0%} busy before the run started; "
                "the figures will be noisier")

        # Redis, filled with some keys, with a steady load started below.
        self.rport = free_port()
        self.start(["redis-server", "--port", str(self.rport), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self.work])
        deadline = time.time() + 10
        while subprocess.run(["redis-cli", "-p", str(self.rport), "ping"],
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        subprocess.run(["redis-benchmark", "-p", str(self.rport), "-q", "-n", "20000",
                        "-r", "5000", "-t", "set,get,incr,lpush"], capture_output=True,
                       check=True)

        say("pgbench -i -s 5")
        subprocess.run([self.pgbench, "-i", "-s", "5", "-q", self.pg_url], capture_output=True,
                       check=True)
        self.start_loads()

        self.sink_port = free_port()
        self.sink = http.server.ThreadingHTTPServer(("127.0.0.1", self.sink_port), Sink)
        threading.Thread(target=self.sink.serve_forever, daemon=True).start()

        self.rules = os.path.join(self.work, "rules")
        self.data = os.path.join(self.work, "data")
        self.config = os.path.join(self.work, "autotuner.yml")
        self.write_rules(self.rules)
        self.write_config()
        self.aport = free_port()
        self.auto = Target("autotuner", self.aport, self.start_autotuner())
        if self.args.soak_only:
            return
        nport, pport, xport = free_port(), free_port(), free_port()
        sep = "&" if "?" in self.mon_url else "?"
        self.node = Target("node_exporter", nport, self.start(
            ["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{nport}"]))
        self.pgexp = Target("postgres_exporter", pport, self.start(
            ["prometheus-postgres-exporter", f"--web.listen-address=127.0.0.1:{pport}"],
            env={"DATA_SOURCE_NAME":
                 f"{self.mon_url}{sep}sslmode=disable&application_name={PGEXP_APP}"}))
        self.rexp = Target("redis_exporter", xport, self.start(
            ["prometheus-redis-exporter", f"--web.listen-address=127.0.0.1:{xport}",
             f"--redis.addr=redis://127.0.0.1:{self.rport}"]))
        self.exporters = [self.node, self.pgexp, self.rexp]
        self.targets = self.exporters + [self.auto]
        for t in self.targets:
            wait_http(t.port)
        # autotuner's windowed figures need a few collections.
        time.sleep(3 if q else 8)

    def rotation(self, r):
        k = r % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    def wrk(self, t, seconds):
        s0 = stat_cpu_s(t.pid)
        out = subprocess.run(
            ["wrk", "-t2", "-c8", f"-d{seconds}s", "--timeout", "10s", "-s", self.lua,
             f"http://127.0.0.1:{t.port}/metrics"], capture_output=True, text=True).stdout
        cpu = stat_cpu_s(t.pid) - s0
        m = re.search(r"^BENCH (\{.*\})$", out, re.M)
        if not m:
            raise RuntimeError(f"wrk said:\n{out}")
        d = json.loads(m.group(1))
        d["cpu_s"] = cpu
        return d

    def compare(self):
        q = self.quick
        rounds, per_round = (3, 50) if q else (8, 200)
        wrk_rounds, wrk_s = (2, 2) if q else (3, 5)
        self.report["settings"] = {"sequential_rounds": rounds, "scrapes_per_round": per_round,
                                   "wrk_rounds": wrk_rounds, "wrk_seconds": wrk_s,
                                   "wrk": "-t2 -c8", "quick": q}
        self.lua = os.path.join(self.work, "bench.lua")
        with open(self.lua, "w") as f:
            f.write(WRK_LUA)

        say("warm-up: 20 sequential scrapes and 1 s of wrk each")
        for t in self.targets:
            t.batch(20)
            self.wrk(t, 1)
            t.latencies, t.cpu_s, t.cpu_ns, t.scrapes, t.threads_ended = [], 0.0, 0, 0, 0
        time.sleep(3)
        for t in self.targets:
            t.result["rss_idle_mb"] = rss_mb(t.pid)
            _, body = http_get(t.port, "/metrics")
            t.result["bytes"] = len(body)
            t.result["series"] = sum(1 for line in body.decode().splitlines()
                                     if line and not line.startswith("#"))

        say(f"sequential scrapes: {rounds} rounds of {per_round} per target, order rotating")
        for r in range(rounds):
            for t in self.rotation(r):
                t.latencies.extend(t.batch(per_round))
        for t in self.targets:
            # schedstat is exact to the nanosecond but sees only live threads; utime+stime
            # counts ended threads too but in 10 ms ticks (a batch of fast scrapes is a few
            # ticks). The first is used unless a thread ended during a batch.
            exact = t.threads_ended == 0
            t.result.update(
                latency_min_ms=min(t.latencies) * 1e3,
                latency_median_ms=statistics.median(t.latencies) * 1e3,
                latency_p99_ms=pct(t.latencies, 99) * 1e3,
                cpu_per_scrape_ms=(t.cpu_ns / 1e6 if exact else t.cpu_s * 1e3) / t.scrapes,
                cpu_per_scrape_source="schedstat" if exact else "stat (a thread ended)",
                cpu_per_scrape_ms_schedstat=t.cpu_ns / t.scrapes / 1e6,
                cpu_per_scrape_ms_stat=t.cpu_s / t.scrapes * 1e3,
                sequential_scrapes=t.scrapes)

        say(f"8 concurrent clients (wrk -t2 -c8): {wrk_rounds} rounds of {wrk_s} s per target")
        runs = {t.name: [] for t in self.targets}
        for r in range(wrk_rounds):
            for t in self.rotation(r):
                runs[t.name].append(self.wrk(t, wrk_s))
        for t in self.targets:
            w = runs[t.name]
            reqs = sum(x["requests"] for x in w)
            t.result.update(
                concurrent_scrapes_per_second=statistics.median(
                    x["requests"] / (x["duration_us"] / 1e6) for x in w),
                concurrent_min_ms=min(x["min_us"] for x in w) / 1e3,
                concurrent_median_ms=statistics.median(x["p50_us"] for x in w) / 1e3,
                concurrent_p99_ms=statistics.median(x["p99_us"] for x in w) / 1e3,
                concurrent_errors=sum(x["errors"] for x in w),
                concurrent_cpu_per_scrape_ms=sum(x["cpu_s"] for x in w) / max(reqs, 1) * 1e3)
            t.result["rss_after_load_mb"] = rss_mb(t.pid)

        idle = 20 if q else 60
        say(f"unscraped: {idle} s with nobody scraping (loads running), CPU of each process")
        self.report["settings"]["unscraped_window_s"] = idle
        c0 = {t.name: stat_cpu_s(t.pid) for t in self.targets}
        t0 = time.time()
        time.sleep(idle)
        elapsed = time.time() - t0
        for t in self.targets:
            # autotuner collects every 5 s and evaluates its rules on its own schedule; the
            # exporters work only when scraped.
            t.result["idle_cpu_per_min_ms"] = (stat_cpu_s(t.pid) - c0[t.name]) * 60 / elapsed * 1e3

    def backends(self, psql, app):
        return {int(x) for x in psql.query(
            f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'")}

    def db_window(self, psql, app, seconds, each_second=None, until=None):
        """CPU (s) of the server processes serving `app` over a window of `seconds`, polled
        every second for new backends; `each_second` runs once a second (its count returned);
        `until` (optional) is called at the end and its wait is inside the window."""
        start = {p: sched_cpu_ns(p) for p in self.backends(psql, app)}
        last = dict(start)
        seen_new = set()
        n = 0
        t_end = time.time() + seconds
        while time.time() < t_end:
            tick = time.time()
            if each_second:
                each_second()
                n += 1
            for p in self.backends(psql, app):
                if p not in start:
                    seen_new.add(p)
                last[p] = max(last.get(p, 0), sched_cpu_ns(p))
            time.sleep(max(0.0, 1 - (time.time() - tick)))
        extra = until() if until else None
        for p in self.backends(psql, app):
            if p not in start:
                seen_new.add(p)
            last[p] = max(last.get(p, 0), sched_cpu_ns(p))
        total = sum(v - start.get(p, 0) for p, v in last.items())
        return total / 1e9, n, extra, {"backends_at_start": len(start),
                                       "backends_opened": len(seen_new)}

    def db_cpu(self):
        """The PostgreSQL server's CPU spent on monitoring, each client alone."""
        q = self.quick
        w = 20 if q else 60
        say(f"PostgreSQL CPU on monitoring: {w} s windows, pgbench stopped, one client at a time")
        self.stop_loads()
        psql = Psql(self.pg_url)
        try:
            r = {"method": "on-CPU time (schedstat) of the server processes whose "
                           "pg_stat_activity.application_name is the client's, pgbench "
                           "stopped, the other client SIGSTOPped", "window_s": w}
            # postgres_exporter alone, scraped once a second.
            os.killpg(self.auto.pid, signal.SIGSTOP)
            time.sleep(2)
            cpu, n, _, info = self.db_window(
                psql, PGEXP_APP, w, each_second=lambda: http_get(self.pgexp.port, "/metrics"))
            per = cpu / max(n, 1)
            r["postgres_exporter"] = {"scrapes": n, "per_scrape_ms": per * 1e3,
                                      "per_min_at_15s_ms": per * 4 * 1e3, **info}
            os.killpg(self.auto.pid, signal.SIGCONT)

            # autotuner alone, from one completed collection to another, at 5 s then 15 s.
            for interval, key in ((5, "autotuner_default_5s"), (15, "autotuner_at_15s")):
                if interval != 5:
                    self.write_config(f"{interval}s")
                    self.restart_autotuner()
                # Ready means one collection is in (with the connection made): the next one
                # completing starts the window.
                ts0 = self.after_next_pg_collection()
                cpu, _, ts1, info = self.db_window(
                    psql, "autotuner", w - interval / 2, until=self.after_next_pg_collection)
                runs = max(1, round((ts1 - ts0) / interval))
                per = cpu / runs
                r[key] = {"collections": runs, "per_collection_ms": per * 1e3,
                          "per_min_ms": per * 60 / interval * 1e3,
                          "per_min_at_15s_ms": per * 4 * 1e3, **info}
            self.report["db_cpu"] = r
            self.pgexp.result["db_cpu_per_scrape_ms"] = r["postgres_exporter"]["per_scrape_ms"]
            self.pgexp.result["db_cpu_per_min_default_ms"] = (
                r["postgres_exporter"]["per_min_at_15s_ms"])
            self.pgexp.result["db_cpu_per_min_at_15s_ms"] = (
                r["postgres_exporter"]["per_min_at_15s_ms"])
            self.auto.result["db_cpu_per_scrape_ms"] = (
                r["autotuner_default_5s"]["per_collection_ms"])
            self.auto.result["db_cpu_per_min_default_ms"] = r["autotuner_default_5s"]["per_min_ms"]
            self.auto.result["db_cpu_per_min_at_15s_ms"] = r["autotuner_at_15s"]["per_min_ms"]
        finally:
            psql.close()
            os.killpg(self.auto.pid, signal.SIGCONT)
        self.write_config("5s")
        self.restart_autotuner()
        self.start_loads()

    def action_latency(self):
        reps = 4 if self.quick else 10
        say(f"condition true → action: {reps} alerts delivered to the webhook receiver")
        self.add_probe_rule()
        got, sent_at = [], {}
        for i in range(reps):
            # A random phase against the 1 s rule tick.
            time.sleep(random.uniform(0.5, 1.5))
            Sink.arrivals.clear()
            labels = {"alertname": "BenchProbe", "rep": str(i)}
            now = datetime.datetime.now(datetime.timezone.utc).isoformat()
            alert = {"status": "firing", "labels": labels, "startsAt": now,
                     "fingerprint": f"benchprobe{i}"}
            sent = time.perf_counter()
            sent_at[str(i)] = (time.time(), sent)
            status, body = self.api("POST", "/api/v1/alerts/webhook",
                                    {"version": "4", "status": "firing", "alerts": [alert]})
            if status != 200:
                raise RuntimeError(f"the webhook receiver answered {status}: {body!r}")
            deadline = sent + 10
            while not Sink.arrivals and time.perf_counter() < deadline:
                time.sleep(0.001)
            if Sink.arrivals:
                got.append(Sink.arrivals[0][0] - sent)
                sent_at[str(i)] += (Sink.arrivals[0][0],)
            self.api("POST", "/api/v1/alerts/webhook", {"version": "4", "status": "resolved",
                     "alerts": [{**alert, "status": "resolved", "endsAt": now}]})
        # Where the time went: the audit log's intent record (written and fsynced before the
        # action runs) splits the wait for the rule's tick from the action itself.
        to_intent, intent_to_arrival = [], []
        status, body = self.api("GET", "/api/v1/audit?rule=BenchProbe&phase=intent&limit=100")
        if status == 200:
            for rec in json.loads(body)["data"]["records"]:
                rep_label = (rec.get("labels") or {}).get("rep")
                if rep_label in sent_at and len(sent_at[rep_label]) == 3:
                    wall, sent, arrived = sent_at[rep_label]
                    intent = rec["ts_ms"] / 1e3 - wall
                    to_intent.append(intent)
                    intent_to_arrival.append(arrived - sent - intent)
        self.auto.result["condition_to_action"] = {
            "alert_to_intent_median_ms": statistics.median(to_intent) * 1e3 if to_intent
            else None,
            "intent_to_arrival_median_ms": statistics.median(intent_to_arrival) * 1e3
            if intent_to_arrival else None,
            "repetitions": reps, "arrived": len(got),
            "min_ms": min(got) * 1e3 if got else None,
            "median_ms": statistics.median(got) * 1e3 if got else None,
            "max_ms": max(got) * 1e3 if got else None,
            "rule_interval_s": 1}

    def reload_latency(self):
        reps = 4 if self.quick else 10
        say(f"rule file saved → active: {reps} saves by rename, {reps} in place")
        res = {}
        for how in ("rename", "in_place"):
            got = []
            for i in range(reps):
                name = f"BenchSaved_{how}_{i}"
                text = (f"groups:\n  - name: bench_saved_{how}_{i}\n    rules:\n"
                        f"      - name: {name}\n        expr: autotuner_rules_loaded < 0\n")
                path = os.path.join(self.rules, f"bench_saved_{how}_{i}.yml")
                t0 = time.perf_counter()
                if how == "rename":  # as editors save: aside, then renamed over
                    tmp = os.path.join(self.rules, f".bench_saved_{i}.swp")
                    with open(tmp, "w") as f:
                        f.write(text)
                    os.rename(tmp, path)
                else:
                    with open(path, "w") as f:
                        f.write(text)
                while time.perf_counter() - t0 < 10:
                    if self.api("GET", f"/api/v1/rules/{name}")[0] == 200:
                        got.append(time.perf_counter() - t0)
                        break
                    time.sleep(0.002)
                time.sleep(random.uniform(0.3, 0.6))
            res[how] = {"repetitions": reps, "active": len(got),
                        "median_ms": statistics.median(got) * 1e3 if got else None,
                        "max_ms": max(got) * 1e3 if got else None}
        for name in os.listdir(self.rules):
            if name.startswith("bench_saved_"):
                os.remove(os.path.join(self.rules, name))
        self.auto.result["rule_saved_to_active"] = res

    def postgres_pids(self):
        with open(os.path.join(self.pg_data, "postmaster.pid")) as f:
            post = int(f.readline())
        pids = [post]
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == post:
                            pids.append(int(p))
                except (OSError, ValueError, IndexError):
                    pass
        return pids

    def pg_ctl(self, *args):
        cmd = [os.path.join(self.pg_bin, "pg_ctl"), "-D", self.pg_data, *args]
        if os.getuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--"] + cmd
        subprocess.run(cmd, capture_output=True, check=True)

    def wait_pg_up(self, want, limit=60):
        deadline = time.time() + limit
        while time.time() < deadline:
            if self.auto_metric("pg_up") == want:
                return True
            time.sleep(0.25)
        return False

    def outage(self):
        secs = 8 if self.quick else 20
        rate = 200
        say(f"autotuner scrape latency, PostgreSQL normal / hung / stopped: {secs} s blocks at "
            f"{rate} scrapes/s (loads and exporters stopped first)")
        self.stop_loads()
        for t in self.exporters:
            self.stop(t.proc)
        time.sleep(2)
        n = secs * rate
        lat = {"normal": []}
        seen = {}
        blocks = []
        lat["normal"] += self.auto.batch(n, pace=1 / rate)
        blocks.append("normal")
        # Hung: every process of the cluster stopped until the block is over.
        self.stopped_pids = self.postgres_pids()
        self.signal_pids(self.stopped_pids, signal.SIGSTOP)
        try:
            seen["hung"] = self.wait_pg_up("0")
            lat["hung"] = self.auto.batch(n, pace=1 / rate)
        finally:
            self.signal_pids(self.stopped_pids, signal.SIGCONT)
            self.stopped_pids = []
        blocks.append("hung")
        self.wait_pg_up("1")
        lat["normal"] += self.auto.batch(n, pace=1 / rate)
        blocks.append("normal")
        # Stopped, then started again with the options it was started with.
        with open(os.path.join(self.pg_data, "postmaster.opts")) as f:
            argv = shlex.split(f.read())[1:]
        if "-D" in argv:
            i = argv.index("-D")
            del argv[i:i + 2]
        self.pg_ctl("-m", "fast", "-w", "stop")
        try:
            seen["stopped"] = self.wait_pg_up("0")
            lat["stopped"] = self.auto.batch(n, pace=1 / rate)
        finally:
            self.pg_ctl("-l", os.path.join(os.path.dirname(self.pg_data), "server.log"), "-w",
                        "start", "-o", " ".join(shlex.quote(a) for a in argv))
        blocks.append("stopped")
        seen["up_again"] = self.wait_pg_up("1")
        lat["normal"] += self.auto.batch(n, pace=1 / rate)
        blocks.append("normal")
        out = {k: {"scrapes": len(v), "median_ms": statistics.median(v) * 1e3,
                   "p99_ms": pct(v, 99) * 1e3} for k, v in lat.items()}
        out["pg_up_reached"] = seen
        out["blocks"] = blocks
        out["rate_per_s"] = rate
        self.auto.result["outage"] = out

    def soak(self, seconds):
        """10 scrapes a second for `seconds`, every rule group ticking each second, pgbench
        and Redis loads running; resident memory sampled every 10 s."""
        say(f"soak: {seconds} s at 10 scrapes/s, every rule group evaluated each second")
        soak_rules = os.path.join(self.work, "rules-soak")
        self.write_rules(soak_rules, tick="1s")
        self.write_config("5s")
        if not self.loads:
            self.start_loads()
        self.restart_autotuner(soak_rules)
        samples = []
        c = http.client.HTTPConnection("127.0.0.1", self.aport, timeout=10)
        t0 = time.perf_counter()
        nxt, next_sample, scrapes = t0, t0, 0
        while True:
            now = time.perf_counter()
            if now >= next_sample:
                samples.append((round(now - t0, 1), rss_mb(self.auto.pid)))
                next_sample += 10
            if now - t0 >= seconds:
                break
            c.request("GET", "/metrics")
            c.getresponse().read()
            scrapes += 1
            nxt += 0.1
            time.sleep(max(0.0, nxt - time.perf_counter()))
        c.close()
        ys = [y for _, y in samples]

        def slope(pts):
            if len(pts) < 3:
                return None
            mx = statistics.mean(x for x, _ in pts)
            my = statistics.mean(y for _, y in pts)
            den = sum((x - mx) ** 2 for x, _ in pts)
            return sum((x - mx) * (y - my) for x, y in pts) / den * 3600 if den else None

        return {"seconds": seconds, "scrapes": scrapes, "rss_start_mb": ys[0],
                "rss_end_mb": ys[-1], "rss_max_mb": max(ys),
                "slope_mb_per_hour": slope(samples),
                "slope_second_half_mb_per_hour": slope(
                    [(x, y) for x, y in samples if x >= seconds / 2]),
                "history_retention": "10m (default); memory should level off once it is full",
                "samples": samples}

    def run(self):
        started = time.time()
        self.setup()
        versions = self.versions()
        if not self.args.soak_only:
            self.compare()
            self.db_cpu()
            self.action_latency()
            self.reload_latency()
            self.outage()
        soak = self.soak(self.args.soak) if self.args.soak else None
        self.report.update(self.header(versions))
        self.report["duration_s"] = round(time.time() - started)
        if soak:
            self.report["soak"] = soak
        if not self.args.soak_only:
            self.summarize()
        self.write()

    # -- report ------------------------------------------------------------------------------

    def versions(self):
        def first(cmd, pattern=None):
            v = version(cmd)
            m = re.search(pattern, v) if pattern else None
            return m.group(1) if m else v
        pg = Psql(self.pg_url)
        try:
            pg_version = pg.query("SHOW server_version")[0]
        finally:
            pg.close()
        return {
            "autotuner": first([self.args.binary, "--version"], r"autotuner (\S+)"),
            "node_exporter": first(["prometheus-node-exporter", "--version"],
                                   r"version (\S+ \([^)]*\))"),
            "postgres_exporter": first(["prometheus-postgres-exporter", "--version"],
                                       r"version (\S+ \([^)]*\))"),
            "redis_exporter": first(["prometheus-redis-exporter", "--version"],
                                    r"Redis Metrics Exporter (\S+)"),
            "postgresql": pg_version,
            "redis": first(["redis-server", "--version"], r"v=(\S+)"),
            "wrk": first(["wrk", "--version"], r"wrk (\S+)"),
        }

    def header(self, versions):
        cpu = "?"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f
                           if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024 / 1024
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem, 1),
                        "kernel": platform.release(),
                        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")
                        if hasattr(platform, "freedesktop_os_release") else "?"},
            "versions": versions,
        }

    def summarize(self):
        ex = self.exporters
        keys = ("series", "bytes", "cpu_per_scrape_ms", "cpu_per_scrape_ms_stat",
                "concurrent_cpu_per_scrape_ms", "idle_cpu_per_min_ms", "rss_idle_mb",
                "rss_after_load_mb")
        summed = {k: sum(t.result[k] for t in ex) for k in keys}
        a, n, p = self.auto.result, self.node.result, self.pgexp.result
        for t in self.targets:
            # What a Prometheus scraping every 15 s costs in all: 4 scrapes and the rest.
            t.result["cpu_per_min_at_15s_scrapes_ms"] = (
                t.result["idle_cpu_per_min_ms"] + 4 * t.result["cpu_per_scrape_ms"])
        summed["cpu_per_min_at_15s_scrapes_ms"] = sum(
            t.result["cpu_per_min_at_15s_scrapes_ms"] for t in ex)
        o = a["outage"]

        def ratio(x, y):
            return x / y if y else None

        ratios = {
            "latency_median_vs_node": ratio(a["latency_median_ms"], n["latency_median_ms"]),
            "latency_p99_vs_node": ratio(a["latency_p99_ms"], n["latency_p99_ms"]),
            "cpu_per_scrape_vs_three": ratio(a["cpu_per_scrape_ms"],
                                             summed["cpu_per_scrape_ms"]),
            "cpu_per_min_at_15s_scrapes_vs_three": ratio(
                a["cpu_per_min_at_15s_scrapes_ms"], summed["cpu_per_min_at_15s_scrapes_ms"]),
            "scrapes_per_second_vs_node": ratio(a["concurrent_scrapes_per_second"],
                                                n["concurrent_scrapes_per_second"]),
            "rss_after_load_vs_three": ratio(a["rss_after_load_mb"],
                                             summed["rss_after_load_mb"]),
            "rss_idle_vs_three": ratio(a["rss_idle_mb"], summed["rss_idle_mb"]),
            "db_cpu_default_vs_postgres_exporter": ratio(a["db_cpu_per_min_default_ms"],
                                                         p["db_cpu_per_min_default_ms"]),
            "db_cpu_at_15s_vs_postgres_exporter": ratio(a["db_cpu_per_min_at_15s_ms"],
                                                        p["db_cpu_per_min_at_15s_ms"]),
            "outage_p99_hung_vs_normal": ratio(o["hung"]["p99_ms"], o["normal"]["p99_ms"]),
            "outage_p99_stopped_vs_normal": ratio(o["stopped"]["p99_ms"],
                                                  o["normal"]["p99_ms"]),
        }
        saved = a["rule_saved_to_active"]["rename"]["median_ms"]
        checks = [
            ("scrape latency median ≤ 1/10 of node_exporter's",
             ratios["latency_median_vs_node"], "≤", 0.1),
            ("CPU per scrape ≤ 1/20 of the three exporters' sum",
             ratios["cpu_per_scrape_vs_three"], "≤", 0.05),
            ("scrapes/s (8 clients) ≥ 10× node_exporter's",
             ratios["scrapes_per_second_vs_node"], "≥", 10),
            ("resident memory after load ≤ 1/3 of the three's sum",
             ratios["rss_after_load_vs_three"], "≤", 1 / 3),
            ("PostgreSQL CPU per minute at defaults ≤ postgres_exporter's (5 s vs 15 s)",
             ratios["db_cpu_default_vs_postgres_exporter"], "≤", 1),
            ("PostgreSQL CPU per minute, both at 15 s, ≤ postgres_exporter's",
             ratios["db_cpu_at_15s_vs_postgres_exporter"], "≤", 1),
            ("saved rule file active within 250 ms (median, ms)", saved, "≤", 250),
            ("scrape p99 with PostgreSQL hung within 20 % of normal",
             ratios["outage_p99_hung_vs_normal"], "≤", 1.2),
            ("scrape p99 with PostgreSQL stopped within 20 % of normal",
             ratios["outage_p99_stopped_vs_normal"], "≤", 1.2),
        ]
        self.report["targets"] = {t.name: t.result for t in self.targets}
        self.report["three_exporters_summed"] = summed
        self.report["ratios"] = ratios
        self.report["checks"] = [
            {"target": label, "value": v, "limit": f"{op} {lim:.3g}",
             "holds": None if v is None else (v <= lim if op == "≤" else v >= lim)}
            for label, v, op, lim in checks]

    def write(self):
        out = self.args.out
        os.makedirs(out, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        prefix = "soak" if self.args.soak_only else "side-by-side"
        path = self.args.json or os.path.join(out, f"{prefix}-{stamp}.json")
        with open(path, "w") as f:
            json.dump(self.report, f, indent=2)
        say("")
        say(text_table(self.report))
        if not self.args.soak_only:
            md_path = os.path.join(out, "side-by-side.md")
            with open(md_path, "w") as f:
                f.write(markdown(self.report))
            say(f"written: {path}\n         {md_path}")
        else:
            say(f"written: {path}")


# -- formatting ------------------------------------------------------------------------------

NAMES = ["node_exporter", "postgres_exporter", "redis_exporter"]


def fnum(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    if v != v:  # NaN
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.{digits}g}" if a else "0"


def fcheck(v):
    return "—" if v is None else f"{v:.4g}"


def rows(r):
    """(label, [node, pg, redis, sum, autotuner], ratio) for the comparison table."""
    t, s, ra = r["targets"], r["three_exporters_summed"], r["ratios"]

    def row(label, key, summed=True, ratio=None):
        vals = [t[n].get(key) for n in NAMES]
        vals.append(s.get(key) if summed else None)
        vals.append(t["autotuner"].get(key))
        return (label, vals, ra.get(ratio) if ratio else None)

    out = [
        row("series per scrape", "series"),
        row("bytes per scrape", "bytes"),
        row("sequential latency min (ms)", "latency_min_ms", False),
        row("sequential latency median (ms)", "latency_median_ms", False,
            "latency_median_vs_node"),
        row("sequential latency p99 (ms)", "latency_p99_ms", False, "latency_p99_vs_node"),
        row("8 clients: latency min (ms)", "concurrent_min_ms", False),
        row("8 clients: latency median (ms)", "concurrent_median_ms", False),
        row("8 clients: latency p99 (ms)", "concurrent_p99_ms", False),
        row("8 clients: scrapes/s", "concurrent_scrapes_per_second", False,
            "scrapes_per_second_vs_node"),
        row("CPU per scrape (ms)", "cpu_per_scrape_ms", True, "cpu_per_scrape_vs_three"),
        row("CPU per scrape, utime+stime (ms)", "cpu_per_scrape_ms_stat"),
        row("CPU per scrape, 8 clients (ms)", "concurrent_cpu_per_scrape_ms"),
        row("CPU per minute unscraped (ms)", "idle_cpu_per_min_ms"),
        row("CPU per minute, 15 s scrapes (ms)", "cpu_per_min_at_15s_scrapes_ms", True,
            "cpu_per_min_at_15s_scrapes_vs_three"),
        row("resident memory idle (MB)", "rss_idle_mb", True, "rss_idle_vs_three"),
        row("resident memory after load (MB)", "rss_after_load_mb", True,
            "rss_after_load_vs_three"),
        row("PostgreSQL CPU per scrape/collection (ms)", "db_cpu_per_scrape_ms", False),
        row("PostgreSQL CPU per minute, defaults (ms)", "db_cpu_per_min_default_ms", False,
            "db_cpu_default_vs_postgres_exporter"),
        row("PostgreSQL CPU per minute, both at 15 s (ms)", "db_cpu_per_min_at_15s_ms", False,
            "db_cpu_at_15s_vs_postgres_exporter"),
    ]
    return out


def own_lines(r):
    a = r["targets"]["autotuner"]
    c = a["condition_to_action"]
    rs = a["rule_saved_to_active"]
    o = a["outage"]
    return [
        f"condition true → action (alert delivered → webhook action received, rule ticking every "
        f"1 s): median {fnum(c['median_ms'])} ms, min {fnum(c['min_ms'])}, max "
        f"{fnum(c['max_ms'])} ({c['arrived']}/{c['repetitions']} arrived; alert → intent "
        f"recorded {fnum(c['alert_to_intent_median_ms'])} ms, intent → webhook received "
        f"{fnum(c['intent_to_arrival_median_ms'])} ms, medians)",
        f"rule file saved → served by the API: by rename median {fnum(rs['rename']['median_ms'])}"
        f" ms (max {fnum(rs['rename']['max_ms'])}); written in place median "
        f"{fnum(rs['in_place']['median_ms'])} ms (max {fnum(rs['in_place']['max_ms'])})",
        f"scrape latency median / p99 (ms) at {o['rate_per_s']}/s: PostgreSQL normal "
        f"{fnum(o['normal']['median_ms'])} / {fnum(o['normal']['p99_ms'])}, hung "
        f"{fnum(o['hung']['median_ms'])} / {fnum(o['hung']['p99_ms'])}, stopped "
        f"{fnum(o['stopped']['median_ms'])} / {fnum(o['stopped']['p99_ms'])} "
        f"(pg_up reached 0: hung {o['pg_up_reached'].get('hung')}, stopped "
        f"{o['pg_up_reached'].get('stopped')})",
    ]


def soak_line(s):
    def mbh(v):
        return "—" if v is None else f"{v:+.2f} MB/h"
    return (f"soak {s['seconds']} s, {s['scrapes']} scrapes at 10/s, every rule group ticking "
            f"each second: resident memory {s['rss_start_mb']:.1f} → {s['rss_end_mb']:.1f} MB "
            f"(max {s['rss_max_mb']:.1f}); slope {mbh(s['slope_mb_per_hour'])} overall, "
            f"{mbh(s['slope_second_half_mb_per_hour'])} over the second half")


def machine_line(r):
    m, v = r["machine"], r["versions"]
    return (f"{r['date']}; {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, "
            f"kernel {m['kernel']}; autotuner {v['autotuner']}, node_exporter "
            f"{v['node_exporter']}, postgres_exporter {v['postgres_exporter']}, redis_exporter "
            f"{v['redis_exporter']}, PostgreSQL {v['postgresql']}, Redis {v['redis']}, "
            f"wrk {v['wrk']}")


def text_table(r):
    out = [machine_line(r), ""]
    if "targets" in r:
        head = ["", "node_exp", "pg_exp", "redis_exp", "3 summed", "autotuner", "ratio"]
        body = [[label] + [fnum(v) for v in vals] + [fnum(ratio) + "×" if ratio else ""]
                for label, vals, ratio in rows(r)]
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        for line in [head] + body:
            out.append("  ".join(line[0].ljust(widths[0]) if i == 0 else
                                 line[i].rjust(widths[i]) for i in range(len(line))))
        out += [""] + own_lines(r) + [""]
        for c in r["checks"]:
            mark = {True: "holds", False: "DOES NOT HOLD", None: "not measured"}[c["holds"]]
            out.append(f"  [{mark:>13}] {c['target']}: {fcheck(c['value'])} ({c['limit']})")
    if r.get("soak"):
        out += ["", soak_line(r["soak"])]
    out.append(f"\nmeasured in {r['duration_s']} s")
    return "\n".join(out)


def markdown(r):
    out = [f"Side by side, {machine_line(r)}. Run with `scripts/bench` (measuring took "
           f"{r['duration_s'] // 60} min); rounds alternate between the targets.", "",
           "| | node_exporter | postgres_exporter | redis_exporter | the three summed | "
           "autotuner | autotuner ÷ reference |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, vals, ratio in rows(r):
        cells = [fnum(v) for v in vals] + [fnum(ratio) + "×" if ratio else ""]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += ["", "The reference of a ratio is node_exporter for latency and scrapes/s, "
            "postgres_exporter for PostgreSQL CPU, and the three summed otherwise.", "",
            "| target | measured | holds |", "| --- | ---: | --- |"]
    for c in r["checks"]:
        holds = {True: "yes", False: "**no**", None: "not measured"}[c["holds"]]
        out.append(f"| {c['target']} | {fcheck(c['value'])} ({c['limit']}) | {holds} |")
    out.append("")
    out += [f"- {line}" for line in own_lines(r)]
    if r.get("soak"):
        out.append(f"- {soak_line(r['soak'])}")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--out", required=True, help="directory of the JSON and Markdown files")
    ap.add_argument("--json", help="the JSON file (default OUT/side-by-side-<date>.json)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--soak", type=int, default=0, metavar="SECONDS")
    ap.add_argument("--soak-only", action="store_true")
    args = ap.parse_args()
    if args.soak_only and not args.soak:
        ap.error("--soak-only needs --soak SECONDS")

    def on_signal(signum, _frame):
        # Once: the clean-up that follows must not be cut short by a second signal.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bench = Bench(args)
    try:
        bench.run()
    except Exception:
        log = os.path.join(bench.work, "autotuner.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                tail = f.readlines()[-30:]
            print("autotuner's log, last lines:\n" + "".join(tail), file=sys.stderr)
        raise
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
