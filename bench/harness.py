"""The bench's machinery: the SQS emulator, the counting proxy, queues, workers, submitters, the
workers' logs and CPU accounting. bench/run.py runs the measurements with these parts.

Every process is started in its own session and registered on the caller's ExitStack, so it is
stopped (its whole process group) when the bench ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Not resolve(): run from an exported tree whose bench/ is a symlink, the tree's own devstack/
# and var/ are the ones meant.
REPO_ROOT = Path(__file__).absolute().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(REPO_ROOT))

from devstack.stack import (  # noqa: E402 - after the sys.path line above
    LOCAL_CREDENTIALS,
    LOCAL_REGION,
    create_queues,
    free_port,
    local_environ,
    sqs_client,
    start_moto_server,
    start_worker,
    stop_process_group,
)
from pcelery.catalog import CATALOG, sqs_queue_name  # noqa: E402

ENV = "local"  # the measured runs' queues: pcelery-local-default
IDLE_ENV = "dev"  # the idle workers' own queues (pcelery-dev-default), so they never take a measured task
QUEUE = CATALOG.default_queue
PERSISTENT_TASK = "demo.add"  # devstack.tasks: x + y through the real PersistentTask wrapper
PG_ADMIN_URL = os.environ.get("PCELERY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
LOG_DIR = REPO_ROOT / "var" / "bench"
LOCALSTACK_PYTHON = Path(os.environ.get("BENCH_LOCALSTACK_PYTHON", REPO_ROOT / ".venv-localstack" / "bin" / "python"))
CATALOG_SPEC = "pcelery.catalog:CATALOG"  # the real catalog (visibility 120 s, long poll 19 s), not the demo's


class BenchError(RuntimeError):
    pass


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


# --- The SQS emulator ---------------------------------------------------------------------------

@dataclass
class Emulator:
    kind: str  # "localstack" or "moto"
    endpoint: str
    version: str
    pid: int


def start_localstack(stack: contextlib.ExitStack, log_path: Path, timeout: float = 120.0) -> Emulator:
    """LocalStack without Docker (FIELD-NOTES: Python 3.13, these variables), SQS only, on a free
    loopback port, its state in a throwaway directory under var/bench."""
    if not LOCALSTACK_PYTHON.exists():
        raise BenchError(f"LocalStack's interpreter {LOCALSTACK_PYTHON} is missing: run `make setup` (it builds "
                         ".venv-localstack), point BENCH_LOCALSTACK_PYTHON at one, or use --sqs moto")
    port = free_port()
    root = log_path.parent / f"localstack-{port}"
    root.mkdir(parents=True, exist_ok=True)
    stack.callback(_remove_tree, root)
    env = {**os.environ, "OVERRIDE_IN_DOCKER": "0", "FILESYSTEM_ROOT": str(root),
           "GATEWAY_LISTEN": f"127.0.0.1:{port}", "LOCALSTACK_HOST": f"127.0.0.1:{port}", "SERVICES": "sqs",
           "SQS_ENDPOINT_STRATEGY": "path", "SKIP_SSL_CERT_DOWNLOAD": "1", "LOCALSTACK_TELEMETRY_DISABLED": "1",
           "DNS_ADDRESS": "0"}
    env.pop("PYTHONPATH", None)  # its own venv, never this repository's packages
    log = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115 - the ExitStack closes it
    proc = subprocess.Popen([str(LOCALSTACK_PYTHON), "-m", "localstack.runtime.main"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
    stack.callback(stop_process_group, proc, sig=signal.SIGTERM, timeout=20)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"LocalStack exited with code {proc.returncode} while starting; see {log_path}")
        try:
            with urllib.request.urlopen(f"{endpoint}/_localstack/health", timeout=2) as response:
                health = json.load(response)
            if health.get("services", {}).get("sqs") in ("available", "running"):
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"LocalStack did not become healthy within {timeout:.0f} s; see {log_path}")
        time.sleep(0.3)
    return Emulator("localstack", endpoint, str(health.get("version", "?")), proc.pid)


def start_moto(stack: contextlib.ExitStack, log_path: Path) -> Emulator:
    import moto

    # Purges are never used, but moto's real-SQS 60 s purge rule is not wanted either.
    os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
    server = start_moto_server(log=stack.enter_context(open(log_path, "wb")))  # noqa: SIM115 - the ExitStack closes it
    stack.callback(server.stop)
    return Emulator("moto", server.endpoint, moto.__version__, server.process.pid)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- The counting proxy -------------------------------------------------------------------------

class Proxy:
    """bench/counting_proxy.py in its own process: one loopback port per (kind, label)."""

    def __init__(self, stack: contextlib.ExitStack, sqs_upstream: str, pg_upstream: str | None,
                 sqs_labels: Iterable[str], pg_labels: Iterable[str], log_path: Path):
        self.ports = {f"sqs:{label}": free_port() for label in sqs_labels}
        self.ports.update({f"pg:{label}": free_port() for label in pg_labels})
        command = [sys.executable, "-m", "bench.counting_proxy", "--sqs-upstream", sqs_upstream]
        if pg_upstream and any(k.startswith("pg:") for k in self.ports):
            command += ["--pg-upstream", pg_upstream]
        command += [f"{k}={v}" for k, v in self.ports.items()]
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=stack.enter_context(open(log_path, "wb")), start_new_session=True)  # noqa: SIM115
        stack.callback(stop_process_group, self.proc, timeout=5)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise BenchError(f"the counting proxy did not start; see {log_path}")
        self.any_sqs = next(v for k, v in self.ports.items() if k.startswith("sqs:"))

    def sqs_endpoint(self, label: str) -> str:
        return f"http://127.0.0.1:{self.ports['sqs:' + label]}"

    def pg_port(self, label: str) -> int:
        return self.ports["pg:" + label]

    def counts(self) -> dict[str, dict[str, int]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.any_sqs}/__counts", timeout=10) as response:
            return json.load(response)

    def events(self, label: str) -> list[tuple[float, str]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.any_sqs}/__events?label={label}", timeout=10) as r:
            return [(t, a) for t, a in json.load(r)]


def count_diff(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out = {}
    for label, counts in after.items():
        prior = before.get(label, {})
        out[label] = {k: v - prior.get(k, 0) for k, v in counts.items() if v - prior.get(k, 0)}
    return out


# --- Queues ----------------------------------------------------------------------------------------

class Queues:
    """The catalog's queues on the emulator, reached directly (never through the proxy): creating
    them, their depth, waiting for them to drain."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.sqs = sqs_client(endpoint)
        self.urls: dict[str, str] = {}

    def create(self, env: str) -> str:
        self.urls[env] = create_queues(self.sqs, CATALOG, env)[QUEUE]["url"]
        return self.urls[env]

    def url(self, env: str = ENV) -> str:
        return self.urls[env]

    def fresh(self, env: str = ENV) -> None:
        """Delete and recreate the work queue (same name, URL and contract). A stopped worker
        leaves its long poll (up to 19 s) waiting inside the emulator, and both emulators hand
        the next message sent to that dead poller, where it stays invisible for the 120 s
        visibility timeout. A poll on a deleted queue never sees the new queue's messages."""
        old = self.urls[env]
        self.sqs.delete_queue(QueueUrl=old)
        if self.create(env) != old:
            raise BenchError(f"the recreated queue has another URL ({self.urls[env]}, was {old})")

    def depth(self, env: str = ENV) -> int:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.urls[env], AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return sum(int(v) for v in attrs.values())

    def wait_drained(self, what: str, worker: Worker | None = None, timeout: float = 300.0,
                     interval: float = 0.05, env: str = ENV) -> float:
        """Unix time of the first look that finds no visible, in-flight or delayed message."""
        deadline = time.monotonic() + timeout
        while True:
            seen = time.time()
            if not self.depth(env):
                return seen
            if worker is not None and worker.proc.poll() is not None:
                raise BenchError(f"{what}: the worker exited with code {worker.proc.returncode} before the queue "
                                 f"drained; see {worker.log_path}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: {self.depth(env)} message(s) still in the queue after {timeout:.0f} s; "
                                 f"see {worker.log_path if worker else LOG_DIR}")
            time.sleep(interval)

    def wait_depth(self, n: int, what: str, timeout: float = 60.0, env: str = ENV) -> None:
        deadline = time.monotonic() + timeout
        while (depth := self.depth(env)) < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: only {depth} of {n} messages arrived in the queue")
            time.sleep(0.05)


