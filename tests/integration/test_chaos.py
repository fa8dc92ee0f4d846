"""A scaled-down chaos run: 300 tasks through two workers and a relay while pool children and
whole workers are SIGKILLed, SQS answers 503 and then hangs, the store refuses connections,
tasks fail transiently, poison arrives and a task is dead-lettered by a bug until a "deploy"
fixes it and the DLQ is redriven. At the end: nothing lost, no transactional effect twice,
only the poison in the DLQ, every worker restart accounted for.

Faults go through real sockets (FaultProxy in front of moto and Postgres); the test's own
submits and checks talk to both directly, like an application whose network is fine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import pytest
from conftest import REPO, LocalEnv, proxied_env, wait_for

from devstack import DEMO_CATALOG
from devstack.stack import sqs_client
from devstack.tasks import effect_count
from pcelery import store
from pcelery.outbox import Outbox


@pytest.fixture
def chaos(moto_server, tmp_path):
    with proxied_env(moto_server, "prod", tmp_path, db_prefix="pcelery_chaos") as parts:
        yield parts


def _running_child(env: LocalEnv, ids: list[str]) -> int | None:
    for task_id in ids:
        row = env.row(task_id)
        if row and row.state == "running" and row.worker:
            return int(row.worker.rsplit(":", 1)[1])
    return None


def test_chaos_run_loses_nothing_doubles_nothing_and_dead_letters_only_poison(chaos, tmp_path):
    env, sqs_proxy, pg_proxy = chaos
    run = uuid.uuid4().hex[:6]
    bug = tmp_path / "bug-deployed"
    bug.write_text("the bug")
    faults: list[tuple[str, str]] = []  # (fault, what it hit): the run's fault table
    workers = {"a": env.worker("a", concurrency=2), "b": env.worker("b", concurrency=2)}
    for w in workers.values():
        w.wait_ready()
    env.relay(interval=1.0, min_age=2.0)

    # A submitter whose SQS calls go through the proxy too: during an SQS fault its rows stay
    # pending and the relay publishes them afterwards.
    proxied_outbox = Outbox(env.engine, DEMO_CATALOG, "prod", sqs_client(sqs_proxy.url))

    def submit_batch(n: int, tag: str, outbox: Outbox = env.outbox) -> list[str]:
        keys = [f"{tag}-{run}-{i}" for i in range(n)]
        with outbox.transaction() as conn:
            return outbox.submit_many(conn, [("demo.effect", [k], {}) for k in keys])

    effect_ids = submit_batch(120, "effect")
    flaky = [env.submit("demo.flaky", f"flaky-{run}-{i}", 1) for i in range(20)]
    slow = [env.submit("demo.slow", f"slow-{run}-{i}", 2.0) for i in range(10)]
    fixable = [env.submit("demo.until_fixed", f"fixable-{run}-{i}", str(bug)) for i in range(5)]
    poison = [f"poison-{run}-{i}" for i in range(5)]
    for body in poison:
        env.send_raw("default", body)

    # 1. A pool child SIGKILLed mid-task.
    child = wait_for(lambda: _running_child(env, slow), timeout=60, what="a slow task running")
    os.kill(child, signal.SIGKILL)
    faults.append(("SIGKILL of a pool child", f"pid {child}"))

    # 2. SQS answers 503, then hangs, with tasks in flight.
    with sqs_proxy.fault("http", 503):
        during_503 = submit_batch(30, "during-503", proxied_outbox)
        assert {env.row(t).state for t in during_503} == {"pending"}  # left for the relay
        effect_ids += during_503
        time.sleep(5)
    faults.append(("SQS HTTP 503", "5 s"))
    with sqs_proxy.fault("hang"):
        time.sleep(5)
    faults.append(("SQS hanging", "5 s"))

    def kill_and_replace(name: str) -> None:
        os.killpg(workers[name].proc.pid, signal.SIGKILL)  # a lost container: main process and pool
        workers[name].stop()
        faults.append(("SIGKILL of a worker's main process and pool", f"worker {name}"))
        workers[f"{name}2"] = env.worker(f"{name}2", concurrency=2)
        workers[f"{name}2"].wait_ready()

    # 3. A whole worker SIGKILLed while tasks run, and a new one started.
    wait_for(lambda: _running_child(env, slow + effect_ids), timeout=60, what="tasks running")
    kill_and_replace("b")

    # 4. The store refuses connections for 20 s; submits carry on.
    with pg_proxy.fault("refuse"):
        effect_ids += submit_batch(60, "during-store-outage")
        time.sleep(20)
    faults.append(("store refusing connections", "20 s"))

    # 5. The other worker SIGKILLed too, and replaced.
    kill_and_replace("a")
    effect_ids += submit_batch(50, "after")

    total = len(effect_ids) + len(flaky) + len(slow) + len(fixable) + len(poison)
    assert total == 300
    healthy = effect_ids + flaky + slow
    env.wait_rows(healthy, "succeeded", timeout=300)
    env.wait_rows(fixable, "dead", timeout=180)

    # 6. The fix is deployed and the DLQ redriven: the fixed tasks run, the poison goes back.
    bug.unlink()
    wait_for(lambda: env.depth("default", dlq=True) == len(fixable) + len(poison), timeout=120,
             what="the fixable tasks and the poison in the DLQ", logs=env.logs())
    redrive = subprocess.run([sys.executable, "-m", "ops", "redrive", "default-dlq", "--yes", "-o", "json",
                              "--endpoint-url", env.endpoint],  # env prod on moto: named, not inherited
                             cwd=REPO, env={**env.environ}, capture_output=True, text=True, timeout=120, check=False)
    assert redrive.returncode == 0, redrive.stderr
    assert json.loads(redrive.stdout)["moved"] == len(fixable) + len(poison)
    env.wait_rows(fixable, "succeeded", timeout=120)
    wait_for(lambda: env.depth("default", dlq=True) == len(poison) and env.depth("default") == 0, timeout=120,
             what="only the poison back in the DLQ", logs=env.logs())

    states = Counter(env.row(t).state for t in healthy + fixable)
    keys = ([f"effect-{run}-{i}" for i in range(120)] + [f"during-503-{run}-{i}" for i in range(30)]
            + [f"during-store-outage-{run}-{i}" for i in range(60)] + [f"after-{run}-{i}" for i in range(50)]
            + [f"flaky-{run}-{i}" for i in range(20)] + [f"slow-{run}-{i}" for i in range(10)]
            + [f"fixable-{run}-{i}" for i in range(5)])
    doubled = {k: n for k in keys if (n := effect_count(env.engine, k)) != 1}
    dlq = set(env.dlq_bodies("default"))
    print("\nchaos fault table:", *(f"  {fault}: {what}" for fault, what in faults), sep="\n")
    lost = len(healthy) + len(fixable) - states["succeeded"]
    print(f"tasks {total}, succeeded {states['succeeded']}, lost {lost}, doubled {len(doubled)}, in the DLQ "
          f"{len(dlq)} (the poison), worker restarts {sum(name.endswith('2') for name in workers)}")
    assert states == {"succeeded": len(healthy) + len(fixable)}, states
    assert doubled == {}, f"effects not exactly once: {doubled}"
    assert dlq <= set(poison) and env.depth("default", dlq=True) == len(poison)
    assert all(w.alive() for name, w in workers.items() if name in ("a2", "b2"))
    assert store.count_by_state(env.engine)["dead"] == 0
