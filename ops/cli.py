"""`pcelery-ops` (`python -m ops` in the repository): argument parsing, confirmation and the
command handlers over pcelery.ops.queues, .redrive and .tasks; pcelery.ops.render shows their
data; devstack.practice (the repository's dev harness) is `local`.

Data goes to stdout (a table, or with --output json the data and nothing else); progress,
notes, prompts and errors go to stderr. Errors are one line and a documented exit code.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from pcelery.ops import (
    EXIT_CODES,
    EXIT_DB,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONFIRMED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REFUSED,
    EXIT_SETUP,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    OpsError,
    render,
    setup_problem,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from pcelery.ops.aws import Aws
    from pcelery.ops.queues import QueueDepth, QueueRef
    from pcelery.settings import Settings
    from pcelery.store import TaskRow

log = logging.getLogger("ops")

# Parse the command line fully (types, durations, choices), then exit 0 without touching AWS or
# the database. The RUNBOOK test uses it for lines that need a real AWS account.
PARSE_ONLY_ENV = "OPS_PARSE_ONLY"


def prog_name() -> str:
    """How the operator called it, for usage lines and the hints that name a command."""
    return "pcelery-ops" if Path(sys.argv[0]).name == "pcelery-ops" else "python -m ops"


def _epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()) + f"""

