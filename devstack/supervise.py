"""`python -m devstack.supervise EXIT_FILE -- COMMAND ...`: run COMMAND and record how it ended.

The local practice stack (`ops local up`) starts each of its processes (moto, the worker, the
relay) through this, detached in a session of its own, so that `ops local status` and `down` can
say which process died, with what exit code or signal and when, long after the `up` that started
it has returned. The record is EXIT_FILE, JSON: {"pid", "exit_code", "signal", "exited_at",
"stop_requested"}. A SIGTERM (what `ops local down` sends to the whole group) is passed on by the
group itself: this process only waits for COMMAND, writes the record, and then takes down whatever
COMMAND left in the group (a killed worker's pool processes).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def record(exit_file: Path, pid: int, returncode: int, *, stop_requested: bool) -> dict:
    data = {
        "pid": pid,
        "exit_code": returncode,
        "signal": signal.Signals(-returncode).name if returncode < 0 else None,
        "exited_at": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "stop_requested": stop_requested,
    }
    tmp = exit_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(exit_file)
    return data


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m devstack.supervise EXIT_FILE -- COMMAND ...", file=sys.stderr)
        return 2
    exit_file, command = Path(args[0]), args[2:]
    exit_file.unlink(missing_ok=True)
    stop_requested = False

    def requested(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True  # COMMAND got the same signal from the group: wait for it

    signal.signal(signal.SIGTERM, requested)
    signal.signal(signal.SIGINT, requested)
    child = subprocess.Popen(command)  # same stdout/stderr (the log) and the same process group
    returncode = child.wait()
    record(exit_file, child.pid, returncode, stop_requested=stop_requested)
    if os.getpgrp() == os.getpid():  # the leader of a group of its own (started detached)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGKILL)  # the rest of the group, and this process with it
    return returncode


if __name__ == "__main__":
    sys.exit(main())
