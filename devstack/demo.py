"""`make demo`: the whole product on a laptop, in about a minute, with no AWS account.

    python -m devstack.demo

Starts a moto SQS server on a free loopback port, creates every catalog queue and its DLQ
(devstack:DEMO_CATALOG: the real contracts with timings shrunk to seconds), migrates the task store
(a fresh SQLite file under var/, or the Postgres database DATABASE_URL names), starts a worker and
the outbox relay, and then shows, step by step:

  1. normal tasks succeed;
  2. a flaky task fails once and succeeds when SQS redelivers it;
  3. an always-failing task and a poison message (an id with no row) end in the DLQ;
  4. a task longer than its queue's visibility timeout runs once (the heartbeat);
  5. a worker SIGKILLed mid-task: the task completes on a second worker, its effect once.

It ends with the per-state counts of this run's tasks and each DLQ's depth, and stops every
process it started (also on Ctrl-C or SIGTERM). Exit code: 0 when every expectation held, 1 when
one did not, 130 when interrupted. Process logs stay in var/demo/ for a look afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from pcelery.catalog import sqs_queue_name
from pcelery.store import STATES

from . import DEMO_CATALOG_SPEC
from .stack import (
    REPO_ROOT,
    create_queues,
    local_environ,
    sqs_client,
    start_moto_server,
    start_relay,
    start_worker,
    stop_process_group,
)

if TYPE_CHECKING:
    from pcelery.store import TaskRow

ENV = "local"
LOG_DIR = Path(REPO_ROOT) / "var" / "demo"
DEADLINE = 90  # seconds any single step may take on a slow machine before it counts as failed


class Demo:
    def __init__(self):
        self.started = time.monotonic()
        self.failures: list[str] = []
        self.processes: list = []  # (name, Popen) of workers and the relay, in start order
        self.moto = None
        self.logs: list = []
        self.task_ids: list[str] = []

    # --- narration ---

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    def check(self, ok: bool, text: str, detail: str = "") -> bool:
        if ok:
            self.say(f"  ok    {text}")
        else:
            self.failures.append(text)
            self.say(f"  FAIL  {text}" + (f" ({detail})" if detail else ""))
        return ok

    def wait(self, predicate, timeout: float = DEADLINE, interval: float = 0.25):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value or time.monotonic() > deadline:
                return value
            time.sleep(interval)

    # --- the stack ---

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.moto = start_moto_server(log=self._log("moto"))
        self.say(f"local SQS (moto server, pid {self.moto.process.pid}) listening on {self.moto.endpoint}")

        database_url = os.environ.get("DATABASE_URL") or _fresh_sqlite_url()
        self.environ = local_environ(self.moto.endpoint, database_url, catalog_spec=DEMO_CATALOG_SPEC, env=ENV)
        os.environ.update(self.environ)  # before pcelery reads the settings below

        from pcelery import schema
        from pcelery.outbox import Outbox
        from pcelery.settings import Settings

        from . import tasks as demo_tasks

        settings = Settings.from_env()
        self.catalog = settings.catalog
        self.sqs = sqs_client(self.moto.endpoint)
        self.queues = create_queues(self.sqs, self.catalog, ENV)
        for q in self.catalog:
            self.say(f"queue {sqs_queue_name(ENV, q.name)} + DLQ: visibility timeout {q.visibility_timeout} s, "
                     f"maxReceiveCount {q.max_receive_count}, heartbeat {'on' if q.heartbeat else 'off'}")

        self.engine = schema.make_engine(settings.database_url)
        schema.migrate(self.engine)
        demo_tasks.migrate(self.engine)
        self.say(f"task store {self.engine.url.render_as_string(hide_password=True)} migrated")
        self.outbox = Outbox.from_settings(settings, engine=self.engine)

        self.start_worker("worker-1")
        relay = start_relay(self.environ, log=self._log("relay"), interval=1.0, min_age=2.0)
        self.processes.append(("relay", relay))
        self.say(f"outbox relay started (pid {relay.pid})")

    def start_worker(self, name: str):
        log_path = LOG_DIR / f"{name}.log"
        proc = start_worker(self.environ, hostname=f"{name}@demo", log=self._log(name))
        self.processes.append((name, proc))
        ready = self.wait(lambda: proc.poll() is not None or " ready." in log_path.read_text(errors="replace"))
        if proc.poll() is not None or not ready:
            raise DemoAbort(f"{name} did not start (exit code {proc.poll()}); see {log_path}")
        self.say(f"{name} ready (pid {proc.pid}, queues {', '.join(self.catalog.names())})")
        return proc

    def _log(self, name: str):
        handle = open(LOG_DIR / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.logs.append(handle)
        return handle

    def stop(self) -> None:
        for _name, proc in reversed(self.processes):
            stop_process_group(proc, timeout=15)
        if self.moto:
            self.moto.stop()
        for handle in self.logs:
            handle.close()
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()

    # --- helpers over the store and SQS ---

    def submit(self, task_name: str, *args, queue: str | None = None, **kwargs) -> str:
        with self.outbox.transaction() as conn:
            task_id = self.outbox.submit(conn, task_name, *args, queue=queue, **kwargs)
        self.task_ids.append(task_id)
        return task_id

    def row(self, task_id: str) -> TaskRow | None:
        from pcelery import store

        return store.get_task(self.engine, task_id)

    def submitted(self, task_id: str) -> TaskRow:
        """The row of a task this demo submitted (committed, so it exists)."""
        row = self.row(task_id)
        if row is None:
            raise DemoAbort(f"the row of submitted task {task_id} is missing from the store")
        return row

    def wait_state(self, task_ids: list[str], states: set[str], timeout: float = DEADLINE) -> list[TaskRow]:
        def done() -> list[TaskRow] | None:
            rows = [self.submitted(t) for t in task_ids]
            return rows if all(r.state in states for r in rows) else None

        return self.wait(done, timeout) or [self.submitted(t) for t in task_ids]

    def dlq_task_ids(self, queue: str) -> set[str]:
        """Task ids of the messages in a DLQ (peeked with a zero visibility timeout: left there)."""
        found = set()
        for _ in range(3):
            messages = self.sqs.receive_message(QueueUrl=self.queues[queue]["dlq_url"], MaxNumberOfMessages=10,
                                                VisibilityTimeout=0, WaitTimeSeconds=0).get("Messages", [])
            for m in messages:
                try:
                    found.add(json.loads(base64.b64decode(m["Body"]))["headers"]["id"])
                except (ValueError, KeyError, TypeError):
                    found.add(f"(undecodable message {m['MessageId']})")
        return found

    def depth(self, queue: str, *, dlq: bool = False) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=self.queues[queue]["dlq_url" if dlq else "url"],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    # --- the script ---

    def run(self) -> None:
        from pcelery.messages import encode_body

        from .tasks import effect_rows

        default, long_queue = self.catalog.get("default"), self.catalog.get("long")
        run_id = uuid.uuid4().hex[:6]

        self.say("step 1-4: submitting normal, flaky, always-failing, poison and long tasks (they run in parallel)")
        normal = [self.submit("demo.add", i, 10 * i) for i in range(10)]
        flaky = self.submit("demo.flaky", f"flaky-{run_id}", 1)
        failing = self.submit("demo.always_fail", "this task always fails")
        poison = str(uuid.uuid4())  # a message whose id has no row: nothing to run, ever
        self.sqs.send_message(QueueUrl=self.queues["default"]["url"],
                              MessageBody=encode_body(poison, "demo.add", queue="default"))
        long_seconds = round(2.5 * long_queue.visibility_timeout)
        long_key = f"long-{run_id}"
        long_task = self.submit("demo.long", long_key, long_seconds, queue="long")

        self.say("step 1: 10 normal tasks (demo.add)")
        rows = self.wait_state(normal, {"succeeded"})
        self.check(all(r.state == "succeeded" for r in rows) and [r.result for r in rows]
                   == [11 * i for i in range(10)], "10 normal tasks succeeded with the right results",
                   f"states {[r.state for r in rows]}")

        self.say("step 2: a flaky task that fails on its first attempt "
                 f"(redelivered after {default.visibility_timeout} s)")
        row = self.wait_state([flaky], {"succeeded"})[0]
        self.check(row.state == "succeeded" and row.attempts == 2,
                   "flaky task failed once, then succeeded on attempt 2",
                   f"state {row.state}, attempts {row.attempts}")

        self.say(f"step 3: an always-failing task and a poison message (expected in the DLQ after "
                 f"{default.max_receive_count} receives, "
                 f"about {default.max_receive_count * default.visibility_timeout} s)")
        in_dlq = self.wait(lambda: {failing, poison} <= self.dlq_task_ids("default"), timeout=DEADLINE + 30)
        row = self.submitted(failing)
        self.check(row.state == "dead" and row.attempts == default.max_receive_count and bool(in_dlq),
                   f"always-failing task ran {default.max_receive_count} times, is dead "
                   f"(\"{row.error}\") and its message is in the DLQ",
                   f"state {row.state}, attempts {row.attempts}, in DLQ: {bool(in_dlq)}")
        self.check(bool(in_dlq) and self.row(poison) is None,
                   "poison message (an id with no row) is in the DLQ; the worker kept serving")

        self.say(f"step 4: a {long_seconds} s task on queue 'long' "
                 f"(visibility timeout {long_queue.visibility_timeout} s, "
                 f"heartbeat every {long_queue.heartbeat_interval} s)")
        row = self.wait_state([long_task], {"succeeded"}, timeout=DEADLINE + long_seconds)[0]
        effects = effect_rows(self.engine, long_key)
        self.check(row.state == "succeeded" and row.attempts == 1 and len(effects) == 1
                   and effects[0]["receive_count"] == 1,
                   "long task ran once: 1 attempt, 1 effect, its message received once",
                   f"state {row.state}, attempts {row.attempts}, effects {len(effects)}, "
                   f"receive counts {[e['receive_count'] for e in effects]}")

        self.say("step 5: a worker SIGKILLed mid-task")
        kill_key = f"kill-{run_id}"
        slow = self.submit("demo.slow", kill_key, 3.0)
        running = self.wait_state([slow], {"running", "succeeded"})[0]
        worker = next(p for n, p in self.processes if n == "worker-1")
        if running.state == "running":
            os.killpg(worker.pid, signal.SIGKILL)
            stop_process_group(worker, timeout=5)
            self.say(f"  worker-1 (pid {worker.pid}) and its pool SIGKILLed while running task {slow}")
        else:
            self.say(f"  the task finished before it could be killed (state {running.state})")
        self.start_worker("worker-2")
        row = self.wait_state([slow], {"succeeded"})[0]
        effects = effect_rows(self.engine, kill_key)
        self.check(row.state == "succeeded" and row.attempts == 2 and len(effects) == 1,
                   "the killed worker's task completed on worker-2 (attempt 2, effect once)",
                   f"state {row.state}, attempts {row.attempts}, effects {len(effects)}")

        self.summary()

    def summary(self) -> None:
        from collections import Counter

        states = Counter(self.submitted(t).state for t in self.task_ids)
        self.say("this run's tasks by state: " + ", ".join(f"{s}={states.get(s, 0)}" for s in STATES))
        dlq = {q.name: self.depth(q.name, dlq=True) for q in self.catalog}
        self.say("DLQ depth: " + ", ".join(f"{sqs_queue_name(ENV, name, dlq=True)}={n}" for name, n in dlq.items()))
        self.check(dlq == {"default": 2, "long": 0}, "only the failing task and the poison message are dead-lettered",
                   f"DLQ depths {dlq}")


class DemoAbort(RuntimeError):
    """The stack could not be brought up; the message says which part and where its log is."""


def _fresh_sqlite_url() -> str:
    path = Path(REPO_ROOT) / "var" / "demo.sqlite3"
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.split("\n\n")[0]).parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    demo = Demo()
    try:
        demo.start()
        demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr, flush=True)
        return 130
    except DemoAbort as exc:
        print(f"demo aborted: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        demo.stop()
    if demo.failures:
        print(f"demo FAILED: {len(demo.failures)} expectation(s) not met: {'; '.join(demo.failures)}. "
              f"Logs: {LOG_DIR}", flush=True)
        return 1
    print(f"demo passed: every expectation held. Process logs: {LOG_DIR}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
