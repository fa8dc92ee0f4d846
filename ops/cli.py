"""`python -m ops` (`pcelery-ops`): argument parsing, confirmation and the command handlers over
pcelery.ops.queues, .redrive and .tasks; pcelery.ops.render shows their data.

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
from typing import TYPE_CHECKING, Any, TypeAlias

from pcelery.ops import (
    EXIT_CODES,
    EXIT_DB,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONFIRMED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    OpsError,
    render,
)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from pcelery.ops.aws import Aws
    from pcelery.ops.queues import QueueDepth, QueueRef
    from pcelery.store import TaskRow

log = logging.getLogger("ops")

# Parse the command line fully (types, durations, choices), then exit 0 without touching AWS or
# the database. The RUNBOOK test uses it for lines that need a real AWS account.
PARSE_ONLY_ENV = "OPS_PARSE_ONLY"

EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()) + f"""

queues: a catalog queue name (default, long; add -dlq for its DLQ) taken with --env, a raw SQS
queue name, or a queue URL. AWS settings: --profile/--region/--endpoint-url or AWS_PROFILE,
AWS_REGION, AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL. Database: DATABASE_URL (or DB_HOST...).
{PARSE_ONLY_ENV}=1 parses a command line and exits 0 without running it. See RUNBOOK.md.
"""

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


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


def _common_parser() -> argparse.ArgumentParser:
    from pcelery.catalog import ENVIRONMENTS

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument("--env", default=None, choices=ENVIRONMENTS,
                   help="environment whose catalog queues names resolve in (default $PCELERY_ENV or local)")
    g.add_argument("--catalog", default=None,
                   help="queue catalog as module:ATTRIBUTE (default $PCELERY_CATALOG or pcelery.catalog:CATALOG)")
    g.add_argument("--profile", default=None, help="AWS profile (default $AWS_PROFILE)")
    g.add_argument("--region", default=None, help="AWS region (default $AWS_REGION)")
    g.add_argument("--endpoint-url", default=None,
                   help="SQS endpoint (default $AWS_ENDPOINT_URL_SQS or $AWS_ENDPOINT_URL; set = local, no CloudWatch)")
    g.add_argument("--output", "-o", choices=("table", "json"), default="table",
                   help="table (default) or json: the data alone on stdout")
    g.add_argument("--debug", action="store_true", help="log AWS calls and show tracebacks of internal errors")
    return common


def _add(sub: Subparsers, common: argparse.ArgumentParser, name: str, help_text: str,
         description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, parents=[common], help=help_text,
                          description=textwrap.fill(description or help_text, 90),
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def _depth_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "depth",
             "visible, in-flight and delayed counts of queues and their DLQs (and task rows per state)")
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="queues to show (default: every catalog queue)")
    p.add_argument("--watch", type=_positive_float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")


def _peek_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "peek", "show messages of a DLQ without consuming them (each is made visible again at once)")
    p.add_argument("queue", metavar="DLQ", help="e.g. default-dlq (catalog name + -dlq), an SQS name or a URL")
    p.add_argument("--limit", type=_positive_int, default=10, help="at most this many messages (default 10)")
    p.add_argument("--force", action="store_true",
                   help="peek a work queue too (each peek counts as a receive toward maxReceiveCount)")


def _redrive_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "redrive", "move messages from a DLQ back to its source queue (or --to)",
             "Move messages from a DLQ back to its source queue (or --to). After a client-side move the "
             "moved tasks' rows go from dead to queued when the database is reachable; a native move "
             "does not say which messages it moved, so those rows stay dead until a worker claims them.")
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


def _tasks_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "tasks", "list task rows of the claim-check store (stuck, failed, dead, pending too long)")
    p.add_argument("--state", help="pending, queued, running, succeeded, failed or dead")
    p.add_argument("--task", metavar="NAME", help="only this task name")
    p.add_argument("--older-than", type=_duration, metavar="DURATION",
                   help="created longer ago than this: 90s, 15m, 2h, 1d")
    p.add_argument("--stuck", action="store_true", help="running rows whose lease has expired (their worker died)")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most N rows, oldest first (default 50)")


def _replay_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "replay",
             "re-enqueue tasks from their rows (reset to pending, then publish through the outbox)")
    p.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    p.add_argument("--state", help="replay every row in this state (failed, dead, ...) instead of ids")
    p.add_argument("--task", metavar="NAME", help="with --state: only this task name")
    p.add_argument("--limit", type=_positive_int, default=100, help="at most N rows (default 100)")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _purge_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "purge",
             "delete every message of a queue (asks first; in prod the queue name must be typed back)")
    p.add_argument("queue", metavar="QUEUE", help="a catalog name (default, default-dlq), an SQS name or a URL")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (not enough in prod)")
    p.add_argument("--confirm-name", metavar="NAME", help="prod: the SQS queue name, instead of typing it back")
    p.add_argument("--force", action="store_true", help="allow purging a catalog work queue in prod")
    p.add_argument("--dry-run", action="store_true", help="show what would be purged; purge nothing")


def _local_parser(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = _add(sub, common, "local", "the local stack (moto SQS, SQLite, worker, relay) to practise this runbook on")
    p.add_argument("action", choices=("up", "down", "status", "seed", "demo"),
                   help="up: start it and print export lines (eval \"$(python -m ops local up)\"); down: stop what "
                        "up started; status: exit 0 when up, 4 when not; seed: submit demo tasks, some failing, to "
                        "the running stack; demo: run the self-contained product demo (python -m devstack.demo)")


def build_parser() -> argparse.ArgumentParser:
    common = _common_parser()
    parser = argparse.ArgumentParser(
        prog="python -m ops", description="On-call tools for persistent Celery on SQS: look at queues and "
        "DLQs, move messages back, replay tasks from the claim-check store.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (_depth_parser, _peek_parser, _redrive_parser, _tasks_parser, _replay_parser, _purge_parser,
                       _local_parser):
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
        self._aws: Aws | None = None
        # open_store's answer, once asked: (engine, None) or (None, why not).
        self._store: tuple[sa.Engine, None] | tuple[None, str] | None = None

    @property
    def aws(self) -> Aws:
        if self._aws is None:
            from pcelery.ops.aws import connect

            self._aws = connect(self.settings, profile=self.args.profile, region=self.args.region,
                                endpoint_url=self.args.endpoint_url)
        return self._aws

    def resolve(self, spec: str) -> QueueRef:
        from pcelery.ops.queues import resolve

        return resolve(self.aws.sqs, spec, env=self.env, catalog=self.catalog)

    def _open_store(self, *, quiet: bool) -> tuple[sa.Engine, None] | tuple[None, str]:
        from pcelery.ops.tasks import open_store

        if self._store is None:
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
    clear = sys.stderr.isatty()
    try:
        while True:
            render.depth_refresh(_depth_snapshot(ctx, refs), args.output, args.watch, clear=clear)
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
    from pcelery.ops.queues import peek
    from pcelery.ops.tasks import task_rows

    args = ctx.args
    ref = ctx.resolve(args.queue)
    messages = peek(ctx.aws.sqs, ref, limit=args.limit, force=args.force)
    engine = ctx.store() if messages else None
    rows: dict[str, TaskRow] = {}
    if engine is not None:
        try:
            rows = task_rows(engine, [m["task_id"] for m in messages])
        except Exception as exc:  # noqa: BLE001 - rows are extra; peek must still answer
            render.note(f"task rows unavailable ({exc})")
    if args.output == "json":
        render.print_json(render.peek_json(messages, rows, store_read=engine is not None))
    else:
        render.peek_text(ref.name, messages, rows, store_read=engine is not None)
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
    render.note(render.redrive_plan_text(plan, task=args.task, limit=args.limit, rate=args.rate))
    if not args.dry_run and not args.yes:
        confirm(f"Move messages from {plan.source.name} to {plan.destination.name}?", expected="yes",
                what="redrive")
    result = redrive(ctx.aws, plan, limit=args.limit, rate=args.rate, task=args.task, dry_run=args.dry_run,
                     hold_seconds=args.hold_seconds)
    requeued = _requeue_rows(ctx, result.moved_task_ids)
    if args.output == "json":
        render.print_json({**result.summary(), "tasks_requeued": requeued})
    else:
        render.redrive_text(result, requeued)
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if result.failed else EXIT_OK


def _requeue_rows(ctx: Context, task_ids: list[str]) -> int | None:
    """Rows of client-redriven tasks dead -> queued: how many moved, or None (nothing to do, or
    no store)."""
    if not task_ids:
        return None
    engine = ctx.store()
    if engine is None:
        return None
    from pcelery.store import mark_redriven

    try:
        return len(mark_redriven(engine, task_ids))
    except Exception as exc:  # noqa: BLE001 - the messages moved; the rows are cosmetic
        render.note(f"task rows not updated ({exc}): they show dead until a worker claims them")
        return None


def cmd_tasks(ctx: Context) -> int:
    from pcelery.ops.tasks import list_tasks

    args = ctx.args
    engine = ctx.required_store()
    rows = list_tasks(engine, state=args.state, task_name=args.task, older_than_seconds=args.older_than,
                      stuck=args.stuck, limit=args.limit)
    if args.output == "json":
        render.print_json([r.as_json() for r in rows])
    else:
        render.tasks_table(rows)
    return EXIT_OK


def _publisher(ctx: Context, engine: sa.Engine) -> Callable[[list[str]], dict[str, str]]:
    """publish(ids) -> {task_id: message_id} through the outbox's own publisher."""
    from pcelery import outbox

    box = outbox.Outbox(engine, ctx.catalog, ctx.env, sqs=ctx.aws.sqs)
    return box.publish_ids


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
        if args.output == "json":
            render.print_json(render.replay_plan_json(rows, dry_run=args.dry_run))
        else:
            render.replay_plan_text(rows, dry_run=args.dry_run)
        return EXIT_OK
    render.note(f"replay {len(rows)} task(s): rows back to pending, then published to their queues")
    if not args.yes:
        confirm(f"Replay {len(rows)} task(s)? A replayed task runs again even if it succeeded before.",
                expected="yes", what="replay")
    result = replay(engine, rows, _publisher(ctx, engine))
    render.show(args.output, result, render.replay_text)
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


