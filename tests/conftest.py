"""Shared fixtures and helpers: the real parts this machine runs, in one place.

Two tiers, by folder:
- tests/unit: no subprocess and no server of our own; the real Postgres and SQLite are allowed,
  and moto in-process (`mock_aws`) for ops library functions. `make test-fast` runs them alone;
  a test here that starts a process fails with a message saying to move it.
- tests/integration: real worker and relay subprocesses, moto servers, LocalStack, CDK synth.

Fixtures:
- `sqs_endpoint`: a moto server subprocess on a free loopback port (one per test session).
- `moto_server`: a moto server of the test module's own (scenarios that must not share queues).
- `pg_url`: a fresh database on the machine's Postgres (127.0.0.1:5432, trust auth), created for
  this session and dropped after it; `pg_database(prefix)` makes more of them.
- `db_url`: parametrized over Postgres and SQLite; `engine`: that store, migrated and emptied.
- `LocalEnv`: one environment's queues on an SQS endpoint plus a store, with workers, a relay and
  the helpers the integration tests share (submit, wait for rows, DLQ bodies...).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from devstack import DEMO_CATALOG
from devstack.stack import (
    LOCAL_CREDENTIALS,
    LOCAL_REGION,
    create_queues,
    local_environ,
    sqs_client,
    start_moto_server,
    start_relay,
    start_worker,
    stop_process_group,
)
from pcelery import schema, store
from pcelery.messages import encode_body
from pcelery.outbox import Outbox

REPO = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("PCELERY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PCELERY_TEST_REDIS", "redis://127.0.0.1:6379/15")
UNIT = REPO / "tests" / "unit"


# --- tiers ------------------------------------------------------------------------------------

def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = "unit" if item.path.is_relative_to(UNIT) else "integration"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if not request.node.path.is_relative_to(UNIT):
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test started a process: move it to tests/integration (the fast tier "
                             "runs no subprocesses)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)


# --- environment ------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _local_aws_env() -> Iterator[None]:
    """boto3 and kombu must never reach for real credentials or a real region in tests."""
    keys = (*LOCAL_CREDENTIALS, "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_SQS", "PCELERY_ENV", "PCELERY_CATALOG", "DATABASE_URL")
    saved = {k: os.environ.get(k) for k in keys}
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "PCELERY_ENV", "PCELERY_CATALOG",
              "DATABASE_URL"):
        os.environ.pop(k, None)
    os.environ.update(LOCAL_CREDENTIALS)
    os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = LOCAL_REGION
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- servers ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sqs_endpoint() -> Iterator[str]:
    server = start_moto_server()
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[Any]:
    server = start_moto_server()
    yield server
    server.stop()


def reset_moto(endpoint: str) -> None:
    """Every queue of a moto server gone: a test that owns the server starts from nothing."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=10).read()


# --- databases --------------------------------------------------------------------------------

_created_databases: list[str] = []


