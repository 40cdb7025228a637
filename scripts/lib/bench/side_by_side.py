#!/usr/bin/env python3
"""Side-by-side benchmark: autotuner against node_exporter, postgres_exporter and redis_exporter
(Debian's builds), on loopback, on the same PostgreSQL and Redis, in one run.

Started by scripts/bench, which provisions PostgreSQL (with pg_stat_statements) and builds the
release binary; this script starts Redis, the exporters and autotuner, loads PostgreSQL with
pgbench, measures, and writes a JSON file and a Markdown table. Standard library only.

What is measured, for each target (rounds alternate between the targets, after a warm-up):
- series and bytes per scrape (uncompressed);
- scrape latency, sequential on one kept-alive connection: min, median, p99;
- scrapes per second with 8 concurrent clients (wrk), and wrk's median and p99 latency;
- CPU seconds per scrape: the process's on-CPU time (all threads, /proc/<pid>/task/*/schedstat,
  nanoseconds) over the sequential scrapes, divided by their number;
- resident memory (VmRSS) after start and warm-up, and after all the load;
- the PostgreSQL server's CPU spent on monitoring per minute: the CPU of every process of the
  cluster over a window with only that exporter asking, minus a baseline window with nobody
  asking (pgbench stopped for this phase).
And autotuner's own: an alert delivered to its Alertmanager webhook until the webhook action
of a rule matching it arrives; a rule file saved until the API serves the rule; scrape latency
while PostgreSQL is hung (SIGSTOP) and stopped, against normal.
"""

import argparse
import datetime
import http.client
import http.server
import json
import os
import platform
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
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOKEN = "bench-operate-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path="/metrics", timeout=30, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path, headers=headers or {})
            r = c.getresponse()
            r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered on port {port}{path}")


def cpu_ns(pid):
    """On-CPU time of every thread of pid, in nanoseconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(values, p):
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


class Target:
    def __init__(self, name, port, proc, path="/metrics"):
        self.name, self.port, self.proc, self.path = name, port, proc, path
        self.latencies = []
        self.cpu = 0
        self.scrapes = 0
        self.result = {}

    @property
    def pid(self):
        return self.proc.pid

    def scrape_batch(self, n):
        """n sequential scrapes on one connection; latencies in seconds."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        before = cpu_ns(self.pid)
        out = []
        for _ in range(n):
            t = time.perf_counter()
            c.request("GET", self.path)
            r = c.getresponse()
            r.read()
            out.append(time.perf_counter() - t)
        self.cpu += cpu_ns(self.pid) - before
        self.scrapes += n
        c.close()
        self.latencies.extend(out)
        return out


def start(cmd, env=None, log=None):
    return subprocess.Popen(
        cmd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=log or subprocess.DEVNULL,
        start_new_session=True,
    )


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except OSError:
        return "?"


def postgres_pids(data_dir):
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        post = int(f.readline())
    pids = [post]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == post:
                    pids.append(int(p))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def cluster_cpu_ns(data_dir):
    return sum(cpu_ns(p) for p in postgres_pids(data_dir) if os.path.exists(f"/proc/{p}"))


