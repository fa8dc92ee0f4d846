"""A fault-injecting TCP proxy for the tests: real sockets, no patched functions.

    proxy = FaultProxy("127.0.0.1", upstream_port).start()
    proxy.url                 # http://127.0.0.1:<port>: give it to the process under test
    proxy.set("http", 503)    # every new HTTP request is answered 503 (SQS outage)
    proxy.set("hang")         # connections are accepted, nothing is ever answered
    proxy.set("refuse")       # the port is closed: connection refused (store outage)
    proxy.set("pass")         # back to forwarding

With `count_postgres=True` it also counts the Postgres round trips its clients make (see
`PostgresCounter`): `proxy.postgres.round_trips`.

Changing the mode cuts every open connection, so clients that keep connections alive (boto3,
kombu's curl client, a database pool) meet the new mode on their next request instead of
carrying on through an old connection. The port stays the same across modes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

MODES = ("pass", "http", "hang", "refuse")
REASONS = {408: "Request Timeout", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


class PostgresCounter:
    """Reads the frontend side of the Postgres wire protocol and counts what costs a round trip:
    each simple Query ('Q': psycopg sends BEGIN, COMMIT, ROLLBACK and pings this way) and each
    Sync ('S': the end of one parameterized Parse/Bind/Execute statement)."""

    _UNTYPED_CODES = (80877103, 80877104)  # SSLRequest, GSSENCRequest: answered, then the startup message

    def __init__(self) -> None:
        self.queries: list[str] = []  # the text of each simple Query
        self.syncs = 0
        self._lock = threading.Lock()

    @property
    def round_trips(self) -> int:
        with self._lock:
            return len(self.queries) + self.syncs

    def reset(self) -> None:
        with self._lock:
            self.queries.clear()
            self.syncs = 0

    def stream(self) -> _PgStream:
        return _PgStream(self)


class _PgStream:
    """One client connection's bytes, parsed as they pass."""

    def __init__(self, counter: PostgresCounter):
        self.counter, self.buffer, self.started = counter, b"", False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:  # untyped: int32 length, int32 code, ...
                if len(self.buffer) < 8:
                    return
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) < length:
                    return
                code = int.from_bytes(self.buffer[4:8], "big")
                self.started = code not in PostgresCounter._UNTYPED_CODES
                self.buffer = self.buffer[length:]
                continue
            if len(self.buffer) < 5:
                return
            kind, length = self.buffer[:1], int.from_bytes(self.buffer[1:5], "big")
            if len(self.buffer) < 1 + length:
                return
            body, self.buffer = self.buffer[5:1 + length], self.buffer[1 + length:]
            with self.counter._lock:
                if kind == b"Q":
                    self.counter.queries.append(body.rstrip(b"\0").decode(errors="replace"))
                elif kind == b"S":
                    self.counter.syncs += 1


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 count_postgres: bool = False):
        self.postgres = PostgresCounter() if count_postgres else None
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.mode, self.status = "pass", 500
        self._listener: socket.socket | None = None
        self._port = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self.requests_faulted = 0  # HTTP requests answered with an error status

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._close_listener()
        self._cut_all()

    def set(self, mode: str, status: int = 500) -> None:
        assert mode in MODES, mode
        with self._lock:
            self.mode, self.status = mode, status
        self._cut_all()
        if mode == "refuse":
            self._close_listener()
        elif self._listener is None:
            self._listen()

    @contextlib.contextmanager
    def fault(self, mode: str, status: int = 500) -> Iterator[None]:
        self.set(mode, status)
        try:
            yield
        finally:
            self.set("pass")

    # --- sockets ---

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):  # the same port again after a refuse window
            try:
                listener.bind((self.host, self._port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"cannot listen on {self.host}:{self._port} again")
        listener.listen(128)
        self._port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True, name="faultproxy-accept").start()

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.add(sock)

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopped:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed (refuse mode, or stop)
            self._track(client)
            mode = self.mode
            target = {"pass": self._forward, "http": self._answer_http, "hang": self._hang}.get(mode, self._hang)
            threading.Thread(target=target, args=(client,), daemon=True, name=f"faultproxy-{mode}").start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._track(upstream)

        def pump(src: socket.socket, dst: socket.socket, parse: _PgStream | None = None) -> None:
            try:
                while data := src.recv(65536):
                    if parse is not None:
                        parse.feed(data)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
        pump(client, upstream, self.postgres.stream() if self.postgres is not None else None)

    def _answer_http(self, client: socket.socket) -> None:
        """Read one HTTP request (headers and Content-Length body) and answer it with the error
        status, then close: an SQS endpoint having a bad minute."""
        try:
            client.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = client.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip() or 0)
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    break
                body += chunk
            status = self.status
            text = f"<html><body>{status} {REASONS.get(status, 'Error')} (fault injected)</body></html>".encode()
            client.sendall(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: text/html\r\n"
                           f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n".encode() + text)
            with self._lock:
                self.requests_faulted += 1
        except OSError:
            pass
        finally:
            client.close()

    def _hang(self, client: socket.socket) -> None:
        """Accept and never answer; the socket is closed when the mode changes."""
        with contextlib.suppress(OSError):
            while client.recv(65536):
                pass


class EntryRefusingProxy:
    """An HTTP proxy in front of an SQS endpoint that fails, entry by entry, the SendMessageBatch
    entries of the task ids in `refuse` (as SQS does on an internal error or throttling: HTTP 200
    with the entry under Failed) and forwards everything else. boto3 speaks SQS's JSON protocol.

        proxy = EntryRefusingProxy(moto_endpoint, refuse={"task-id"}).start()
        proxy.url   # the endpoint to give the publisher
    """

    def __init__(self, upstream: str, *, refuse: set[str]):
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.refuse = refuse
        self.refused: list[str] = []  # task ids refused so far
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> EntryRefusingProxy:
        import http.server

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                failed: list[dict[str, Any]] = []
                if self.headers.get("X-Amz-Target", "").endswith(".SendMessageBatch"):
                    request = json.loads(body)
                    kept = []
                    for entry in request["Entries"]:
                        task_id = _task_id(entry["MessageBody"])
                        if task_id in proxy.refuse:
                            proxy.refused.append(task_id)
                            failed.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError",
                                           "Message": "refused by the test proxy"})
                        else:
                            kept.append(entry)
                    if failed:
                        if not kept:
                            self._reply(200, json.dumps({"Successful": [], "Failed": failed}).encode())
                            return
                        body = json.dumps({**request, "Entries": kept}).encode()
                status, answer = self._forward(body)
                if failed and status == 200:
                    merged = json.loads(answer)
                    merged["Failed"] = [*merged.get("Failed", []), *failed]
                    answer = json.dumps(merged).encode()
                self._reply(status, answer)

            def _forward(self, body: bytes) -> tuple[int, bytes]:
                import http.client

                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("content-length", "host")}
                    conn.request("POST", self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    return response.status, response.read()
                finally:
                    conn.close()

            def _reply(self, status: int, answer: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.0")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _task_id(message_body: str) -> str | None:
    """The task id in a Celery-on-SQS body (base64 of the JSON envelope)."""
    import base64

    try:
        return json.loads(base64.b64decode(message_body))["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
