"""The environment contract of every process (pcelery.settings). A bad value is a SettingsError
that names the variable and the fix; the ECS variables become the same URLs a laptop gives; each
process parses only what it uses."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from devstack import DEMO_CATALOG
from pcelery.catalog import CATALOG
from pcelery.settings import (
    RelaySettings,
    SchedulerSettings,
    Settings,
    SettingsError,
    WorkerSettings,
    default_sqlite_url,
    local_dir,
    log_level,
)

REPO = Path(__file__).resolve().parents[2]


def settings(**environ: str) -> Settings:
    return Settings.from_env(environ)


def worker(**environ: str) -> WorkerSettings:
    return WorkerSettings.from_env(Settings.from_env(environ), environ)


def error(**environ: str) -> str:
    """The message of the first process settings (common, worker, relay) that refuse environ."""
    def parse_all() -> None:
        WorkerSettings.from_env(Settings.from_env(environ), environ)
        RelaySettings.from_env(environ)
        SchedulerSettings.from_env({"PCELERY_SCHEDULES": "team.schedules:SCHEDULES", **environ})

    with pytest.raises(SettingsError) as caught:
        parse_all()
    return str(caught.value)


def test_defaults_are_the_local_embedded_stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = settings()
    assert s.env == "local"
    assert s.catalog is CATALOG
    assert s.database_url == default_sqlite_url() == f"sqlite:///{tmp_path / 'var' / 'pcelery.sqlite3'}"
    assert s.region == "us-east-1" and s.aws_region is None
    assert s.sqs_endpoint is None and s.local_credentials is None
    w = worker()
    assert w.queues == tuple(CATALOG.names())
    assert w.task_modules == ()  # local: a worker may start without tasks
    assert w.concurrency == max(q.concurrency for q in CATALOG)
    assert w.log_level == "INFO" and w.result_backend is None
    assert w.node_name.startswith("default+long@")
    r = RelaySettings.from_env({})
    assert (r.min_age, r.interval, r.log_level) == (30.0, 5.0, "INFO")
    assert local_dir({}) == tmp_path / "var" / "local"


def test_explicit_values():
    s = settings(PCELERY_ENV="prod", PCELERY_CATALOG="devstack:DEMO_CATALOG", AWS_REGION="eu-west-1",
                 AWS_ENDPOINT_URL_SQS="http://127.0.0.1:5000")
    assert (s.env, s.catalog, s.region, s.sqs_endpoint) == ("prod", DEMO_CATALOG, "eu-west-1", "http://127.0.0.1:5000")
    assert s.local_credentials is not None and s.local_credentials.access_key_id == "local"
    assert settings(AWS_DEFAULT_REGION="ap-south-1").region == "ap-south-1"
    assert settings(AWS_ENDPOINT_URL="http://127.0.0.1:4566").sqs_endpoint == "http://127.0.0.1:4566"
    w = worker(PCELERY_ENV="prod", PCELERY_WORKER_QUEUES=" long , default", PCELERY_TASK_MODULES="shop.tasks, b.c",
               PCELERY_CONCURRENCY="7", PCELERY_WORKER_NAME="w1@host", PCELERY_LOG_LEVEL="debug")
    assert (w.queues, w.task_modules, w.concurrency, w.node_name, w.log_level) == (
        ("long", "default"), ("shop.tasks", "b.c"), 7, "w1@host", "DEBUG")
    r = RelaySettings.from_env({"PCELERY_RELAY_MIN_AGE": "2.5", "PCELERY_RELAY_INTERVAL": "0"})
    assert (r.min_age, r.interval) == (2.5, 0.0)
    assert local_dir({"PCELERY_LOCAL_DIR": "/tmp/stack"}) == Path("/tmp/stack")


def test_a_queue_named_twice_is_consumed_once_and_concurrency_follows_the_consumed_queues():
    w = worker(PCELERY_CATALOG="devstack:DEMO_CATALOG", PCELERY_WORKER_QUEUES="default,long,default")
    assert w.queues == ("default", "long")
    assert worker(PCELERY_WORKER_QUEUES="long").concurrency == CATALOG.get("long").concurrency


def test_outside_local_a_worker_needs_its_task_modules():
    message = error(PCELERY_ENV="dev")
    assert message.startswith("PCELERY_TASK_MODULES is not set: name the modules that declare your tasks")
    assert worker(PCELERY_ENV="dev", PCELERY_TASK_MODULES="shop.tasks").task_modules == ("shop.tasks",)


def test_worker_only_variables_do_not_stop_the_other_processes():
    bad_worker_vars = {"PCELERY_ENV": "prod", "PCELERY_WORKER_QUEUES": "nope", "PCELERY_CONCURRENCY": "lots",
                       "PCELERY_RESULT_BACKEND": "amqp://x"}
    assert Settings.from_env(bad_worker_vars).env == "prod"  # what ops, the relay and migrate read
    assert RelaySettings.from_env(bad_worker_vars).min_age == 30.0


@pytest.mark.parametrize("environ, expected", [
    ({"PCELERY_ENV": "qa"}, "PCELERY_ENV: unknown environment 'qa': use one of local, dev, staging, prod"),
    ({"PCELERY_CATALOG": "catalog"}, "PCELERY_CATALOG: catalog spec 'catalog' must look like 'module:ATTRIBUTE'"),
    ({"PCELERY_CATALOG": "nowhere:CATALOG"}, "cannot be loaded"),
    ({"PCELERY_WORKER_QUEUES": "default,bulk"},
     "PCELERY_WORKER_QUEUES names ['bulk'], which the catalog does not have: use some of ['default', 'long']"),
    ({"PCELERY_TASK_MODULES": "shop/tasks.py"}, "PCELERY_TASK_MODULES='shop/tasks.py': ['shop/tasks.py'] are not"),
    ({"PCELERY_CELERY_APP": "shopsite.celery"},
     "PCELERY_CELERY_APP='shopsite.celery' must name the team's Celery app as module:attribute, e.g. "
     "'myproject.celery:app'"),
    ({"PCELERY_CELERY_APP": "shop-site.celery:app"}, "PCELERY_CELERY_APP='shop-site.celery:app' must name"),
    ({"PCELERY_CONCURRENCY": "0"}, "PCELERY_CONCURRENCY='0' must be a positive integer"),
    ({"PCELERY_SCHEDULES": "schedules"}, "PCELERY_SCHEDULES='schedules' must name your schedules as "
                                         "module:ATTRIBUTE"),
    ({"PCELERY_ACK_LINGER": "60"}, "PCELERY_ACK_LINGER='60' is more than 5 seconds: lower it or unset it for 0.2"),
    ({"PCELERY_ACK_LINGER": "soon"}, "PCELERY_ACK_LINGER='soon' is not a number of seconds"),
    ({"PCELERY_CONCURRENCY": "four"}, "PCELERY_CONCURRENCY='four' must be a positive integer"),
    ({"PCELERY_LOG_LEVEL": "chatty"}, "PCELERY_LOG_LEVEL='chatty' is not a log level: use one of DEBUG, INFO"),
    ({"PCELERY_LOGLEVEL": "DEBUG"}, "PCELERY_LOGLEVEL is no longer read: rename it to PCELERY_LOG_LEVEL"),
    ({"PCELERY_RELAY_MIN_AGE": "half a minute"}, "PCELERY_RELAY_MIN_AGE='half a minute' is not a number of seconds"),
    ({"PCELERY_RELAY_INTERVAL": "-1"}, "PCELERY_RELAY_INTERVAL='-1' must be 0 or more seconds"),
    ({"PCELERY_RELAY_INTERVAL": "inf"}, "PCELERY_RELAY_INTERVAL='inf' must be 0 or more seconds"),
    ({"PCELERY_STARTUP_TIMEOUT": "soon"}, "PCELERY_STARTUP_TIMEOUT='soon' is not a number of seconds"),
    ({"DATABASE_URL": "not a url"}, "DATABASE_URL='not a url' is not a database URL: use postgresql://"),
    ({"DATABASE_URL": "postgresql://app:s3cret@db:notaport/x"},
     "DATABASE_URL='postgresql://app:***@db:notaport/x' is not a database URL"),
    ({"DATABASE_URL": "mysql://app:s3cret@db/x"}, "DATABASE_URL='mysql://app:***@db/x' names a mysql database"),
    ({"DB_HOST": "db.internal", "DB_USER": "app"}, "DB_HOST is set but ['DB_PASSWORD'] are not"),
    ({"DB_HOST": "db.internal", "DB_USER": "app", "DB_PASSWORD": "pw", "DB_PORT": "54x"},
     "DB_PORT='54x' is not a port number"),
    ({"PCELERY_RESULT_BACKEND": "amqp://guest@localhost"}, "is not a redis:// or rediss:// URL: fix it or unset it"),
    ({"REDIS_HOST": "cache.internal"}, "REDIS_HOST is set but REDIS_AUTH_TOKEN is not"),
    ({"REDIS_HOST": "cache.internal", "REDIS_AUTH_TOKEN": "t", "REDIS_PORT": "0"},
     "REDIS_PORT='0' is not a port number"),
])
def test_each_bad_setting_is_named_with_its_fix(environ, expected):
    assert expected in error(**environ)


def test_a_bad_database_url_never_shows_its_password():
    assert "s3cret" not in error(DATABASE_URL="mysql://app:s3cret@db/x")


def test_log_level_is_one_spelling():
    assert log_level({"PCELERY_LOG_LEVEL": "warning"}) == "WARNING"


def test_database_url_forms():
    # Heroku-style postgres:// URLs would make SQLAlchemy pick psycopg2, which is not installed.
    assert settings(DATABASE_URL="postgres://u:p@h/db").database_url == "postgresql+psycopg://u:p@h/db"
    assert settings(DATABASE_URL="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"
    assert settings(DATABASE_URL="sqlite:////tmp/x.db").database_url == "sqlite:////tmp/x.db"
    # What ECS passes: RDS's generated secret, quoted into the URL, TLS required.
    url = settings(DB_HOST="db.internal", DB_PORT="6432", DB_NAME="tasks", DB_USER="app",
                   DB_PASSWORD="p@ss/word:1").database_url
    assert url == "postgresql+psycopg://app:p%40ss%2Fword%3A1@db.internal:6432/tasks?sslmode=require"
    assert settings(DB_HOST="h", DB_USER="u", DB_PASSWORD="p").database_url.endswith("@h:5432/pcelery?sslmode=require")
    # DATABASE_URL wins over the DB_* parts.
    assert settings(DATABASE_URL="sqlite:///a.db", DB_HOST="h").database_url == "sqlite:///a.db"
    # With the CA bundle the certificate and host name are verified, not just encrypted.
    verified = settings(DB_HOST="h", DB_USER="u", DB_PASSWORD="p",
                        DB_SSLROOTCERT="/etc/ssl/certs/rds-global-bundle.pem").database_url
    assert verified.endswith("?sslmode=verify-full&sslrootcert=/etc/ssl/certs/rds-global-bundle.pem")


def test_result_backend_forms():
    assert worker(PCELERY_RESULT_BACKEND="redis://127.0.0.1:6379/15").result_backend == "redis://127.0.0.1:6379/15"
    url = worker(REDIS_HOST="cache.internal", REDIS_AUTH_TOKEN="a/b+c").result_backend
    assert url == "rediss://:a%2Fb%2Bc@cache.internal:6379/0?ssl_cert_reqs=required"  # ElastiCache: always TLS


def _environment_reads(path: Path) -> list[str]:
    """`os.environ` / `os.getenv` uses in a module (reads and writes alike)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_only_the_settings_module_reads_the_environment():
    """Every setting read in one module: the runtime and ops take values as arguments. (The dev
    harness passes os.environ on to the processes it starts; that is not reading a setting.)"""
    runtime = [p for folder in ("app", "ops") for p in sorted((REPO / folder).rglob("*.py"))]
    readers = [hit for p in runtime if p.name != "settings.py" for hit in _environment_reads(p)]
    assert readers == [], f"these read the environment outside pcelery.settings: {readers}"
    for p in [*runtime, *sorted((REPO / "devstack").glob("*.py")), *sorted((REPO / "infra").glob("*.py"))]:
        if p.name == "settings.py":
            continue
        text = p.read_text()
        for quote in ('"', "'"):
            assert f"get({quote}PCELERY_" not in text and f"os.environ[{quote}PCELERY_" not in text, p


def test_a_worker_receives_in_batches_only_where_messages_may_wait():
    from pcelery.celeryconfig import prefetch_multiplier, receives_in_batches

    settings = Settings.from_env({})
    short = WorkerSettings.from_env(settings, {"PCELERY_WORKER_QUEUES": "default", "PCELERY_CONCURRENCY": "4"})
    both = WorkerSettings.from_env(settings, {"PCELERY_CONCURRENCY": "4"})
    # The window holds the pool plus a batch of 10: 4 x 4 = 16 >= 4 + 10.
    assert (receives_in_batches(settings, short), prefetch_multiplier(settings, short)) == (True, 4)
    # A queue with heartbeats (long tasks) among the consumed ones: no message waits behind the pool.
    assert (receives_in_batches(settings, both), prefetch_multiplier(settings, both)) == (False, 1)
