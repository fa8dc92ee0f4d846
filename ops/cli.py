"""`python -m ops`: argument parsing and rendering over ops.queues and ops.tasks.

Data goes to stdout (a table, or with --output json the data and nothing else); progress,
notes, prompts and errors go to stderr. Errors are one line and a documented exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

from . import (
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
)

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


def _duration(text: str) -> float:
    from .tasks import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: use a number and s, m, h or d") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def build_parser() -> argparse.ArgumentParser:
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

    parser = argparse.ArgumentParser(
        prog="python -m ops", description="On-call tools for persistent Celery on SQS: look at queues and "
        "DLQs, move messages back, replay tasks from the claim-check store.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, description=None):
        return sub.add_parser(name, parents=[common], help=help_text,
                              description=textwrap.fill(description or help_text, 90),
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("depth", "visible, in-flight and delayed counts of queues and their DLQs (and task rows per state)")
    p.add_argument("queues", nargs="*", metavar="QUEUE", help="queues to show (default: every catalog queue)")
    p.add_argument("--watch", type=_positive_float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")

    p = add("peek", "show messages of a DLQ without consuming them (each is made visible again at once)")
    p.add_argument("queue", metavar="DLQ", help="e.g. default-dlq (catalog name + -dlq), an SQS name or a URL")
    p.add_argument("--limit", type=_positive_int, default=10, help="at most this many messages (default 10)")
    p.add_argument("--force", action="store_true",
                   help="peek a work queue too (each peek counts as a receive toward maxReceiveCount)")

    p = add("redrive", "move messages from a DLQ back to its source queue (or --to)",
            "Move messages from a DLQ back to its source queue (or --to). After a client-side move the "
            "moved tasks' rows go from dead to queued when the database is reachable; a native move "
            "does not say which messages it moved, so those rows stay dead until a worker claims them.")
    p.add_argument("queue", metavar="DLQ", help="e.g. default-dlq (catalog name + -dlq), an SQS name or a URL")
    p.add_argument("--to", metavar="QUEUE", help="destination (default: the one queue whose redrive policy names the DLQ)")
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
    p.add_argument("--hold-seconds", type=_positive_int, default=60, metavar="SECONDS",
                   help="client mode: a message being moved stays invisible this long; if ops dies mid-move it "
                        "reappears in the DLQ after this (default 60)")

    p = add("tasks", "list task rows of the claim-check store (stuck, failed, dead, pending too long)")
    p.add_argument("--state", help="pending, queued, running, succeeded, failed or dead")
    p.add_argument("--task", metavar="NAME", help="only this task name")
    p.add_argument("--older-than", type=_duration, metavar="DURATION", help="created longer ago than this: 90s, 15m, 2h, 1d")
    p.add_argument("--stuck", action="store_true", help="running rows whose lease has expired (their worker died)")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most N rows, oldest first (default 50)")

    p = add("replay", "re-enqueue tasks from their rows (reset to pending, then publish through the outbox)")
    p.add_argument("task_ids", nargs="*", metavar="TASK_ID")
    p.add_argument("--state", help="replay every row in this state (failed, dead, ...) instead of ids")
    p.add_argument("--task", metavar="NAME", help="with --state: only this task name")
    p.add_argument("--limit", type=_positive_int, default=100, help="at most N rows (default 100)")
    p.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = add("purge", "delete every message of a queue (asks first; in prod the queue name must be typed back)")
    p.add_argument("queue", metavar="QUEUE", help="a catalog name (default, default-dlq), an SQS name or a URL")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation (not enough in prod)")
    p.add_argument("--confirm-name", metavar="NAME", help="prod: the SQS queue name, instead of typing it back")
    p.add_argument("--force", action="store_true", help="allow purging a catalog work queue in prod")
    p.add_argument("--dry-run", action="store_true", help="show what would be purged; purge nothing")

    p = add("local", "the local stack (moto SQS, SQLite, worker, relay) to practise this runbook on")
    p.add_argument("action", choices=("up", "down", "status", "seed", "demo"),
                   help="up: start it and print export lines (eval \"$(python -m ops local up)\"); down: stop what "
                        "up started; status: exit 0 when up, 4 when not; seed: submit demo tasks, some failing, to "
                        "the running stack; demo: run the self-contained product demo (python -m devstack.demo)")
    return parser


# ------------------------------------------------------------------------------- rendering


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _table(headers: list[str], rows: list[list], out=None) -> None:
    out = out or sys.stdout
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


def _short(text, n=60):
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _when(iso) -> str | None:
    """'2026-11-24T01:38:21.123456Z' -> '2026-11-24 01:38:21' for tables."""
    return None if not iso else str(iso).replace("T", " ")[:19]


def _note(text: str) -> None:
    # One line, always: an AWS error message can carry a whole HTML page.
    text = " ".join(str(text).split())
    print(f"ops: {text if len(text) <= 600 else text[:599] + '…'}", file=sys.stderr)


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


# ------------------------------------------------------------------------------- commands


class Context:
    """What every command needs: settings, catalog, AWS clients (lazily) and the store."""

    def __init__(self, args):
        from pcelery.settings import Settings, SettingsError

        self.args = args
        try:
            self.settings = Settings.from_env(env=args.env, catalog_spec=args.catalog)
        except SettingsError as exc:
            raise OpsError(str(exc), EXIT_USAGE) from None
        self.catalog = self.settings.catalog
        self.env = self.settings.env
        self._aws = None
        self._store = None
        self._store_note = None

    @property
    def aws(self):
        if self._aws is None:
            from .queues import connect

            self._aws = connect(self.settings, profile=self.args.profile, region=self.args.region,
                                endpoint_url=self.args.endpoint_url)
        return self._aws

    def resolve(self, spec: str):
        from .queues import resolve

        return resolve(self.aws.sqs, spec, env=self.env, catalog=self.catalog)

    def store(self, *, required: bool = False):
        """The store engine, or None (with one note on stderr) when it is unreachable."""
        from .tasks import open_store

        if self._store is None and self._store_note is None:
            self._store, self._store_note = open_store(self.settings.database_url)
            if self._store_note and not required:
                _note(f"{self._store_note}; task fields are left empty")
        if required and self._store is None:
            raise OpsError(self._store_note, EXIT_DB)
        return self._store

    def close(self):
        if self._store is not None:
            self._store.dispose()


def cmd_depth(ctx: Context) -> int:
    from pcelery.store import count_by_queue_and_state

    from .queues import catalog_refs, depth

    args = ctx.args
    refs = ([ctx.resolve(q) for q in args.queues] if args.queues
            else catalog_refs(ctx.aws.sqs, env=ctx.env, catalog=ctx.catalog))

    def snapshot():
        engine = ctx.store()
        counts = None
        if engine is not None:
            try:
                counts = count_by_queue_and_state(engine)
            except Exception as exc:  # noqa: BLE001 - counts are extra; depth must still answer
                _note(f"task counts unavailable ({exc})")
        return depth(ctx.aws, refs, env=ctx.env, catalog=ctx.catalog, task_counts=counts)

    if not args.watch:
        _render_depth(snapshot(), args.output)
        return EXIT_OK
    tty = sys.stderr.isatty()
    try:
        while True:
            rows = snapshot()
            if args.output == "json":
                print(json.dumps(rows, default=str), flush=True)  # one document per refresh
            else:
                if tty:
                    sys.stderr.write("\033[H\033[J")
                sys.stderr.write(f"{time.strftime('%H:%M:%S')}  every {args.watch:g}s, Ctrl-C to stop\n")
                _render_depth(rows, "table", out=sys.stderr)
                sys.stderr.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EXIT_OK


def _render_depth(rows, output, out=None):
    if output == "json":
        _print_json(rows)
        return
    table = []
    for r in rows:
        dlq = r["dlq"] or {}
        tasks = r.get("tasks")
        tasks_text = None
        if tasks is not None:
            tasks_text = " ".join(f"{k}={v}" for k, v in tasks.items() if v) or "none"
        age = r["oldest_age_seconds"]
        table.append([r["queue"], r["visible"], r["in_flight"], r["delayed"],
                      None if age is None else f"{age:.0f}s", dlq.get("visible"), dlq.get("in_flight"), tasks_text])
    _table(["QUEUE", "VISIBLE", "IN-FLIGHT", "DELAYED", "OLDEST", "DLQ-VISIBLE", "DLQ-IN-FLIGHT", "TASKS"],
           table, out=out)


def cmd_peek(ctx: Context) -> int:
    from .queues import peek
    from .tasks import row_summary, task_rows

    args = ctx.args
    ref = ctx.resolve(args.queue)
    messages = peek(ctx.aws.sqs, ref, limit=args.limit, force=args.force)
    engine = ctx.store() if messages else None
    if engine is not None:
        try:
            rows = task_rows(engine, [m["task_id"] for m in messages])
            for m in messages:
                m["task_row"] = row_summary(rows.get(m["task_id"]))
        except Exception as exc:  # noqa: BLE001 - rows are extra; peek must still answer
            _note(f"task rows unavailable ({exc})")
    if args.output == "json":
        _print_json(messages)
        return EXIT_OK
    if not messages:
        print(f"{ref.name}: no visible messages")
        return EXIT_OK
    print(f"{ref.name}: {len(messages)} message(s), none consumed")
    for m in messages:
        row = m["task_row"] or {}
        print()
        print(f"message {m['message_id']}  received {m['receive_count']}x (this peek included)  sent {m['sent_at']}")
        print(f"  task     {m['task'] or '(not a Celery message)'}  id {m['task_id'] or '-'}")
        if m["task_row"]:
            print(f"  row      {row['state']}  attempts {row['attempts']}  error {_short(row['last_error'], 100) or '-'}")
            print(f"  payload  {_short(json.dumps(row['payload'], default=str), 100)}")
        elif m["task_id"] and engine is not None:
            print("  row      (no row with this id: a poison message, see RUNBOOK.md#poison-task)")
        if m["attributes"]:
            print(f"  attrs    {json.dumps(m['attributes'])}")
        if not m["task"]:  # a Celery body is base64 of an envelope: the row's payload says more
            print(f"  body     {_short(m['body'], 100)}")
    return EXIT_OK


def cmd_redrive(ctx: Context) -> int:
    from .queues import plan_redrive, redrive

    args = ctx.args
    dlq = ctx.resolve(args.queue)
    to = ctx.resolve(args.to) if args.to else None
    plan = plan_redrive(ctx.aws.sqs, dlq, env=ctx.env, catalog=ctx.catalog, to=to, mode=args.mode,
                        task=args.task, limit=args.limit, force=args.force)
    for n in plan.notes:
        _note(n)
    scope = [f"{plan.visible} visible"]
    if args.task:
        scope.append(f"only task {args.task}")
    if args.limit:
        scope.append(f"at most {args.limit}")
    if args.rate:
        scope.append(f"{args.rate:g}/s")
    _note(f"redrive {plan.source.name} -> {plan.destination.name} ({', '.join(scope)}; mode {plan.mode})")
    if not args.dry_run and not args.yes:
        confirm(f"Move messages from {plan.source.name} to {plan.destination.name}?", expected="yes",
                what="redrive")
    result = redrive(ctx.aws, plan, limit=args.limit, rate=args.rate, task=args.task, dry_run=args.dry_run,
                     hold_seconds=args.hold_seconds)
    summary = result.summary()
    summary["tasks_requeued"] = None
    if result.moved_task_ids:
        engine = ctx.store()
        if engine is not None:
            from pcelery.store import mark_redriven

            try:
                summary["tasks_requeued"] = len(mark_redriven(engine, result.moved_task_ids))
            except Exception as exc:  # noqa: BLE001 - the messages moved; the rows are cosmetic
                _note(f"task rows not updated ({exc}): they show dead until a worker claims them")
    if args.output == "json":
        _print_json(summary)
    else:
        if result.dry_run:
            print(f"dry run: would move {result.would_move} message(s) from {result.source} to "
                  f"{result.destination} (mode {result.mode}); nothing moved")
        else:
            print(f"moved {result.moved}, failed {result.failed}, skipped {result.skipped}: {result.source} -> "
                  f"{result.destination} (mode {result.mode})")
            if summary["tasks_requeued"] is not None:
                n, of = summary["tasks_requeued"], len(result.moved_task_ids)
                print(f"task rows dead -> queued: {n} of {of}"
                      + (" (the others were already claimed by a worker)" if n < of else ""))
        if result.failure_reason:
            print(f"reason: {result.failure_reason}")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if result.failed else EXIT_OK


def cmd_tasks(ctx: Context) -> int:
    from .tasks import list_tasks

    args = ctx.args
    engine = ctx.store(required=True)
    rows = list_tasks(engine, state=args.state, task_name=args.task, older_than_seconds=args.older_than,
                      stuck=args.stuck, limit=args.limit)
    if args.output == "json":
        _print_json(rows)
        return EXIT_OK
    _table(["ID", "TASK", "QUEUE", "STATE", "ATTEMPTS", "CREATED", "UPDATED", "ERROR"],
           [[r["id"], r["task_name"], r["queue"], r["state"], r["attempts"], _when(r["created_at"]),
             _when(r["updated_at"]), _short(r.get("error"), 50)] for r in rows])
    return EXIT_OK


def _publisher(ctx: Context, engine):
    """publish(ids) -> {task_id: message_id} through the outbox's own publisher."""
    from pcelery import outbox

    box = outbox.Outbox(engine, ctx.catalog, ctx.env, sqs=ctx.aws.sqs)
    return box.publish_ids


