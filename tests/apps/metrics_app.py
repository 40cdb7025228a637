"""A small application instrumented with the official Python client (Debian's
python3-prometheus-client), for tests/app_metrics.rs.

Serves on 127.0.0.1:PORT (argv[1]):
  /metrics        the client's own WSGI app: OpenMetrics or text by the Accept header, gzip
                  when asked (what django-prometheus and prometheus-fastapi-instrumentator use)
  /text           the text format whatever the Accept header says
  /static/NAME    a file of the directory argv[2], as text/plain; version=0.0.4 (payloads
                  captured from node_exporter and Prometheus, served byte for byte)
  /drop           removes one labelled series (staleness)
  /set?value=V    sets app_queue_depth (the remote-source rule's input)
  /observe?route=R&seconds=S&n=N   records N requests of S seconds on route R

Every value is fixed by the test's requests: no process or platform collector, nothing that
moves on its own.
"""
import os
import sys
import threading
import urllib.parse
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIServer, WSGIRequestHandler, make_server

from prometheus_client import (CollectorRegistry, Counter, Enum, Gauge, Histogram, Info,
                               Summary, make_wsgi_app)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

registry = CollectorRegistry(auto_describe=True)
requests = Counter("app_requests", "Requests served.", ["route", "code"], registry=registry)
latency = Histogram("http_request_duration_seconds", "Request latency.", ["handler"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                    registry=registry)
sizes = Summary("app_response_bytes", "Response sizes.", registry=registry)
queue = Gauge("app_queue_depth", "Jobs waiting.", registry=registry)
odd = Gauge("app_odd_values", "Values the format spells specially.", ["kind"], registry=registry)
escapes = Gauge("app_label_escapes", "Label values that need escaping.", ["value"],
                registry=registry)
clash = Gauge("app_target_clash", "A series with its own target label.", ["target"],
              registry=registry)
build = Info("app_build", "Build information.", registry=registry)
state = Enum("app_state", "Lifecycle state.", states=["starting", "serving", "draining"],
             registry=registry)

requests.labels("/api/orders", "200").inc(41)
requests.labels("/api/orders", "500").inc(2)
requests.labels("/api/users", "200").inc(17)
for s in (0.003, 0.02, 0.02, 0.07, 0.3, 0.3, 1.7):
    latency.labels("/api/orders").observe(s)
latency.labels("/api/users").observe(0.004)
for b in (512, 2048, 1024):
    sizes.observe(b)
queue.set(3)
odd.labels("nan").set(float("nan"))
odd.labels("inf").set(float("inf"))
odd.labels("neg_inf").set(float("-inf"))
odd.labels("tiny").set(1.5e-300)
odd.labels("huge").set(-2.5e+300)
escapes.labels('quote " backslash \\ newline \n comma , brace } equals =').set(1)
escapes.labels("unicode ünïcödé ✓").set(2)
clash.labels("theirs").set(7)
build.info({"version": "1.2.3", "revision": "abc"})
state.state("serving")

metrics_app = make_wsgi_app(registry)
static_dir = sys.argv[2] if len(sys.argv) > 2 else None
lock = threading.Lock()


def app(environ, start_response):
    path = environ.get("PATH_INFO", "")
    params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/metrics":
        return metrics_app(environ, start_response)
    if path == "/text":
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
        return [generate_latest(registry)]
    if path.startswith("/static/") and static_dir:
        name = os.path.basename(path[len("/static/"):])
        with open(os.path.join(static_dir, name), "rb") as f:
            body = f.read()
        start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
        return [body]
    with lock:
        if path == "/drop":
            requests.remove("/api/users", "200")
        elif path == "/set":
            queue.set(float(params["value"][0]))
        elif path == "/observe":
            route = params["route"][0]
            for _ in range(int(params.get("n", ["1"])[0])):
                latency.labels(route).observe(float(params["seconds"][0]))
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = make_server("127.0.0.1", int(sys.argv[1]), app, server_class=Server,
                     handler_class=QuietHandler)
print("listening", flush=True)
server.serve_forever()