# --- Workers -----------------------------------------------------------------------------------

# Both log formats (Celery's "[2026-01-01 12:00:00,123: INFO/MainProcess] ..." and the
# product's) start their lines with asctime.
_STAMP = rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})"
_READY = re.compile(_STAMP + rb"[^\n]*? ready\.")
_RECEIVED = re.compile(_STAMP + rb"[^\n]*?Task [\w.]+\[([0-9a-f-]{36})\] received")
_SUCCEEDED = re.compile(_STAMP + rb"[^\n]*?Task [\w.]+\[([0-9a-f-]{36})\] succeeded in ([0-9.e-]+)s")


def _epoch(stamp: bytes, millis: bytes) -> float:
    return time.mktime(time.strptime(stamp.decode(), "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


@dataclass
class TaskTimes:
    received: float | None = None  # unix time of the main process's "received" line
    done: float | None = None  # unix time of the pool child's "succeeded" line
    run_s: float | None = None  # Celery's "succeeded in": the task call (product: claim + body + finish)

    @property
    def started(self) -> float | None:
        return None if self.done is None or self.run_s is None else self.done - self.run_s


class WorkerLog:
    """Reads a worker's log as it grows: its ready line and every task's received/succeeded lines."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.pending = b""
        self.ready: float | None = None
        self.tasks: dict[str, TaskTimes] = {}

    def poll(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        if not data:
            return
        self.offset += len(data)
        data, _, self.pending = (self.pending + data).rpartition(b"\n")
        if self.ready is None and (m := _READY.search(data)):
            self.ready = _epoch(m.group(1), m.group(2))
        for m in _RECEIVED.finditer(data):
            self.tasks.setdefault(m.group(3).decode(), TaskTimes()).received = _epoch(m.group(1), m.group(2))
        for m in _SUCCEEDED.finditer(data):
            t = self.tasks.setdefault(m.group(3).decode(), TaskTimes())
            t.done, t.run_s = _epoch(m.group(1), m.group(2)), float(m.group(4))

    def wait_done(self, task_id: str, timeout: float, proc: subprocess.Popen) -> TaskTimes:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            found = self.tasks.get(task_id)
            if found is not None and found.done is not None:
                return found
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"task {task_id} did not succeed within {timeout:.0f} s; see {self.path}")
            time.sleep(0.002)

    def run_seconds(self, ids: Iterable[str]) -> list[float]:
        self.poll()
        return [t.run_s for i in ids if (t := self.tasks.get(i)) is not None and t.run_s is not None]


@dataclass
class Worker:
    case: str
    proc: subprocess.Popen
    log: WorkerLog

    @property
    def log_path(self) -> Path:
        return self.log.path

    def wait_ready(self, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            self.log.poll()
            if self.log.ready is not None:
                return self.log.ready
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.path.read_bytes()[-3000:].decode(errors="replace")
                raise BenchError(f"{self.case} worker did not start (exit code {self.proc.poll()}); log "
                                 f"{self.log.path}:\n{tail}")
            time.sleep(0.05)

    def stop(self) -> None:
        # SIGQUIT: cold shutdown, prefetched messages are given back (the queue is empty anyway).
        stop_process_group(self.proc, sig=signal.SIGQUIT, timeout=10)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)


def _with_callers_path(environ: dict[str, str]) -> dict[str, str]:
    """local_environ sets PYTHONPATH to the repository; a PYTHONPATH the bench was started with
    (to run another copy of the runtime, say) stays after it."""
    extra = os.environ.get("PYTHONPATH")
    if extra:
        environ = {**environ, "PYTHONPATH": os.pathsep.join([environ.get("PYTHONPATH", ""), extra]).strip(os.pathsep)}
    return environ


def start_product_worker(stack: contextlib.ExitStack, *, case: str, endpoint: str, db_url: str, env: str,
                         concurrency: int, log_path: Path) -> Worker:
    """`pcelery-worker` (devstack.stack.start_worker: the image's entry point) running the demo
    tasks (devstack.tasks, `demo.add` through PersistentTask) on the catalog's default queue."""
    environ = _with_callers_path({**local_environ(endpoint, db_url, catalog_spec=CATALOG_SPEC, env=env),
                                  "PCELERY_LOG_LEVEL": "INFO"})
    log = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115 - the ExitStack closes it
    proc = start_worker(environ, queues=[QUEUE], concurrency=concurrency,
                        hostname=f"bench-{log_path.stem}@127.0.0.1", log=log)
    stack.callback(stop_process_group, proc, sig=signal.SIGQUIT, timeout=10)
    return Worker(case, proc, WorkerLog(log_path))


def _worker_environ(endpoint: str, db_url: str, env: str, concurrency: int) -> dict[str, str]:
    return {**local_environ(endpoint, db_url, catalog_spec=CATALOG_SPEC, env=env),
            "PCELERY_WORKER_QUEUES": QUEUE, "PCELERY_CONCURRENCY": str(concurrency)}


def product_worker_conf(endpoint: str, concurrency: int, env: str = ENV) -> dict[str, Any]:
    """The Celery settings the product's worker on QUEUE runs with: pcelery.celeryconfig's
    app_settings, then its worker_settings computed as the worker computes them when it starts
    (under the worker's environment; it asks SQS for the queues' URLs). The plain worker gets
    the same numbers: this is where the bench reads them, never a copy."""
    from pcelery import celeryconfig
    from pcelery.settings import Settings

    environ = _worker_environ(endpoint, "sqlite:///:memory:", env, concurrency)
    settings = Settings.from_env(environ)
    saved = {k: os.environ.get(k) for k in environ}
    os.environ.update(environ)  # WorkerSettings.from_env reads the process environment
    try:
        return {**celeryconfig.app_settings(settings), **celeryconfig.worker_settings(settings)}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_plain_worker(stack: contextlib.ExitStack, *, endpoint: str, env: str, concurrency: int,
                       prefetch_multiplier: int, log_path: Path) -> Worker:
    """`celery -A bench.plain_app worker` with the flags pcelery-worker gives the product's worker
    (its prefetch multiplier included: Celery's command line reads it before a worker's settings
    are computed) and the same environment (endpoint, env, catalog, queues, concurrency)."""
    environ = _with_callers_path(_worker_environ(endpoint, "sqlite:///:memory:", env, concurrency))
    log = stack.enter_context(open(log_path, "wb"))  # noqa: SIM115 - the ExitStack closes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.plain_app", "worker", "-Q", QUEUE,
         "--concurrency", str(concurrency), "--prefetch-multiplier", str(prefetch_multiplier),
         "--hostname", f"bench-{log_path.stem}@127.0.0.1",
         "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
        cwd=REPO_ROOT, env={**os.environ, **environ}, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process_group, proc, sig=signal.SIGQUIT, timeout=10)
    return Worker("plain", proc, WorkerLog(log_path))


# --- Submitters: the caller's side -------------------------------------------------------------

class PlainSubmitter:
    """Bare `.delay()` through a plain Celery app whose broker is the given endpoint."""

    name = "plain"

    def __init__(self, endpoint: str, queue_url: str):
        from bench.plain_app import TASK_NAME, make_app
        from pcelery.settings import Settings

        settings = Settings.from_env(local_environ(endpoint, "sqlite:///:memory:", catalog_spec=CATALOG_SPEC,
                                                   env=ENV))
        host_port = endpoint.split("://", 1)[1]
        self.app = make_app(queue_url=queue_url, broker_url=f"sqs://local:local@{host_port}", settings=settings)
        self.task = self.app.tasks[TASK_NAME]

    def many(self, n: int, chunk: int = 0) -> list[str]:
        return [self.task.delay(i, i).id for i in range(n)]

    def single(self) -> str:
        return self.task.delay(1, 2).id

    def close(self) -> None:
        self.app.close()


class OutboxSubmitter:
    """The product's submit API, made the way an application makes it: Outbox.from_settings with
    the environment's settings (its own engine, the SUBMIT timeouts for SQS)."""

    name = "outbox"

    def __init__(self, endpoint: str, db_url: str, publish_linger: float | None = None):
        from pcelery.outbox import Outbox
        from pcelery.settings import Settings

        settings = Settings.from_env(local_environ(endpoint, db_url, catalog_spec=CATALOG_SPEC, env=ENV))
        # task_queues: the submitter does not import the task modules (a web process need not).
        # publish_linger: only when asked for; otherwise whatever Outbox.from_settings does by default.
        options = {} if publish_linger is None else {"publish_linger": publish_linger}
        self.outbox = Outbox.from_settings(settings, task_queues={PERSISTENT_TASK: QUEUE}, **options)

    def many(self, n: int, chunk: int = 100) -> list[str]:
        """n tasks, `chunk` per outbox transaction (submit_many)."""
        ids: list[str] = []
        for start in range(0, n, chunk):
            with self.outbox.transaction() as conn:
                ids += self.outbox.submit_many(
                    conn, [(PERSISTENT_TASK, [i, i], {}) for i in range(start, min(n, start + chunk))])
        return ids

    def single(self) -> str:
        """One submit() in a transaction of its own (commit and publish included)."""
        with self.outbox.transaction() as conn:
            return self.outbox.submit(conn, PERSISTENT_TASK, 1, 2)

    @property
    def publish_linger(self) -> float:
        coalescer = getattr(self.outbox, "coalescer", None)  # publishes on a thread of its own, if any
        return getattr(coalescer, "linger", 0.0) if coalescer is not None else 0.0

    def close(self) -> None:
        coalescer = getattr(self.outbox, "coalescer", None)
        if coalescer is not None:
            coalescer.flush(5.0)
        self.outbox.engine.dispose()


class ReferenceConsumer:
    """Not the product: the emulator's own floor for a traffic pattern. A thread with a bare boto3
    client long-polls for up to 10 messages (WaitTimeSeconds as the workers), deletes what each
    receive returned in one DeleteMessageBatch, and polls again at once; it never holds a visible
    message back. What its ReceiveMessage count is above one per SendMessageBatch is how often the
    emulator split a batch between two long polls, which no consumer that starts its tasks as soon
    as they arrive can avoid."""

    def __init__(self, endpoint: str, queue_url: str, wait_time_seconds: int):
        self.client = sqs_client(endpoint)
        self.queue_url, self.wait = queue_url, wait_time_seconds
        self.received: list[int] = []  # messages per receive that returned any
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="reference-consumer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            messages = self.client.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                                                   WaitTimeSeconds=self.wait).get("Messages", [])
            if messages:
                self.received.append(len(messages))
                self.client.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)])

    def stop(self) -> None:
        """Ends its waiting long poll with one last message (sent after the counts were taken)."""
        self.stopping.set()
        self.client.send_message(QueueUrl=self.queue_url, MessageBody="stop")
        self.thread.join(timeout=self.wait + 5)