queues: a catalog queue name (default, long; add -dlq for its DLQ) taken with --env, a raw SQS
queue name, or a queue URL. AWS settings: --profile/--region/--endpoint-url or AWS_PROFILE,
AWS_REGION, AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL. Database: DATABASE_URL (or DB_HOST...).
With --env dev, staging or prod, a local endpoint or SQLite store from the environment (the
local stack's exports) is refused: `eval "$({prog_name()} local down)"` clears them.
Tables fit the terminal (colour on a terminal only; NO_COLOR turns it off); -o json for scripts.
Tab completion: eval "$(pcelery-ops completion bash)" (or zsh).
{PARSE_ONLY_ENV}=1 parses a command line and exits 0 without running it. See RUNBOOK.md.
"""


Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs wrapped to the terminal (at most 100 columns): paragraphs are
    filled, indented lines (the exit-code table) keep their indent and hang under their text."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        width = min(width, 100)
        out: list[str] = []
        for paragraph in text.split("\n\n"):
            prose: list[str] = []
            for ln in [*paragraph.splitlines(), None]:
                if ln is not None and not ln.startswith("  "):
                    prose.append(ln)
                    continue
                if prose:
                    out.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                    prose = []
                if ln is not None:  # a table line: wrapped under its own text
                    lead = len(ln) - len(ln.lstrip())
                    hang = lead + len(ln.lstrip().split("  ", 1)[0]) + 2
                    out.append(textwrap.fill(ln.strip(), width, initial_indent=indent + " " * lead,
                                             subsequent_indent=indent + " " * hang))
            out.append("")
        return "\n".join(out).rstrip("\n")


# ---------------------------------------------------------------------------- argument types


def _duration(text: str) -> float:
    from pcelery.ops.tasks import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: use a number and s, m, h or d") from None


# Bounds checked when the command line is parsed, so an absurd number is a usage error naming the
# option, never an OverflowError from SQLite or a rejected SQS call half-way through a redrive.
MAX_COUNT = 1_000_000  # --limit
SQS_MAX_VISIBILITY = 43_200  # --hold-seconds: SQS's longest visibility timeout (12 h)


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} must be {low} or more")
        if value > high:
            raise argparse.ArgumentTypeError(f"{text!r} is above the most this option takes, {high:,}")
        return value
    return parse


_positive_int = _whole_number(1, MAX_COUNT)
_hold_seconds = _whole_number(1, SQS_MAX_VISIBILITY)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number above 0")
    return value


# ---------------------------------------------------------------------------------- parsers


def _output_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output options")
    g.add_argument("--output", "-o", choices=("table", "json"), default="table",
                   help="table (default: fits the terminal, colour on a terminal only) or json: the data alone on "
                        "stdout")
    g.add_argument("--debug", action="store_true", help="log AWS calls and show tracebacks of internal errors")
    return common


def _aws_options() -> argparse.ArgumentParser:
    from pcelery.catalog import ENVIRONMENTS

    common = argparse.ArgumentParser(add_help=False, parents=[_output_options()])
    g = common.add_argument_group("environment and AWS options")
    g.add_argument("--env", default=None, choices=ENVIRONMENTS,
                   help="environment whose catalog queues names resolve in (default $PCELERY_ENV or local)")
    g.add_argument("--catalog", default=None,
                   help="queue catalog as module:ATTRIBUTE (default $PCELERY_CATALOG or pcelery.catalog:CATALOG)")
    g.add_argument("--profile", default=None, help="AWS profile (default $AWS_PROFILE)")
    g.add_argument("--region", default=None, help="AWS region (default $AWS_REGION)")
    g.add_argument("--endpoint-url", default=None,
                   help="SQS endpoint (default $AWS_ENDPOINT_URL_SQS or $AWS_ENDPOINT_URL; set = local, no "
                        "CloudWatch); given here it may serve any --env")
    return common


def _add(sub: Subparsers, parent: argparse.ArgumentParser, name: str, help_text: str,
         description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[parent], help=help_text, description=description or help_text,
                          epilog=epilog or _epilog(), formatter_class=HelpFormatter)


def _depth_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "depth",
             "visible, in-flight and delayed counts of queues and their DLQs (and task rows per state)",
             "Visible, in-flight and delayed counts of queues and their DLQs, with the task rows of each queue "
             "per state. OLDEST is the age of the oldest message, from CloudWatch (n/a on a local endpoint, "
             "which has no metrics).")
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="queues to show (default: every catalog queue)")
    p.add_argument("--watch", type=_positive_float, metavar="SECONDS",
                   help="refresh every SECONDS until Ctrl-C (in place on a terminal; -o json: a document per line)")


def _peek_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "peek", "show messages of a DLQ without consuming them (each is made visible again at once)",
             "Show messages of a DLQ without consuming them (each is made visible again at once): task, task id, "
             "when it was sent, its row's state/attempts and why it cannot run. Says how many it left out; "
             "-o json adds bodies, attributes and payloads.")
    p.add_argument("queue", metavar="DLQ", help="e.g. default-dlq (catalog name + -dlq), an SQS name or a URL")
    p.add_argument("--limit", type=_positive_int, default=10, help="at most this many messages (default 10)")
    p.add_argument("--force", action="store_true",
                   help="peek a work queue too (each peek counts as a receive toward maxReceiveCount)")


def _redrive_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "redrive", "move messages from a DLQ back to its source queue (or --to)",
             "Move messages from a DLQ back to its source queue (or --to). The plan, said before anything moves "
             "(and by --dry-run), names the mode this run uses and why. After a client-side move the moved "
             "tasks' rows go from dead to queued when the database is reachable; a native move does not say "
             "which messages it moved, so those rows stay dead until a worker claims them. On a terminal a "
             "progress bar shows rate and time left.")
    p.add_argument("queue", metavar="DLQ", help="e.g. default-dlq (catalog name + -dlq), an SQS name or a URL")
    p.add_argument("--to", metavar="QUEUE",
                   help="destination (default: the one queue whose redrive policy names the DLQ)")
    p.add_argument("--mode", choices=("auto", "native", "client"), default="auto",
                   help="native: SQS move task; client: receive/send/delete here; auto (default): native where "
                        "the endpoint has it and no --task/--limit, else client")
    p.add_argument("--limit", type=_positive_int, help="move at most N messages (client mode)")
    p.add_argument("--rate", type=_positive_float, metavar="PER_SECOND", help="at most this many messages a second")
    p.add_argument("--task", metavar="NAME", help="move only messages of this Celery task (client mode)")
    p.add_argument("--dry-run", action="store_true", help="report what would move; move nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true",
                   help="allow a source that is not a DLQ or a --to that is not one of its sources")
    p.add_argument("--hold-seconds", type=_hold_seconds, default=60, metavar="SECONDS",
                   help="client mode: a message being moved stays invisible this long; if ops dies mid-move it "
                        f"reappears in the DLQ after this (default 60, at most SQS's {SQS_MAX_VISIBILITY:,})")


def _states() -> tuple[str, ...]:
    from pcelery.store import STATES

    return STATES


def _tasks_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "tasks", "list task rows of the claim-check store (stuck, failed, dead, pending too long)",
             "List task rows of the claim-check store, oldest first. LAST ERROR on a row that has since run to "
             "another state (a succeeded retry) is an earlier attempt's and says so. Says how many rows it left "
             "out when --limit cut the list.")
    p.add_argument("--state", choices=_states(), metavar="STATE", help=f"only this state: {', '.join(_states())}")
    p.add_argument("--task", metavar="NAME", help="only this task name")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="created longer ago than this: 90s, 15m, 2h, 1d")
    p.add_argument("--stuck", action="store_true", help="running rows whose lease has expired (their worker died)")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most N rows, oldest first (default 50)")


def _replay_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "replay",
             "re-enqueue tasks from their rows (reset to pending, then publish through the outbox)",
             "Re-enqueue tasks from their rows: reset to pending, then publish through the outbox. The old copies "
             "of those tasks still in their queue's DLQ are deleted afterwards (a later redrive would otherwise "
             "run them a second time); --dry-run says how many there are.")
    p.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    p.add_argument("--state", choices=_states(), metavar="STATE",
                   help="replay every row in this state (failed, dead, ...) instead of ids")
    p.add_argument("--task", metavar="NAME", help="with --state: only this task name")
    p.add_argument("--limit", type=_positive_int, default=100, help="at most N rows (default 100)")
    p.add_argument("--keep-dlq-copies", action="store_true",
                   help="leave the replayed tasks' old messages in their DLQ (do not redrive them too)")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _cancel_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "cancel", "cancel tasks that have not started (scheduled, pending, queued, failed)",
             "Cancel tasks that have not started: scheduled (a long countdown or ETA), pending, queued, or "
             "failed and waiting for a retry. Their rows become cancelled; a message of theirs that still "
             "arrives is acked without running. A running or finished task is not touched (the summary says "
             "which, and the exit code is 8, or 3 for an id without a row).")
    p.add_argument("task_ids", nargs="+", metavar="TASK_ID")
    p.add_argument("--dry-run", action="store_true", help="say which would be cancelled; change nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _schedules_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "schedules", "periodic schedules with their last and next run",
             "The periodic schedules pcelery-scheduler submits: what each runs and when, its last slot "
             "submitted (by any scheduler) with that task's state, and its next slot. Schedules the store "
             "remembers but the code no longer declares are listed too. Without the database: the declared "
             "schedules alone.")
    p.add_argument("--schedules", metavar="MODULE:ATTRIBUTE",
                   help="the schedules as the scheduler loads them (default $PCELERY_SCHEDULES; unset: the store's "
                        "record alone)")


def _purge_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "purge",
             "delete every message of a queue (asks first; in prod the queue name must be typed back)")
    p.add_argument("queue", metavar="QUEUE", help="a catalog name (default, default-dlq), an SQS name or a URL")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (not enough in prod)")
    p.add_argument("--confirm-name", metavar="NAME", help="prod: the SQS queue name, instead of typing it back")
    p.add_argument("--force", action="store_true", help="allow purging a catalog work queue in prod")
    p.add_argument("--dry-run", action="store_true", help="show what would be purged; purge nothing")


LOCAL_STATE_HELP = """the local stack keeps its state in $PCELERY_LOCAL_DIR (default: var/local in the repository,
so every shell of one checkout shares one stack; set it to run a second one): stack.json (what
`up` started), moto.log, worker.log, relay.log, each process's exit record, and the SQLite store
tasks.sqlite3. `local status` shows them all."""


LOCAL_EXIT_CODES = f"""exit codes:
    0  success (status: the stack is up)
    1  {EXIT_CODES[EXIT_INTERNAL]}
    2  bad arguments (seed: a task it does not know)
    4  the stack is not up, or a process of it is not running (status says which)
   10  {EXIT_CODES[EXIT_SETUP]}
  130  {EXIT_CODES[EXIT_INTERRUPTED]}"""


def _local_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    outputs = _output_options()
    epilog = LOCAL_STATE_HELP + "\n\n" + LOCAL_EXIT_CODES
    p = _add(sub, argparse.ArgumentParser(add_help=False), "local",
             "the local practice stack (moto SQS, SQLite, a worker and the relay)",
             "The local practice stack: a moto SQS server, the demo catalog's queues, a SQLite store, a worker "
             "and the outbox relay, running in the background, to practise RUNBOOK.md on.", epilog)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = _add(actions, outputs, "up", "start it; prints export lines: eval \"$(python -m ops local up)\"",
             "Start the stack (idempotent) and print the export lines that point this shell at it: "
             "eval \"$(python -m ops local up)\". A new stack starts with empty queues and an empty store.", epilog)
    a = _add(actions, outputs, "down", "stop it; prints unset lines: eval \"$(python -m ops local down)\"",
             "Stop exactly what `up` started, say which processes had already exited (code, time, log), and print "
             "the lines that give this shell back the settings it had before `up`: "
             "eval \"$(python -m ops local down)\".", epilog)
    a = _add(actions, outputs, "status", "each process: running, or its exit code, time and log (exit 0 up, 4 not)",
             epilog=epilog)
    a = _add(actions, outputs, "seed", "submit demo tasks to the running stack, some failing",
             "Submit demo tasks to the running stack through the outbox, as application code does: by default "
             "5 demo.add (succeed), 3 demo.always_fail (end in the DLQ after 3 receives) and 2 demo.flaky (fail "
             "once, then succeed); with --task, --count of that one task.", epilog)
    a.add_argument("--task", metavar="NAME",
                   help="only this demo task (demo.add, demo.flaky, demo.always_fail, demo.until_fixed, demo.slow)")
    a.add_argument("--count", type=_positive_int, default=5, help="with --task: how many (default 5)")
    a = _add(actions, outputs, "deploy", "restart the worker on the fixed release, or with --broken on a bad one",
             "Deploy a release to the stack's worker (it restarts, as ECS replaces tasks): by default the good "
             "one; --broken ships a release with a bug in demo.until_fixed, which then fails on every attempt "
             "(the incident drill of RUNBOOK.md#practise-locally).", epilog)
    a.add_argument("--broken", action="store_true", help="deploy the release with the bug")
    _add(actions, outputs, "demo", "run the self-contained product demo (make demo); does not touch the stack",
         epilog=epilog)


def _completion_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, argparse.ArgumentParser(add_help=False), "completion",
             "print a tab-completion script: eval \"$(pcelery-ops completion bash)\"",
             "Print the tab-completion script of pcelery-ops for bash or zsh. Load it in this shell with "
             "eval \"$(pcelery-ops completion bash)\", or for every shell add that line to ~/.bashrc (zsh: "
             "completion zsh, in ~/.zshrc). It completes commands, options, their values and the catalog's queue "
             "names.")
    p.add_argument("shell", choices=("bash", "zsh"))


def build_parser() -> argparse.ArgumentParser:
    common = _aws_options()
    parser = argparse.ArgumentParser(
        prog=prog_name(), description="On-call tools for persistent Celery on SQS: look at queues and "
        "DLQs, move messages back, replay tasks from the claim-check store, practise on a local stack.",
        epilog=_epilog(), formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (_depth_parser, _peek_parser, _redrive_parser, _tasks_parser, _replay_parser, _cancel_parser,
                       _schedules_parser, _purge_parser, _local_parser, _completion_parser):
        add_parser(sub, common)
    return parser


# ------------------------------------------------------------------------------- confirming


def confirm(question: str, *, expected: str = "yes", what: str) -> None:
    """Ask on the terminal; without one, refuse (EXIT_NOT_CONFIRMED) and say how to proceed."""
    if not sys.stdin.isatty():
        raise OpsError(f"refusing to {what} without confirmation: no terminal to ask on; rerun with --yes "
                       "(see --dry-run first)", EXIT_NOT_CONFIRMED)
    sys.stderr.write(f"{question} Type {expected!r} to continue: ")
    sys.stderr.flush()
    answer = sys.stdin.readline().strip()
    if answer != expected:
        raise OpsError(f"not confirmed ({answer!r} is not {expected!r}): nothing was changed", EXIT_NOT_CONFIRMED)


# ---------------------------------------------------------------------------------- context


def is_local_endpoint(url: str) -> bool:
    """An emulator's endpoint: plain http, or a loopback host (SQS itself is https on a public or
    VPC endpoint name)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "http" or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def store_configured(settings: Settings) -> bool:
    """DATABASE_URL (or DB_HOST...) is set: the store is not the embedded SQLite default."""
    from pcelery.settings import default_sqlite_url

    return settings.database_url != default_sqlite_url()


