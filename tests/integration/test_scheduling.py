"""Scheduling beyond SQS's limits, with real processes: countdowns longer than SQS's 15-minute
delay held in the store and published by the relays when due, retries after a backoff instead of a
visibility timeout, dead-lettering without spending the remaining receives, and periodic schedules
submitted once per slot by several `pcelery-scheduler` processes. moto server, the real Postgres,
DEMO_CATALOG timings (default queue: visibility 8 s, 3 receives, max_countdown 30 days)."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import re
import signal
import subprocess
import textwrap
import time

import pytest
import sqlalchemy as sa
from conftest import LocalEnv, Process, make_pg_database, reset_moto, run_console_script, wait_for

from devstack.stack import console_script
from devstack.tasks import effect_rows
from pcelery import schema, store
from pcelery.messages import decode_body
from pcelery.scheduler import Schedule

DAY = 86400


@pytest.fixture
def env(moto_server, tmp_path):
    reset_moto(moto_server.endpoint)
    e = LocalEnv(moto_server.endpoint, make_pg_database("scheduling"), "dev", tmp_path).migrate()
    yield e
    e.close()


def set_due(env: LocalEnv, ids: list[str], seconds_from_now: float) -> None:
    """Time passes: the rows fall due `seconds_from_now` from now (the relays read due_at)."""
    with env.engine.begin() as conn:
        conn.execute(sa.update(schema.tasks).where(schema.tasks.c.id.in_(ids))
                     .values(due_at=store.utcnow() + dt.timedelta(seconds=seconds_from_now)))


def test_a_long_countdown_waits_in_the_store_and_several_relays_publish_it_once_when_due(env):
    ids = [env.submit("demo.effect", f"later-{i}", countdown=20 * DAY) for i in range(3)]
    cancelled = env.submit("demo.effect", "never", countdown=20 * DAY)
    rows = [env.row(i) for i in ids]
    assert {r.state for r in rows} == {"scheduled"} and env.depth("default") == 0
    assert all(abs((r.due_at - r.created_at).total_seconds() - 20 * DAY) < 1 for r in rows)
    listed = run_console_script("pcelery-ops", "tasks", "--state", "scheduled", "--output", "json",
                                "--endpoint-url", env.endpoint, env=env.environ)
    assert listed.returncode == 0, listed.stderr
    shown = {t["id"]: t for t in json.loads(listed.stdout)}
    assert set(shown) == {*ids, cancelled} and all(shown[i]["due_at"] for i in ids)
    table = ops(env, "tasks", "--state", "scheduled")
    assert table.returncode == 0 and " DUE " in table.stdout.splitlines()[0] and "in 19d23h" in table.stdout
    # Cancelled before it is due, through the on-call CLI: it never runs.
    dry = ops(env, "cancel", cancelled, "--dry-run", "--output", "json")
    assert json.loads(dry.stdout)["cancelled"] == [cancelled] and env.row(cancelled).state == "scheduled"
    assert ops(env, "cancel", cancelled).returncode == 7  # no terminal to confirm on, no --yes
    done = ops(env, "cancel", cancelled, "--yes")
    assert done.returncode == 0 and f"cancelled 1 task: they will not run\n  {cancelled}" in done.stdout

    worker = env.worker("a", queues=["default"], concurrency=2).wait_ready()
    relays = [env.relay(f"relay-{n}", interval=0.3, min_age=0) for n in range(3)]
    set_due(env, ids, 905)  # beyond SQS's delay: still the store's to hold
    time.sleep(2)
    assert {env.row(i).state for i in ids} == {"scheduled"} and env.depth("default") == 0
    for relay in relays:  # the rows survive the relays going away
        relay.stop()
    relays = [env.relay(f"relay-again-{n}", interval=0.3, min_age=0) for n in range(3)]

    set_due(env, ids, 4)  # within SQS's delay: published now, released by SQS when due
    due = {i: env.row(i).due_at for i in ids}
    env.wait_rows(ids, "succeeded", timeout=60)
    log = worker.log.read_text(errors="replace")
    for n, task_id in enumerate(ids):
        assert len(re.findall(rf"demo\.effect\[{task_id}\] received", log)) == 1  # published once
        [effect] = effect_rows(env.engine, f"later-{n}")
        started = (effect["created_at"] - due[task_id]).total_seconds()
        assert -1.5 <= started <= 10, f"started {started:+.1f} s from its due time"
    assert env.row(cancelled).state == "cancelled" and effect_rows(env.engine, "never") == []
    # A task that ran, or an id without a row, is not cancelled, and the exit code says so.
    late = ops(env, "cancel", ids[0], "--yes")
    assert late.returncode == 8 and f"not cancelled {ids[0]}: it is succeeded already" in late.stdout
    assert ops(env, "cancel", "no-such-task", "--yes").returncode == 3
    for relay in relays:
        relay.stop()


def ops(env: LocalEnv, *args: str, environ: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """pcelery-ops against this env's moto server (named: env dev is a deployed env) and store."""
    proc = run_console_script("pcelery-ops", *args, "--endpoint-url", env.endpoint,
                              env={**env.environ, "COLUMNS": "120", **(environ or {})})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_a_retryable_failure_comes_back_after_its_backoff_and_the_row_keeps_each_error(env):
    env.worker("a", queues=["default"], concurrency=2).wait_ready()
    retried = env.submit("demo.retry_backoff", "flaky", failures=1)
    row = env.wait_rows([retried], "succeeded", timeout=60)[0]
    [first_error] = row.attempt_errors
    assert (row.attempts, first_error["attempt"]) == (2, 1)
    assert first_error["error"].startswith("TimeoutError: flaky: failing on purpose")
    [effect] = effect_rows(env.engine, "flaky")
    waited = (effect["created_at"] - dt.datetime.fromisoformat(first_error["at"].replace("Z", "+00:00")))
    # Back after its 1-2 s backoff (plus a receive), not after the 8 s visibility timeout.
    assert waited.total_seconds() < 6, waited