def wrk(port, path, seconds):
    out = subprocess.run(
        ["wrk", "-t2", "-c8", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(label):
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", out)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / {"us": 1e6, "ms": 1e3, "s": 1}[unit]

    return rps, lat("50"), lat("99")


class Sink(http.server.BaseHTTPRequestHandler):
    """Records when each webhook action arrives."""

    arrivals = []

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        Sink.arrivals.append((time.time(), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def api(port, method, path, body=None):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--soak", type=int, default=0)
    ap.add_argument("--soak-only", action="store_true",
                    help="skip the comparison: start autotuner alone and soak")
    args = ap.parse_args()

    quick = args.quick
    rounds = 3 if quick else 8
    per_round = 50 if quick else 200
    wrk_seconds = 3 if quick else 8
    db_window = 20 if quick else 60

    pg_url = os.environ["AUTOTUNER_TEST_PG_URL"]
    mon_url = os.environ["AUTOTUNER_TEST_PG_MONITOR_URL"]
    pg_bin = os.environ["AUTOTUNER_TEST_PG_BIN"]
    pg_data = os.path.join(os.environ["AUTOTUNER_TEST_DIR"], "pg", "data")
    work = tempfile.mkdtemp(prefix="autotuner-bench-")
    procs = []

    def stop_all():
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    try:
        return run(args, quick, rounds, per_round, wrk_seconds, db_window, pg_url, mon_url,
                   pg_bin, pg_data, work, procs)
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)


def run(args, quick, rounds, per_round, wrk_seconds, db_window, pg_url, mon_url, pg_bin,
        pg_data, work, procs):
    say = lambda *a: print(*a, flush=True)  # noqa: E731

    # Redis, loaded with some keys and traffic so its INFO is not trivial.
    rport = free_port()
    procs.append(start(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", work]))
    time.sleep(0.5)
    subprocess.run(["redis-benchmark", "-p", str(rport), "-q", "-n", "20000", "-r", "5000",
                    "-t", "set,get,incr,lpush"], capture_output=True)

    # PostgreSQL: a pgbench database, and a light steady load during the scrape phases.
    subprocess.run(["pgbench", "-i", "-s", "5", "-q", pg_url], capture_output=True, check=True)
    subprocess.run(["psql", pg_url, "-qc", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"],
                   capture_output=True)

    def pgbench_load():
        p = start(["pgbench", "-c", "2", "-R", "100", "-T", "100000", pg_url])
        procs.append(p)
        return p

    load = pgbench_load()
    pg_version = version(["psql", pg_url, "-Atc", "SHOW server_version"])

    # The webhook sink for the action-latency measurement.
    sink_port = free_port()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", sink_port), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()

    # autotuner: host, PostgreSQL, Redis, the shipped rules and a probe rule.
    rules = os.path.join(work, "rules")
    os.makedirs(rules)
    for f in os.listdir(os.path.join(ROOT, "rules")):
        if f.endswith(".yml"):
            shutil.copy(os.path.join(ROOT, "rules", f), rules)
    with open(os.path.join(rules, "bench_probe.yml"), "w") as f:
        f.write(f"""groups:
  - name: bench_probe
    interval: 1s
    rules:
      - name: BenchProbe
        expr: autotuner_alert{{alertname="BenchProbe"}}
        on_absent: clear
        mode: enforce
        actions:
          - webhook: {{ url: "http://127.0.0.1:{sink_port}/hook" }}
""")
    config = os.path.join(work, "autotuner.yml")

    def write_config(pg_interval):
        with open(config, "w") as f:
            f.write(f"""collectors:
  postgres: {{interval: {pg_interval}}}
actions:
  mode: enforce
targets:
  postgres: [{{name: main, url: '{mon_url}'}}]
  redis: [{{name: cache, url: 'redis://127.0.0.1:{rport}'}}]
""")

    write_config("5s")
    aport = free_port()
    data = os.path.join(work, "data")

    def start_autotuner():
        log = open(os.path.join(work, "autotuner.log"), "ab")
        p = start([args.binary, f"--web.listen-address=127.0.0.1:{aport}",
                   f"--config.file={config}", f"--rules.dir={rules}", f"--data.dir={data}"],
                  env={"AUTOTUNER_OPERATE_TOKEN": TOKEN}, log=log)
        procs.append(p)
        wait_http(aport, "/-/ready")
        return p

    auto = Target("autotuner", aport, start_autotuner())
    if args.soak_only:
        soak = do_soak(args.soak, aport, auto)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
        with open(path, "w") as f:
            json.dump({"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
                       "soak": soak, "samples": soak.pop("samples")}, f, indent=2)
        say(json.dumps(soak, indent=2))
        say(f"written: {path}")
        return 0

    nport, pport, xport = free_port(), free_port(), free_port()
    node = Target("node_exporter", nport,
                  start(["prometheus-node-exporter", f"--web.listen-address=127.0.0.1:{nport}"]))
    pgexp = Target("postgres_exporter", pport,
                   start(["prometheus-postgres-exporter", f"--web.listen-address=127.0.0.1:{pport}"],
                         env={"DATA_SOURCE_NAME": mon_url + "?sslmode=disable"}))
    rexp = Target("redis_exporter", xport,
                  start(["prometheus-redis-exporter", f"--web.listen-address=127.0.0.1:{xport}",
                         f"--redis.addr=redis://127.0.0.1:{rport}"]))
    procs.extend([node.proc, pgexp.proc, rexp.proc])
    targets = [node, pgexp, rexp, auto]
    for t in targets:
        wait_http(t.port)
    exporters = [node, pgexp, rexp]

    # Warm-up, then resident memory at idle.
    for t in targets:
        t.scrape_batch(20)
        t.latencies, t.cpu, t.scrapes = [], 0, 0
    time.sleep(5)
    for t in targets:
        t.result["rss_idle_mb"] = rss_kb(t.pid) / 1024
        body = urllib.request.urlopen(f"http://127.0.0.1:{t.port}/metrics").read()
        text = body.decode()
        t.result["bytes"] = len(body)
        t.result["series"] = sum(1 for l in text.splitlines() if l and not l.startswith("#"))

    say(f"sequential scrapes: {rounds} rounds of {per_round}, alternating")
    for r in range(rounds):
        for t in (targets if r % 2 == 0 else list(reversed(targets))):
            t.scrape_batch(per_round)
    for t in targets:
        t.result.update(
            latency_min_ms=min(t.latencies) * 1e3,
            latency_median_ms=statistics.median(t.latencies) * 1e3,
            latency_p99_ms=pct(t.latencies, 99) * 1e3,
            cpu_per_scrape_ms=t.cpu / t.scrapes / 1e6,
        )

    say(f"8 concurrent clients (wrk), {wrk_seconds}s each, two rounds")
    for t in targets:
        t.result["wrk"] = []
    for r in range(2):
        for t in (targets if r == 0 else list(reversed(targets))):
            t.result["wrk"].append(wrk(t.port, t.path, wrk_seconds))
    for t in targets:
        w = t.result.pop("wrk")
        t.result["scrapes_per_second"] = statistics.median(x[0] for x in w)
        t.result["concurrent_median_ms"] = statistics.median(x[1] for x in w) * 1e3
        t.result["concurrent_p99_ms"] = statistics.median(x[2] for x in w) * 1e3
        t.result["rss_after_load_mb"] = rss_kb(t.pid) / 1024

    # Database CPU spent on monitoring: pgbench stopped, each PG client alone in turn.
    say(f"database CPU: {db_window}s windows (baseline, postgres_exporter, autotuner)")
    load.terminate()
    load.wait()
    os.killpg(auto.pid, signal.SIGSTOP)
    time.sleep(2)

    def window(action=None):
        before = cluster_cpu_ns(pg_data)
        end = time.time() + db_window
        n = 0
        while time.time() < end:
            if action:
                action()
                n += 1
                time.sleep(max(0, 1 - (time.time() % 1)))
            else:
                time.sleep(0.5)
        return (cluster_cpu_ns(pg_data) - before) / 1e9, n

    base, _ = window()

    def scrape_pg():
        urllib.request.urlopen(f"http://127.0.0.1:{pport}/metrics").read()

    pg_cpu, pg_n = window(scrape_pg)
    per_scrape = max(0.0, pg_cpu - base) / max(pg_n, 1)
    pgexp.result["db_cpu_per_scrape_ms"] = per_scrape * 1e3
    # Prometheus's default interval is 1m; 15s is the common setting for databases.
    pgexp.result["db_cpu_per_min_at_15s_ms"] = per_scrape * 4 * 1e3
    os.killpg(auto.pid, signal.SIGCONT)
    time.sleep(1)
    at_cpu, _ = window()
    auto.result["db_cpu_per_min_default_5s_ms"] = max(0.0, at_cpu - base) * 60 / db_window * 1e3
    # The same at postgres_exporter's usual interval: autotuner restarted with 15 s.
    os.killpg(auto.pid, signal.SIGTERM)
    auto.proc.wait()
    write_config("15s")
    auto.proc = start_autotuner()
    time.sleep(2)
    at15, _ = window()
    auto.result["db_cpu_per_min_at_15s_ms"] = max(0.0, at15 - base) * 60 / db_window * 1e3
    load = pgbench_load()
    time.sleep(3)

    # Condition true to action: an alert delivered until the rule's webhook arrives.
    say("condition-true-to-action and rule-file-saved-to-active")
    to_action = []
    for i in range(3 if quick else 8):
        Sink.arrivals.clear()
        sent = time.time()
        status, body = api(aport, "POST", "/api/v1/alerts/webhook", {
            "version": "4",
            "alerts": [{"status": "firing", "labels": {"alertname": "BenchProbe", "n": str(i)},
                        "startsAt": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "fingerprint": f"bench{i}"}],
        })
        if status != 200:
            raise RuntimeError(f"webhook intake answered {status}: {body!r}")
        deadline = sent + 10
        while not Sink.arrivals and time.time() < deadline:
            time.sleep(0.002)
        if Sink.arrivals:
            to_action.append(Sink.arrivals[0][0] - sent)
        time.sleep(1.3)
    auto.result["condition_to_action_ms"] = (
        statistics.median(to_action) * 1e3 if to_action else float("nan"))
    auto.result["condition_to_action_max_ms"] = max(to_action) * 1e3 if to_action else float("nan")

    # A rule file saved (written aside, renamed into place, as editors do) until served.
    to_active = []
    for i in range(5 if quick else 10):
        name = f"BenchSaved{i}"
        tmp = os.path.join(rules, f".bench_saved_{i}.tmp")
        with open(tmp, "w") as f:
            f.write(f"groups:\n  - name: saved{i}\n    rules:\n      - name: {name}\n"
                    f"        expr: up == 2\n")
        t0 = time.time()
        os.rename(tmp, os.path.join(rules, f"bench_saved_{i}.yml"))
        while time.time() - t0 < 10:
            status, _ = api(aport, "GET", f"/api/v1/rules/{name}")
            if status == 200:
                to_active.append(time.time() - t0)
                break
            time.sleep(0.002)
        time.sleep(0.3)
    auto.result["rule_saved_to_active_ms"] = (
        statistics.median(to_active) * 1e3 if to_active else float("nan"))
    auto.result["rule_saved_to_active_max_ms"] = max(to_active) * 1e3 if to_active else float("nan")

    # Scrape latency while PostgreSQL is hung, then stopped.
    say("autotuner scrape latency: PostgreSQL normal, hung (SIGSTOP), stopped")
    n = 300 if quick else 1000
    lat = {}
    probe = Target("autotuner", aport, auto.proc)
    lat["normal"] = probe.scrape_batch(n)
    load.terminate()
    load.wait()
    def pg_up():
        text = urllib.request.urlopen(f"http://127.0.0.1:{aport}/metrics").read().decode()
        m = re.search(r'^pg_up\{[^}]*\} (\S+)$', text, re.M)
        return m.group(1) if m else None

    def until_down(limit=45):
        # The collector notices at its next run (15 s interval, 12 s timeout here).
        deadline = time.time() + limit
        while pg_up() != "0" and time.time() < deadline:
            time.sleep(0.5)
        return pg_up()

    pids = postgres_pids(pg_data)
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        seen = {"hung": until_down()}
        lat["hung"] = probe.scrape_batch(n)
    finally:
        for p in pids:
            os.kill(p, signal.SIGCONT)
    # Restarted afterwards with the options it was started with (postmaster.opts).
    with open(os.path.join(pg_data, "postmaster.opts")) as f:
        argv = shlex.split(f.read())[1:]
    if "-D" in argv:
        i = argv.index("-D")
        del argv[i:i + 2]
    pg_ctl = ["runuser", "-u", "postgres", "--", os.path.join(pg_bin, "pg_ctl"), "-D", pg_data]
    subprocess.run(pg_ctl + ["-m", "fast", "-w", "stop"], capture_output=True, check=True)
    seen["stopped"] = until_down()
    lat["stopped"] = probe.scrape_batch(n)
    subprocess.run(pg_ctl + ["-l", os.path.join(os.path.dirname(pg_data), "server.log"), "-w",
                             "start", "-o", " ".join(shlex.quote(a) for a in argv)],
                   capture_output=True, check=True)
    auto.result["outage"] = {
        k: {"median_ms": statistics.median(v) * 1e3, "p99_ms": pct(v, 99) * 1e3}
        for k, v in lat.items()
    }
    auto.result["outage"]["pg_up_while"] = seen

    soak = do_soak(args.soak, aport, auto) if args.soak else None
    # Report.
    summed = {
        k: sum(t.result[k] for t in exporters)
        for k in ("cpu_per_scrape_ms", "rss_idle_mb", "rss_after_load_mb", "series", "bytes")
    }
    a = auto.result
    ratios = {
        "latency_median_vs_node": a["latency_median_ms"] / node.result["latency_median_ms"],
        "cpu_per_scrape_vs_three": a["cpu_per_scrape_ms"] / summed["cpu_per_scrape_ms"],
        "scrapes_per_second_vs_node": a["scrapes_per_second"] / node.result["scrapes_per_second"],
        "rss_after_load_vs_three": a["rss_after_load_mb"] / summed["rss_after_load_mb"],
        "rss_idle_vs_three": a["rss_idle_mb"] / summed["rss_idle_mb"],
        "db_cpu_vs_postgres_exporter_at_15s": (
            a["db_cpu_per_min_at_15s_ms"] / pgexp.result["db_cpu_per_min_at_15s_ms"]
            if pgexp.result["db_cpu_per_min_at_15s_ms"] > 0 else float("nan")),
        "outage_p99_hung_vs_normal": a["outage"]["hung"]["p99_ms"] / a["outage"]["normal"]["p99_ms"],
        "outage_p99_stopped_vs_normal": (
            a["outage"]["stopped"]["p99_ms"] / a["outage"]["normal"]["p99_ms"]),
    }
    cpu_model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 1024 / 1024
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model, "memory_gib": round(mem_gb, 1),
                    "kernel": platform.release()},
        "versions": {
            "autotuner": version([args.binary, "--version"]),
            "node_exporter": version(["prometheus-node-exporter", "--version"]),
            "postgres_exporter": version(["prometheus-postgres-exporter", "--version"]),
            "redis_exporter": re.sub(r".*(Redis Metrics Exporter [^ ]+).*", r"\1",
                                     version(["prometheus-redis-exporter", "--version"])),
            "postgresql": pg_version,
            "redis": version(["redis-server", "--version"]),
        },
        "settings": {"rounds": rounds, "scrapes_per_round": per_round, "wrk_seconds": wrk_seconds,
                     "db_window_s": db_window, "quick": quick},
        "targets": {t.name: t.result for t in targets},
        "three_exporters_summed": summed,
        "ratios": ratios,
        "soak": soak,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"side-by-side-{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(args.out, "side-by-side.md"), "w") as f:
        f.write(md)
    say("")
    say(md)
    say(f"written: {path} and {os.path.join(args.out, 'side-by-side.md')}")
    return 0


def do_soak(seconds, port, auto):
    """Scrapes at 10/s for `seconds` (the probe rule ticks every 1 s), sampling the resident
    memory every 10 s: what it holds should level off at the configured history."""
    print(f"soak: {seconds}s at 10 scrapes/s, a rule group evaluated every 1s", flush=True)
    samples = []
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    next_sample = t0
    while time.time() - t0 < seconds:
        if time.time() >= next_sample:
            samples.append((round(time.time() - t0, 1), rss_kb(auto.pid) / 1024))
            next_sample += 10
        c.request("GET", "/metrics")
        c.getresponse().read()
        time.sleep(0.1)
    samples.append((round(time.time() - t0, 1), rss_kb(auto.pid) / 1024))
    xs, ys = [x for x, _ in samples], [y for _, y in samples]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in samples) / max(
        sum((x - mx) ** 2 for x in xs), 1e-9)
    # The history fills for its retention (10 min by default): growth after that is a leak.
    late = [(x, y) for x, y in samples if x >= min(600, seconds / 2)]
    late_slope = None
    if len(late) > 2:
        lx, ly = statistics.mean(x for x, _ in late), statistics.mean(y for _, y in late)
        late_slope = sum((x - lx) * (y - ly) for x, y in late) / max(
            sum((x - lx) ** 2 for x, _ in late), 1e-9) * 3600
    return {"seconds": seconds, "rss_start_mb": ys[0], "rss_end_mb": ys[-1],
            "rss_max_mb": max(ys), "slope_mb_per_hour": slope * 3600,
            "slope_after_history_full_mb_per_hour": late_slope, "samples": samples}


def markdown(r):
    t = r["targets"]
    names = ["node_exporter", "postgres_exporter", "redis_exporter", "autotuner"]
    f1 = lambda v: "—" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}")  # noqa: E731
    rows = [
        ("series per scrape", "series", lambda v: f"{v}"),
        ("bytes per scrape", "bytes", lambda v: f"{v:,}"),
        ("scrape latency min (ms)", "latency_min_ms", f1),
        ("scrape latency median (ms)", "latency_median_ms", f1),
        ("scrape latency p99 (ms)", "latency_p99_ms", f1),
        ("8 clients: scrapes/s", "scrapes_per_second", lambda v: f"{v:,.0f}"),
        ("8 clients: median / p99 (ms)", None, None),
        ("CPU per scrape (ms)", "cpu_per_scrape_ms", f1),
        ("resident memory idle (MB)", "rss_idle_mb", f1),
        ("resident memory after load (MB)", "rss_after_load_mb", f1),
        ("PostgreSQL CPU per minute at 15 s (ms)", "db_cpu_per_min_at_15s_ms", f1),
    ]
    out = [f"Run {r['date']} on {r['machine']['cores']} cores ({r['machine']['cpu']}, "
           f"{r['machine']['memory_gib']} GiB); " +
           ", ".join(f"{k} {v}" for k, v in r["versions"].items()) + ".", "",
           "| | " + " | ".join(names) + " | three exporters summed |",
           "| --- |" + " --- |" * (len(names) + 1)]
    summed = r["three_exporters_summed"]
    for label, key, fmt in rows:
        cells = []
        for n in names:
            if key is None:
                cells.append(f"{f1(t[n]['concurrent_median_ms'])} / {f1(t[n]['concurrent_p99_ms'])}")
            else:
                v = t[n].get(key)
                cells.append("—" if v is None else fmt(v))
        s = summed.get(key) if key else None
        cells.append("" if s is None else fmt(s))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    a = t["autotuner"]
    ra = r["ratios"]
    out += ["", "| target | measured | holds |", "| --- | --- | --- |"]
    checks = [
        ("scrape latency median ≤ 1/10 of node_exporter's", ra["latency_median_vs_node"], 0.1,
         True),
        ("CPU per scrape ≤ 1/20 of the three summed", ra["cpu_per_scrape_vs_three"], 0.05, True),
        ("scrapes/s ≥ 10× node_exporter's", ra["scrapes_per_second_vs_node"], 10, False),
        ("memory after load ≤ 1/3 of the three summed", ra["rss_after_load_vs_three"], 1 / 3,
         True),
        ("PostgreSQL CPU ≤ postgres_exporter's at 15 s", ra["db_cpu_vs_postgres_exporter_at_15s"],
         1, True),
        ("scrape p99 with PostgreSQL hung within 20 %", ra["outage_p99_hung_vs_normal"], 1.2, True),
        ("scrape p99 with PostgreSQL stopped within 20 %", ra["outage_p99_stopped_vs_normal"], 1.2,
         True),
    ]
    for label, v, limit, at_most in checks:
        ok = v <= limit if at_most else v >= limit
        out.append(f"| {label} | {v:.3g}× | {'yes' if ok else 'no'} |")
    saved = a["rule_saved_to_active_ms"]
    out.append(f"| saved rule file active within 250 ms | median {saved:.0f} ms, "
               f"max {a['rule_saved_to_active_max_ms']:.0f} ms | {'yes' if saved <= 250 else 'no'} |")
    out += ["",
            f"autotuner alone: alert delivered → rule's webhook action arrived: median "
            f"{a['condition_to_action_ms']:.0f} ms (max {a['condition_to_action_max_ms']:.0f} ms; "
            f"the rule is evaluated every 1 s). PostgreSQL CPU per minute at autotuner's default "
            f"5 s interval: {a['db_cpu_per_min_default_5s_ms']:.1f} ms. Scrape latency median / p99 "
            f"(ms): normal {a['outage']['normal']['median_ms']:.3f} / "
            f"{a['outage']['normal']['p99_ms']:.3f}, PostgreSQL hung "
            f"{a['outage']['hung']['median_ms']:.3f} / {a['outage']['hung']['p99_ms']:.3f}, stopped "
            f"{a['outage']['stopped']['median_ms']:.3f} / {a['outage']['stopped']['p99_ms']:.3f} "
            f"(pg_up then: {a['outage']['pg_up_while']})."]
    if r.get("soak"):
        s = dict(r["soak"])
        s.pop("samples", None)
        out.append(f"Soak {s['seconds']} s at 10 scrapes/s: resident memory {s['rss_start_mb']:.1f} "
                   f"→ {s['rss_end_mb']:.1f} MB (max {s['rss_max_mb']:.1f}), slope "
                   f"{s['slope_mb_per_hour']:.2f} MB/hour.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