def local_settings_in_env(settings: Settings, *, endpoint_flag: str | None, access_key: str | None = None
                          ) -> list[str]:
    """What in the environment points a command aimed at a deployed env (dev, staging, prod) at a
    local stack instead: an emulator's endpoint, a SQLite store, the emulators' dummy key
    (access_key: the one boto3 found). Empty for env local; an endpoint given on the command line
    is taken as meant."""
    from pcelery.settings import LOCAL_ACCESS_KEY

    if settings.env == "local":
        return []
    found = []
    if settings.sqs_endpoint and not endpoint_flag and is_local_endpoint(settings.sqs_endpoint):
        found.append(f"the SQS endpoint {settings.sqs_endpoint} (AWS_ENDPOINT_URL_SQS or AWS_ENDPOINT_URL)")
    if settings.database_url.startswith("sqlite") and store_configured(settings):
        found.append(f"DATABASE_URL={settings.database_url}")
    if access_key == LOCAL_ACCESS_KEY and not endpoint_flag:
        found.append(f"AWS_ACCESS_KEY_ID={LOCAL_ACCESS_KEY} (the emulators' dummy key)")
    return found


def _refuse_local(command: str, env: str, found: list[str]) -> None:
    if found:
        raise OpsError(
            f"{command} is aimed at env {env!r}, a deployed environment, but this shell points at a local stack "
            f"({'; '.join(found)}): refusing to run it there. Clear the local stack's settings with "
            f"`eval \"$({prog_name()} local down)\"` (or unset them); to use an emulator on purpose, pass "
            "--endpoint-url", EXIT_REFUSED)


