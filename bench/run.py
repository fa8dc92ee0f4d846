"""What persistence costs: plain Celery `.delay()` against the product's outbox + claim-check,
side by side, in one run on one machine. Results: bench/RESULTS.md explains a run's numbers.

    .venv/bin/python -m bench.run            # about 4 minutes on 2 cores; --help for sizes

Three cases share one moto server (devstack.stack.start_moto_server) and the catalog's `default` queue
(real CATALOG contract: visibility 120 s, long poll 19 s), the same concurrency and prefetch 1:

  plain     a tiny plain Celery app (bench/plain_app.py), acks_late, `.delay()` per task
  sqlite    Outbox.submit_many (chunks of 100) + the real worker (devstack.stack.start_worker), SQLite
  postgres  the same on a fresh database of the machine's Postgres (dropped at the end)

Measured, in this order:
  1. throughput: N trivial tasks, first submit to queue empty; each repeat runs every case once
     (interleaved, so drift on a noisy machine hits all cases alike); median reported
  2. backlog: the worker side alone, one run per case: --backlog tasks are queued before the
     worker starts; ready line to queue empty. Every case sees the same shape of work (a backlog)
  3. counted runs: one more run per case with the workers and the submitter behind
     bench/counting_proxy.py: SQS requests per task by action and side, Postgres round trips and
     transactions per task, and the same for 20 single `submit()`/`.delay()` calls (not timed as
     throughput: the proxy costs CPU)
  4. submit latency on the caller's side, no worker running: `outbox.submit` in its own
     transaction, `submit_many` of 100 (per task), bare `.delay()`; median and p95. The queue
     is purged after every sample: moto's SendMessage slows down as its queue grows

"Done" is SQS saying the queue holds no visible, in-flight or delayed message (the last delete
has happened), polled every 0.1 s straight at moto, for every case alike; the persistent cases
are also checked to have all their rows `succeeded`. Processes and logs: var/bench/. Every
process it starts is stopped at the end, also on Ctrl-C/SIGTERM; exit 0 on success, 1 when a case
failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
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

ENV = "local"
QUEUE = CATALOG.default_queue
PERSISTENT_TASK = "demo.add"  # devstack.tasks: x + y, the same trivial work as bench.add
PG_ADMIN_URL = os.environ.get("PCELERY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
LOG_DIR = REPO_ROOT / "var" / "bench"
WARM_UP_TASKS = 8  # per worker start: pool children open their connections before the clock runs
SINGLE_SUBMITS = 20  # in each counted run, after the timed part: requests of one submit() / delay()
SUBMIT_CHUNK = 100  # tasks per outbox transaction in the throughput runs
TIME_BUDGET = 285.0  # seconds; later repeats are skipped (and said so) rather than run over 5 minutes
RUN_DEADLINE = 120.0  # one run's drain; beyond it the case counts as failed


class BenchError(RuntimeError):
    pass


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- Submitters: the caller's side of each case ----------------------------------------------------

class PlainSubmitter:
    """Bare `.delay()` through a Celery app whose broker is the given SQS endpoint."""

    def __init__(self, endpoint: str, queue_url: str):
        from bench.plain_app import TASK_NAME, make_app

        host_port = endpoint.split("://", 1)[1]
        self.app = make_app(queue_url, broker_url=f"sqs://local:local@{host_port}")
        self.task = self.app.tasks[TASK_NAME]

    def submit(self, n: int) -> list[str]:
        return [self.task.delay(i, i).id for i in range(n)]

    def single(self) -> None:
        self.task.delay(1, 2)

    def close(self) -> None:
        self.app.close()


class OutboxSubmitter:
    """The product's submit API: rows in the caller's transaction, ids sent to SQS after COMMIT."""

    def __init__(self, endpoint: str, db_url: str):
        from pcelery import schema
        from pcelery.outbox import Outbox

        self.engine = schema.make_engine(db_url)
        # task_queues={}: every task goes to the catalog's default queue, without importing pcelery.worker.
        self.outbox = Outbox(self.engine, CATALOG, ENV, sqs_client(endpoint), task_queues={})

    def submit(self, n: int) -> list[str]:
        ids: list[str] = []
        for start in range(0, n, SUBMIT_CHUNK):
            ids += self.batch(min(SUBMIT_CHUNK, n - start))
        return ids

    def batch(self, k: int) -> list[str]:
        with self.outbox.transaction() as conn:
            return self.outbox.submit_many(conn, [(PERSISTENT_TASK, [i, i], {}) for i in range(k)])

    def single(self) -> None:
        with self.outbox.transaction() as conn:
            self.outbox.submit(conn, PERSISTENT_TASK, 1, 2)

    def succeeded(self, ids: list[str]) -> int:
        import sqlalchemy as sa

        from pcelery import schema

        with self.engine.connect() as conn:
            n = 0
            for start in range(0, len(ids), 500):
                n += conn.execute(sa.select(sa.func.count()).select_from(schema.tasks).where(
                    schema.tasks.c.id.in_(ids[start:start + 500]), schema.tasks.c.state == "succeeded")).scalar_one()
            return n

    def close(self) -> None:
        self.engine.dispose()


# --- The shared stack ------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    label: str
    db_url: str | None = None  # direct; None for plain Celery
    # Through the counting proxy, one port per side (Postgres only; SQLite has no wire to count).
    counted_worker_db_url: str | None = None
    counted_submit_db_url: str | None = None

    @property
    def persistent(self) -> bool:
        return self.db_url is not None


@dataclass
class Stack:
    stack: contextlib.ExitStack
    concurrency: int
    moto_endpoint: str = ""
    proxy_ports: dict[str, int] = field(default_factory=dict)
    sqs: object = None  # boto3 client straight at moto: queue state, never counted
    queue_url: str = ""
    cases: list[Case] = field(default_factory=list)
    runs: int = 0
    worker_log: Path | None = None  # of the worker started last

    def endpoint(self, side: str | None) -> str:
        """moto itself, or the counting proxy's port for `side` ("submit"/"worker")."""
        return self.moto_endpoint if side is None else f"http://127.0.0.1:{self.proxy_ports['sqs:' + side]}"

    def queue_url_on(self, endpoint: str) -> str:
        return self.queue_url.replace(self.moto_endpoint, endpoint, 1)

    # -- queue state --

    def in_queue(self) -> int:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
            "ApproximateNumberOfMessagesDelayed"])["Attributes"]
        return sum(int(v) for v in attrs.values())

    def wait_drained(self, what: str, worker: subprocess.Popen | None = None, timeout: float = RUN_DEADLINE) -> float:
        deadline = time.monotonic() + timeout
        while self.in_queue():
            if worker is not None and worker.poll() is not None:
                raise BenchError(f"{what}: the worker exited with code {worker.returncode} before the queue drained")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: {self.in_queue()} message(s) still in the queue after {timeout:.0f} s")
            time.sleep(0.1)
        return time.perf_counter()

    # -- processes --

    def fresh_queue(self) -> None:
        """Delete and recreate the work queue (same name, URL and contract). A stopped worker can
        leave a long poll (up to 19 s) waiting inside moto; the next message sent would go to that
        dead poller and stay invisible for the 120 s visibility timeout. A poll on a deleted queue
        never sees the new queue's messages."""
        self.sqs.delete_queue(QueueUrl=self.queue_url)
        url = create_queues(self.sqs, CATALOG, ENV)[QUEUE]["url"]
        if url != self.queue_url:
            raise BenchError(f"the recreated queue has another URL ({url}, was {self.queue_url})")

    def purge(self) -> None:
        """Empty the queue between latency samples: moto's SendMessage slows down as its queue
        grows (7 ms with an empty queue, 30 ms at 1000 messages, measured), real SQS does not."""
        self.sqs.purge_queue(QueueUrl=self.queue_url)

    def start_worker(self, case: Case, *, counted: bool, fresh_queue: bool = True) -> subprocess.Popen:
        self.runs += 1
        if fresh_queue:
            self.fresh_queue()
        endpoint = self.endpoint("worker" if counted else None)
        log_path = LOG_DIR / f"{case.name}-{self.runs:02d}{'-counted' if counted else ''}.log"
        log = self.stack.enter_context(open(log_path, "wb"))  # noqa: SIM115 - the ExitStack closes it
        hostname = f"bench-{case.name}-{self.runs}@127.0.0.1"
        if case.persistent:
            db_url = (counted and case.counted_worker_db_url) or case.db_url
            environ = {**local_environ(endpoint, db_url, catalog_spec="pcelery.catalog:CATALOG", env=ENV),
                       "PCELERY_LOG_LEVEL": "INFO"}
            proc = start_worker(environ, queues=[QUEUE], concurrency=self.concurrency, hostname=hostname, log=log)
        else:
            env = {**os.environ, **LOCAL_CREDENTIALS, "AWS_REGION": LOCAL_REGION, "AWS_DEFAULT_REGION": LOCAL_REGION,
                   "AWS_ENDPOINT_URL_SQS": endpoint, "BENCH_PLAIN_QUEUE_URL": self.queue_url_on(endpoint)}
            # The same flags pcelery-worker gives the product's worker.
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "bench.plain_app", "worker", "-Q", QUEUE,
                 "--concurrency", str(self.concurrency), "--hostname", hostname,
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        # Stopped even if the bench dies halfway; stop_process_group is a no-op on an exited group.
        self.stack.callback(stop_process_group, proc, sig=signal.SIGQUIT, timeout=10)
        deadline = time.monotonic() + 90
        while b" ready." not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_bytes()[-3000:].decode(errors="replace")
                raise BenchError(f"{case.name} worker did not start (exit code {proc.poll()}); log {log_path}:\n{tail}")
            time.sleep(0.1)
        self.worker_log = log_path
        return proc


