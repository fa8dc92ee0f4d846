"""`make demo` (python -m devstack.demo, the README's first command) keeps working: it brings the
whole local stack up, every scripted expectation holds, and it stops what it started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _descendants_alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace").lower()]


def test_the_demo_passes_and_stops_every_process_it_started():
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "PCELERY_ENV", "PCELERY_CATALOG")}
    done = subprocess.run([sys.executable, "-m", "devstack.demo"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=280, check=False)
    out = done.stdout
    assert done.returncode == 0, f"demo failed ({done.returncode}):\n{out}\n{done.stderr[-3000:]}"
    for line in (
        "ok    10 normal tasks succeeded with the right results",
        "ok    flaky task failed once, then succeeded on attempt 2",
        "ok    always-failing task ran 3 times, is dead",
        "ok    poison message (an id with no row) is in the DLQ; the worker kept serving",
        "ok    long task ran once: 1 attempt, 1 effect, its message received once",
        "worker-1 (pid",
        "ok    the killed worker's task completed on worker-2 (attempt 2, effect once)",
        "this run's tasks by state: pending=0, queued=0, running=0, succeeded=13, failed=0, dead=1",
        "DLQ depth: pcelery-local-default-dlq=2, pcelery-local-long-dlq=0",
        "demo passed",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "FAIL" not in out
    # Every worker, relay and moto server it started is gone (their pids are in its narration).
    import re

    pids = sorted({int(p) for p in re.findall(r"\bpid (\d+)", out)})
    assert len(pids) == 4  # moto, worker-1, the relay, worker-2
    assert _descendants_alive(pids) == []


def test_ctrl_c_stops_every_process_the_demo_started():
    import re
    import signal
    import time

    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "PCELERY_ENV", "PCELERY_CATALOG")}
    proc = subprocess.Popen([sys.executable, "-m", "devstack.demo"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:  # until the relay, the last process of the set-up, is up
            lines.append(line)
            if "outbox relay started" in line:
                break
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + proc.stdout.read()
    assert code == 130, out
    assert "interrupted: stopping every process the demo started" in proc.stderr.read()
    pids = sorted({int(p) for p in re.findall(r"\bpid (\d+)", out)})
    assert len(pids) == 3, out  # moto, worker-1 and the relay
    deadline = time.monotonic() + 10
    while _descendants_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _descendants_alive(pids) == []