def cmd_replay(ctx: Context) -> int:
    from .tasks import replay, select_for_replay

    args = ctx.args
    if args.task_ids and args.state:
        raise OpsError("give TASK_ID ... or --state, not both", EXIT_USAGE)
    if not args.task_ids and not args.state:
        raise OpsError("replay needs TASK_ID ... or --state STATE (e.g. --state dead --task NAME)", EXIT_USAGE)
    engine = ctx.store(required=True)
    rows = select_for_replay(engine, task_ids=args.task_ids, state=args.state, task_name=args.task,
                             limit=args.limit)
    if args.dry_run or not rows:
        data = {"dry_run": args.dry_run, "would_replay": [r["id"] for r in rows], "rows": rows}
        if args.output == "json":
            _print_json(data)
        else:
            print(f"{'dry run: would replay' if args.dry_run else 'nothing to replay:'} {len(rows)} task(s)")
            for r in rows:
                print(f"  {r['id']}  {r['task_name']}  {r['state']}  attempts {r['attempts']}")
        return EXIT_OK
    _note(f"replay {len(rows)} task(s): rows back to pending, then published to their queues")
    if not args.yes:
        confirm(f"Replay {len(rows)} task(s)? A replayed task runs again even if it succeeded before.",
                expected="yes", what="replay")
    result = replay(engine, rows, _publisher(ctx, engine))
    if args.output == "json":
        _print_json(result)
    else:
        print(f"replayed {len(result['reset'])} task(s): published {len(result['published'])}, "
              f"left for the relay {len(result['left_for_relay'])}, skipped (running) {len(result['skipped_running'])}")
        if result["error"]:
            print(f"note: {result['error']}")
    return EXIT_OK