# --- Measurements ------------------------------------------------------------------------------------

def submitter_for(stack: Stack, case: Case, *, counted: bool):
    endpoint = stack.endpoint("submit" if counted else None)
    if case.persistent:
        return OutboxSubmitter(endpoint, (counted and case.counted_submit_db_url) or case.db_url)
    return PlainSubmitter(endpoint, stack.queue_url_on(endpoint))


def timed_run(stack: Stack, case: Case, submitter, worker, n: int) -> dict:
    """One run of n tasks: submit them all, then wait for the queue to be empty."""
    t0 = time.perf_counter()
    ids = submitter.submit(n)
    t1 = time.perf_counter()
    t2 = stack.wait_drained(f"{case.name}: {n} tasks", worker)
    in_task = task_run_seconds(stack.worker_log, set(ids))
    return {"ids": ids, "submit_s": t1 - t0, "drain_s": t2 - t1, "total_s": t2 - t0, "tasks_per_s": n / (t2 - t0),
            "in_task_median_ms": statistics.median(in_task) * 1000 if in_task else None,
            "in_task_p95_ms": percentile(in_task, 95) * 1000 if in_task else None}


_SUCCEEDED = re.compile(rb"Task [\w.]+\[([0-9a-f-]{36})\] succeeded in ([0-9.e-]+)s")


