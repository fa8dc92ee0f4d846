"""Counting proxies for the bench: how many SQS requests (by action) and how many Postgres round
trips each side (submitter or worker) makes. It runs as its own process, so its CPU never shares
a GIL with the submitter being measured, and only in the bench's counted runs (it costs CPU).

SQS: neither emulator counts requests by action and caller (moto's `/moto-api/` exposes its
state, data.json, reset and seeding, not a count of the calls that produced it; LocalStack's
`/_localstack/` endpoints report health and config), so an HTTP proxy sits in front of it. A
request is counted when it arrives; its action is the JSON protocol's `X-Amz-Target` (boto3 and
kombu's curl client both use it) or the query protocol's `Action=`.

Postgres: a TCP relay that reads the frontend side of the wire protocol and counts each simple
Query ('Q': psycopg sends BEGIN, COMMIT and ROLLBACK this way, counted by name) and each Sync
('S', which ends an extended-protocol Parse/Bind/Execute group: one parameterized statement).
Each of those is one client-server round trip, which is what a remote RDS charges in latency.

One loopback port per label, so the counts split by side without guessing from headers:

    python -m bench.counting_proxy --sqs-upstream http://127.0.0.1:5000 --pg-upstream 127.0.0.1:5432 \
        sqs:submit=5001 sqs:worker=5002 pg:submit=5003 pg:worker=5004
    GET /__counts on any SQS port -> {"submit": {"SendMessage": 300, "pg Sync": 900, ...}, "worker": {...}}
    GET /__events?label=worker on any SQS port -> [[unix time, action], ...] of that label's SQS
        requests (the last EVENTS_KEPT of each label): the idle part turns them into a rate

Queue URLs in the emulator's answers are rewritten to the proxy port they were asked through.
LocalStack builds them from its LOCALSTACK_HOST whatever the request's Host header says (moto
from the Host header), so without the rewrite a client that sends to the queue URL (the query
protocol does) would go around the proxy. boto3 and kombu on the JSON protocol send every call to
their endpoint anyway; the rewrite keeps the counting independent of that.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}
EVENTS_KEPT = 200_000  # per label: (time, action) of the latest SQS requests


def make_handler(label: str, upstream: urllib.parse.SplitResult, counts: dict[str, Counter], lock: threading.Lock,
                 events: dict[str, deque], own_netloc: str):
    local = threading.local()  # one keep-alive upstream connection per proxy thread
    upstream_netloc = upstream.netloc.encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive both ways, as boto3 and curl expect
        # Headers and body go out in two writes: with Nagle's algorithm on, the body would wait
        # for the client's delayed ACK of the headers, 40 ms a request, and slow every counted run.
        disable_nagle_algorithm = True

        def log_message(self, *args):  # one line per request would cost more than the request
            pass

        def handle(self):
            # A worker stopped in the middle of a long poll: its answer has nowhere to go.
            with contextlib.suppress(ConnectionError):
                super().handle()

        def do_GET(self):
            if self.path == "/__counts" or self.path.startswith("/__events?"):
                with lock:
                    if self.path == "/__counts":
                        body = json.dumps({k: dict(v) for k, v in counts.items()}).encode()
                    else:
                        wanted = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("label", [""])[0]
                        body = json.dumps(list(events.get(wanted, ()))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self._forward()

        def do_POST(self):
            self._forward()

        def _forward(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            action = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
            if not action:
                query = urllib.parse.urlsplit(self.path).query
                form = body.decode(errors="replace") if b"Action=" in body else ""
                found = urllib.parse.parse_qs(query + "&" + form).get("Action")
                action = found[0] if found else f"{self.command} {urllib.parse.urlsplit(self.path).path}"
            with lock:
                counts[label][action] += 1
                events[label].append((time.time(), action))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            for attempt in (1, 2):
                conn = getattr(local, "conn", None)
                if conn is None:
                    # Long polls last up to 20 s; the client's own timeout is what bounds them.
                    conn = local.conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()
                    local.conn = None
                    if attempt == 2:
                        self.send_error(502, "upstream SQS endpoint failed")
                        return
            if upstream_netloc in payload:  # queue URLs: back through this proxy port (see the docstring)
                payload = payload.replace(upstream_netloc, own_netloc.encode())
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


# --- Postgres ----------------------------------------------------------------------------------

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104  # untyped requests that come before the startup packet


class FrontendCounter:
    """Parses the client-to-server byte stream of one Postgres connection and counts messages."""

    def __init__(self, counts: Counter, lock: threading.Lock):
        self.counts, self.lock = counts, lock
        self.buffer = bytearray()
        self.started = False  # after the startup packet, every message has a type byte

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) < length:
                    return
                code = int.from_bytes(self.buffer[4:8], "big")
                self.started = code not in (_SSL_REQUEST, _GSSENC_REQUEST)
                del self.buffer[:length]
                continue
            if len(self.buffer) < 5:
                return
            total = 1 + int.from_bytes(self.buffer[1:5], "big")
            if len(self.buffer) < total:
                return
            kind, body = bytes(self.buffer[:1]), bytes(self.buffer[5:total])
            del self.buffer[:total]
            if kind == b"Q":  # psycopg sends BEGIN/COMMIT/ROLLBACK this way: they name the transactions
                verb = (body.split(None, 1)[0].rstrip(b";\0").upper().decode(errors="replace")
                        if body.strip(b"\0 ") else "")
                if verb in ("BEGIN", "COMMIT", "ROLLBACK"):
                    name = f"pg {verb}"
                else:  # an empty statement is SQLAlchemy's pool_pre_ping (";" in autocommit)
                    name = f"pg Query {verb}" if verb else "pg ping"
            elif kind == b"S":
                name = "pg Sync"  # one parameterized statement (Parse/Bind/Execute ... Sync)
            else:
                continue
            with self.lock:
                self.counts[name] += 1


def serve_postgres(listener: socket.socket, upstream: tuple[str, int], counts: Counter, lock: threading.Lock) -> None:

    def pump(source, sink, counter=None):
        try:
            while data := source.recv(65536):
                if counter:
                    counter.feed(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    while True:
        client, _ = listener.accept()
        server = socket.create_connection(upstream)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, server, FrontendCounter(counts, lock)), daemon=True).start()
        threading.Thread(target=pump, args=(server, client), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.counting_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sqs-upstream", required=True, help="SQS endpoint to forward to, e.g. http://127.0.0.1:5000")
    parser.add_argument("--pg-upstream", help="Postgres host:port to relay to, e.g. 127.0.0.1:5432")
    parser.add_argument("listen", nargs="+", metavar="KIND:LABEL=PORT",
                        help="a loopback port per side, KIND sqs or pg, e.g. sqs:worker=5002")
    args = parser.parse_args(argv)
    upstream = urllib.parse.urlsplit(args.sqs_upstream)
    counts: dict[str, Counter] = {}
    events: dict[str, deque] = {}
    lock = threading.Lock()
    http_servers, pg_ports = [], []
    for spec in args.listen:
        kind, _, rest = spec.partition(":")
        label, _, port = rest.partition("=")
        if kind not in ("sqs", "pg") or not label or not port.isdigit():
            parser.error(f"{spec!r} is not KIND:LABEL=PORT with KIND sqs or pg, e.g. sqs:worker=5002")
        counts.setdefault(label, Counter())
        events.setdefault(label, deque(maxlen=EVENTS_KEPT))
        if kind == "sqs":
            server = ThreadingHTTPServer(("127.0.0.1", int(port)),
                                         make_handler(label, upstream, counts, lock, events, f"127.0.0.1:{port}"))
            server.daemon_threads = True
            http_servers.append(server)
        else:
            if not args.pg_upstream:
                parser.error(f"{spec!r} needs --pg-upstream HOST:PORT")
            pg_ports.append((int(port), label))
    if not http_servers:
        parser.error("give at least one sqs:LABEL=PORT (it also serves /__counts)")
    if pg_ports:
        host, _, pg_port = args.pg_upstream.rpartition(":")
        for port, label in pg_ports:
            listener = socket.create_server(("127.0.0.1", port))  # bound before "ready" is printed
            threading.Thread(target=serve_postgres, args=(listener, (host, int(pg_port)), counts[label], lock),
                             daemon=True).start()
    for server in http_servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        http_servers[0].serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
