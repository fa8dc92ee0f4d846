"""Run a command on a real terminal (a pty of a given size), the way an on-call engineer sees
it: colour, progress bars and terminal widths only show there. stdout and stderr can each be the
terminal or a pipe, as when the operator pipes the data away and watches the progress."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import struct
import subprocess
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z@]|\x1b\][^\x07]*\x07|\r")


def plain(text: str) -> str:
    """Terminal output without colour codes and carriage returns."""
    return ANSI.sub("", text)


@dataclass
class TerminalRun:
    returncode: int
    screen: str  # everything written to the terminal, escape codes and all
    stdout: str  # when stdout was a pipe
    stderr: str  # when stderr was a pipe

    @property
    def text(self) -> str:
        return plain(self.screen)


def _drain(fd: int, sink: list[bytes]) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return
        if not chunk:
            return
        sink.append(chunk)


def on_terminal(argv: list[str], *, env: dict[str, str], cwd: Path | str, cols: int = 100, rows: int = 40,
                stdout_tty: bool = True, stderr_tty: bool = True, typed: str | None = None,
                timeout: float = 120, interrupt_after: float | None = None,
                keystrokes: tuple[tuple[float, str], ...] = ()) -> TerminalRun:
    """Run argv with a pty of cols x rows as its terminal (stdin always, stdout/stderr as asked).
    typed: what is already typed on the terminal; keystrokes: (seconds to wait, text) typed in
    turn, as a person types into a program that is ready; interrupt_after: send Ctrl-C then."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {k: v for k, v in env.items() if k not in ("NO_COLOR", "COLUMNS", "LINES", "FORCE_COLOR")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=slave,
                            stdout=slave if stdout_tty else subprocess.PIPE,
                            stderr=slave if stderr_tty else subprocess.PIPE, start_new_session=True)
    os.close(slave)
    if typed is not None:
        os.write(master, typed.encode())
    screen: list[bytes] = []
    readers = [threading.Thread(target=_drain, args=(master, screen), daemon=True)]
    piped: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    for name in ("stdout", "stderr"):
        stream = getattr(proc, name)
        if stream is not None:
            readers.append(threading.Thread(target=_drain, args=(stream.fileno(), piped[name]), daemon=True))
    for r in readers:
        r.start()
    try:
        for wait, text in keystrokes:
            time.sleep(wait)
            os.write(master, text.encode())
        if interrupt_after is not None:
            time.sleep(interrupt_after)
            os.killpg(proc.pid, 2)
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
        for r in readers:
            r.join(10)
        os.close(master)
    return TerminalRun(proc.returncode, b"".join(screen).decode(errors="replace"),
                       b"".join(piped["stdout"]).decode(errors="replace"),
                       b"".join(piped["stderr"]).decode(errors="replace"))