def check_succeeded(case: Case, submitter, ids: list[str]) -> None:
    """The persistent cases' rows all say `succeeded` (a queue can also empty into the DLQ)."""
    if not case.persistent:
        return
    deadline = time.monotonic() + 10  # the row commits before the ack, so this is normally immediate
    while (done := submitter.succeeded(ids)) < len(ids):
        if time.monotonic() > deadline:
            raise BenchError(f"{case.name}: queue empty but only {done} of {len(ids)} rows succeeded")
        time.sleep(0.1)


def task_run_seconds(log_path: Path, ids: set[str]) -> list[float]:
    """Seconds each task spent in the pool child, from Celery's own "succeeded in" log lines: the
    task body for plain Celery; claim + body + finish (two transactions) for the product."""
    found = []
    for match in _SUCCEEDED.finditer(log_path.read_bytes()):
        if match.group(1).decode() in ids:
            found.append(float(match.group(2)))
    return found


def throughput(stack: Stack, case: Case, n: int, *, counted: bool = False) -> tuple[dict, dict]:
    """Start a worker, warm it up, time one run; (timings, request counts of the timed run)."""
    worker = stack.start_worker(case, counted=counted)
    submitter = submitter_for(stack, case, counted=counted)
    try:
        submitter.submit(WARM_UP_TASKS)
        stack.wait_drained(f"{case.name}: warm-up", worker)
        before = proxy_counts(stack) if counted else {}
        result = timed_run(stack, case, submitter, worker, n)
        after = proxy_counts(stack) if counted else {}
        if counted:
            # The caller's cost of the one-at-a-time API too: submit() in its own transaction.
            for _ in range(SINGLE_SUBMITS):
                submitter.single()
            singles = proxy_counts(stack)["submit"]
            result["single_submit_counts"] = dict(Counter(singles) - Counter(after["submit"]))
        check_succeeded(case, submitter, result.pop("ids"))  # after the counting: its queries are not the product's
    finally:
        submitter.close()
        stop_process_group(worker, sig=signal.SIGQUIT, timeout=10)  # the queue is empty: nothing to restore
    counts = {side: dict(Counter(after[side]) - Counter(before.get(side, {}))) for side in after}
    return result, counts