def make_pg_database(prefix: str = "pcelery_test") -> str:
    """A new, empty database on the machine's Postgres; dropped at the end of the session."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _created_databases.append(name)
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    yield
    if not _created_databases:
        return
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        for name in _created_databases:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> str:
    return make_pg_database()


@pytest.fixture
def pg_database() -> Callable[[str], str]:
    return make_pg_database


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'tasks.sqlite3'}"


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """The store at db_url, migrated, with no rows (the Postgres database lives for the session)."""
    eng = schema.make_engine(db_url)
    schema.migrate(eng)
    with eng.begin() as conn:
        conn.execute(schema.tasks.delete())
        conn.execute(schema.schedules.delete())
    yield eng
    eng.dispose()


def new_task(engine: sa.Engine, *, task_name: str = "demo.add", queue: str = "default", args: Any = (1, 2),
             kwargs: dict[str, Any] | None = None, delay: int = 0) -> str:
    """A `pending` row inserted straight into the store."""
    task_id = str(uuid.uuid4())
    with engine.begin() as conn:
        store.insert_task(conn, task_id=task_id, task_name=task_name, queue=queue, args=list(args),
                          kwargs={"x": 1} if kwargs is None else kwargs, delay_seconds=delay)
    return task_id


def dead_task(engine: sa.Engine, task_name: str, *, queue: str = "default", args: Any = (1,),
              error: str = "ValueError: boom") -> str:
    """A row the way the worker leaves it after the last receive (its message is the caller's)."""
    tid = new_task(engine, task_name=task_name, queue=queue, args=args, kwargs={})
    assert store.claim(engine, tid, worker="w1", lease_seconds=30).outcome == "run"
    store.finish_failure(engine, tid, worker="w1", error=error, final=True)
    return tid


# --- waiting ----------------------------------------------------------------------------------

def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str | Callable[[], str],
             logs: list[Path] | tuple[Path, ...] = (), interval: float = 0.25) -> Any:
    """Poll until predicate() is truthy and return its value; fail with the logs' tails. Waits
    are generous (two cores, other runs in parallel); nothing asserts on wall time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} (tail) ---\n{tail(p)}" for p in logs)
            text = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {text}\n{tails}")
        time.sleep(interval)


# --- an environment on an endpoint ------------------------------------------------------------

class Process:
    """A worker or relay subprocess of a LocalEnv, logging to a file of the test's."""

    def __init__(self, log: Path, start: Callable[[Any], subprocess.Popen]):
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = start(self._log_file)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 90) -> Process:
        wait_for(lambda: " ready." in self.log.read_text(errors="replace") or not self.alive(),
                 timeout=timeout, what=f"worker ready ({self.log.name})", logs=[self.log])
        assert self.alive(), f"worker exited with {self.proc.returncode}:\n{tail(self.log)}"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        code = stop_process_group(self.proc, sig=sig)
        self._log_file.close()
        return code


class LocalEnv:
    """One environment's queues (DEMO_CATALOG) on an SQS endpoint, the task store, an outbox to
    submit with, and the worker / relay processes started in it. Environments with different
    names on one endpoint have disjoint queues, so their workers never take each other's work."""

    def __init__(self, endpoint: str, db_url: str, env: str, tmp: Path, *, result_backend: str | None = None,
                 create: bool = True, process_endpoint: str | None = None, process_db_url: str | None = None):
        """process_endpoint / process_db_url: what the worker and relay processes are given
        instead (a FaultProxy in front of moto or Postgres), while the test itself talks to SQS
        and the store directly."""
        self.endpoint, self.db_url, self.env, self.tmp = endpoint, db_url, env, tmp
        self.environ = local_environ(process_endpoint or endpoint, process_db_url or db_url, env=env,
                                     result_backend=result_backend)
        self.sqs = sqs_client(endpoint)
        self.queues = create_queues(self.sqs, DEMO_CATALOG, env) if create else {}
        self.engine = schema.make_engine(db_url)
        self.outbox = Outbox(self.engine, DEMO_CATALOG, env, self.sqs)
        self.processes: list[Process] = []

    def migrate(self) -> LocalEnv:
        from devstack.tasks import migrate as migrate_demo_tables

        schema.migrate(self.engine)
        migrate_demo_tables(self.engine)
        return self

    # processes

    def worker(self, name: str, **kwargs: Any) -> Process:
        log = self.tmp / f"{self.env}-{name}.log"
        p = Process(log, lambda f: start_worker(self.environ, log=f, hostname=f"{name}@{self.env}", **kwargs))
        self.processes.append(p)
        return p

    def relay(self, name: str = "relay", **kwargs: Any) -> Process:
        p = Process(self.tmp / f"{self.env}-{name}.log", lambda f: start_relay(self.environ, log=f, **kwargs))
        self.processes.append(p)
        return p

    def logs(self) -> list[Path]:
        return [p.log for p in self.processes]

    def close(self) -> None:
        for p in self.processes:
            if p.alive():
                p.stop()
        self.engine.dispose()

    # the store

    def submit(self, task_name: str, *args: Any, queue: str | None = None, **kwargs: Any) -> str:
        with self.outbox.transaction() as conn:
            return self.outbox.submit(conn, task_name, *args, queue=queue, **kwargs)

    def row(self, task_id: str) -> store.TaskRow | None:
        return store.get_task(self.engine, task_id)

    def wait_rows(self, ids: list[str], states: str | tuple[str, ...] | set[str], *,
                  timeout: float = 90) -> list[store.TaskRow]:
        wanted = {states} if isinstance(states, str) else set(states)

        def done() -> list[store.TaskRow] | None:
            rows = [self.row(i) for i in ids]
            return rows if all(r and r.state in wanted for r in rows) else None  # type: ignore[return-value]

        return wait_for(done, timeout=timeout, what=f"{len(ids)} task(s) in state {sorted(wanted)}",
                        logs=self.logs())

    def dead_task(self, task_name: str, queue: str = "default", error: str = "ValueError: boom",
                  **attrs: str) -> str:
        """A dead row and its message in the queue's DLQ, as the worker leaves them."""
        tid = dead_task(self.engine, task_name, queue=queue, error=error)
        self.send(self.url(queue, dlq=True), encode_body(tid, task_name, queue=queue), **attrs)
        return tid

    # SQS

    def url(self, queue: str, *, dlq: bool = False) -> str:
        return self.queues[queue]["dlq_url" if dlq else "url"]

    def counts(self, url: str) -> tuple[int, int, int]:
        """(visible, in flight, delayed)"""
        a = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        return (int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"]),
                int(a["ApproximateNumberOfMessagesDelayed"]))

    def depth(self, queue: str, *, dlq: bool = False) -> int:
        visible, in_flight, _ = self.counts(self.url(queue, dlq=dlq))
        return visible + in_flight

    def send(self, url: str, body: str, **attrs: str) -> None:
        wire = {k: {"DataType": "String", "StringValue": str(v)} for k, v in attrs.items()}
        self.sqs.send_message(QueueUrl=url, MessageBody=body, **({"MessageAttributes": wire} if wire else {}))

    def send_raw(self, queue: str, body: str) -> None:
        self.send(self.url(queue), body)

    def dlq_bodies(self, queue: str) -> list[str]:
        """Bodies in the queue's DLQ, left there (received with a zero visibility timeout)."""
        seen = {}
        for _ in range(5):
            got = self.sqs.receive_message(QueueUrl=self.url(queue, dlq=True), MaxNumberOfMessages=10,
                                           VisibilityTimeout=0, WaitTimeSeconds=0).get("Messages", [])
            seen.update({m["MessageId"]: m["Body"] for m in got})
        return list(seen.values())

    def drain_bodies(self, url: str, expected: int, deadline_s: float = 30) -> list[str]:
        """Every body in the queue (consumed), waiting for held messages to come back."""
        bodies: list[str] = []
        deadline = time.monotonic() + deadline_s
        while len(bodies) < expected and time.monotonic() < deadline:
            msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                            VisibilityTimeout=60).get("Messages", [])
            bodies += [m["Body"] for m in msgs]
        return bodies


