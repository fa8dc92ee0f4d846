"""Plain Celery `.delay()` against the product (outbox + claim-check + PersistentTask), side by
side in one run on one machine, on LocalStack by default. It prints markdown tables and writes
bench/RESULTS.md (method, targets with PASS/FAIL, where the time goes).

    make bench                                # = .venv/bin/python -m bench.run, about 7 minutes
    .venv/bin/python -m bench.run --sqs moto  # moto instead (its cost grows with queue depth)
    .venv/bin/python -m bench.run --save-baseline --label "..."  # this run becomes the "before"

Cases: `plain` (bench/plain_app.py: the product's own Celery settings minus persistence, bare
`.delay()`, `celery worker` with pcelery-worker's flags, prefetch multiplier 1), `plain_tuned`
(the same at the product's own prefetch multiplier, a second baseline), `postgres` (the product: Outbox, the
`pcelery-worker` console script running devstack.tasks' `demo.add`, a fresh Postgres database)
and optionally `sqlite`. Every worker runs the real catalog's default queue (visibility 120 s,
long poll 19 s) at the same concurrency.

Parts, in this order (sizes: --help):
  1. throughput: each repeat runs, per case, an end-to-end run (N tasks submitted with the worker
     running, first submit to queue empty) and a worker-only drain (N tasks queued before the
     worker starts, its ready line to queue empty); repeats interleave the cases, medians reported
  2. ceiling: one worker-only drain of a bigger backlog per product case
  3. idle: one idle worker per case on queues of their own, every request counted through the
     proxy for --idle-seconds while parts 4 and 5 run; scaled to an hour
  4. counted runs at steady load, through bench/counting_proxy.py (SQS requests per action and
     side, Postgres round trips): tasks submitted at --rate with the worker running: plain
     `.delay()`, `Outbox.submit_many` (chunks of --counted-chunk) and single `submit()` calls;
     then a reference consumer (bare boto3, no product) on submit_many's traffic: the emulator's floor
  5. light-load latency: one task at a time, submit -> received / started / done, from the
     workers' own log lines

"Done" is the emulator reporting no visible, in-flight or delayed message on the queue (the last
delete has happened), asked directly (not through the proxy) every 0.05 s, for every case alike;
the product's rows are also checked to be `succeeded`. Logs: var/bench/. Every process the bench
starts is stopped and its database dropped at the end, also on Ctrl-C/SIGTERM; exit 0 when the
run completed (whatever the targets say), 1 when a part failed, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).absolute().parent.parent))

from bench import report
from bench.harness import (
    ENV,
    IDLE_ENV,
    LOCAL_AWS_ENV,
    LOG_DIR,
    PG_ADMIN_URL,
    QUEUE,
    REPO_ROOT,
    BatchSender,
    BenchError,
    CpuMeter,
    OutboxSubmitter,
    PlainSubmitter,
    Proxy,
    Queues,
    ReferenceConsumer,
    Worker,
    check_succeeded,
    count_diff,
    cpu_diff,
    environment_fingerprint,
    paced,
    percentile,
    postgres_backends,
    process_tree,
    product_worker_conf,
    say,
    start_localstack,
    start_moto,
    start_plain_worker,
    start_product_worker,
    worker_cpu_parts,
)
from pcelery.catalog import CATALOG
from pcelery.outbox import DELAY_LINGER

WARM_UP_TASKS = 20  # per worker start: every pool child opens its connections before the clock runs
LATENCY_WARM_UP = 5
LATENCY_GAP = 0.1  # seconds between one task's success and the next submit
SETTLE = 1.0  # seconds before and after a counted run, so deferred requests land in their own run


@dataclass
class Case:
    name: str  # plain | postgres | sqlite
    label: str
    db_url: str | None = None  # direct; None for plain Celery
    counted_worker_db: str | None = None  # through the proxy (Postgres only; SQLite has no wire to count)
    counted_submit_db: str | None = None
    idle_db: str | None = None
    prefetch_multiplier: int | None = None  # plain Celery's; the product's comes from its settings

    @property
    def product(self) -> bool:
        return self.db_url is not None


class Bench:
    def __init__(self, stack: contextlib.ExitStack, args: argparse.Namespace):
        self.stack, self.args = stack, args
        self.runs = 0
        self.emulator: Any = None
        self.queues: Queues
        self.proxy: Proxy
        self.pg_database = ""
        self.cases: list[Case] = []
        self.idle: dict[str, Worker] = {}
        self.idle_window: tuple[float, float] = (0.0, 0.0)
        self.idle_counts_before: dict = {}
        self.worker_conf: dict = {}

    # -- set-up --

    def set_up(self) -> None:
        args = self.args
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for old in LOG_DIR.glob("*.log"):
            old.unlink()
        os.environ.update(LOCAL_AWS_ENV)
        if args.sqs == "localstack":
            self.emulator = start_localstack(self.stack, LOG_DIR / "localstack.log")
        else:
            self.emulator = start_moto(self.stack, LOG_DIR / "moto.log")
        say(f"{self.emulator.kind} {self.emulator.version} on {self.emulator.endpoint}")
        if args.sqs == "moto":
            say("note: moto scans every message of a queue on each receive and send (ReceiveMessage 11 ms at depth "
                "10, 141 ms at 1,000): the drain and ceiling runs build a backlog, so they measure moto")

        import psycopg

        from pcelery import schema

        names = [c.strip() for c in args.cases.split(",") if c.strip()]
        pg_url = sqlite_url = None
        admin = PG_ADMIN_URL.split("://", 1)[1].rsplit("/", 1)[0]  # user@host:port
        if "postgres" in names:
            self.pg_database = f"pcelery_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_database}"')
            self.stack.callback(self._drop_database)
            pg_url = f"postgresql+psycopg://{admin}/{self.pg_database}"
        if "sqlite" in names:
            path = LOG_DIR / f"bench-{uuid.uuid4().hex[:8]}.sqlite3"
            self.stack.callback(lambda: [p.unlink(missing_ok=True) for p in LOG_DIR.glob(f"{path.name}*")])
            sqlite_url = f"sqlite:///{path}"
        for url in filter(None, (pg_url, sqlite_url)):
            engine = schema.make_engine(url)
            schema.migrate(engine)
            engine.dispose()

        self.proxy = Proxy(self.stack, self.emulator.endpoint, admin.rsplit("@", 1)[-1] if pg_url else None,
                           sqs_labels=("submit", "worker", "idle-plain", "idle-product"),
                           pg_labels=("submit", "worker", "idle") if pg_url else (),
                           log_path=LOG_DIR / "proxy.log")
        self.queues = Queues(self.emulator.endpoint)
        self.queues.create(ENV)
        self.queues.create(IDLE_ENV)

        def proxied(label: str) -> str:
            user_host = admin.rsplit(":", 1)[0]
            return f"postgresql+psycopg://{user_host}:{self.proxy.pg_port(label)}/{self.pg_database}?sslmode=disable"

        self.worker_conf = product_worker_conf(self.emulator.endpoint, args.concurrency)
        own = self.worker_conf["worker_prefetch_multiplier"]
        for name in names:
            if name == "plain":
                m = args.plain_prefetch_multiplier or own
                self.cases.append(Case("plain", f"plain Celery, prefetch multiplier {m}", prefetch_multiplier=m))
            elif name == "plain_tuned":
                self.cases.append(Case("plain_tuned", f"plain Celery, prefetch multiplier {own} (the product's)",
                                       prefetch_multiplier=own))
            elif name == "postgres":
                self.cases.append(Case("postgres", "pcelery, Postgres", pg_url, proxied("worker"), proxied("submit"),
                                       proxied("idle")))
            elif name == "sqlite":
                self.cases.append(Case("sqlite", "pcelery, SQLite", sqlite_url))
        say(f"queue {self.queues.url(ENV)}; idle queue {self.queues.url(IDLE_ENV)}; "
            f"Postgres database {self.pg_database or 'none'}")

    def _drop_database(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_database}" WITH (FORCE)')

    # -- parts of a run --

    def start_worker(self, case: Case, tag: str, *, endpoint: str | None = None, db_url: str | None = None,
                     env: str = ENV) -> Worker:
        self.runs += 1
        log_path = LOG_DIR / f"{self.runs:02d}-{case.name}-{tag}.log"
        endpoint = endpoint or self.emulator.endpoint
        if case.product:
            worker = start_product_worker(self.stack, case=case.name, endpoint=endpoint, db_url=db_url or case.db_url,
                                          env=env, concurrency=self.args.concurrency, log_path=log_path)
        else:
            worker = start_plain_worker(self.stack, endpoint=endpoint, env=env, concurrency=self.args.concurrency,
                                        prefetch_multiplier=case.prefetch_multiplier or 1,
                                        log_path=log_path)
        return worker

    def submitter(self, case: Case, *, endpoint: str | None = None, db_url: str | None = None,
                  queue_url: str | None = None, publish_linger: float | None = None):
        endpoint = endpoint or self.emulator.endpoint
        if case.product:
            linger = self.args.publish_linger if publish_linger is None else publish_linger
            return OutboxSubmitter(endpoint, db_url or case.db_url, linger)
        url = queue_url or self.queues.url(ENV)
        return PlainSubmitter(endpoint, url.replace(self.emulator.endpoint, endpoint, 1))

    def cpu_meter(self, case: Case, worker: Worker) -> CpuMeter:
        parts: dict = {"submitter": None, **worker_cpu_parts(worker),
                       "emulator": lambda: process_tree(self.emulator.pid)}
        if case.name == "postgres":
            parts["postgres"] = lambda: postgres_backends(self.pg_database)
        return CpuMeter(parts)

    def end_to_end(self, case: Case, n: int) -> dict:
        """The worker runs; n tasks submitted as fast as the caller can; first submit to empty."""
        self.queues.fresh()
        worker = self.start_worker(case, "e2e")
        submitter = self.submitter(case)
        try:
            worker.wait_ready()
            submitter.many(WARM_UP_TASKS, self.args.chunk)
            self.queues.wait_drained(f"{case.name}: warm-up", worker)
            meter = self.cpu_meter(case, worker)
            cpu0, t0 = meter.snapshot(), time.time()
            ids = submitter.many(n, self.args.chunk)
            t1 = time.time()
            t2 = self.queues.wait_drained(f"{case.name}: {n} tasks", worker, timeout=self.args.run_timeout)
            cpu = cpu_diff(meter.snapshot(), cpu0)
            check_succeeded(case.name, case.db_url, ids)
            in_task = worker.log.run_seconds(ids)
        finally:
            submitter.close()
            worker.stop()
        return {"tasks": n, "submit_s": t1 - t0, "drain_s": t2 - t1, "total_s": t2 - t0, "tasks_per_s": n / (t2 - t0),
                "wall_s": t2 - t0, "cpu_s": cpu, **_in_task(in_task)}

    def drain(self, case: Case, n: int, tag: str = "drain") -> dict:
        """The worker side alone: n tasks wait in the queue before the worker starts; its ready
        line (the log's own time stamp) to queue empty."""
        self.queues.fresh()
        submitter = self.submitter(case)
        try:
            ids = submitter.many(n, self.args.chunk)
        finally:
            submitter.close()
        self.queues.wait_depth(n, f"{case.name}: backlog of {n}")
        worker = self.start_worker(case, tag)
        try:
            ready = worker.wait_ready()
            meter = self.cpu_meter(case, worker)
            cpu0, t_cpu0 = meter.snapshot(), time.time()
            t_empty = self.queues.wait_drained(f"{case.name}: backlog of {n}", worker, timeout=self.args.run_timeout)
            cpu = cpu_diff(meter.snapshot(), cpu0)
            check_succeeded(case.name, case.db_url, ids)
            worker.log.poll()
            done = sorted(t.done for i in ids if (t := worker.log.tasks.get(i)) and t.done)
            in_task = worker.log.run_seconds(ids)
        finally:
            worker.stop()
        steady = None
        if len(done) >= 20:  # the middle 80 % of the successes: no start-up, no tail
            lo, hi = done[len(done) // 10], done[len(done) * 9 // 10]
            steady = (len(done) * 9 // 10 - len(done) // 10) / (hi - lo) if hi > lo else None
        return {"tasks": n, "drain_s": t_empty - ready, "tasks_per_s": n / (t_empty - ready),
                "steady_tasks_per_s": steady, "wall_s": t_empty - t_cpu0, "cpu_s": cpu, **_in_task(in_task)}

    def counted(self, case: Case, mode: str) -> dict:
        """Steady load through the counting proxy: the worker runs, tasks arrive at --rate."""
        args = self.args
        self.queues.fresh()
        worker = self.start_worker(case, f"counted-{mode}", endpoint=self.proxy.sqs_endpoint("worker"),
                                   db_url=case.counted_worker_db)
        # submit_coalesced: single submit() calls whose caller lets them wait DELAY_LINGER to share a
        # SendMessageBatch, as `.delay()` on a configured app and the Django outbox do by default.
        linger = DELAY_LINGER if mode == "submit_coalesced" else None
        submitter = self.submitter(case, endpoint=self.proxy.sqs_endpoint("submit"), db_url=case.counted_submit_db,
                                   publish_linger=linger)
        chunk = args.counted_chunk if mode == "submit_many" else 1

        def submit(k: int) -> list[str]:
            return submitter.many(k, chunk) if mode == "submit_many" else [submitter.single() for _ in range(k)]

        try:
            worker.wait_ready()
            submit(WARM_UP_TASKS)
            self.queues.wait_drained(f"{case.name}: counted warm-up", worker)
            time.sleep(SETTLE)
            before, t0 = self.proxy.counts(), time.time()
            ids = paced(submit, args.counted_tasks, args.rate, chunk)
            t1 = time.time()
            t2 = self.queues.wait_drained(f"{case.name}: counted {mode}", worker, timeout=args.run_timeout)
            check_succeeded(case.name, case.db_url, ids)
            time.sleep(SETTLE)
            counts = count_diff(self.proxy.counts(), before)
        finally:
            submitter.close()
            worker.stop()
        if case.counted_worker_db:  # a side whose database bypassed the proxy would read as 0 round trips
            for side in ("worker", "submit"):
                if not any(k.startswith("pg ") for k in counts.get(side, {})):
                    raise BenchError(f"counted {mode}: no Postgres round trip of the {side} went through the proxy; "
                                     f"its database URL does not point at the proxy's {side} port")
        return {"mode": mode, "tasks": len(ids), "chunk": chunk, "rate": args.rate, "submit_s": t1 - t0,
                "publish_linger": getattr(submitter, "publish_linger", None),
                "total_s": t2 - t0, "tasks_per_s": len(ids) / (t2 - t0),
                "submit": counts.get("submit", {}), "worker": counts.get("worker", {})}

    def counted_reference(self) -> dict:
        """The emulator's floor for submit_many's traffic: harness.ReferenceConsumer and
        BatchSender (no product, no Celery) through the same proxy, at the same rate and chunk."""
        args = self.args
        self.queues.fresh()
        url = self.queues.url(ENV)
        consumer = ReferenceConsumer(self.proxy.sqs_endpoint("worker"), url.replace(
            self.emulator.endpoint, self.proxy.sqs_endpoint("worker"), 1), self.worker_conf["broker_transport_options"]
            ["wait_time_seconds"])
        sender = BatchSender(self.proxy.sqs_endpoint("submit"), url.replace(
            self.emulator.endpoint, self.proxy.sqs_endpoint("submit"), 1))
        try:
            sender.many(WARM_UP_TASKS)
            self.queues.wait_drained("reference consumer: warm-up")
            time.sleep(SETTLE)
            before, t0, receives0 = self.proxy.counts(), time.time(), len(consumer.received)
            ids = paced(sender.many, args.counted_tasks, args.rate, args.counted_chunk)
            t1 = time.time()
            t2 = self.queues.wait_drained("reference consumer", timeout=args.run_timeout)
            time.sleep(SETTLE)
            counts = count_diff(self.proxy.counts(), before)
            sizes = consumer.received[receives0:]
        finally:
            consumer.stop()
        return {"mode": "reference", "tasks": len(ids), "chunk": args.counted_chunk, "rate": args.rate,
                "submit_s": t1 - t0, "total_s": t2 - t0, "tasks_per_s": len(ids) / (t2 - t0),
                "messages_per_receive": {str(k): sizes.count(k) for k in sorted(set(sizes))},
                "submit": counts.get("submit", {}), "worker": counts.get("worker", {})}

    def latency(self, case: Case) -> dict:
        """One task at a time: submit, wait for its success line, LATENCY_GAP, the next one."""
        self.queues.fresh()
        worker = self.start_worker(case, "latency")
        submitter = self.submitter(case)
        samples: dict[str, list[float]] = {"call": [], "received": [], "started": [], "done": []}
        try:
            worker.wait_ready()
            for i in range(LATENCY_WARM_UP + self.args.latency_samples):
                time.sleep(LATENCY_GAP)
                t0 = time.time()
                task_id = submitter.single()
                t_call = time.time()
                times = worker.log.wait_done(task_id, timeout=60, proc=worker.proc)
                if i < LATENCY_WARM_UP:
                    continue
                samples["call"].append(t_call - t0)
                samples["done"].append(times.done - t0)
                if times.started is not None:
                    samples["started"].append(times.started - t0)
                if times.received is not None:
                    samples["received"].append(times.received - t0)
        finally:
            submitter.close()
            worker.stop()
        return {k: {"median_s": statistics.median(v), "p95_s": percentile(v, 95), "samples": len(v)}
                for k, v in samples.items() if v}

    def idle_start(self) -> None:
        """One idle worker per kind (plain, product) on the idle queues, counted through the
        proxy while the next parts run."""
        product = next((c for c in self.cases if c.name == "postgres"), None) or next(
            (c for c in self.cases if c.product), None)
        wanted = [c for c in self.cases if not c.product][:1] + ([product] if product else [])
        for case in wanted:
            label = "idle-plain" if not case.product else "idle-product"
            db = case.idle_db or case.db_url
            self.idle[case.name] = self.start_worker(case, "idle", endpoint=self.proxy.sqs_endpoint(label),
                                                     db_url=db, env=IDLE_ENV)
        for worker in self.idle.values():
            worker.wait_ready()
        time.sleep(self.args.idle_settle)
        self.idle_counts_before = self.proxy.counts()
        self.idle_window = (time.time(), 0.0)
        say(f"idle: {', '.join(self.idle)} worker(s) counted for {self.args.idle_seconds:.0f} s from now")

    def idle_finish(self) -> dict:
        start = self.idle_window[0]
        left = start + self.args.idle_seconds - time.time()
        if left > 0:
            say(f"idle: waiting {left:.0f} s more")
            time.sleep(left)
        end = time.time()
        counts = count_diff(self.proxy.counts(), self.idle_counts_before)
        out = {}
        for name, worker in self.idle.items():
            label = "idle-plain" if name == "plain" else "idle-product"
            if worker.proc.poll() is not None:
                raise BenchError(f"the idle {name} worker exited with code {worker.proc.returncode}; see "
                                 f"{worker.log_path}")
            events = sorted(t for t, _ in self.proxy.events(label) if start <= t < end)
            by_action = {k: v for k, v in counts.get(label, {}).items()}
            out[name] = {"window_s": end - start, "requests": len(events), "by_action": by_action,
                         "first_to_last_s": events[-1] - events[0] if len(events) > 1 else None,
                         "queues": 1,
                         "postgres": counts.get("idle", {}) if name != "plain" else {}}
            worker.stop()
        self.queues.fresh(IDLE_ENV)
        return out


def _in_task(seconds: list[float]) -> dict:
    if not seconds:
        return {"in_task_median_ms": None, "in_task_p95_ms": None}
    return {"in_task_median_ms": statistics.median(seconds) * 1000, "in_task_p95_ms": percentile(seconds, 95) * 1000}


def machine(emulator: Any) -> dict:
    import sqlite3

    import boto3
    import celery
    import kombu
    import psycopg
    import sqlalchemy

    pg_version = "?"
    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN_URL, connect_timeout=10) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]
    return {"nproc": os.cpu_count(), "python": platform.python_version(), "celery": celery.__version__,
            "kombu": kombu.__version__, "boto3": boto3.__version__, "sqlalchemy": sqlalchemy.__version__,
            "psycopg": psycopg.__version__, "sqlite": sqlite3.sqlite_version, "postgres": pg_version,
            "emulator": f"{emulator.kind} {emulator.version}", "load_average_at_start": os.getloadavg(),
            "runtime": environment_fingerprint()}


def product_settings(conf: dict) -> dict:
    """The delivery settings both apps run with (harness.product_worker_conf)."""
    options = conf.get("broker_transport_options", {})
    return {"prefetch_multiplier": conf.get("worker_prefetch_multiplier"),
            "acks_late": conf.get("task_acks_late"),
            "polling_interval": options.get("polling_interval"),
            "wait_time_seconds": options.get("wait_time_seconds"),
            "worker_concurrency": conf.get("worker_concurrency"),
            "product_only_options": {k: v for k, v in options.items() if k.startswith("pcelery")}}


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    results: dict[str, Any] = {"throughput": {}, "drain": {}, "ceiling": {}, "counted": {}, "idle": {},
                               "latency": {}, "phases_s": {}, "warm_up_tasks": WARM_UP_TASKS}
    with contextlib.ExitStack() as stack:
        bench = Bench(stack, args)
        bench.set_up()
        results["machine"] = machine(bench.emulator)
        results["settings"] = product_settings(bench.worker_conf)
        results["cases"] = {c.name: c.label for c in bench.cases}
        phase = time.time()
        for repeat in range(args.repeats):
            for case in bench.cases:
                timing = bench.end_to_end(case, args.tasks)
                results["throughput"].setdefault(case.name, []).append(timing)
                say(f"repeat {repeat + 1} {case.name} end to end: {timing['tasks_per_s']:.1f} tasks/s "
                    f"(submit {timing['submit_s']:.2f} s, drain {timing['drain_s']:.2f} s)")
            for case in bench.cases:
                timing = bench.drain(case, args.tasks)
                results["drain"].setdefault(case.name, []).append(timing)
                say(f"repeat {repeat + 1} {case.name} worker-only drain: {timing['tasks_per_s']:.1f} tasks/s "
                    f"({args.tasks} in {timing['drain_s']:.2f} s)")
        results["phases_s"]["throughput"] = time.time() - phase

        phase = time.time()
        for case in bench.cases:
            if case.product and args.ceiling_tasks:
                results["ceiling"][case.name] = timing = bench.drain(case, args.ceiling_tasks, tag="ceiling")
                say(f"ceiling {case.name}: {timing['tasks_per_s']:.1f} tasks/s ({args.ceiling_tasks} in "
                    f"{timing['drain_s']:.2f} s; steady {timing['steady_tasks_per_s'] or 0:.1f})")
        results["phases_s"]["ceiling"] = time.time() - phase

        phase = time.time()
        if args.idle_seconds:
            bench.idle_start()
        for case in bench.cases:
            modes = ["submit_many", "submit", "submit_coalesced"] if case.product else ["delay"]
            for mode in modes:
                key = f"{case.name}: {mode}"
                results["counted"][key] = counted = bench.counted(case, mode)
                say(f"counted {key}: submit {json.dumps(counted['submit'])} worker {json.dumps(counted['worker'])}")
        if any(c.product for c in bench.cases):
            results["counted"]["reference: batch"] = counted = bench.counted_reference()
            say(f"counted reference consumer: submit {json.dumps(counted['submit'])} worker "
                f"{json.dumps(counted['worker'])}; messages per receive {counted['messages_per_receive']}")
        results["phases_s"]["counted"] = time.time() - phase

        phase = time.time()
        for case in bench.cases:
            if case.name == "plain_tuned":  # one task at a time: prefetch does not matter
                continue
            results["latency"][case.name] = lat = bench.latency(case)
            say(f"latency {case.name}: done median {lat['done']['median_s'] * 1000:.1f} ms, "
                f"p95 {lat['done']['p95_s'] * 1000:.1f} ms")
        results["phases_s"]["latency"] = time.time() - phase
        if args.idle_seconds:
            phase = time.time()
            results["idle"] = bench.idle_finish()
            results["phases_s"]["idle (beyond the parts it overlapped)"] = time.time() - phase
            say(f"idle: {json.dumps({k: (v['requests'], round(v['window_s'])) for k, v in results['idle'].items()})}")
    results["elapsed_s"] = time.time() - started
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    say("phases: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["phases_s"].items()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sqs", choices=("localstack", "moto"), default="localstack",
                        help="the SQS emulator (default localstack; moto's receive and send slow down with queue "
                             "depth, so its backlog figures measure moto)")
    parser.add_argument("--cases", default="plain,plain_tuned,postgres",
                        help="comma-separated, from plain, plain_tuned (plain Celery at the product's prefetch "
                             "multiplier, a second baseline), postgres, sqlite (default plain,plain_tuned,postgres)")
    parser.add_argument("--tasks", type=int, default=1000,
                        help="tasks per end-to-end run and per worker-only drain (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="throughput repeats per case (default 3)")
    parser.add_argument("--ceiling-tasks", type=int, default=3000,
                        help="backlog of the product's ceiling run (default 3000; 0 skips it)")
    parser.add_argument("--counted-tasks", type=int, default=500, help="tasks per counted run (default 500)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="tasks/s the counted runs submit at: the steady load, below one worker's rate before "
                             "issue 9 (default 50)")
    parser.add_argument("--counted-chunk", type=int, default=10,
                        help="tasks per submit_many transaction in the counted runs (default 10: one "
                             "SendMessageBatch every chunk/rate seconds, a steady stream rather than bursts)")
    parser.add_argument("--chunk", type=int, default=100,
                        help="tasks per submit_many transaction (default 100); plain submits one .delay() each")
    parser.add_argument("--idle-seconds", type=float, default=120.0,
                        help="how long the idle workers are counted (default 120; 0 skips it)")
    parser.add_argument("--idle-settle", type=float, default=5.0,
                        help="seconds after the idle workers' ready lines before counting starts (default 5)")
    parser.add_argument("--latency-samples", type=int, default=50, help="light-load samples per case (default 50)")
    parser.add_argument("--publish-linger", type=float, default=None,
                        help="Outbox.from_settings(publish_linger=...) for the product's submitter (default: not "
                             "passed, the product's default)")
    parser.add_argument("--concurrency", type=int, default=CATALOG.get(QUEUE).concurrency,
                        help="worker pool size for every case (default: the catalog's, %(default)s, what "
                             "pcelery-worker uses)")
    parser.add_argument("--plain-prefetch-multiplier", type=int, default=1,
                        help="plain Celery's prefetch multiplier (default 1: plain Celery on SQS with late acks "
                             "as the product ran before issue 9 and as the issue's baseline measured it, since "
                             "without a visibility keeper a prefetched message can outlive its visibility "
                             "timeout; 0: the product's own multiplier)")
    parser.add_argument("--run-timeout", type=float, default=600.0, help="longest one run may take (default 600 s)")
    parser.add_argument("--label", default="",
                        help="what this run measures, e.g. 'before: runtime at f7cf40b' (written into RESULTS.md)")
    parser.add_argument("--results", default=str(REPO_ROOT / "bench" / "RESULTS.md"),
                        help="where the report goes (default bench/RESULTS.md; '-' writes none)")
    parser.add_argument("--baseline", default=str(REPO_ROOT / "bench" / "baseline.json"),
                        help="figures of an earlier run, shown as 'before' (default bench/baseline.json)")
    parser.add_argument("--save-baseline", action="store_true",
                        help="write this run's figures to --baseline (this run becomes the 'before')")
    parser.add_argument("--json", type=Path, default=LOG_DIR / "results.json",
                        help="raw results (default var/bench/results.json)")
    args = parser.parse_args(argv)
    if min(args.tasks, args.repeats, args.counted_tasks, args.latency_samples, args.concurrency, args.chunk,
           args.counted_chunk) < 1:
        parser.error("--tasks, --repeats, --counted-tasks, --latency-samples, --concurrency, --chunk and "
                     "--counted-chunk must be at least 1")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    cases = {c.strip() for c in args.cases.split(",")} - {""}
    if cases - {"plain", "plain_tuned", "postgres", "sqlite"} or "plain" not in cases:
        parser.error(f"--cases: plain plus any of plain_tuned, postgres, sqlite (got {args.cases!r})")

    def on_sigterm(signum, _frame):
        raise KeyboardInterrupt  # unwinds the ExitStack: every process stopped, the database dropped

    signal.signal(signal.SIGTERM, on_sigterm)
    command = "python -m bench.run" + ("" if argv is None and len(sys.argv) == 1 else
                                       " " + subprocess.list2cmdline(sys.argv[1:] if argv is None else argv))
    try:
        results = run(args)
    except KeyboardInterrupt:
        say("interrupted: stopped every process this bench started")
        return 130
    except (BenchError, OSError) as exc:
        say(f"bench failed: {exc}")
        return 1
    except Exception as exc:
        import psycopg

        if isinstance(exc, psycopg.OperationalError):
            say(f"bench failed: cannot reach Postgres at {PG_ADMIN_URL} ({str(exc).strip().splitlines()[0]}): "
                "start it, or point PCELERY_TEST_PG at an admin URL of one that may CREATE DATABASE")
            return 1
        raise
    results["parameters"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["command"] = command
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    baseline_path = Path(args.baseline)
    baseline = None
    if args.save_baseline:
        baseline_path.write_text(json.dumps(report.baseline_figures(results), indent=2) + "\n")
        say(f"baseline written to {baseline_path}")
    elif baseline_path.exists():
        baseline = json.loads(baseline_path.read_text())
    text = report.render(results, baseline=baseline, is_baseline=args.save_baseline)
    print(report.tables(results, baseline=baseline))
    if args.results != "-":
        Path(args.results).write_text(text)
        say(f"report written to {args.results}")
    say(f"done in {results['elapsed_s']:.0f} s; raw results in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
