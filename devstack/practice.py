"""The detached local stack behind `python -m ops local up|down|status|seed|deploy|demo`, to
practise the runbook on. Functions return data; progress goes to the `ops` logger; the ops CLI
renders the data (pcelery.ops.render).

`up` starts a moto server, creates the DEMO_CATALOG queues (env local), migrates a SQLite store
under the state directory, starts a worker and the outbox relay, and records what it started in
stack.json there; the CLI prints `export` lines for `eval "$(python -m ops local up)"`. Each
process runs under devstack.supervise, which records its exit code, signal and time, so `status`
and `down` can say which process died and when. `down` stops exactly the processes recorded, and
the CLI prints the lines that give the shell back what it had before `up`.

The state directory is $PCELERY_LOCAL_DIR, default var/local in the repository: every shell of one
checkout shares one stack; another directory is another stack.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import DEMO_CATALOG, DEMO_CATALOG_SPEC
from . import stack as local_stack

log = logging.getLogger("ops")

PROCESSES = ("moto", "worker", "relay")
# What each recorded process's command line must contain, so `down` never signals a pid that
# has since been reused by something else.
SIGNATURES = {"moto": "moto.server", "worker": "celery", "relay": "pcelery-relay"}
DOWN_GRACE_SECONDS = 3.0
# Set in the shell by `up` (the state directory): this shell's settings came from a local stack.
MARKER = "PCELERY_LOCAL_STACK"


class NotUp(Exception):
    """The local stack is not running (seed and deploy need it)."""


class BadSeed(ValueError):
    """`seed --task` names a task seed cannot submit."""


def state_dir() -> Path:
    """$PCELERY_LOCAL_DIR (pcelery.settings.local_dir), else var/local in the repository, from any
    working directory. Read when asked, not at import."""
    from pcelery.settings import local_dir

    return local_dir({"PCELERY_LOCAL_DIR": str(local_stack.REPO_ROOT / "var" / "local"), **os.environ})


def stack_file() -> Path:
    return state_dir() / "stack.json"


def log_file(name: str) -> Path:
    return state_dir() / f"{name}.log"


def exit_file(name: str, generation: int = 0) -> Path:
    """Where devstack.supervise records how `name` ended; each restart (local deploy) of a process
    gets a file of its own, so an old worker finishing its shutdown never speaks for the new one."""
    return state_dir() / (f"{name}.exit.json" if not generation else f"{name}.{generation}.exit.json")


def broken_flag() -> Path:
    """While this file exists the worker runs "the broken release": demo.until_fixed fails."""
    return state_dir() / "broken-release"


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
    return sig is None or sig in cmdline


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
        return True
    except OSError:
        return False


def read_stack(path: Path | None = None) -> dict | None:
    try:
        return json.loads((path or stack_file()).read_text())
    except (OSError, ValueError):
        return None


def _exit_path(stack: dict, name: str) -> Path:
    return Path(stack.get("exit_files", {}).get(name) or exit_file(name))


def _exit_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _process(name: str, pid: int, exit_path: Path) -> dict[str, Any]:
    alive = _alive(name, pid) and not exit_path.exists()
    exit_info = None if alive else (_exit_record(exit_path) or {})
    if exit_info is not None:
        exit_info["log"] = str(log_file(name))
    return {"pid": pid, "alive": alive, "log": str(log_file(name)), "exit": exit_info}


def status() -> dict:
    """The stack's processes, each running or with how it ended (exit code or signal, time), its
    log, the SQS endpoint, the store and the state directory."""
    stack = read_stack()
    base = {"state_dir": str(state_dir()), "stack_file": str(stack_file())}
    if not stack:
        return {**base, "up": False, "processes": {}, "environ": {}}
    procs = {name: _process(name, pid, _exit_path(stack, name)) for name, pid in stack["pids"].items()}
    up = all(p["alive"] for p in procs.values()) and _answers(stack["endpoint"])
    return {**base, "up": up, "endpoint": stack["endpoint"], "database_url": stack["database_url"],
            "started_at": stack.get("started_at"), "release": "broken" if broken_flag().exists() else "good",
            "processes": procs, "environ": stack.get("shell", stack["environ"])}


def shell_environ(endpoint: str, database_url: str) -> dict[str, str]:
    """What the operator's shell needs to reach the stack (no credentials: the local endpoint
    gets the emulators' dummy keys by itself), plus the marker."""
    previous = os.environ.get("PYTHONPATH", "") if MARKER not in os.environ else ""
    root = str(local_stack.REPO_ROOT)
    pythonpath = root if not previous or root in previous.split(":") else f"{root}:{previous}"
    return {"AWS_ENDPOINT_URL_SQS": endpoint, "PCELERY_ENV": "local", "PCELERY_CATALOG": DEMO_CATALOG_SPEC,
            "DATABASE_URL": database_url, "PYTHONPATH": pythonpath, MARKER: str(state_dir())}