@contextlib.contextmanager
def local_env(endpoint: str, db_url: str, env: str, tmp: Path, **kwargs: Any) -> Iterator[LocalEnv]:
    e = LocalEnv(endpoint, db_url, env, tmp, **kwargs)
    try:
        yield e
    finally:
        e.close()


@contextlib.contextmanager
def proxied_env(moto_server: Any, env: str, tmp: Path, *, db_prefix: str) -> Iterator[tuple[LocalEnv, Any, Any]]:
    """A LocalEnv on its own Postgres database whose worker and relay processes reach SQS and
    Postgres through FaultProxies (tests/faults.py), while the test talks to both directly.
    Yields (env, sqs_proxy, pg_proxy); the moto server starts empty."""
    from faults import FaultProxy

    reset_moto(moto_server.endpoint)
    db_url = make_pg_database(db_prefix)
    sqs_proxy = FaultProxy("127.0.0.1", int(moto_server.endpoint.rsplit(":", 1)[1])).start()
    pg_proxy = FaultProxy("127.0.0.1", 5432).start()
    e = LocalEnv(moto_server.endpoint, db_url, env, tmp, process_endpoint=sqs_proxy.url,
                 process_db_url=db_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{pg_proxy.port}/")).migrate()
    try:
        yield e, sqs_proxy, pg_proxy
    finally:
        e.close()
        sqs_proxy.stop()
        pg_proxy.stop()


def run_console_script(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
                       **kwargs: Any) -> subprocess.CompletedProcess:
    """Run one of the package's console scripts (pcelery-ops, pcelery-relay...) from this venv."""
    script = Path(sys.executable).parent / name
    return subprocess.run([str(script), *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False, **kwargs)
