"""Settings.from_env: the environment contract of every process. A bad value is a SettingsError
that names the variable and the fix; the ECS variables become the same URLs a laptop gives."""

from __future__ import annotations

import pytest

from app.settings import DEFAULT_SQLITE_URL, Settings, SettingsError
from catalog import CATALOG, DEMO_CATALOG


def settings(**environ) -> Settings:
    return Settings.from_env(environ)


def error(**environ) -> str:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(environ)
    return str(caught.value)


def test_defaults_are_the_local_embedded_stack():
    s = settings()
    assert s.env == "local"
    assert s.catalog is CATALOG
    assert s.database_url == DEFAULT_SQLITE_URL
    assert s.result_backend is None
    assert s.worker_queues == tuple(CATALOG.names())
    assert s.region == "us-east-1"
    assert s.sqs_endpoint is None
    assert s.task_modules == ("app.demo_tasks",)


def test_explicit_values():
    s = settings(PCELERY_ENV="prod", PCELERY_CATALOG="catalog:DEMO_CATALOG", PCELERY_WORKER_QUEUES=" long , default",
                 AWS_REGION="eu-west-1", AWS_ENDPOINT_URL_SQS="http://127.0.0.1:5000",
                 PCELERY_TASK_MODULES="app.demo_tasks, shop.tasks")
    assert (s.env, s.catalog, s.region, s.sqs_endpoint) == ("prod", DEMO_CATALOG, "eu-west-1", "http://127.0.0.1:5000")
    assert s.worker_queues == ("long", "default")
    assert s.task_modules == ("app.demo_tasks", "shop.tasks")
    assert settings(AWS_DEFAULT_REGION="ap-south-1").region == "ap-south-1"
    assert settings(AWS_ENDPOINT_URL="http://127.0.0.1:4566").sqs_endpoint == "http://127.0.0.1:4566"


def test_a_queue_named_twice_is_consumed_once():
    assert settings(PCELERY_WORKER_QUEUES="default,long,default").worker_queues == ("default", "long")


@pytest.mark.parametrize("environ, expected", [
    ({"PCELERY_ENV": "qa"}, "PCELERY_ENV/PCELERY_CATALOG: unknown environment 'qa': use one of local, dev, staging, prod"),
    ({"PCELERY_CATALOG": "catalog"}, "must look like 'module:ATTRIBUTE'"),
    ({"PCELERY_CATALOG": "nowhere:CATALOG"}, "cannot be loaded"),
    ({"PCELERY_WORKER_QUEUES": "default,bulk"},
     ("PCELERY_WORKER_QUEUES names ['bulk'], which the catalog does not have: use some of ['default', 'long']")),
    ({"PCELERY_TASK_MODULES": "app/demo_tasks.py"}, "PCELERY_TASK_MODULES='app/demo_tasks.py' must be a comma-separated"),
    ({"PCELERY_TASK_MODULES": " , "}, "PCELERY_TASK_MODULES"),
    ({"DB_HOST": "db.internal", "DB_USER": "app"}, "DB_HOST is set but ['DB_PASSWORD'] are not"),
    ({"DB_HOST": "db.internal", "DB_USER": "app", "DB_PASSWORD": "pw", "DB_PORT": "54x"},
     "DB_PORT='54x' is not a port number"),
    ({"PCELERY_RESULT_BACKEND": "amqp://guest@localhost"}, "is not a redis:// or rediss:// URL: fix it or unset it"),
    ({"REDIS_HOST": "cache.internal"}, "REDIS_HOST is set but REDIS_AUTH_TOKEN is not"),
    ({"REDIS_HOST": "cache.internal", "REDIS_AUTH_TOKEN": "t", "REDIS_PORT": "0"}, "REDIS_PORT='0' is not a port number"),
])
def test_each_bad_setting_is_named_with_its_fix(environ, expected):
    assert expected in error(**environ)


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
    assert settings(PCELERY_RESULT_BACKEND="redis://127.0.0.1:6379/15").result_backend == "redis://127.0.0.1:6379/15"
    url = settings(REDIS_HOST="cache.internal", REDIS_AUTH_TOKEN="a/b+c").result_backend
    assert url == "rediss://:a%2Fb%2Bc@cache.internal:6379/0?ssl_cert_reqs=required"  # ElastiCache: always TLS
