"""The detached local stack behind `python -m ops local up|down|status|seed|demo`, to practise
the runbook on. Functions return data; progress goes to the `ops` logger; the ops CLI renders
the data (pcelery.ops.render).

`up` starts a moto server, creates the DEMO_CATALOG queues (env local), migrates a SQLite store
under the state directory (PCELERY_LOCAL_DIR, default ./var/local), starts a worker and the
outbox relay, and records what it started in stack.json there; the CLI prints `export` lines for
`eval "$(python -m ops local up)"`. `down` stops exactly the processes recorded there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

from pcelery.settings import local_dir

from . import DEMO_CATALOG, DEMO_CATALOG_SPEC
from . import stack as local_stack

log = logging.getLogger("ops")

STACK_DIR = local_dir()
STACK_FILE = STACK_DIR / "stack.json"
# What each recorded process's command line must contain, so `down` never signals a pid that
# has since been reused by something else.
SIGNATURES = {"moto": "moto.server", "worker": "celery", "relay": "pcelery-relay"}


class NotUp(Exception):
    """The local stack is not running (seed needs it)."""


def _say(text: str) -> None:
    log.info("%s", text)


def _alive(name: str, pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    sig = SIGNATURES.get(name)
    return sig is None or sig in cmdline or "python" in cmdline


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
        return True
    except OSError:
        return False


def read_stack() -> dict | None:
    try:
        return json.loads(STACK_FILE.read_text())
    except (OSError, ValueError):
        return None


def status() -> dict:
    stack = read_stack()
    if not stack:
        return {"up": False, "stack_file": str(STACK_FILE), "processes": {}}
    procs = {name: {"pid": pid, "alive": _alive(name, pid)} for name, pid in stack["pids"].items()}
    up = all(p["alive"] for p in procs.values()) and _answers(stack["endpoint"])
    return {"up": up, "stack_file": str(STACK_FILE), "endpoint": stack["endpoint"],
            "database_url": stack["database_url"], "processes": procs, "environ": stack["environ"]}


def up() -> dict:
    from pcelery.schema import make_engine, migrate

    from . import tasks as demo_tasks

    current = status()
    if current["up"]:
        _say(f"local stack already up ({current['endpoint']}); `python -m ops local down` stops it")
        return current
    if read_stack():
        _say("a previous local stack is partly down: stopping what is left of it first")
        down()
    STACK_DIR.mkdir(parents=True, exist_ok=True)
    logs = {name: open(STACK_DIR / f"{name}.log", "ab") for name in ("moto", "worker", "relay")}  # noqa: SIM115 - closed below
    pids: dict[str, int] = {}
    try:
        server = local_stack.start_moto_server(log=logs["moto"])
        pids["moto"] = server.process.pid
        local_stack.create_queues(local_stack.sqs_client(server.endpoint), DEMO_CATALOG, "local")
        # moto keeps its queues in memory, so a new stack starts with empty queues; rows left in an
        # old store would name messages that exist nowhere. Start the store afresh with them.
        db_file = STACK_DIR / "tasks.sqlite3"
        for leftover in (db_file, db_file.with_name(db_file.name + "-wal"), db_file.with_name(db_file.name + "-shm")):
            leftover.unlink(missing_ok=True)
        database_url = f"sqlite:///{db_file}"
        engine = make_engine(database_url)
        migrate(engine)
        demo_tasks.migrate(engine)  # the demo tasks keep their effects in a table of their own
        engine.dispose()
        environ = local_stack.local_environ(server.endpoint, database_url, catalog_spec=DEMO_CATALOG_SPEC)
        pids["worker"] = local_stack.start_worker(environ, log=logs["worker"]).pid
        pids["relay"] = local_stack.start_relay(environ, log=logs["relay"]).pid
        stack = {"endpoint": server.endpoint, "database_url": database_url, "pids": pids, "environ": environ,
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        STACK_FILE.write_text(json.dumps(stack, indent=2))
    except Exception:
        for name, pid in pids.items():
            _stop(name, pid)
        raise
    finally:
        for f in logs.values():
            f.close()
    _say(f"local stack up: SQS {server.endpoint}, store {database_url}, logs in {STACK_DIR}")
    return status()


def _stop(name: str, pid: int, timeout: float = 20.0) -> bool:
    if not _alive(name, pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)  # each was started in its own session: stop its children too
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(name, pid):
        time.sleep(0.2)
    if _alive(name, pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


def down() -> dict:
    stack = read_stack()
    if not stack:
        _say("local stack is not up: nothing to stop")
        return {"stopped": []}
    stopped = []
    # Workers and relay first, so they do not log connection errors while moto goes away.
    for name in sorted(stack["pids"], key=lambda n: n == "moto"):
        if _stop(name, stack["pids"][name]):
            stopped.append(name)
    STACK_FILE.unlink(missing_ok=True)
    _say(f"local stack down (stopped: {', '.join(stopped) or 'nothing was running'})")
    return {"stopped": stopped}


# What `seed` submits to the running stack: work that succeeds, work that fails until the DLQ,
# and work that fails once and then succeeds, so every runbook procedure has something to act on.
SEED = (("demo.add", 5), ("demo.always_fail", 3), ("demo.flaky", 2))


def seed() -> dict:
    """Submit demo tasks to the running stack through the outbox, as application code does."""
    from pcelery.outbox import Outbox
    from pcelery.settings import Settings

    stack = read_stack()
    if not stack or not status()["up"]:
        raise NotUp("the local stack is not up: run `eval \"$(python -m ops local up)\"` first")
    box = Outbox.from_settings(Settings.from_env({**os.environ, **stack["environ"]}))
    ids: list[str] = []
    with box.transaction() as conn:
        for task_name, count in SEED:
            for i in range(count):
                args: tuple[object, ...]
                if task_name == "demo.add":
                    args = (i, 1)
                elif task_name == "demo.always_fail":
                    args = (f"payment API down (seed {i})",)
                else:
                    args = (f"seed-{time.time_ns()}-{i}",)
                ids.append(box.submit(conn, task_name, *args))
    box.engine.dispose()
    return {"task_ids": ids, "by_task": dict(SEED)}


def demo_command() -> tuple[list[str], dict[str, str]]:
    """The command and environment of the self-contained product demo (`make demo`). The stack's
    exports must not leak into it, or it would mix its rows into the stack's database."""
    stack = read_stack() or {}
    drop = set(stack.get("environ", {})) | {"AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL", "DATABASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return [sys.executable, "-m", "devstack.demo"], env