class Context:
    """What every command needs: settings, catalog, AWS clients (lazily) and the store."""

    def __init__(self, args: argparse.Namespace):
        from pcelery.settings import Settings, SettingsError

        self.args = args
        try:
            self.settings = Settings.from_env(env=args.env, catalog_spec=args.catalog)
        except SettingsError as exc:
            raise OpsError(str(exc), EXIT_USAGE) from None
        self.catalog = self.settings.catalog
        self.env = self.settings.env
        _refuse_local(args.command, self.env, local_settings_in_env(self.settings, endpoint_flag=args.endpoint_url))
        self._aws: Aws | None = None
        # open_store's answer, once asked: (engine, None) or (None, why not).
        self._store: tuple[sa.Engine, None] | tuple[None, str] | None = None

    @property
    def aws(self) -> Aws:
        if self._aws is None:
            from pcelery.ops.aws import connect

            aws = connect(self.settings, profile=self.args.profile, region=self.args.region,
                          endpoint_url=self.args.endpoint_url)
            if self.env != "local" and not aws.endpoint:
                credentials = aws.session.get_credentials()
                _refuse_local(self.args.command, self.env, local_settings_in_env(
                    self.settings, endpoint_flag=None, access_key=getattr(credentials, "access_key", None)))
            self._aws = aws
            if self.args.endpoint_url and self.env != "local" and is_local_endpoint(self.args.endpoint_url):
                render.note(f"env {self.env} on the endpoint {self.args.endpoint_url} (--endpoint-url), not AWS")
        return self._aws

    def resolve(self, spec: str) -> QueueRef:
        from pcelery.ops.queues import resolve

        return resolve(self.aws.sqs, spec, env=self.env, catalog=self.catalog)

    def _open_store(self, *, quiet: bool) -> tuple[sa.Engine, None] | tuple[None, str]:
        from pcelery.ops.tasks import open_store

        if self._store is None:
            if self.env != "local" and not store_configured(self.settings):
                self._store = (None, f"no claim-check database is configured for env {self.env!r} (DATABASE_URL "
                                     "or DB_HOST): it runs in the VPC, where the ops task has it "
                                     "(RUNBOOK.md#ops-in-the-vpc)")
            else:
                self._store = open_store(self.settings.database_url)
            if self._store[1] is not None and not quiet:
                render.note(f"{self._store[1]}; task fields are left empty")
        return self._store

    def store(self) -> sa.Engine | None:
        """The store engine, or None (with one note on stderr) when it is unreachable."""
        return self._open_store(quiet=False)[0]

    def required_store(self) -> sa.Engine:
        """The store engine; unreachable is an error (EXIT_DB) for the commands that need it."""
        opened = self._open_store(quiet=True)
        if opened[0] is None:
            raise OpsError(opened[1], EXIT_DB)
        return opened[0]

    def close(self) -> None:
        if self._store is not None and self._store[0] is not None:
            self._store[0].dispose()