def cmd_purge(ctx: Context) -> int:
    from pcelery.catalog import queue_prefix

    from .queues import attributes, is_work_queue, purge

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
        data = {"queue": ref.name, "url": ref.url, "would_purge_approximately": count, "dry_run": True}
        _print_json(data) if args.output == "json" else print(f"dry run: would purge about {count} message(s) "
                                                               f"from {ref.name}")
        return EXIT_OK
    if prod:
        if args.confirm_name is not None:
            if args.confirm_name != ref.name:
                raise OpsError(f"--confirm-name {args.confirm_name!r} is not the queue's name {ref.name!r}: "
                               "nothing was purged", EXIT_NOT_CONFIRMED)
        else:
            confirm(f"PROD: purge about {count} message(s) from {ref.name}? This cannot be undone.",
                    expected=ref.name, what=f"purge a prod queue (or pass --confirm-name {ref.name})")
    elif not args.yes:
        confirm(f"Purge about {count} message(s) from {ref.name}? This cannot be undone.", expected="yes",
                what="purge")
    result = purge(ctx.aws.sqs, ref)
    if args.output == "json":
        _print_json(result)
    else:
        print(f"purged {ref.name} (about {result['purged_approximately']} message(s); SQS may take up to 60 s)")
    return EXIT_OK