class BatchSender:
    """The reference consumer's producer: SendMessageBatch of `chunk` bodies per call, as
    Outbox.submit_many publishes (no store, no Celery envelope: the emulator's side only)."""

    def __init__(self, endpoint: str, queue_url: str):
        self.client = sqs_client(endpoint)
        self.queue_url = queue_url
        self.sent = 0

    def many(self, n: int) -> list[str]:
        ids = [f"ref-{self.sent + i}" for i in range(n)]
        for start in range(0, n, 10):
            self.client.send_message_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "MessageBody": task_id} for i, task_id in enumerate(ids[start:start + 10])])
        self.sent += n
        return ids


def count_succeeded(db_url: str, ids: list[str]) -> int:
    import sqlalchemy as sa

    from pcelery import schema

    engine = schema.make_engine(db_url)
    try:
        with engine.connect() as conn:
            n = 0
            for start in range(0, len(ids), 500):
                n += conn.execute(sa.select(sa.func.count()).select_from(schema.tasks).where(
                    schema.tasks.c.id.in_(ids[start:start + 500]), schema.tasks.c.state == "succeeded")).scalar_one()
            return n
    finally:
        engine.dispose()


def check_succeeded(case: str, db_url: str | None, ids: list[str], timeout: float = 10.0) -> None:
    """The product's rows all say `succeeded` (a queue can also empty into the DLQ)."""
    if db_url is None:
        return
    deadline = time.monotonic() + timeout
    while (done := count_succeeded(db_url, ids)) < len(ids):
        if time.monotonic() > deadline:
            raise BenchError(f"{case}: queue empty but only {done} of {len(ids)} rows succeeded")
        time.sleep(0.1)