def test_a_failure_the_policy_does_not_retry_is_dead_at_once_and_sent_to_the_dlq(env):
    env.worker("a", queues=["default"], concurrency=2).wait_ready()
    wrong = env.submit("demo.retry_backoff", "wrong", failures=5, error="value")
    exhausted = env.submit("demo.retry_backoff", "exhausted", failures=5)
    dead = env.wait_rows([wrong, exhausted], "dead", timeout=60)
    # ValueError is not retried: one attempt. TimeoutError is, up to max_attempts=2, which is below
    # the queue's 3 receives: the worker dead-letters it rather than wait for the third.
    assert [(r.attempts, len(r.attempt_errors)) for r in dead] == [(1, 1), (2, 2)]
    assert dead[0].error.startswith("ValueError: wrong")
    wait_for(lambda: env.depth("default", dlq=True) == 2, timeout=30, what="both in the DLQ", logs=env.logs())
    wait_for(lambda: env.depth("default") == 0, timeout=5, what="the originals acked", logs=env.logs())
    assert sorted(decode_body(b).task_id for b in env.dlq_bodies("default")) == sorted([wrong, exhausted])


# --- periodic schedules -------------------------------------------------------------------------

SCHEDULES = """
from pcelery.scheduler import Schedule

SCHEDULES = [
    Schedule(name="tick", task="demo.add", every=1, args=(1, 2)),
    Schedule(name="tick-skip", task="demo.add", every=1, args=(3, 4), grace=2),
    Schedule(name="tick-catch-up", task="demo.add", every=1, args=(5, 6), missed="catch_up"),
]
"""


def start_scheduler(env: LocalEnv, name: str) -> Process:
    environ = {**os.environ, **env.environ, "PCELERY_SCHEDULES": "test_schedules:SCHEDULES",
               "PYTHONPATH": f"{env.tmp}{os.pathsep}{env.environ['PYTHONPATH']}"}
    p = Process(env.tmp / f"{name}.log", lambda log: subprocess.Popen(
        [console_script("pcelery-scheduler")], env=environ, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True))
    env.processes.append(p)
    return p


def slots_submitted(env: LocalEnv, schedule: Schedule) -> list[dt.datetime]:
    """The schedule's slots that have a task row, found from the slot-derived ids."""
    with env.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.tasks.c.id, schema.tasks.c.created_at)).all()
    if not rows:
        return []
    ids = {r.id for r in rows}
    first = min(r.created_at for r in rows) - dt.timedelta(seconds=5)
    slots, slot = [], schedule.next_after(first)
    while slot <= store.utcnow():
        if schedule.task_id(slot) in ids:
            slots.append(slot)
        slot = schedule.next_after(slot)
    return slots