def backlog_drain(stack: Stack, case: Case, n: int) -> dict:
    """The worker side alone: n tasks wait in the queue before the worker starts; time from its
    "ready" line to the queue being empty. The same submit shape (a backlog) for every case."""
    stack.fresh_queue()
    submitter = submitter_for(stack, case, counted=False)
    try:
        ids = submitter.submit(n)
    finally:
        submitter.close()
    worker = stack.start_worker(case, counted=False, fresh_queue=False)
    try:
        t_ready = time.perf_counter()
        t_empty = stack.wait_drained(f"{case.name}: backlog of {n}", worker)
    finally:
        stop_process_group(worker, sig=signal.SIGQUIT, timeout=10)
    verifier = submitter_for(stack, case, counted=False)
    try:
        check_succeeded(case, verifier, ids)
    finally:
        verifier.close()
    in_task = task_run_seconds(stack.worker_log, set(ids))
    return {"drain_s": t_empty - t_ready, "tasks_per_s": n / (t_empty - t_ready),
            "in_task_median_ms": statistics.median(in_task) * 1000 if in_task else None}


def proxy_counts(stack: Stack) -> dict:
    with urllib.request.urlopen(f"{stack.endpoint('submit')}/__counts", timeout=10) as response:
        return json.load(response)


def latency(stack: Stack, rounds: int, singles_per_round: int, batch_size: int) -> dict:
    """Caller-side seconds per task, no worker running; interleaved rounds, like the throughput runs."""
    submitters = {case.name: submitter_for(stack, case, counted=False) for case in stack.cases}
    samples: dict[str, list[float]] = {}
    try:
        for submitter in submitters.values():  # connections, queue URL lookup, statement caches
            for _ in range(5):
                submitter.single()
            if hasattr(submitter, "batch"):
                submitter.batch(batch_size)
        for _ in range(rounds):
            for name, submitter in submitters.items():
                kind = "delay()" if name == "plain" else "submit"
                for _ in range(singles_per_round):
                    t0 = time.perf_counter()
                    submitter.single()
                    samples.setdefault(f"{name}: {kind}", []).append(time.perf_counter() - t0)
                    stack.purge()
                if hasattr(submitter, "batch"):
                    t0 = time.perf_counter()
                    submitter.batch(batch_size)
                    samples.setdefault(f"{name}: submit_many({batch_size})", []).append(
                        (time.perf_counter() - t0) / batch_size)
                    stack.purge()
    finally:
        for submitter in submitters.values():
            submitter.close()
    return {key: {"median_ms": statistics.median(v) * 1000, "p95_ms": percentile(v, 95) * 1000, "samples": len(v)}
            for key, v in samples.items()}


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


# --- Report ------------------------------------------------------------------------------------------

def machine() -> dict:
    import sqlite3

    import boto3
    import celery
    import kombu
    import moto
    import psycopg
    import sqlalchemy

    with psycopg.connect(PG_ADMIN_URL, connect_timeout=10) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
        "celery": celery.__version__, "kombu": kombu.__version__, "boto3": boto3.__version__,
        "moto": moto.__version__, "sqlalchemy": sqlalchemy.__version__, "psycopg": psycopg.__version__,
        "sqlite": sqlite3.sqlite_version, "postgres": pg_version,
        "load_average_at_start": os.getloadavg(),
    }


