"""The outbox relay: publishes rows a submitter committed but did not get onto SQS.

    pcelery-relay [--once] [--interval S] [--min-age S] [--batch N]

One or more copies per environment; they are safe together thanks to FOR UPDATE SKIP LOCKED. It
reads the common settings (pcelery.settings) plus PCELERY_RELAY_MIN_AGE (default 30 s: a
submitter normally publishes within milliseconds of its commit) and PCELERY_RELAY_INTERVAL
(default 5 s). Each loop prints one CloudWatch Embedded Metric Format line to stdout (namespace
PersistentCelery, dimension Environment, metrics OutboxPendingCount and
OutboxOldestPendingAgeSeconds); logs go to stderr. SIGTERM finishes the current batch and exits 0.

At start it waits for the store (its schema current) and SQS (every catalog queue) with capped
backoff and a line per attempt, for up to PCELERY_STARTUP_TIMEOUT seconds (pcelery.startup).

Exit codes: 0 done, 1 a `--once` run failed (database error), 2 bad settings or arguments,
3 refused (a catalog queue missing, a schema behind the code), 4 SQS or the store unreachable at
start for PCELERY_STARTUP_TIMEOUT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from pcelery import startup, store
from pcelery.outbox import SQS_BATCH, Publisher, publish_and_mark
from pcelery.store import PendingSummary

log = logging.getLogger("pcelery.relay")

EMF_NAMESPACE = "PersistentCelery"
MAX_REFUSED_PER_PASS = 1000


def relay_pass(engine: sa.Engine, publisher: Publisher, *, min_age: float, batch: int = SQS_BATCH,
               should_stop: Callable[[], bool] = lambda: False) -> int:
    """Publish pending rows older than min_age until none are left (or SQS stops accepting).
    Each batch is one short transaction that locks its rows while they are sent, so copies of
    the relay never send the same row. Returns how many were published."""
    total = 0
    # Rows SQS refused in this pass (a missing queue, an invalid delay): skipped until the next
    # pass, so they can neither spin this loop nor hold back the rows behind them.
    refused: set[str] = set()
    while not should_stop() and len(refused) < MAX_REFUSED_PER_PASS:
        with engine.begin() as conn:
            rows = store.claim_unpublished(conn, older_than_seconds=min_age, limit=batch, exclude_ids=refused)
            if not rows:
                break
            published = publish_and_mark(conn, publisher, rows)
        total += len(published.sent)
        refused.update(r.id for r in rows if r.id not in published.sent)
        if published.unreachable:
            break  # the rest waits for the next interval
    return total


def emf_line(env: str, summary: PendingSummary, *, published: int | None = None, now: float | None = None) -> str:
    """One CloudWatch Embedded Metric Format record; the CDK monitoring construct alarms on
    OutboxOldestPendingAgeSeconds under exactly these names."""
    record: dict[str, Any] = {
        "_aws": {
            "Timestamp": int((now if now is not None else time.time()) * 1000),
            "CloudWatchMetrics": [{
                "Namespace": EMF_NAMESPACE,
                "Dimensions": [["Environment"]],
                "Metrics": [
                    {"Name": "OutboxPendingCount", "Unit": "Count"},
                    {"Name": "OutboxOldestPendingAgeSeconds", "Unit": "Seconds"},
                ],
            }],
        },
        "Environment": env,
        "OutboxPendingCount": summary.count,
        "OutboxOldestPendingAgeSeconds": round(summary.oldest_age_seconds, 3),
    }
    if published is not None:
        record["OutboxPublished"] = published  # a property for Logs Insights, not a metric
    return json.dumps(record)


def _parser() -> argparse.ArgumentParser:
    from pcelery.settings import DEFAULT_RELAY_INTERVAL, DEFAULT_RELAY_MIN_AGE

    parser = argparse.ArgumentParser(
        prog="pcelery-relay", description="Publish committed tasks that were not sent to SQS (the outbox relay).",
        epilog="exit codes: 0 done (SIGTERM, or --once finished); 1 a --once run failed on the database; "
               "2 bad settings or arguments; 3 refused (a catalog queue missing, an old schema); 4 SQS or the store "
               "unreachable at start (PCELERY_STARTUP_TIMEOUT)")
    parser.add_argument("--once", action="store_true", help="one pass until no rows are left, then exit")
    parser.add_argument("--interval", type=_non_negative, default=None,
                        help=f"seconds between passes (PCELERY_RELAY_INTERVAL, default {DEFAULT_RELAY_INTERVAL:g})")
    parser.add_argument("--min-age", type=_non_negative, default=None,
                        help=f"only rows pending at least this long (PCELERY_RELAY_MIN_AGE, "
                             f"default {DEFAULT_RELAY_MIN_AGE:g})")
    parser.add_argument("--batch", type=_batch, default=SQS_BATCH, help="rows per transaction, 1-1000 (default 10)")
    return parser


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more seconds")
    return value


def _batch(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 1000")
    return int(text)


def main(argv: list[str] | None = None, *, database_url: str | None = None) -> int:
    """`pcelery-relay`. database_url: the store's, instead of the environment's (manage.py pcelery_relay)."""
    from pcelery.schema import make_engine
    from pcelery.settings import RelaySettings, Settings, SettingsError
    from pcelery.sqs import RELAY, make_client

    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if database_url:
            settings = dataclasses.replace(settings, database_url=database_url)
        relay_settings = RelaySettings.from_env()
    except SettingsError as exc:
        print(f"pcelery-relay: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=relay_settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    min_age = args.min_age if args.min_age is not None else relay_settings.min_age
    interval = args.interval if args.interval is not None else relay_settings.interval
    client = make_client(settings, timeouts=RELAY)
    try:
        startup.wait_for_all([
            ("the task store", lambda: startup.store_is_current(make_engine(settings.database_url))),
            ("SQS", lambda: startup.queue_urls(settings, client)),
        ], timeout=relay_settings.startup_timeout, prog="pcelery-relay")
    except (startup.Refused, startup.Unreachable) as exc:
        return startup.exit_for("pcelery-relay", exc)
    engine = make_engine(settings.database_url)
    publisher = Publisher(settings.catalog, settings.env, client)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the current batch, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("relay started: env=%s min_age=%gs interval=%gs batch=%d", settings.env, min_age, interval, args.batch)
    try:
        while True:
            try:
                published = relay_pass(engine, publisher, min_age=min_age, batch=args.batch, should_stop=stop.is_set)
                if published:
                    log.info("published %d pending task(s)", published)
                print(emf_line(settings.env, store.pending_summary(engine), published=published), flush=True)
            except sa.exc.SQLAlchemyError as exc:
                log.error("database error in relay pass (%s); retrying in %gs",
                          str(exc).splitlines()[0], interval)
                if args.once:
                    return 1
            if args.once or stop.wait(interval):
                return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