def _previous(keys: list[str]) -> dict[str, str | None]:
    """The shell's values before `up`, to give back at `down`. A shell that still carries an older
    stack's exports (its `down` was not eval'd) had none of its own that can be known."""
    if MARKER in os.environ:
        return dict.fromkeys(keys)
    return {k: os.environ.get(k) for k in keys}


def up() -> dict:
    from pcelery.schema import make_engine, migrate

    from . import tasks as demo_tasks

    current = status()
    if current["up"]:
        _say(f"local stack already up ({current['endpoint']}; state in {current['state_dir']}); "
             "`python -m ops local down` stops it")
        return current
    if read_stack():
        _say("a previous local stack is partly down: stopping what is left of it first")
        report = down()
        for name, info in report["already_exited"].items():
            _say(f"  {name} had exited ({_how(info)}); its log: {info['log']}")
    directory = state_dir()
    directory.mkdir(parents=True, exist_ok=True)
    broken_flag().unlink(missing_ok=True)  # a new stack runs the good release
    for leftover in directory.glob("*.exit.json"):
        leftover.unlink(missing_ok=True)
    logs = {name: open(log_file(name), "ab") for name in PROCESSES}  # noqa: SIM115 - closed below
    pids: dict[str, int] = {}
    try:
        server = local_stack.start_moto_server(log=logs["moto"], exit_file=exit_file("moto"))
        pids["moto"] = server.process.pid
        local_stack.create_queues(local_stack.sqs_client(server.endpoint), DEMO_CATALOG, "local")
        # moto keeps its queues in memory, so a new stack starts with empty queues; rows left in an
        # old store would name messages that exist nowhere. Start the store afresh with them.
        db_file = directory / "tasks.sqlite3"
        for leftover in (db_file, db_file.with_name(db_file.name + "-wal"), db_file.with_name(db_file.name + "-shm")):
            leftover.unlink(missing_ok=True)
        database_url = f"sqlite:///{db_file}"
        engine = make_engine(database_url)
        migrate(engine)
        demo_tasks.migrate(engine)  # the demo tasks keep their effects in a table of their own
        engine.dispose()
        environ = local_stack.local_environ(server.endpoint, database_url, catalog_spec=DEMO_CATALOG_SPEC)
        pids["worker"] = _start_worker(environ, logs["worker"], exit_file("worker")).pid
        pids["relay"] = local_stack.start_relay(environ, log=logs["relay"], exit_file=exit_file("relay")).pid
        shell = shell_environ(server.endpoint, database_url)
        stack = {"endpoint": server.endpoint, "database_url": database_url, "pids": pids, "environ": environ,
                 "shell": shell, "previous": _previous(list(shell)),
                 "exit_files": {name: str(exit_file(name)) for name in PROCESSES},
                 "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        stack_file().write_text(json.dumps(stack, indent=2))
    except Exception:
        for name, pid in pids.items():
            _stop(name, pid)
        raise
    finally:
        for f in logs.values():
            f.close()
    _say(f"local stack up: SQS {server.endpoint}, store {database_url}; state and logs in {directory} "
         "(PCELERY_LOCAL_DIR); `python -m ops local status` shows each process")
    return status()


def _start_worker(environ: dict[str, str], log: Any, exit_path: Path) -> subprocess.Popen:
    return local_stack.start_worker(environ, log=log, exit_file=exit_path)


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


def _how(info: dict) -> str:
    if info.get("signal"):
        how = f"killed by {info['signal']}"
    elif info.get("exit_code") is not None:
        how = f"exit code {info['exit_code']}"
    else:
        how = "no exit recorded"
    return how + (f" at {info['exited_at']}" if info.get("exited_at") else "")


def _restore(stack: dict) -> dict[str, str | None]:
    """The shell's values before `up`, for each variable the shell still has as `up` set it."""
    shell, previous = stack.get("shell") or {}, stack.get("previous") or {}
    return {k: previous.get(k) for k, v in shell.items() if os.environ.get(k) == v}


def down() -> dict:
    """Stop what `up` started (workers and relay first), report what had already exited, and
    say what the shell should get back (`restore`, printed as unset/export lines)."""
    stack = read_stack()
    last = state_dir() / "last-stack.json"
    if not stack:
        _say(f"local stack is not up: nothing to stop (state in {state_dir()})")
        previous = read_stack(last)
        return {"stopped": [], "already_exited": {}, "restore": _restore(previous) if previous else {},
                "state_dir": str(state_dir())}
    stopped, already = [], {}
    for name in sorted(stack["pids"], key=lambda n: n == "moto"):
        proc = _process(name, stack["pids"][name], _exit_path(stack, name))
        # Nothing of a stack outlives it (moto's queues are in memory; `up` starts a new store), so a
        # worker still in its long poll is not waited for: a few seconds, then the whole group goes.
        if proc["alive"] and _stop(name, stack["pids"][name], timeout=DOWN_GRACE_SECONDS):
            stopped.append(name)
        elif not proc["alive"]:
            already[name] = proc["exit"]
    stack_file().replace(last)
    return {"stopped": stopped, "already_exited": already, "restore": _restore(stack), "state_dir": str(state_dir())}


# What `seed` submits by default: work that succeeds, work that fails until the DLQ, and work
# that fails once and then succeeds, so every runbook procedure has something to act on.
SEED = (("demo.add", 5), ("demo.always_fail", 3), ("demo.flaky", 2))
SEEDABLE = ("demo.add", "demo.always_fail", "demo.flaky", "demo.until_fixed", "demo.slow")


def _seed_args(task: str, i: int) -> tuple[object, ...]:
    if task == "demo.add":
        return (i, 1)
    if task == "demo.always_fail":
        return (f"payment API down (seed {i})",)
    if task == "demo.until_fixed":
        return (f"order-{time.time_ns()}-{i}", str(broken_flag()))
    if task == "demo.slow":
        return (f"slow-{time.time_ns()}-{i}", 2.0)
    return (f"seed-{time.time_ns()}-{i}",)  # demo.flaky


def _expect(task: str) -> str:
    receives = DEMO_CATALOG.get("default").max_receive_count
    if task == "demo.always_fail":
        return f"fails {receives} times, then its message is in the DLQ"
    if task == "demo.flaky":
        return "fails once, then succeeds on attempt 2"
    if task == "demo.until_fixed":
        if broken_flag().exists():
            return f"fails on every attempt (the broken release), in the DLQ after {receives}"
        return "succeeds (fails while a broken release is deployed)"
    if task == "demo.slow":
        return "runs 2 s, then succeeds"
    return "succeeds"


def seed(task: str | None = None, count: int = 5) -> dict:
    """Submit demo tasks to the running stack through the outbox, as application code does: the
    default mix, or `count` of `task`."""
    from pcelery.outbox import Outbox
    from pcelery.settings import Settings

    if task is not None and task not in SEEDABLE:
        raise BadSeed(f"seed cannot submit {task!r}: it knows {', '.join(SEEDABLE)}")
    stack = read_stack()
    if not stack or not status()["up"]:
        raise NotUp("the local stack is not up: run `eval \"$(python -m ops local up)\"` first "
                    "(`python -m ops local status` says what is wrong)")
    plan = ((task, count),) if task else SEED
    box = Outbox.from_settings(Settings.from_env({**os.environ, **stack["environ"]}))
    submitted: list[dict[str, str]] = []
    try:
        with box.transaction() as conn:
            for name, n in plan:
                for i in range(n):
                    submitted.append({"id": box.submit(conn, name, *_seed_args(name, i)), "task": name,
                                      "expect": _expect(name)})
    finally:
        box.engine.dispose()
    failing = any(t["task"] == "demo.always_fail" or "fails on every" in t["expect"] for t in submitted)
    hint = ("the failing ones reach the DLQ in about 30 s: `python -m ops depth`, then RUNBOOK.md#alarm-dlq-not-empty"
            if failing else "they run within seconds: `python -m ops tasks`")
    return {"tasks": submitted, "task_ids": [t["id"] for t in submitted],
            "by_task": {name: n for name, n in plan}, "hint": hint}


def deploy(*, broken: bool = False) -> dict:
    """Restart the stack's worker on the good release, or (broken=True) on a release with a bug in
    demo.until_fixed: what a bad deploy and its fix look like to on-call."""
    stack = read_stack()
    if not stack or not status()["up"]:
        raise NotUp("the local stack is not up: run `eval \"$(python -m ops local up)\"` first "
                    "(`python -m ops local status` says what is wrong)")
    if broken:
        broken_flag().write_text("demo.until_fixed fails on every attempt while this file exists\n")
    else:
        broken_flag().unlink(missing_ok=True)
    # (The flag is what "the release" is: a worker reads it when it runs demo.until_fixed.)
    old_pid = stack["pids"]["worker"]
    generation = int(stack.get("worker_generation", 0)) + 1
    new_exit = exit_file("worker", generation)
    new_exit.unlink(missing_ok=True)
    _say(f"deploying the {'broken' if broken else 'good'} release: a new worker starts, then the old one stops "
         "(it finishes what it runs), as an ECS deployment replaces tasks")
    with open(log_file("worker"), "ab") as handle:
        offset = handle.tell()
        new = _start_worker(stack["environ"], handle, new_exit)
    new_pid = new.pid
    deadline = time.monotonic() + 60
    while " ready." not in _read_from(log_file("worker"), offset):
        if new.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(new_pid, signal.SIGKILL)
            raise NotUp(f"the new worker did not start: see {log_file('worker')} (the old one still runs)")
        time.sleep(0.25)
    stack["pids"]["worker"] = new_pid
    stack["worker_generation"] = generation
    stack.setdefault("exit_files", {})["worker"] = str(new_exit)
    stack_file().write_text(json.dumps(stack, indent=2))
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(old_pid, signal.SIGTERM)  # its warm shutdown goes on by itself
    if broken:
        hint = ("demo.until_fixed now fails on every attempt: submit some (`python -m ops local seed --task "
                "demo.until_fixed`), watch them reach the DLQ (`python -m ops depth`) and follow "
                "RUNBOOK.md#alarm-dlq-not-empty; `python -m ops local deploy` ships the fix")
    else:
        hint = ("the good release runs: what the broken one sent to the DLQ can be redriven now "
                "(RUNBOOK.md#poison-task, step 3)")
    return {"release": "broken" if broken else "good", "worker_pid": stack["pids"]["worker"], "hint": hint,
            "deployed_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")}


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def demo_command() -> tuple[list[str], dict[str, str], Path]:
    """The command, environment and directory of the self-contained product demo (`make demo`).
    The stack's exports must not leak into it, or it would mix its rows into the stack's database."""
    stack = read_stack() or {}
    drop = (set(stack.get("environ", {})) | set(stack.get("shell", {}))
            | {"AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL", "DATABASE_URL", MARKER})
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return [sys.executable, "-m", "devstack.demo"], env, local_stack.REPO_ROOT