def single_cell(counts: dict) -> str:
    """Requests per single submit: SQS by action, Postgres as round trips (by kind)."""
    if not counts:
        return "n/a"
    sqs = ", ".join(f"{k} {v / SINGLE_SUBMITS:.2f}" for k, v in sorted(counts.items()) if not k.startswith("pg "))
    pg = {k.removeprefix("pg "): v for k, v in counts.items() if k.startswith("pg ")}
    if not pg:
        return f"SQS: {sqs}"
    parts = ", ".join(f"{k} {v / SINGLE_SUBMITS:.2f}" for k, v in sorted(pg.items()))
    return f"SQS: {sqs}; Postgres {sum(pg.values()) / SINGLE_SUBMITS:.2f} round trips ({parts})"


def report(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"machine: {m['nproc']} CPUs, Python {m['python']}, celery {m['celery']}, kombu {m['kombu']}, "
                 f"boto3 {m['boto3']}, moto {m['moto']}, SQLAlchemy {m['sqlalchemy']}, psycopg {m['psycopg']}, "
                 f"SQLite {m['sqlite']}, Postgres {m['postgres']}; load average at start "
                 f"{', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}")
    p = results["parameters"]
    lines.append(f"parameters: N={p['tasks']} tasks per throughput run, {p['repeats_done']} of {p['repeats']} repeats, "
                 f"concurrency {p['concurrency']}, prefetch multiplier 1, plain polling_interval "
                 f"{p['plain_polling_interval']} s (the product's: 0.05 s, app/celeryconfig.py), "
                 f"warm-up {WARM_UP_TASKS} tasks per worker start")
    lines.append("")
    lines.append("### Throughput (median of repeats; each run: first submit to queue empty)")
    lines.append("")
    lines.append("| case | tasks/s | vs plain | submit phase s | drain phase s | total s | in-task ms median (p95) "
                 "| all runs tasks/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    base = None
    for name, runs in results["throughput"].items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if runs[0][k] is not None}
        base = base or med["tasks_per_s"]
        each = ", ".join(f"{r['tasks_per_s']:.1f}" for r in runs)
        lines.append(f"| {name} | {med['tasks_per_s']:.1f} | {med['tasks_per_s'] / base:.2f}x | {med['submit_s']:.2f} "
                     f"| {med['drain_s']:.2f} | {med['total_s']:.2f} | {med.get('in_task_median_ms', 0):.1f} "
                     f"({med.get('in_task_p95_ms', 0):.1f}) | {each} |")
    lines.append("")
    lines.append(f"### Worker side alone: a backlog of {p['backlog']} tasks queued before the worker starts (one run)")
    lines.append("")
    lines.append("| case | tasks/s | vs plain | drain s (ready to empty) | in-task ms median |")
    lines.append("|---|---|---|---|---|")
    base = None
    for name, b in results["backlog"].items():
        base = base or b["tasks_per_s"]
        lines.append(f"| {name} | {b['tasks_per_s']:.1f} | {b['tasks_per_s'] / base:.2f}x | {b['drain_s']:.2f} "
                     f"| {b['in_task_median_ms'] or 0:.1f} |")
    lines.append("")
    lines.append(f"### Requests per task (one counted run of {p['counted_tasks']} tasks per case through "
                 "bench/counting_proxy.py)")
    lines.append("")
    lines.append("| case | SQS by submitter | SQS by worker | SQS total | Postgres round trips (submit + worker) "
                 "| Postgres transactions | one submit()/delay() on its own | counted-run tasks/s |")
    lines.append("|---|---|---|---|---|---|---|---|")
    n = p["counted_tasks"]
    for name, counted in results["counted"].items():
        sides = counted["counts"]
        sqs = {side: {k: v for k, v in c.items() if not k.startswith("pg ")} for side, c in sides.items()}
        pgc = {side: {k: v for k, v in c.items() if k.startswith("pg ")} for side, c in sides.items()}

        def fmt(c):
            total = sum(c.values())
            parts = ", ".join(f"{k.removeprefix('pg ')} {v / n:.2f}" for k, v in sorted(c.items()))
            return f"{total / n:.2f} ({parts})" if c else "0"

        sqs_total = sum(sum(c.values()) for c in sqs.values()) / n
        pg_rt = [sum(pgc.get(s, {}).values()) / n for s in ("submit", "worker")]
        tx = sum(v for c in pgc.values() for k, v in c.items() if k in ("pg COMMIT", "pg ROLLBACK")) / n
        pg_cell = (f"{pg_rt[0]:.2f} + {pg_rt[1]:.2f} = {sum(pg_rt):.2f}; worker: {fmt(pgc.get('worker', {}))}"
                   if any(pgc.values()) else "n/a")
        lines.append(f"| {name} | {fmt(sqs.get('submit', {}))} | {fmt(sqs.get('worker', {}))} | {sqs_total:.2f} "
                     f"| {pg_cell} | {f'{tx:.2f}' if any(pgc.values()) else 'n/a'} "
                     f"| {single_cell(counted['timing'].get('single_submit_counts', {}))} "
                     f"| {counted['timing']['tasks_per_s']:.1f} |")
    lines.append("")
    lines.append("### Submit latency per task, caller side, no worker running")
    lines.append("")
    lines.append("| how | median ms | p95 ms | samples | median vs plain delay() |")
    lines.append("|---|---|---|---|---|")
    base = results["latency"].get("plain: delay()", {}).get("median_ms")
    for key, v in results["latency"].items():
        ratio = f"{v['median_ms'] / base:.2f}x" if base else "n/a"
        lines.append(f"| {key} | {v['median_ms']:.2f} | {v['p95_ms']:.2f} | {v['samples']} | {ratio} |")
    return "\n".join(lines)