# --------------------------------------------------------------------------------- commands


def cmd_depth(ctx: Context) -> int:
    from pcelery.ops.queues import catalog_refs

    args = ctx.args
    refs = ([ctx.resolve(q) for q in args.queues] if args.queues
            else catalog_refs(ctx.aws.sqs, env=ctx.env, catalog=ctx.catalog))
    if not args.watch:
        render.show(args.output, _depth_snapshot(ctx, refs), render.depth_table)
        return EXIT_OK
    with render.DepthWatch(args.output, args.watch) as watch:
        try:
            while True:
                watch.show(_depth_snapshot(ctx, refs))
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK


def _depth_snapshot(ctx: Context, refs: list[QueueRef]) -> list[QueueDepth]:
    from pcelery.ops.queues import depth
    from pcelery.store import count_by_queue_and_state

    engine = ctx.store()
    counts = None
    if engine is not None:
        try:
            counts = count_by_queue_and_state(engine)
        except Exception as exc:  # noqa: BLE001 - counts are extra; depth must still answer
            render.note(f"task counts unavailable ({exc})")
    return depth(ctx.aws, refs, env=ctx.env, catalog=ctx.catalog, task_counts=counts)


def cmd_peek(ctx: Context) -> int:
    from pcelery.ops.queues import attributes, counts, is_work_queue, peek
    from pcelery.ops.tasks import task_rows

    args = ctx.args
    ref = ctx.resolve(args.queue)
    before = counts(attributes(ctx.aws.sqs, ref))  # before this peek holds some of them
    messages = peek(ctx.aws.sqs, ref, limit=args.limit, force=args.force)
    engine = ctx.store() if messages else None
    rows: dict[str, TaskRow] = {}
    if engine is not None:
        try:
            rows = task_rows(engine, [m["task_id"] for m in messages])
        except Exception as exc:  # noqa: BLE001 - rows are extra; peek must still answer
            render.note(f"task rows unavailable ({exc})")
    store_read = engine is not None
    if args.output == "json":
        render.print_json(render.peek_json(messages, rows, store_read=store_read))
    else:
        render.peek_table(ref.name, messages, rows, store_read=store_read, total=before["visible"],
                          in_flight=before["in_flight"])
    render.more_note(len(messages), before["visible"], what="visible messages", approximate=True,
                     how="--limit", output=args.output)
    if args.force and is_work_queue(attributes(ctx.aws.sqs, ref, ["RedrivePolicy"])):
        render.note(f"--force: each message peeked on work queue {ref.name} counted one receive toward its DLQ")
    return EXIT_OK


