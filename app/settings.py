"""Process settings from the environment, parsed once and validated with clear errors.

Entry points (worker, relay, migrate, demo, ops) call `Settings.from_env()`; library code takes
the values as arguments. The CDK workers construct sets exactly these variables on ECS, with the
database password and the Redis AUTH token as ECS secrets.

| variable                  | meaning                                                             |
|---------------------------|---------------------------------------------------------------------|
| PCELERY_ENV               | environment: local, dev, staging, prod (default local)              |
| PCELERY_CATALOG           | queue catalog as module:ATTRIBUTE (default catalog:CATALOG)         |
| DATABASE_URL              | SQLAlchemy URL of the claim-check store (default SQLite under var/) |
| DB_HOST DB_PORT DB_NAME DB_USER DB_PASSWORD | the same, as ECS passes RDS's secret (TLS required) |
| DB_SSLROOTCERT            | CA bundle that verifies the RDS certificate (sslmode=verify-full); unset: TLS without verification |
| PCELERY_RESULT_BACKEND    | optional Celery result backend URL (redis:// or rediss://)          |
| REDIS_HOST REDIS_PORT REDIS_AUTH_TOKEN | the same, as ECS passes ElastiCache's (always TLS)     |
| PCELERY_WORKER_QUEUES     | comma-separated catalog queues this worker consumes (default all)  |
| PCELERY_TASK_MODULES      | comma-separated modules whose tasks the worker registers (default app.demo_tasks) |
| PCELERY_RELAY_MIN_AGE     | relay: seconds a row stays pending before the relay publishes it (default 30) |
| PCELERY_RELAY_INTERVAL    | relay: seconds between passes when idle (default 5)                 |
| AWS_REGION, AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL | standard AWS settings; an endpoint means local SQS |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from catalog import Catalog, CatalogError, check_env, load_catalog

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SQLITE_URL = f"sqlite:///{REPO_ROOT / 'var' / 'pcelery.sqlite3'}"


class SettingsError(ValueError):
    """A setting that is missing or malformed. The message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    env: str
    catalog: Catalog
    database_url: str
    result_backend: str | None
    worker_queues: tuple[str, ...]
    region: str
    sqs_endpoint: str | None
    task_modules: tuple[str, ...] = ("app.demo_tasks",)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        e = os.environ if environ is None else environ
        try:
            env = check_env(e.get("PCELERY_ENV", "local"))
            cat = load_catalog(e.get("PCELERY_CATALOG"))
        except CatalogError as exc:
            raise SettingsError(f"PCELERY_ENV/PCELERY_CATALOG: {exc}") from None
        # dict.fromkeys: a queue named twice is consumed once, in the order first given
        queues = tuple(dict.fromkeys(q.strip() for q in e.get("PCELERY_WORKER_QUEUES", "").split(",") if q.strip()))
        unknown = [q for q in queues if q not in cat.names()]
        if unknown:
            raise SettingsError(
                f"PCELERY_WORKER_QUEUES names {unknown}, which the catalog does not have: "
                f"use some of {cat.names()}"
            )
        return cls(
            env=env,
            catalog=cat,
            database_url=_database_url(e),
            result_backend=_result_backend(e),
            worker_queues=queues or tuple(cat.names()),
            region=e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or "us-east-1",
            sqs_endpoint=e.get("AWS_ENDPOINT_URL_SQS") or e.get("AWS_ENDPOINT_URL") or None,
            task_modules=_task_modules(e),
        )


def _task_modules(e) -> tuple[str, ...]:
    raw = e.get("PCELERY_TASK_MODULES", "app.demo_tasks")
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
    if bad or not modules:
        raise SettingsError(
            f"PCELERY_TASK_MODULES={raw!r} must be a comma-separated list of importable module names "
            "(e.g. 'app.demo_tasks,myproject.tasks'): fix it or unset it for the default"
        )
    return modules


def _database_url(e) -> str:
    if e.get("DATABASE_URL"):
        url = e["DATABASE_URL"]
        if url.startswith(("postgres://", "postgresql://")):
            # SQLAlchemy would pick psycopg2, which is not installed; psycopg 3 is.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url
    if e.get("DB_HOST"):
        missing = [k for k in ("DB_USER", "DB_PASSWORD") if not e.get(k)]
        if missing:
            raise SettingsError(f"DB_HOST is set but {missing} are not: set them (ECS passes them as secrets)")
        # With the RDS CA bundle (the image ships it), check the server's certificate and name:
        # `require` alone encrypts but would hand the password to anything that answers.
        root_cert = e.get("DB_SSLROOTCERT")
        tls = f"sslmode=verify-full&sslrootcert={quote(root_cert, safe='/')}" if root_cert else "sslmode=require"
        return (
            f"postgresql+psycopg://{quote(e['DB_USER'], safe='')}:{quote(e['DB_PASSWORD'], safe='')}"
            f"@{e['DB_HOST']}:{_port(e, 'DB_PORT', '5432')}/{e.get('DB_NAME', 'pcelery')}?{tls}"
        )
    return DEFAULT_SQLITE_URL


def _result_backend(e) -> str | None:
    if e.get("PCELERY_RESULT_BACKEND"):
        url = e["PCELERY_RESULT_BACKEND"]
        if not url.startswith(("redis://", "rediss://")):
            raise SettingsError(
                f"PCELERY_RESULT_BACKEND={url!r} is not a redis:// or rediss:// URL: fix it or unset it"
            )
        return url
    if e.get("REDIS_HOST"):
        token = e.get("REDIS_AUTH_TOKEN")
        if not token:
            raise SettingsError("REDIS_HOST is set but REDIS_AUTH_TOKEN is not: set it (ECS passes it as a secret)")
        return (
            f"rediss://:{quote(token, safe='')}@{e['REDIS_HOST']}:{_port(e, 'REDIS_PORT', '6379')}/0"
            "?ssl_cert_reqs=required"
        )
    return None


def _port(e, name: str, default: str) -> str:
    value = e.get(name) or default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SettingsError(f"{name}={value!r} is not a port number: set it to 1..65535 or unset it for {default}")
    return value
