"""`pcelery-worker`: check the settings, then exec the Celery worker (the image's entry point).

Queues: PCELERY_WORKER_QUEUES (default: every catalog queue). Concurrency: PCELERY_CONCURRENCY,
else the largest `concurrency` among the consumed queues' contracts. Gossip, mingle and
heartbeats are broadcast features SQS does not have, so they are off. Arguments after `--` are
passed on to `celery worker` (e.g. `pcelery-worker -- --loglevel=DEBUG`).

Before Celery starts it checks what it can (pcelery.startup): the settings, that the task
modules import, and that SQS and the store answer, waiting for them with capped backoff (a line
per attempt) for up to PCELERY_STARTUP_TIMEOUT seconds.

Exit codes: 2 a bad setting (the line names the variable and the fix); 3 refused: a catalog
queue missing on SQS, a consumed queue without a redrive policy, or a store schema behind the
code; 4 SQS or the store unreachable for PCELERY_STARTUP_TIMEOUT; otherwise Celery's.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from pcelery import startup


def worker(argv: list[str] | None = None) -> int:
    from pcelery.celeryconfig import prefetch_multiplier
    from pcelery.settings import Settings, SettingsError, WorkerSettings

    parser = argparse.ArgumentParser(
        prog="pcelery-worker", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="settings: PCELERY_ENV, PCELERY_CATALOG, PCELERY_WORKER_QUEUES, PCELERY_TASK_MODULES, "
               "PCELERY_CONCURRENCY, PCELERY_WORKER_NAME, PCELERY_LOG_LEVEL, DATABASE_URL (or DB_*), "
               "PCELERY_RESULT_BACKEND (or REDIS_*), PCELERY_STARTUP_TIMEOUT, AWS_REGION, AWS_ENDPOINT_URL_SQS. "
               "exit codes: 2 bad setting; 3 refused to start (missing queue, no redrive policy, old schema); "
               "4 SQS or the store unreachable; else Celery's")
    parser.add_argument("celery_args", nargs="*", metavar="-- CELERY_ARG",
                        help="passed on to `celery worker` after a `--`")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        worker_settings = WorkerSettings.from_env(settings)
        celery_app = import_celery_app(worker_settings.celery_app)
        import_task_modules(worker_settings.task_modules)
        define_tasks(celery_app)
    except SettingsError as exc:
        print(f"pcelery-worker: error: {exc}", file=sys.stderr)
        return startup.EXIT_BAD_SETTINGS
    try:
        wait_for_dependencies(settings, worker_settings)
    except (startup.Refused, startup.Unreachable) as exc:
        return startup.exit_for("pcelery-worker", exc)
    command = [
        sys.executable, "-m", "celery", "-A", worker_settings.celery_app, "worker",
        "-Q", ",".join(worker_settings.queues),
        # The task modules, imported by the worker as it starts (the app's own autodiscovery, if
        # any, adds its own): a worker refuses messages for tasks it has not imported.
        *(["--include", ",".join(worker_settings.task_modules)] if worker_settings.task_modules else []),
        "--concurrency", str(worker_settings.concurrency),
        # Celery's command line reads both before the worker's own settings are computed.
        "--prefetch-multiplier", str(prefetch_multiplier(settings, worker_settings)),
        "--hostname", worker_settings.node_name,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", worker_settings.log_level,
        *args.celery_args,
    ]
    os.execv(sys.executable, command)
    return 0  # not reached


def import_celery_app(spec: str) -> Any:
    """The app `celery -A` will run must exist and be configured for SQS (pcelery.worker.configure)."""
    from celery import Celery

    from pcelery.settings import SettingsError
    from pcelery.worker import _CONFIGURED

    module, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except Exception as exc:  # noqa: BLE001 - whatever the module raises, name it and the setting
        raise SettingsError(f"PCELERY_CELERY_APP: {spec!r} cannot be loaded ({type(exc).__name__}: {exc}): fix the "
                            "name, or install the code that defines the app") from None
    if not isinstance(found, Celery):
        raise SettingsError(f"PCELERY_CELERY_APP: {spec!r} is a {type(found).__name__}, not a Celery app")
    if found not in _CONFIGURED:
        raise SettingsError(f"PCELERY_CELERY_APP: the app {spec!r} is not configured for SQS: call "
                            "pcelery.worker.configure(app) right after creating it")
    try:
        # What the worker does first as well: the app's own imports, and its fix-ups' set-up
        # (Celery's Django fix-up runs django.setup(), which the task modules' models need).
        found.loader.import_default_modules()
    except Exception as exc:  # noqa: BLE001 - whatever the app's set-up raises, name it and the setting
        raise SettingsError(f"PCELERY_CELERY_APP: setting up the app {spec!r} failed ({type(exc).__name__}: "
                            f"{exc}): fix the app's configuration (its imports, DJANGO_SETTINGS_MODULE...)") from None
    return found


def import_task_modules(modules: tuple[str, ...]) -> None:
    """Import PCELERY_TASK_MODULES now, so a misspelt or broken module is a one-line settings
    error instead of a Celery traceback (the worker imports them again after the exec)."""
    from pcelery.settings import SettingsError

    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - whatever the module raises, name it and the setting
            raise SettingsError(
                f"PCELERY_TASK_MODULES: {module!r} cannot be imported ({type(exc).__name__}: {exc}): fix the module "
                "name, or install the code that declares the tasks into this environment") from None


def define_tasks(celery_app: Any) -> None:
    """Define every task now: `@shared_task` and `@app.task` are lazy, and a task whose options
    break the SQS contract (PersistentTask refuses them) would otherwise stop the worker with a
    traceback when Celery first touches it."""
    from pcelery.settings import SettingsError

    try:
        celery_app.finalize(auto=True)
        for task in list(celery_app.tasks.values()):
            task.name  # noqa: B018 - a pending task is defined when first touched
    except ValueError as exc:
        raise SettingsError(f"PCELERY_TASK_MODULES: {exc}") from None


def wait_for_dependencies(settings: Any, worker_settings: Any) -> None:
    """SQS (every catalog queue, the consumed ones with a redrive policy) and the store (its
    schema current), each waited for up to PCELERY_STARTUP_TIMEOUT."""
    from pcelery.schema import make_engine
    from pcelery.sqs import WORKER, make_client

    client = make_client(settings, timeouts=WORKER)
    startup.wait_for_all([
        ("SQS", lambda: startup.queue_urls(settings, client, consumed=worker_settings.queues)),
        ("the task store", lambda: startup.store_is_current(make_engine(settings.database_url))),
    ], timeout=worker_settings.startup_timeout, prog="pcelery-worker")


if __name__ == "__main__":
    sys.exit(worker())
