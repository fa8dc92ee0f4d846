"""Every setting the product reads from the environment, parsed once and validated here.

No other module reads a PCELERY_* (or AWS_*, DB_*, REDIS_*) variable: entry points call one of the
`from_env` constructors below and pass the values on as arguments. A bad value raises
SettingsError, whose message names the variable and the fix; entry points print it on one line
and exit 2. Each process parses only what it uses, so ops never refuses to run because of a
worker-only variable.

| variable                  | read by | meaning                                                     |
|---------------------------|---------|-------------------------------------------------------------|
| PCELERY_ENV               | all     | environment: local, dev, staging, prod (default local)      |
| PCELERY_CATALOG           | all     | queue catalog as module:ATTRIBUTE (default pcelery.catalog:CATALOG) |
| DATABASE_URL              | all     | SQLAlchemy URL of the claim-check store (default SQLite in ./var/) |
| DB_HOST DB_PORT DB_NAME DB_USER DB_PASSWORD | all | the same, as ECS passes RDS's secret (TLS required) |
| DB_SSLROOTCERT            | all     | CA bundle that verifies the RDS certificate (sslmode=verify-full) |
| AWS_REGION / AWS_DEFAULT_REGION | all | region (default us-east-1)                              |
| AWS_ENDPOINT_URL_SQS / AWS_ENDPOINT_URL | all | an SQS endpoint: a local emulator (moto, LocalStack) |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY | all | only with a local endpoint: its dummy keys (default "local") |
| PCELERY_LOG_LEVEL         | worker, relay | DEBUG, INFO (default), WARNING, ERROR                 |
| PCELERY_STARTUP_TIMEOUT   | worker, relay | seconds to wait for SQS and the store at start (default 60) |
| PCELERY_RESULT_BACKEND    | worker  | optional Celery result backend URL (redis:// or rediss://)  |
| REDIS_HOST REDIS_PORT REDIS_AUTH_TOKEN | worker | the same, as ECS passes ElastiCache's (always TLS) |
| PCELERY_WORKER_QUEUES     | worker  | comma-separated catalog queues to consume (default all)     |
| PCELERY_TASK_MODULES      | worker  | comma-separated modules that declare the tasks (required outside local) |
| PCELERY_ACK_LINGER        | worker  | seconds a worker holds acks to delete them in batches (default 0.2, at most 5) |
| PCELERY_CELERY_APP        | worker  | the team's Celery app, module:attribute (default pcelery.worker:app) |
| PCELERY_CONCURRENCY       | worker  | pool size (default: the largest `concurrency` of the consumed queues) |
| PCELERY_WORKER_NAME       | worker  | Celery node name (default <queues>@<host>)                  |
| PCELERY_SCHEDULES         | scheduler, ops | schedules as module:ATTRIBUTE (a list of pcelery.scheduler.Schedule) |
| PCELERY_TASK_MODULES      | scheduler | optional there: imported so scheduled tasks' declared queues are known |
| PCELERY_RELAY_MIN_AGE     | relay   | seconds a row stays pending before the relay sends it (default 30) |
| PCELERY_RELAY_INTERVAL    | relay   | seconds between relay passes when idle (default 5)          |
| PCELERY_LOCAL_DIR         | dev harness | state of `ops local up` (default ./var/local)          |
| PCELERY_RUNTIME_DB_USER, _PASSWORD | migrate | the runtime role's login (workers, relay), which it creates |
| PCELERY_OPS_DB_USER, _PASSWORD | migrate | the ops role's login (the ops CLI), likewise (infra/README.md) |
| OPS_PARSE_ONLY            | ops     | 1: parse the command line, exit 0, run nothing              |
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pcelery.catalog import Catalog, CatalogError, check_env, load_catalog

DEFAULT_REGION = "us-east-1"
# A local emulator accepts any key; these keep boto3 and kombu from looking for real ones.
LOCAL_ACCESS_KEY = "local"
DEFAULT_RELAY_MIN_AGE = 30.0
DEFAULT_RELAY_INTERVAL = 5.0
DEFAULT_STARTUP_TIMEOUT = 60.0
# Acks wait this long to fill a DeleteMessageBatch: longer batches better under light load, and a
# worker that dies meanwhile has more done messages redelivered (each acked as a duplicate).
DEFAULT_ACK_LINGER = 0.2
MAX_ACK_LINGER = 5.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Spellings earlier releases read; still set somewhere means a setting that silently does nothing.
RENAMED = {"PCELERY_LOGLEVEL": "PCELERY_LOG_LEVEL"}

Environ = Mapping[str, str]


class SettingsError(ValueError):
    """A setting that is missing or malformed. The message names the variable and the fix."""


def _environ(environ: Environ | None) -> Environ:
    e = os.environ if environ is None else environ
    for old, new in RENAMED.items():
        if e.get(old):
            raise SettingsError(f"{old} is no longer read: rename it to {new}")
    return e


@dataclass(frozen=True)
class LocalCredentials:
    """The keys sent to a local SQS endpoint (any keys work there)."""

    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class Settings:
    """What every process (worker, relay, migrate, ops, dev harness) needs."""

    env: str
    catalog: Catalog
    database_url: str
    sqs_endpoint: str | None
    aws_region: str | None = None  # as configured (AWS_REGION, AWS_DEFAULT_REGION); None: not set
    # Set only with a local endpoint; on AWS, boto3 and kombu find the role's credentials.
    local_credentials: LocalCredentials | None = None

    @property
    def region(self) -> str:
        return self.aws_region or DEFAULT_REGION

    @classmethod
    def from_env(cls, environ: Environ | None = None, *, env: str | None = None,
                 catalog_spec: str | None = None) -> Settings:
        """env / catalog_spec override PCELERY_ENV / PCELERY_CATALOG (ops's --env, --catalog)."""
        e = _environ(environ)
        try:
            env_name = check_env(env or e.get("PCELERY_ENV") or "local")
        except CatalogError as exc:
            raise SettingsError(f"PCELERY_ENV: {exc}") from None
        try:
            catalog = load_catalog(catalog_spec or e.get("PCELERY_CATALOG"))
        except CatalogError as exc:
            raise SettingsError(f"PCELERY_CATALOG: {exc}") from None
        endpoint = e.get("AWS_ENDPOINT_URL_SQS") or e.get("AWS_ENDPOINT_URL") or None
        credentials = None
        if endpoint:
            credentials = LocalCredentials(e.get("AWS_ACCESS_KEY_ID") or LOCAL_ACCESS_KEY,
                                           e.get("AWS_SECRET_ACCESS_KEY") or LOCAL_ACCESS_KEY)
        return cls(
            env=env_name,
            catalog=catalog,
            database_url=_database_url(e),
            aws_region=e.get("AWS_REGION") or e.get("AWS_DEFAULT_REGION") or None,
            sqs_endpoint=endpoint,
            local_credentials=credentials,
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker reads on top of Settings."""

    queues: tuple[str, ...]
    task_modules: tuple[str, ...]
    concurrency: int
    node_name: str
    log_level: str
    result_backend: str | None = None
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    celery_app: str = "pcelery.worker:app"  # what `celery -A` runs
    ack_linger: float = DEFAULT_ACK_LINGER

    @classmethod
    def from_env(cls, settings: Settings, environ: Environ | None = None) -> WorkerSettings:
        e = _environ(environ)
        catalog = settings.catalog
        # dict.fromkeys: a queue named twice is consumed once, in the order first given
        queues = tuple(dict.fromkeys(q.strip() for q in e.get("PCELERY_WORKER_QUEUES", "").split(",") if q.strip()))
        unknown = [q for q in queues if q not in catalog.names()]
        if unknown:
            raise SettingsError(
                f"PCELERY_WORKER_QUEUES names {unknown}, which the catalog does not have: use some of {catalog.names()}"
            )
        queues = queues or tuple(catalog.names())
        modules = _task_modules(e)
        if not modules and settings.env != "local":
            raise SettingsError(
                "PCELERY_TASK_MODULES is not set: name the modules that declare your tasks, e.g. "
                "PCELERY_TASK_MODULES=myproject.tasks (a worker without them would dead-letter every message)"
            )
        raw_concurrency = e.get("PCELERY_CONCURRENCY")
        if raw_concurrency:
            if not raw_concurrency.isdigit() or int(raw_concurrency) < 1:
                raise SettingsError(
                    f"PCELERY_CONCURRENCY={raw_concurrency!r} must be a positive integer: fix it or unset it "
                    "for the catalog's concurrency")
            concurrency = int(raw_concurrency)
        else:
            concurrency = max(catalog.get(q).concurrency for q in queues)
        return cls(
            queues=queues,
            task_modules=modules,
            concurrency=concurrency,
            node_name=e.get("PCELERY_WORKER_NAME") or f"{'+'.join(queues)}@{socket.gethostname()}",
            log_level=log_level(e),
            result_backend=_result_backend(e),
            startup_timeout=_seconds(e, "PCELERY_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT),
            celery_app=_celery_app(e),
            ack_linger=_seconds(e, "PCELERY_ACK_LINGER", DEFAULT_ACK_LINGER, most=MAX_ACK_LINGER),
        )


@dataclass(frozen=True)
class RelaySettings:
    """What the outbox relay reads on top of Settings (its command-line options override them)."""

    min_age: float
    interval: float
    log_level: str
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> RelaySettings:
        e = _environ(environ)
        return cls(
            min_age=_seconds(e, "PCELERY_RELAY_MIN_AGE", DEFAULT_RELAY_MIN_AGE),
            interval=_seconds(e, "PCELERY_RELAY_INTERVAL", DEFAULT_RELAY_INTERVAL),
            log_level=log_level(e),
            startup_timeout=_seconds(e, "PCELERY_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT),
        )


@dataclass(frozen=True)
class SchedulerSettings:
    """What `pcelery-scheduler` reads on top of Settings."""

    schedules: str  # module:ATTRIBUTE
    task_modules: tuple[str, ...]
    celery_app: str | None
    log_level: str
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    @classmethod
    def from_env(cls, environ: Environ | None = None) -> SchedulerSettings:
        e = _environ(environ)
        spec = schedules_spec(e)
        if spec is None:
            raise SettingsError("PCELERY_SCHEDULES is not set: name your schedules as module:ATTRIBUTE, e.g. "
                                "'myproject.schedules:SCHEDULES' (a list of pcelery.scheduler.Schedule)")
        return cls(
            schedules=spec,
            task_modules=_task_modules(e),
            celery_app=_celery_app(e) if e.get("PCELERY_CELERY_APP") else None,
            log_level=log_level(e),
            startup_timeout=_seconds(e, "PCELERY_STARTUP_TIMEOUT", DEFAULT_STARTUP_TIMEOUT),
        )


def schedules_spec(environ: Environ | None = None) -> str | None:
    """PCELERY_SCHEDULES (module:ATTRIBUTE), or None when unset (the scheduler requires it; `ops
    schedules` then shows the store's record alone)."""
    spec = (_environ(environ).get("PCELERY_SCHEDULES") or "").strip()
    if not spec:
        return None
    module, _, attribute = spec.partition(":")
    if not module or not attribute or not all(p.isidentifier() for p in (*module.split("."), attribute)):
        raise SettingsError(f"PCELERY_SCHEDULES={spec!r} must name your schedules as module:ATTRIBUTE, e.g. "
                            "'myproject.schedules:SCHEDULES' (a list of pcelery.scheduler.Schedule)")
    return spec


def log_level(environ: Environ | None = None) -> str:
    e = _environ(environ)
    level = (e.get("PCELERY_LOG_LEVEL") or "INFO").upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"PCELERY_LOG_LEVEL={e.get('PCELERY_LOG_LEVEL')!r} is not a log level: use one of "
                            f"{', '.join(LOG_LEVELS)}")
    return level


def configure_logging(level: str, fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    logging.basicConfig(level=level, format=fmt)


def local_dir(environ: Environ | None = None) -> Path:
    """Where the dev harness's detached local stack keeps its state (`ops local up`)."""
    e = _environ(environ)
    return Path(e.get("PCELERY_LOCAL_DIR") or Path.cwd() / "var" / "local").resolve()


def ops_parse_only(environ: Environ | None = None) -> bool:
    """OPS_PARSE_ONLY=1: ops parses its command line and exits 0 without running it (the RUNBOOK
    test checks its AWS-only lines this way)."""
    return _environ(environ).get("OPS_PARSE_ONLY") == "1"


def default_sqlite_url() -> str:
    """The embedded default store: a file under ./var of the working directory."""
    return f"sqlite:///{Path.cwd() / 'var' / 'pcelery.sqlite3'}"


def _task_modules(e: Environ) -> tuple[str, ...]:
    raw = e.get("PCELERY_TASK_MODULES", "")
    modules = tuple(m.strip() for m in raw.split(",") if m.strip())
    bad = [m for m in modules if not all(part.isidentifier() for part in m.split("."))]
    if bad:
        raise SettingsError(
            f"PCELERY_TASK_MODULES={raw!r}: {bad} are not module names; give a comma-separated list of "
            "importable modules, e.g. 'myproject.tasks,myproject.reports.tasks'"
        )
    return modules


def _celery_app(e: Environ) -> str:
    raw = e.get("PCELERY_CELERY_APP") or "pcelery.worker:app"
    module, _, attribute = raw.partition(":")
    if not module or not attribute or not all(part.isidentifier() for part in (*module.split("."), attribute)):
        raise SettingsError(f"PCELERY_CELERY_APP={raw!r} must name the team's Celery app as module:attribute, e.g. "
                            "'myproject.celery:app'")
    return raw


def _seconds(e: Environ, name: str, default: float, *, most: float = math.inf) -> float:
    raw = e.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds: fix it or unset it for {default:g}") from None
    if value < 0 or not math.isfinite(value):
        raise SettingsError(f"{name}={raw!r} must be 0 or more seconds: fix it or unset it for {default:g}")
    if value > most:
        raise SettingsError(f"{name}={raw!r} is more than {most:g} seconds: lower it or unset it for {default:g}")
    return value


def database_url(environ: Environ | None = None) -> str:
    """The store's SQLAlchemy URL alone (Settings.database_url): what a Django project's settings
    read (pcelery.django.database_settings) before anything else of the product is configured."""
    return _database_url(_environ(environ))


# The database roles `pcelery-migrate` provisions beside the schema, in this order. Each is a
# login (user and password, from its own Secrets Manager secret on ECS) that the migration creates
# if missing, gives that password and grants exactly its privileges (pcelery.schema.ensure_roles).
ROLE_KINDS = ("runtime", "ops")
# A Postgres role name as the product writes them: unquoted, lower case (pcelery_prod_runtime).
_ROLE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class DatabaseRole:
    """One login `pcelery-migrate` provisions: `kind` is "runtime" (workers and relay) or "ops"
    (the ops CLI); `user` is the login its secret names now (after a multi-user rotation, the
    role's `_clone`)."""

    kind: str
    user: str
    password: str = field(repr=False)


def database_roles(environ: Environ | None = None) -> tuple[DatabaseRole, ...]:
    """The roles given to `pcelery-migrate`: PCELERY_<KIND>_DB_USER and PCELERY_<KIND>_DB_PASSWORD
    per kind, both or neither. None given: the migration manages no role (local runs, Django's
    `manage.py migrate`), and every process uses the connection's own user."""
    e = _environ(environ)
    roles = []
    for kind in ROLE_KINDS:
        user_var, password_var = f"PCELERY_{kind.upper()}_DB_USER", f"PCELERY_{kind.upper()}_DB_PASSWORD"
        user, password = e.get(user_var) or "", e.get(password_var) or ""
        if not user and not password:
            continue
        if not user or not password:
            missing = user_var if not user else password_var
            raise SettingsError(f"{missing} is not set but its pair is: set both (ECS passes them from the role's "
                                "secret) or neither")
        if not _ROLE_NAME_RE.match(user):
            raise SettingsError(f"{user_var}={user!r} is not a role name this product uses: lower-case letters, "
                                "digits and _, not starting with a digit, at most 63 characters")
        roles.append(DatabaseRole(kind, user, password))
    users = [r.user.removesuffix("_clone") for r in roles]
    if len(set(users)) < len(users):
        raise SettingsError(f"PCELERY_RUNTIME_DB_USER and PCELERY_OPS_DB_USER name the same role {users[0]!r}: "
                            "each role has its own login")
    return tuple(roles)


def _database_url(e: Environ) -> str:
    if e.get("DATABASE_URL"):
        url = e["DATABASE_URL"]
        if url.startswith(("postgres://", "postgresql://")):
            # SQLAlchemy would pick psycopg2, which is not installed; psycopg 3 is.
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return _checked_url(url, as_set=e["DATABASE_URL"])
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
    return default_sqlite_url()


def _checked_url(url: str, *, as_set: str) -> str:
    """DATABASE_URL, refused with the fix when SQLAlchemy cannot read it or it names another
    database than the two the store runs on. The password never appears in the message."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", as_set)
    try:
        backend = make_url(url).get_backend_name()
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise SettingsError(f"DATABASE_URL={shown!r} is not a database URL: use "
                            "postgresql://user:password@host:5432/name or sqlite:///path/to/file.sqlite3") from None
    if backend not in ("postgresql", "sqlite"):
        raise SettingsError(f"DATABASE_URL={shown!r} names a {backend} database; the task store runs on "
                            "postgresql:// or sqlite:///")
    return url


def _result_backend(e: Environ) -> str | None:
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


def _port(e: Environ, name: str, default: str) -> str:
    value = e.get(name) or default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise SettingsError(f"{name}={value!r} is not a port number: set it to 1..65535 or unset it for {default}")
    return value
