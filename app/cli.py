"""`pcelery-worker`: check the settings, then exec the Celery worker (the image's entry point).

Queues: PCELERY_WORKER_QUEUES (default: every catalog queue). Concurrency: PCELERY_CONCURRENCY,
else the largest `concurrency` among the consumed queues' contracts. Gossip, mingle and
heartbeats are broadcast features SQS does not have, so they are off. Arguments after `--` are
passed on to `celery worker` (e.g. `pcelery-worker -- --loglevel=DEBUG`).

Exit codes: 2 bad settings (checked here, before Celery starts); 3 refused by the Celery process
itself: a catalog queue missing on SQS, a consumed queue without a redrive policy, or a store
schema behind the code (pcelery.celeryconfig, pcelery.worker.startup_problems); otherwise Celery's.
"""

from __future__ import annotations

import argparse
import os
import sys


def worker(argv: list[str] | None = None) -> int:
    from pcelery.settings import Settings, SettingsError, WorkerSettings

    parser = argparse.ArgumentParser(
        prog="pcelery-worker", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="settings: PCELERY_ENV, PCELERY_CATALOG, PCELERY_WORKER_QUEUES, PCELERY_TASK_MODULES, "
               "PCELERY_CONCURRENCY, PCELERY_WORKER_NAME, PCELERY_LOG_LEVEL, DATABASE_URL (or DB_*), "
               "PCELERY_RESULT_BACKEND (or REDIS_*), AWS_REGION, AWS_ENDPOINT_URL_SQS. exit codes: 2 bad "
               "settings; 3 refused to start (missing queue, no redrive policy, old schema); else Celery's")
    parser.add_argument("celery_args", nargs="*", metavar="-- CELERY_ARG",
                        help="passed on to `celery worker` after a `--`")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        worker_settings = WorkerSettings.from_env(settings)
    except SettingsError as exc:
        print(f"pcelery-worker: error: {exc}", file=sys.stderr)
        return 2
    command = [
        sys.executable, "-m", "celery", "-A", "pcelery.worker", "worker",
        "-Q", ",".join(worker_settings.queues),
        "--concurrency", str(worker_settings.concurrency),
        "--hostname", worker_settings.node_name,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", worker_settings.log_level,
        *args.celery_args,
    ]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(worker())
