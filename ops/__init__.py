"""The on-call ops CLI (`pcelery-ops`, or `python -m ops ...` in the repository) and the library
under it.

The library returns data: pcelery.ops.aws (AWS sessions; botocore failures as OpsError),
pcelery.ops.queues (SQS: resolve, depth, peek, purge), pcelery.ops.redrive (DLQ -> queue, native
or client-side) and pcelery.ops.tasks (the claim-check store: task rows, replay). pcelery.ops.cli
parses arguments and runs the commands; pcelery.ops.render shows their data. Every failure the
operator can act on is an OpsError carrying one of the exit codes below, so the CLI prints one
line and exits with a documented code instead of a traceback.
"""

from __future__ import annotations

# Exit codes: documented in `python -m ops --help` and in RUNBOOK.md ("Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in ops: the one case that prints a traceback (with --debug)
EXIT_USAGE = 2  # bad arguments (argparse's own code), e.g. a malformed --older-than
EXIT_NOT_FOUND = 3  # queue or task not found (wrong name, --env or --region)
EXIT_UNREACHABLE = 4  # SQS endpoint unreachable or AWS API error
EXIT_AUTH = 5  # no AWS credentials, expired session, or access denied
EXIT_REFUSED = 6  # refused for safety: wrong kind of queue, ambiguous source, prod work queue
EXIT_NOT_CONFIRMED = 7  # needs confirmation: no terminal and no --yes, or the answer was no
EXIT_PARTIAL = 8  # finished, but some messages failed to move or tasks were not cancelled (see the summary)
EXIT_DB = 9  # the command needs the claim-check database and it is unreachable
EXIT_SETUP = 10  # ops cannot run here: a dependency is missing (a setup problem, not a bug)
EXIT_INTERRUPTED = 130  # Ctrl-C (a native move task is cancelled first)

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: rerun with --debug and report it)",
    EXIT_USAGE: "bad arguments",
    EXIT_NOT_FOUND: "queue or task not found (check the name, --env, --region)",
    EXIT_UNREACHABLE: "SQS endpoint unreachable or AWS API error",
    EXIT_AUTH: "no AWS credentials, expired session or access denied",
    EXIT_REFUSED: "refused for safety (wrong kind of queue, ambiguous source, prod work queue); --force overrides",
    EXIT_NOT_CONFIRMED: "not confirmed (no terminal and no --yes, or answered no)",
    EXIT_PARTIAL: "partly done: some messages failed to move, or some tasks were not cancelled (said which)",
    EXIT_DB: "claim-check database unreachable (tasks, replay need it)",
    EXIT_SETUP: "setup problem: this Python lacks a dependency of ops (the message says how to fix it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class OpsError(Exception):
    """Something the operator can act on: `message` says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_UNREACHABLE):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def setup_problem(exc: ImportError, argv: list[str]) -> str:
    """The one line `python -m ops` / `pcelery-ops` prints when this Python lacks the package or
    one of its dependencies: a setup slip, said with its fix, never an "internal error". Imports
    nothing, so it works in exactly the interpreter that lacks everything."""
    import shlex
    import sys
    from pathlib import Path

    missing = getattr(exc, "name", None) or str(exc)
    root = Path(__file__).resolve().parent.parent
    command = shlex.join(["python", "-m", "ops", *argv])
    if (root / "Makefile").is_file() and (root / "app").is_dir() and (root / "devstack").is_dir():
        venv = (Path(".venv") if Path.cwd() == root else root / ".venv") / "bin"
        # In a checkout: the repository's virtualenv has everything (`make setup` builds it).
        fix = (f"run it with the repository's virtualenv: `{shlex.quote(str(venv / 'python'))} -m ops "
               f"{shlex.join(argv)}`, or `. {shlex.quote(str(venv / 'activate'))}` once per shell and then "
               f"`{command}` (or `pcelery-ops ...` from any directory)")
        if not (root / ".venv" / "bin" / "python").exists():
            fix = f"run `make setup` in {shlex.quote(str(root))} first, then " + fix
    else:
        fix = ("install the package into the environment that runs ops: `pip install persistent-celery` "
               "(or `pipx install persistent-celery`)")
    return (f"ops: setup problem: this Python ({sys.executable}) cannot import {missing!r}, which ops needs: "
            f"{fix}")
