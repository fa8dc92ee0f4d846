"""Shared fixtures: the real parts this machine runs.

- `sqs_endpoint`: a moto server subprocess on a free loopback port (one per test session).
- `pg_url`: a fresh database on the machine's Postgres (127.0.0.1:5432, trust auth), created for
  this session and dropped after it, so parallel runs and helpers never see each other's rows.
- `db_url`: parametrized over Postgres and SQLite, for store tests that must hold on both.
"""

from __future__ import annotations

import os
import uuid

import pytest

from app.local import LOCAL_CREDENTIALS, LOCAL_REGION, start_moto_server

PG_ADMIN_URL = os.environ.get("PCELERY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PCELERY_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session", autouse=True)
def _local_aws_env():
    """boto3 and kombu must never reach for real credentials or a real region in tests."""
    saved = {k: os.environ.get(k) for k in (*LOCAL_CREDENTIALS, "AWS_REGION", "AWS_DEFAULT_REGION")}
    os.environ.update(LOCAL_CREDENTIALS)
    os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = LOCAL_REGION
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def sqs_endpoint():
    server = start_moto_server()
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def pg_url():
    import psycopg

    name = f"pcelery_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'tasks.sqlite3'}"