def cmd_redrive(ctx: Context) -> int:
    from pcelery.ops.redrive import plan_redrive, redrive

    args = ctx.args
    dlq = ctx.resolve(args.queue)
    to = ctx.resolve(args.to) if args.to else None
    plan = plan_redrive(ctx.aws.sqs, dlq, env=ctx.env, catalog=ctx.catalog, to=to, mode=args.mode,
                        task=args.task, limit=args.limit, force=args.force)
    for n in plan.notes:
        render.note(n)
    render.note(render.redrive_plan_text(plan, task=args.task, limit=args.limit, rate=args.rate,
                                         dry_run=args.dry_run))
    if not args.dry_run and not args.yes:
        confirm(f"Move messages from {plan.source.name} to {plan.destination.name}?", expected="yes",
                what="redrive")
    total = None if args.task else (min(plan.visible, args.limit) if args.limit else plan.visible)
    with render.Progress(f"redrive {plan.source.name}", total) as progress:
        result = redrive(ctx.aws, plan, limit=args.limit, rate=args.rate, task=args.task, dry_run=args.dry_run,
                         hold_seconds=args.hold_seconds, progress=None if args.dry_run else progress.update)
    outcome = None
    if not args.dry_run and result.mode == "client" and result.moved:
        outcome = _requeue_rows(ctx, result.moved_task_ids, not_celery=result.moved - len(result.moved_task_ids))
    if args.output == "json":
        render.print_json({**result.summary(), "mode_reason": plan.mode_reason,
                           "tasks_requeued": outcome["requeued"] if outcome and not outcome["unknown"] else None,
                           "task_rows": outcome})
    else:
        render.redrive_text(result, outcome)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _requeue_rows(ctx: Context, task_ids: list[str], *, not_celery: int) -> Any:
    """Rows of client-redriven tasks dead -> queued, and what the others are (RowOutcome)."""
    from pcelery.ops.tasks import requeue_moved

    engine = ctx.store() if task_ids else None
    try:
        return requeue_moved(engine, task_ids, not_celery=not_celery)
    except Exception as exc:  # noqa: BLE001 - the messages moved; the rows are cosmetic
        render.note(f"task rows not updated ({exc}): they show dead until a worker claims them")
        return requeue_moved(None, task_ids, not_celery=not_celery)


def cmd_tasks(ctx: Context) -> int:
    from pcelery.ops.tasks import count_tasks, list_tasks

    args = ctx.args
    engine = ctx.required_store()
    filters = {"state": args.state, "task_name": args.task, "older_than_seconds": args.older_than,
               "stuck": args.stuck}
    rows = list_tasks(engine, limit=args.limit, **filters)
    total = count_tasks(engine, **filters) if len(rows) >= args.limit else len(rows)
    if args.output == "json":
        render.print_json([r.as_json() for r in rows])
    else:
        render.tasks_table(rows)
    render.more_note(len(rows), total, what="rows", how="--limit", output=args.output)
    return EXIT_OK


def _publisher(ctx: Context, engine: sa.Engine) -> Callable[[list[str]], dict[str, str]]:
    """publish(ids) -> {task_id: message_id} through the outbox's own publisher."""
    from pcelery import outbox

    box = outbox.Outbox(engine, ctx.catalog, ctx.env, sqs=ctx.aws.sqs)
    return box.publish_ids


def _dlq_copies(ctx: Context, rows: list[TaskRow], *, delete: bool) -> dict[str, int]:
    """{DLQ name: copies found (deleted with delete=True)} of these tasks' messages in the DLQs of
    their queues. A DLQ that does not exist or is empty is skipped."""
    from pcelery.ops.queues import attributes, counts, find_copies

    found: dict[str, int] = {}
    by_queue: dict[str, set[str]] = {}
    for r in rows:
        by_queue.setdefault(r.queue, set()).add(r.id)
    for queue, ids in by_queue.items():
        if queue not in ctx.catalog.names():
            continue
        dlq = ctx.resolve(f"{queue}-dlq")
        if not counts(attributes(ctx.aws.sqs, dlq))["visible"]:
            continue
        verb = "deleting" if delete else "looking for"
        with render.Progress(f"{verb} old copies in {dlq.name}", None) as progress:
            n = find_copies(ctx.aws.sqs, dlq, ids, delete=delete, progress=progress.update)
        if n:
            found[dlq.name] = n
    return found