# --- Main --------------------------------------------------------------------------------------------

def run(args) -> dict:
    started = time.monotonic()
    results: dict = {"machine": machine(), "throughput": {}, "backlog": {}, "counted": {}, "latency": {},
                     "parameters": {"tasks": args.tasks, "counted_tasks": args.counted_tasks, "backlog": args.backlog,
                                    "plain_polling_interval": os.environ.get("BENCH_PLAIN_POLLING_INTERVAL", "0.05"),
                                    "repeats": args.repeats, "concurrency": args.concurrency}}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as exit_stack:
        stack = Stack(exit_stack, args.concurrency)
        # The latency part purges the queue after every sample; moto refuses purges less than
        # 60 s apart unless told otherwise (real SQS's rule, which the bench has no use for).
        os.environ["MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR"] = "false"
        for old in LOG_DIR.glob("*.log"):
            old.unlink()
        moto = start_moto_server(log=exit_stack.enter_context(open(LOG_DIR / "moto.log", "wb")))
        exit_stack.callback(moto.stop)
        stack.moto_endpoint = moto.endpoint
        say(f"moto server on {moto.endpoint}")

        import psycopg

        from pcelery import schema

        db_name = f"pcelery_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')

        def drop_database():
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

        exit_stack.callback(drop_database)
        admin = PG_ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]  # user@host:port
        pg_url = f"postgresql+psycopg://{admin}/{db_name}"

        stack.proxy_ports = {key: free_port() for key in ("sqs:submit", "sqs:worker", "pg:submit", "pg:worker")}
        pg_host_port = admin.rsplit("@", 1)[-1]
        proxy = subprocess.Popen(
            [sys.executable, "-m", "bench.counting_proxy", "--sqs-upstream", moto.endpoint,
             "--pg-upstream", pg_host_port, *(f"{k}={v}" for k, v in stack.proxy_ports.items())],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=exit_stack.enter_context(open(LOG_DIR / "proxy.log", "wb")), start_new_session=True)
        exit_stack.callback(stop_process_group, proxy, timeout=5)
        if proxy.stdout.readline().strip() != b"ready":
            raise BenchError(f"the counting proxy did not start; see {LOG_DIR / 'proxy.log'}")

        user_host = admin.rsplit(":", 1)[0]  # the worker side reaches Postgres through its own proxy port
        counted_pg = {side: f"postgresql+psycopg://{user_host}:{stack.proxy_ports['pg:' + side]}/{db_name}"
                            "?sslmode=disable"
                      for side in ("submit", "worker")}
        sqlite_path = LOG_DIR / f"bench-{uuid.uuid4().hex[:8]}.sqlite3"
        exit_stack.callback(lambda: [p.unlink(missing_ok=True) for p in LOG_DIR.glob(f"{sqlite_path.name}*")])
        sqlite_url = f"sqlite:///{sqlite_path}"
        for url in (sqlite_url, pg_url):
            engine = schema.make_engine(url)
            schema.migrate(engine)
            engine.dispose()

        os.environ.update({**LOCAL_CREDENTIALS, "AWS_REGION": LOCAL_REGION, "AWS_DEFAULT_REGION": LOCAL_REGION})
        stack.sqs = sqs_client(moto.endpoint)
        stack.queue_url = create_queues(stack.sqs, CATALOG, ENV)[QUEUE]["url"]
        say(f"queue {sqs_queue_name(ENV, QUEUE)}; SQLite {sqlite_path}; Postgres database {db_name}")
        stack.cases = [
            Case("plain", "plain Celery .delay()"),
            Case("sqlite", "outbox + claim-check, SQLite", sqlite_url),
            Case("postgres", "outbox + claim-check, Postgres", pg_url, counted_pg["worker"], counted_pg["submit"]),
        ]

        repeats_done = 0
        for repeat in range(args.repeats):
            elapsed = time.monotonic() - started
            # Next repeat, then the backlog, counted and latency parts: about 1.2 repeats together.
            if repeat and elapsed + elapsed / repeat * 2.2 > TIME_BUDGET:
                say(f"time budget: stopping after {repeat} repeat(s) ({elapsed:.0f} s so far)")
                break
            for case in stack.cases:
                timing, _ = throughput(stack, case, args.tasks)
                results["throughput"].setdefault(case.label, []).append(timing)
                say(f"repeat {repeat + 1} {case.name}: {timing['tasks_per_s']:.1f} tasks/s "
                    f"(submit {timing['submit_s']:.2f} s, drain {timing['drain_s']:.2f} s)")
            repeats_done += 1
        results["parameters"]["repeats_done"] = repeats_done

        for case in stack.cases:
            results["backlog"][case.label] = timing = backlog_drain(stack, case, args.backlog)
            say(f"backlog {case.name}: {timing['tasks_per_s']:.1f} tasks/s "
                f"({args.backlog} tasks in {timing['drain_s']:.2f} s)")

        for case in stack.cases:
            timing, counts = throughput(stack, case, args.counted_tasks, counted=True)
            results["counted"][case.label] = {"timing": timing, "counts": counts}
            say(f"counted {case.name}: {json.dumps(counts)}")

        results["latency"] = latency(stack, args.latency_rounds, args.singles_per_round, args.batch)
        say(f"latency: {json.dumps(results['latency'])}")
    results["elapsed_s"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300, help="tasks per throughput run (default 300)")
    parser.add_argument("--counted-tasks", type=int, default=100,
                        help="tasks in each case's counted run (default 100; counts are per task)")
    parser.add_argument("--backlog", type=int, default=100,
                        help="tasks queued before the worker starts, in each case's backlog run (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats per case (default 3)")
    parser.add_argument("--concurrency", type=int, default=CATALOG.get(QUEUE).concurrency,
                        help="worker pool size for every case (default: the catalog's, %(default)s)")
    parser.add_argument("--latency-rounds", type=int, default=10, help="latency rounds (default 10)")
    parser.add_argument("--singles-per-round", type=int, default=10, help="single submits per round (default 10)")
    parser.add_argument("--batch", type=int, default=100, help="submit_many size in the latency part (default 100)")
    parser.add_argument("--json", type=Path, default=LOG_DIR / "results.json",
                        help="where the raw results go (default var/bench/results.json)")
    args = parser.parse_args(argv)
    if min(args.tasks, args.counted_tasks, args.backlog, args.repeats, args.concurrency, args.latency_rounds,
           args.singles_per_round, args.batch) < 1:
        parser.error("every size must be at least 1")

    def on_sigterm(signum, _frame):
        raise KeyboardInterrupt  # unwinds the ExitStack: every process stopped, the database dropped

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run(args)
    except KeyboardInterrupt:
        say("interrupted: stopped every process this bench started")
        return 130
    except BenchError as exc:
        say(f"bench failed: {exc}")
        return 1
    except OSError as exc:  # a port or file the bench could not use
        say(f"bench failed: {exc}")
        return 1
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            say(f"bench failed: cannot reach Postgres at {PG_ADMIN_URL} ({str(exc).strip().splitlines()[0]}): "
                "start it, or point PCELERY_TEST_PG at an admin URL of one that may CREATE DATABASE")
            return 1
        raise
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(report(results))
    say(f"done in {results['elapsed_s']:.0f} s; raw results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