def cmd_local(ctx: Context) -> int:
    try:
        from devstack import practice
        from devstack.stack import REPO_ROOT
    except ImportError:
        raise OpsError("`ops local` runs the dev harness of the repository (devstack/): run it from a checkout "
                       "of the repository after `make setup`", EXIT_USAGE) from None
    action, output = ctx.args.action, ctx.args.output
    if action == "demo":  # the self-contained product demo, in a process of its own
        command, env = practice.demo_command()
        return subprocess.call(command, env=env, cwd=REPO_ROOT)
    data: dict[str, Any]
    if action == "up":
        render.show(output, practice.up(), render.local_up_text)
        return EXIT_OK
    if action == "down":
        render.show(output, practice.down(), render.local_down_text)
        return EXIT_OK
    if action == "status":
        data = practice.status()
        render.show(output, data, render.local_status_text)
        return EXIT_OK if data["up"] else EXIT_UNREACHABLE
    try:  # seed
        data = practice.seed()
    except practice.NotUp as exc:
        raise OpsError(str(exc), EXIT_UNREACHABLE) from None
    render.show(output, data, render.seed_text)
    return EXIT_OK


COMMANDS: dict[str, Callable[[Context], int]] = {
    "depth": cmd_depth, "peek": cmd_peek, "redrive": cmd_redrive, "tasks": cmd_tasks,
    "replay": cmd_replay, "purge": cmd_purge, "local": cmd_local,
}


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from pcelery.settings import ops_parse_only

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="ops: %(message)s",
                        level=logging.DEBUG if args.debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if ops_parse_only():
        render.note(f"parsed: {args.command} (not run: {PARSE_ONLY_ENV}=1)")
        return EXIT_OK
    ctx: Context | None = None
    try:
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
    except Exception as exc:
        if args.debug:
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