def cmd_local(ctx: Context) -> int:
    try:
        from devstack import practice
    except ImportError:
        raise OpsError("`ops local` runs the dev harness of the repository (devstack/): run it from a checkout "
                       "of the repository after `make setup`", EXIT_USAGE) from None
    action, output = ctx.args.action, ctx.args.output
    if action == "up":
        data = practice.up()
        if output == "json":
            _print_json(data)
        else:
            sys.stdout.write(practice.exports(data["environ"]))
        return EXIT_OK
    if action == "down":
        data = practice.down()
        if output == "json":
            _print_json(data)
        return EXIT_OK
    if action == "status":
        data = practice.status()
        if output == "json":
            _print_json(data)
        elif data["up"]:
            print(f"up: SQS {data['endpoint']}, store {data['database_url']}")
            for name, p in data["processes"].items():
                print(f"  {name:<7} pid {p['pid']}  {'running' if p['alive'] else 'NOT running'}")
        else:
            print("down" if not data["processes"] else "partly down: `python -m ops local down` then `up`")
        return EXIT_OK if data["up"] else EXIT_UNREACHABLE
    if action == "seed":
        try:
            data = practice.seed()
        except practice.NotUp as exc:
            raise OpsError(str(exc), EXIT_UNREACHABLE) from None
        if output == "json":
            _print_json(data)
        else:
            print(f"submitted {len(data['task_ids'])} task(s): "
                  f"{', '.join(f'{n} {k}' for k, n in data['by_task'].items())}; "
                  "the failing ones reach the DLQ in about a minute (`python -m ops depth`)")
        return EXIT_OK
    # demo: the self-contained product demo, in a process of its own
    command, env = practice.demo_command()
    return subprocess.call(command, env=env, cwd=practice.REPO_ROOT)


COMMANDS = {"depth": cmd_depth, "peek": cmd_peek, "redrive": cmd_redrive, "tasks": cmd_tasks,
            "replay": cmd_replay, "purge": cmd_purge, "local": cmd_local}


def main(argv: list[str] | None = None) -> int:
    from pcelery.settings import ops_parse_only

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, format="ops: %(message)s",
                        level=logging.DEBUG if args.debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if ops_parse_only():
        _note(f"parsed: {args.command} (not run: {PARSE_ONLY_ENV}=1)")
        return EXIT_OK
    ctx = None
    try:
        ctx = Context(args)
        return COMMANDS[args.command](ctx)
    except OpsError as exc:
        _note(f"error: {exc.message}")
        return exc.exit_code
    except KeyboardInterrupt:
        _note("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        from .queues import aws_error

        try:
            err = aws_error(exc, args.command)
        except Exception:  # noqa: BLE001 - anything not AWS-shaped is a bug in ops
            _note(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
            return EXIT_INTERNAL
        _note(f"error: {err.message}")
        return err.exit_code
    finally:
        if ctx is not None:
            ctx.close()
