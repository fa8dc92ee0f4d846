"""`make demo` (python -m devstack.demo) stops every process it started, also when interrupted.
That the demo runs and every expectation holds is tests/integration/test_readme.py: it runs the
README's `make demo` as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _descendants_alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()
            and "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace").lower()]


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
