"""The store across processes: the claim race between forked processes, and `pcelery-migrate`
(the console script the image's migrate containers run)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from conftest import new_task

from devstack.stack import free_port
from pcelery import schema, store


def _run_store_cli(environ, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DB_HOST")}
    env.update(environ)
    # From another directory than the repository's: the console script stands alone.
    return subprocess.run([str(Path(sys.executable).parent / "pcelery-migrate")], cwd=tmp_path or "/", env=env,
                          check=False, capture_output=True, text=True, timeout=60)


def test_migrate_cli_applies_then_reports_current(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    first = _run_store_cli({"DATABASE_URL": url})
    assert first.returncode == 0, first.stderr
    assert "applied 1: create table pcelery_tasks" in first.stderr
    second = _run_store_cli({"DATABASE_URL": url})
    assert second.returncode == 0, second.stderr
    assert f"schema is current (version {schema.LATEST_SCHEMA_VERSION})" in second.stderr
    assert "applied" not in second.stderr


def test_migrate_cli_unreachable_database_exits_2_with_one_line():
    url = f"postgresql+psycopg://postgres:secret@127.0.0.1:{free_port()}/nothing"
    done = _run_store_cli({"DATABASE_URL": url})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("pcelery-migrate: error: cannot reach the database at "
                              "postgresql+psycopg://postgres:***@127.0.0.1:")
    assert "secret" not in done.stderr


def test_migrate_cli_bad_settings_exits_2():
    done = _run_store_cli({"PCELERY_ENV": "qa"})
    assert done.returncode == 2
    assert "unknown environment 'qa'" in done.stderr


def _claim_all(args):
    url, worker, task_ids, barrier = args
    eng = schema.make_engine(url)
    try:
        barrier.wait(timeout=60)
        return [(tid, store.claim(eng, tid, worker=worker, lease_seconds=60).outcome) for tid in task_ids]
    finally:
        eng.dispose()


def test_racing_processes_claim_each_task_exactly_once(engine, db_url):
    task_ids = [new_task(engine) for _ in range(40)]
    engine.dispose()  # no pooled connection crosses the fork
    ctx = multiprocessing.get_context("fork")
    workers = 3
    barrier = ctx.Manager().Barrier(workers)
    orders = [task_ids, list(reversed(task_ids)), task_ids[20:] + task_ids[:20]]
    with ctx.Pool(workers) as pool:
        results = pool.map(_claim_all, [(db_url, f"w{i}", orders[i], barrier) for i in range(workers)])
    outcomes: dict[str, list[str]] = {}
    for per_worker in results:
        for tid, outcome in per_worker:
            outcomes.setdefault(tid, []).append(outcome)
    for tid in task_ids:
        assert sorted(outcomes[tid]) == ["busy", "busy", "run"], (tid, outcomes[tid])
    assert store.count_by_state(engine)["running"] == len(task_ids)
    assert {r.attempts for r in store.list_tasks(engine, state="running")} == {1}