def test_three_schedulers_submit_every_slot_exactly_once(env):
    (env.tmp / "test_schedules.py").write_text(textwrap.dedent(SCHEDULES))
    tick = Schedule(name="tick", task="demo.add", every=1, args=(1, 2))
    schedulers = [start_scheduler(env, f"scheduler-{n}") for n in range(3)]
    wait_for(lambda: all("scheduler started" in p.log.read_text(errors="replace") for p in schedulers),
             timeout=60, what="three schedulers started", logs=[p.log for p in schedulers])
    time.sleep(40)
    for p in schedulers:
        assert p.stop() == 0
    slots = slots_submitted(env, tick)
    assert len(slots) >= 35
    # Contiguous: no slot missed between the first and the last...
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(slots)), slots
    # ...and each published once: one message per slot in the queue, no other.
    bodies = env.drain_bodies(env.url("default"), expected=10**6, deadline_s=15)
    tick_ids = [decode_body(b).task_id for b in bodies if decode_body(b).task_id in {tick.task_id(s) for s in slots}]
    assert sorted(tick_ids) == sorted(tick.task_id(s) for s in slots)
    [state] = [s for s in store.schedule_states(env.engine).values() if s.name == "tick"]
    assert state.last_slot == slots[-1] and state.next_slot == slots[-1] + dt.timedelta(seconds=1)

    # On-call sees each schedule with its last and next run.
    declared = {"PCELERY_SCHEDULES": "test_schedules:SCHEDULES",
                "PYTHONPATH": f"{env.tmp}{os.pathsep}{env.environ['PYTHONPATH']}"}
    listed = json.loads(ops(env, "schedules", "--output", "json", environ=declared).stdout)
    assert [v["name"] for v in listed] == ["tick", "tick-skip", "tick-catch-up"]
    tick_view = listed[0]
    assert (tick_view["task"], tick_view["when"], tick_view["missed"]) == ("demo.add", "every 1s", "skip")
    assert tick_view["last_slot"] == slots[-1].isoformat().replace("+00:00", "Z")
    assert tick_view["last_task_id"] == tick.task_id(slots[-1]) and tick_view["last_task_state"] == "queued"
    assert dt.datetime.fromisoformat(tick_view["next_slot"]) > store.utcnow() - dt.timedelta(seconds=2)
    table = ops(env, "schedules", environ=declared).stdout
    assert table.splitlines()[0].split() == ["SCHEDULE", "TASK", "WHEN", "LAST", "RUN", "LAST", "STATE", "NEXT",
                                             "RUN"]
    assert re.search(r"^tick +demo\.add +every 1s +\d+s ago +queued +in \d+s$", table, re.M), table
    # Without the code's schedules: the store's record alone, each marked as not declared.
    bare = ops(env, "schedules", environ={"PCELERY_SCHEDULES": ""})
    assert bare.returncode == 0 and "showing the store's record alone" in bare.stderr
    assert re.search(r"^tick +\(not declared\)", bare.stdout, re.M), bare.stdout
    wrong = ops(env, "schedules", "--schedules", "nowhere:SCHEDULES")
    assert wrong.returncode == 2 and "--schedules='nowhere:SCHEDULES' cannot be loaded" in wrong.stderr


def test_a_restarted_scheduler_skips_or_catches_up_the_slots_it_missed(env):
    (env.tmp / "test_schedules.py").write_text(textwrap.dedent(SCHEDULES))
    skip = Schedule(name="tick-skip", task="demo.add", every=1, args=(3, 4), grace=2)
    catch_up = Schedule(name="tick-catch-up", task="demo.add", every=1, args=(5, 6), missed="catch_up")
    first = start_scheduler(env, "scheduler-1")
    wait_for(lambda: len(slots_submitted(env, skip)) >= 4, timeout=60, what="a few slots", logs=[first.log])
    first.stop(signal.SIGKILL)
    killed_at = store.utcnow()
    time.sleep(8)
    second = start_scheduler(env, "scheduler-2")
    wait_for(lambda: (slots_submitted(env, skip) or [killed_at])[-1] > killed_at + dt.timedelta(seconds=12),
             timeout=60, what="slots after the restart", logs=[second.log])
    second.stop()

    caught_up = slots_submitted(env, catch_up)
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(caught_up))
    skipped = slots_submitted(env, skip)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(skipped) if (b - a).total_seconds() > 1]
    assert len(gaps) == 1 and gaps[0] >= 5, gaps  # the downtime, less the 2 s grace
    assert "missed slot(s) skipped (missed='skip')" in second.log.read_text(errors="replace")