def paced(submit: Callable[[int], list[str]], n: int, rate: float, chunk: int) -> list[str]:
    """Submit n tasks at `rate` tasks/s, `chunk` per call, on a fixed schedule (late calls catch up)."""
    ids: list[str] = []
    t0 = time.perf_counter()
    for start in range(0, n, chunk):
        wait = t0 + start / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        ids += submit(min(chunk, n - start))
    return ids


# --- CPU accounting ---------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()  # fields from the 3rd (state) on


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of these processes (their threads included) and of their reaped children."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _TICK


def postgres_backends(database: str) -> list[int]:
    """The server processes serving connections to this database (their title names it)."""
    found = []
    needle = f" {database} ".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"postgres: ") and needle in cmdline.replace(b"\0", b" "):
            found.append(int(entry.name))
    return found


@dataclass
class CpuMeter:
    """CPU seconds by part of the system, between two snapshots: name -> function giving pids
    (None: this process)."""

    parts: dict[str, Callable[[], list[int]] | None] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        out = {}
        for name, pids in self.parts.items():
            if pids is None:
                t = os.times()
                out[name] = t.user + t.system
            else:
                out[name] = cpu_seconds(pids())
        return out


def cpu_diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: max(0.0, v - before.get(k, 0.0)) for k, v in after.items()}


def worker_cpu_parts(worker: Worker) -> dict[str, Callable[[], list[int]]]:
    """The worker's main process and its pool children, apart."""
    return {"worker main": lambda: [worker.proc.pid],
            "worker pool": lambda: [p for p in worker.pids() if p != worker.proc.pid]}


def environment_fingerprint() -> dict[str, Any]:
    """Which runtime this run measured: where pcelery was imported from, and its git state."""
    import pcelery

    where = Path(pcelery.__file__).resolve().parent
    info: dict[str, Any] = {"pcelery_path": str(where)}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=where, capture_output=True, text=True,
                             timeout=10)
        if top.returncode == 0:
            root = top.stdout.strip()
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", str(where)], cwd=root, capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            info.update(commit=head, runtime_modified=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def sqs_name(env: str = ENV) -> str:
    return sqs_queue_name(env, QUEUE)


LOCAL_AWS_ENV = {**LOCAL_CREDENTIALS, "AWS_REGION": LOCAL_REGION, "AWS_DEFAULT_REGION": LOCAL_REGION}
