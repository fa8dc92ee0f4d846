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
EXIT_PARTIAL = 8  # finished, but some messages failed to move (see the summary)
EXIT_DB = 9  # the command needs the claim-check database and it is unreachable
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
    EXIT_PARTIAL: "partly done: some messages failed to move",
    EXIT_DB: "claim-check database unreachable (tasks, replay need it)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


class OpsError(Exception):
    """Something the operator can act on: `message` says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_UNREACHABLE):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