def cmd_replay(ctx: Context) -> int:
    from pcelery.ops.tasks import replay, select_for_replay

    args = ctx.args
    if args.task_ids and args.state:
        raise OpsError("give TASK_ID ... or --state, not both", EXIT_USAGE)
    if not args.task_ids and not args.state:
        raise OpsError("replay needs TASK_ID ... or --state STATE (e.g. --state dead --task NAME)", EXIT_USAGE)
    engine = ctx.required_store()
    rows = select_for_replay(engine, task_ids=args.task_ids, state=args.state, task_name=args.task,
                             limit=args.limit)
    if args.dry_run or not rows:
        copies = _dlq_copies(ctx, rows, delete=False) if rows and not args.keep_dlq_copies else {}
        if args.output == "json":
            render.print_json(render.replay_plan_json(rows, dry_run=args.dry_run, dlq_copies=copies))
        else:
            render.replay_plan_text(rows, dry_run=args.dry_run, dlq_copies=copies)
        return EXIT_OK
    render.note(f"replay {len(rows)} task(s): rows back to pending, then published to their queues"
                + ("" if args.keep_dlq_copies else "; then their old copies are deleted from the DLQs"))
    if not args.yes:
        confirm(f"Replay {len(rows)} task(s)? A replayed task runs again even if it succeeded before.",
                expected="yes", what="replay")
    with render.Progress("replay", len(rows), unit="task") as progress:
        result = replay(engine, rows, _publisher(ctx, engine), progress=progress.update)
    if not args.keep_dlq_copies:
        replayed = [r for r in rows if r.id in set(result["reset"])]
        result["dlq_copies_deleted"] = _dlq_copies(ctx, replayed, delete=True)
        result["dlq_copies_checked"] = True
    render.show(args.output, result, render.replay_text)
    return EXIT_OK


def cmd_cancel(ctx: Context) -> int:
    from pcelery.ops.tasks import cancel

    args = ctx.args
    engine = ctx.required_store()
    if not args.dry_run and not args.yes:
        confirm(f"Cancel {render.plural(len(set(args.task_ids)), 'task')}? A cancelled task never runs.",
                expected="yes", what="cancel")
    result = cancel(engine, args.task_ids, dry_run=args.dry_run)
    if args.output == "json":
        render.print_json({**result, "dry_run": args.dry_run})
    else:
        render.cancel_text(result, dry_run=args.dry_run)
    left = result["not_cancelled"]
    if any(st is None for st in left.values()):
        return EXIT_NOT_FOUND
    return EXIT_PARTIAL if left else EXIT_OK


def cmd_schedules(ctx: Context) -> int:
    from pcelery.ops.tasks import list_schedules, load_declared
    from pcelery.settings import SettingsError, schedules_spec

    try:
        spec = ctx.args.schedules or schedules_spec()
    except SettingsError as exc:
        raise OpsError(str(exc), EXIT_USAGE) from None
    declared = load_declared(spec, "--schedules" if ctx.args.schedules else "PCELERY_SCHEDULES") if spec else None
    if spec is None:
        render.note("no schedules named (--schedules or PCELERY_SCHEDULES): showing the store's record alone")
    # Without the schedules, the store's record is all there is; with them, last runs are extra.
    engine = ctx.required_store() if declared is None else ctx.store()
    views = list_schedules(engine, declared)
    if ctx.args.output == "json":
        render.print_json([v.as_json() for v in views])
    else:
        render.schedules_table(views)
    return EXIT_OK


def cmd_purge(ctx: Context) -> int:
    from pcelery.catalog import queue_prefix
    from pcelery.ops.queues import attributes, is_work_queue, purge

    args = ctx.args
    ref = ctx.resolve(args.queue)
    prod = ctx.env == "prod" or ref.name.startswith(queue_prefix("prod"))
    attrs = attributes(ctx.aws.sqs, ref)
    work_queue = is_work_queue(attrs) or (ref.catalog_queue is not None and not ref.is_catalog_dlq)
    if prod and work_queue and not args.force:
        raise OpsError(f"{ref.name!r} is a work queue in prod: purging it deletes live tasks (their rows stay "
                       "queued forever); redrive or let workers drain it, or pass --force if this is really meant",
                       EXIT_REFUSED)
    count = sum(int(attrs.get(k, 0)) for k in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                                                "ApproximateNumberOfMessagesDelayed"))
    if args.dry_run:
        if args.output == "json":
            render.print_json(render.purge_plan_json(ref.name, ref.url, count))
        else:
            render.purge_plan_text(ref.name, count)
        return EXIT_OK
    if prod:
        if args.confirm_name is not None:
            if args.confirm_name != ref.name:
                raise OpsError(f"--confirm-name {args.confirm_name!r} is not the queue's name {ref.name!r}: "
                               "nothing was purged", EXIT_NOT_CONFIRMED)
        elif not sys.stdin.isatty():
            # --yes is the same keystroke for every queue; in prod the queue's name must be typed.
            raise OpsError(f"purging {ref.name!r} in prod needs its name typed back: pass --confirm-name {ref.name}"
                           + (" (--yes is not enough in prod)" if args.yes else "")
                           + " after a --dry-run; nothing was purged", EXIT_NOT_CONFIRMED)
        else:
            confirm(f"PROD: purge about {count} message(s) from {ref.name}? This cannot be undone.",
                    expected=ref.name, what=f"purge a prod queue (or pass --confirm-name {ref.name})")
    elif not args.yes:
        confirm(f"Purge about {count} message(s) from {ref.name}? This cannot be undone.", expected="yes",
                what="purge")
    result = purge(ctx.aws.sqs, ref)
    render.show(args.output, result, render.purge_text)
    return EXIT_OK


# ------------------------------------------------------------------------------ local stack


def _harness() -> Any:
    """devstack.practice, the repository's dev harness. An editable install (make setup) finds the
    repository from the package's own files, so `pcelery-ops local ...` works from any directory
    of the checkout and beyond; an installed wheel has no harness."""
    try:
        from devstack import practice
    except ImportError:
        import pcelery

        root = Path(pcelery.__file__).resolve().parent.parent
        if not (root / "devstack" / "practice.py").is_file():
            raise OpsError("`ops local` runs the dev harness of the repository (devstack/): run it from a "
                           "checkout of the repository after `make setup`", EXIT_USAGE) from None
        sys.path.insert(0, str(root))
        from devstack import practice
    return practice


def cmd_local(args: argparse.Namespace) -> int:
    practice = _harness()
    action, output = args.action, args.output
    if action == "demo":  # the self-contained product demo, in a process of its own
        command, env, cwd = practice.demo_command()
        return subprocess.call(command, env=env, cwd=cwd)
    try:
        if action == "up":
            data = practice.up()
            render.show(output, data, render.local_up_text)
            if output != "json" and sys.stdout.isatty():
                render.note(f"these lines only take effect through eval: eval \"$({prog_name()} local up)\"")
            return EXIT_OK
        if action == "down":
            data = practice.down()
            report = render.local_down_report(data)
            if report:
                render.note(report)
            render.show(output, data, render.local_down_text)
            if output != "json" and sys.stdout.isatty() and data["restore"]:
                render.note(f"to clear them from this shell: eval \"$({prog_name()} local down)\"")
            return EXIT_OK
        if action == "status":
            data = practice.status()
            render.show(output, data, render.local_status_text)
            return EXIT_OK if data["up"] else EXIT_UNREACHABLE
        if action == "seed":
            data = practice.seed(task=args.task, count=args.count)
            render.show(output, data, render.seed_text)
            return EXIT_OK
        data = practice.deploy(broken=args.broken)  # deploy
        render.show(output, data, render.deploy_text)
        return EXIT_OK
    except practice.NotUp as exc:
        raise OpsError(str(exc), EXIT_UNREACHABLE) from None
    except practice.BadSeed as exc:
        raise OpsError(str(exc), EXIT_USAGE) from None


def cmd_completion(args: argparse.Namespace) -> int:
    from pcelery.ops.completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return EXIT_OK


COMMANDS: dict[str, Callable[[Context], int]] = {
    "depth": cmd_depth, "peek": cmd_peek, "redrive": cmd_redrive, "tasks": cmd_tasks,
    "replay": cmd_replay, "cancel": cmd_cancel, "schedules": cmd_schedules, "purge": cmd_purge,
}
# Commands that take no environment or AWS options, and so no Context.
PLAIN_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"local": cmd_local, "completion": cmd_completion}


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:  # a dependency missing from this Python: setup, not a bug
        print(setup_problem(exc, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return EXIT_SETUP


def _main(argv: list[str] | None) -> int:
    from pcelery.settings import ops_parse_only

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(stream=sys.stderr, format="ops: %(message)s", level=logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    if ops_parse_only():
        render.note(f"parsed: {args.command} (not run: {PARSE_ONLY_ENV}=1)")
        return EXIT_OK
    ctx: Context | None = None
    try:
        if args.command in PLAIN_COMMANDS:
            return PLAIN_COMMANDS[args.command](args)
        ctx = Context(args)
        return COMMANDS[args.command](ctx)
    except OpsError as exc:
        render.note(f"error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        render.note("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except ModuleNotFoundError:
        raise
    except Exception as exc:
        if debug:
            raise
        from pcelery.ops.aws import aws_error

        try:
            err = aws_error(exc, args.command)
        except Exception:  # noqa: BLE001 - anything not AWS-shaped is a bug in ops
            render.note(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
            return EXIT_INTERNAL
        render.note(f"error: {err.message}")
        return err.exit_code
    finally:
        if ctx is not None:
            ctx.close()
