"""Least privilege with real processes: the roles `pcelery-migrate` creates, and the read-only root
file system every ECS container runs on.

Each process runs as the deployed one does: `pcelery-migrate` as the tables' owner with the roles'
logins, the worker and the relay as the runtime role, the ops CLI as the ops role. And each runs on
a read-only root: a private mount namespace (`unshare --mount`, which needs root, as this
machine's CI has) in which `/` is remounted read-only, so the whole file system (the virtualenv,
the repository, $HOME, /tmp) refuses writes, as `readonlyRootFilesystem` makes the image's layers
do; only the worker gets a writable tmpfs on /tmp, which stands for its task's `tmp` volume. /dev/shm
stays writable, as it is in an ECS container. Logs go to files the test opened before.

What this proves: the product's processes (Celery's prefork pool, kombu, boto3, SQLAlchemy and
psycopg among them) start and do their work with nothing writable but /tmp for the worker, and with
only their role's privileges in the database. What it does not: that the team's image keeps
nothing else writable it needs (its own entry point, the team's tasks), that Fargate seeds the
`tmp` volume as the image's VOLUME declares (test_infra.py checks the declaration), or anything
about the network rules (template assertions only).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_ADMIN_URL, REPO, Process, reset_moto, tail, wait_for

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, local_environ, sqs_client
from pcelery import schema, store
from pcelery.outbox import Outbox

SHOP = REPO / "examples" / "django_shop"
BIN = Path(sys.executable).parent


def read_only(command: list[str], *, writable_tmp: bool = False) -> list[str]:
    """`command` on a read-only root (and, with writable_tmp, a fresh tmpfs on /tmp). A checkout
    under /tmp (CI may clone there) is mounted back, read-only, at its own path over the tmpfs,
    through a bind of the old /tmp kept aside on /dev/shm while the tmpfs goes on."""
    inside_tmp = writable_tmp and REPO.is_relative_to("/tmp")
    keep = f"/dev/shm/pcelery-old-tmp-{uuid.uuid4().hex[:8]}"
    mounts = [f"mkdir {keep}", f"mount --bind /tmp {keep}"] if inside_tmp else []
    mounts.append("mount -o remount,bind,ro /")
    if writable_tmp:
        mounts.append("mount -t tmpfs -o size=64m,mode=1777 tmpfs /tmp")
    if inside_tmp:
        repo = shlex.quote(str(REPO))
        mounts += [f"mkdir -p {repo}", f"mount --bind {keep}/{shlex.quote(str(REPO.relative_to('/tmp')))} {repo}",
                   f"mount -o remount,bind,ro {repo}", f"umount -l {keep}", f"rmdir {keep}"]
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", " && ".join(mounts) + ' && exec "$@"', "sh",
            *command]


@pytest.fixture(scope="module", autouse=True)
def _read_only_roots_work() -> None:
    probe = subprocess.run(read_only(["sh", "-c", "! touch /pcelery-probe 2>/dev/null && touch /tmp/probe"],
                                     writable_tmp=True), capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"a private mount namespace needs root (CAP_SYS_ADMIN) and util-linux's unshare: {probe.stderr}")


def admin(database: str | None = None) -> psycopg.Connection:
    return psycopg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}" if database else PG_ADMIN_URL,
                           autocommit=True)


def pg_url(user: str, database: str, password: str = "x") -> str:
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:5432/{database}"


class Database:
    """A database owned by `owner` (attributes as given: CREATEROLE like RDS's master user, or an
    application's plain login), and the two roles' names; all dropped afterwards."""

    def __init__(self, owner_attributes: str):
        suffix = uuid.uuid4().hex[:8]
        self.name, self.owner = f"pcelery_lp_{suffix}", f"pcelery_lp_owner_{suffix}"
        self.runtime, self.ops = f"pcelery_lp{suffix}_runtime", f"pcelery_lp{suffix}_ops"
        self.suffix = suffix
        with admin() as conn:
            conn.execute(f'CREATE ROLE "{self.owner}" LOGIN {owner_attributes}')
            conn.execute(f'CREATE DATABASE "{self.name}" OWNER "{self.owner}"')

    def url(self, user: str | None = None) -> str:
        return pg_url(user or self.owner, self.name)

    def role_environ(self) -> dict[str, str]:
        """What the CDK app gives every migrate container: the roles' logins from their secrets."""
        return {"PCELERY_RUNTIME_DB_USER": self.runtime, "PCELERY_RUNTIME_DB_PASSWORD": f"runtime-{self.suffix}",
                "PCELERY_OPS_DB_USER": self.ops, "PCELERY_OPS_DB_PASSWORD": f"ops-{self.suffix}"}

    def drop(self) -> None:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            for (name,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY rolname DESC",
                                        (f"%{self.suffix}%",)).fetchall():
                conn.execute(f'DROP ROLE "{name}"')


@pytest.fixture
def database() -> Iterator[Database]:
    db = Database("CREATEROLE")
    yield db
    db.drop()


def run(command: list[str], environ: dict[str, str], *, cwd: Path = REPO, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**os.environ, **environ}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_worker_relay_and_ops_do_their_work_as_their_roles_on_a_read_only_root(moto_server, database, tmp_path):
    reset_moto(moto_server.endpoint)
    sqs = sqs_client(moto_server.endpoint)
    create_queues(sqs, DEMO_CATALOG, "local")
    # As the images set it; the read-only root would refuse the bytecode anyway.
    base = {**local_environ(moto_server.endpoint, database.url()), "PYTHONDONTWRITEBYTECODE": "1"}

    # The migration, as the owner, on a read-only root like every migrate container: schema and roles.
    migrated = run(read_only([str(BIN / "pcelery-migrate")]), {**base, **database.role_environ()})
    assert migrated.returncode == 0, migrated.stderr
    assert f"roles current: {database.runtime} (runtime), {database.ops} (ops)" in migrated.stderr

    as_runtime = {**base, "DATABASE_URL": database.url(database.runtime)}
    processes: list[Process] = []

    def start(name: str, command: list[str], environ: dict[str, str]) -> Process:
        process = Process(tmp_path / f"{name}.log", lambda log: subprocess.Popen(
            command, env={**os.environ, **environ}, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
        processes.append(process)
        return process

    owner = schema.make_engine(database.url())
    runtime = schema.make_engine(database.url(database.runtime))
    try:
        # Without a writable /tmp, Celery's prefork pool cannot make its arena: why workers get the volume.
        no_tmp = start("worker-without-tmp", read_only([str(BIN / "pcelery-worker")]), as_runtime)
        wait_for(lambda: not no_tmp.alive(), timeout=90, what="the worker without a writable /tmp to exit",
                 logs=[no_tmp.log])
        assert no_tmp.proc.returncode != 0
        assert "No usable temporary directory" in no_tmp.log.read_text(), tail(no_tmp.log)

        worker = start("worker", read_only([str(BIN / "pcelery-worker")], writable_tmp=True),
                       {**as_runtime, "PCELERY_WORKER_NAME": "ro@local"}).wait_ready()
        relay = start("relay", read_only([str(BIN / "pcelery-relay"), "--interval", "1", "--min-age", "1"]),
                      as_runtime)

        # Submitted the way an application does, as the runtime role: published after commit ...
        outbox = Outbox(runtime, DEMO_CATALOG, "local", sqs)
        with outbox.transaction() as conn:
            submitted = outbox.submit(conn, "demo.add", 2, 3)
        # ... and a committed row its submitter never published: the relay's.
        with runtime.begin() as conn:
            relayed = str(uuid.uuid4())
            store.insert_task(conn, task_id=relayed, task_name="demo.add", queue="default", args=[4, 5], kwargs={})
        logs = [worker.log, relay.log]
        wait_for(lambda: all((r := store.get_task(owner, t)) and r.state == "succeeded" for t in (submitted, relayed)),
                 timeout=90, what="both tasks to succeed", logs=logs)
        assert store.get_task(owner, submitted).result == 5 and store.get_task(owner, relayed).result == 9
        assert worker.alive() and relay.alive()

        # The ops CLI, as the ops role, on a read-only root: read the rows, then replay one.
        as_ops = {**base, "DATABASE_URL": database.url(database.ops)}
        listed = run(read_only([str(BIN / "pcelery-ops"), "tasks", "--state", "succeeded", "-o", "json"]), as_ops)
        assert listed.returncode == 0, listed.stderr
        assert {r["id"] for r in json.loads(listed.stdout)} == {submitted, relayed}
        replayed = run(read_only([str(BIN / "pcelery-ops"), "replay", submitted, "--yes", "-o", "json"]), as_ops)
        assert replayed.returncode == 0, replayed.stderr
        assert json.loads(replayed.stdout)["published"] == [submitted]
        wait_for(lambda: (r := store.get_task(owner, submitted)) and r.state == "succeeded" and r.attempts == 2,
                 timeout=90, what="the replayed task to run again", logs=logs)

        # None of them could have done more: the roles' privileges, as the database reports them.
        with owner.connect() as conn:
            for role, wanted in ((database.runtime, {"INSERT", "SELECT", "UPDATE"}),
                                 (database.ops, {"SELECT", "UPDATE"})):
                held = {p for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
                        if conn.execute(sa.text("SELECT has_table_privilege(:r, 'pcelery_tasks', :p)"),
                                        {"r": role, "p": p}).scalar_one()}
                assert held == wanted, role
    finally:
        for p in processes:
            if p.alive():
                p.stop()
        owner.dispose()
        runtime.dispose()


def test_a_django_projects_own_user_migrates_as_before_and_adds_the_roles_once_it_may(moto_server):
    """Django's `manage.py migrate` runs pcelery.schema.migrate as the project's user, which is no
    superuser and cannot create roles: role management is a separate, explicit step (pcelery-migrate
    given the roles' logins), so it migrates as before. Asked for the roles, pcelery-migrate
    refuses with the fix (exit 3); with CREATEROLE granted (database.external, infra/README.md) it
    adds them on the tables the project owns."""
    db = Database("")  # a plain login: no CREATEROLE, no superuser
    try:
        environ = {**local_environ(moto_server.endpoint, db.url(), catalog_spec="shop.queues:CATALOG",
                                   task_modules="shop.tasks"),
                   "PYTHONPATH": str(SHOP), "DJANGO_SETTINGS_MODULE": "shopsite.settings"}
        migrated = run([sys.executable, "manage.py", "migrate", "--no-input"], environ, cwd=SHOP)
        assert migrated.returncode == 0, migrated.stderr
        assert "Applying pcelery.0001_initial... OK" in migrated.stdout
        with admin() as conn:
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                                (f"pcelery_lp{db.suffix}%",)).fetchone() == (0,)

        refused = run([str(BIN / "pcelery-migrate")], {**environ, **db.role_environ()})
        assert refused.returncode == 3, refused.stderr
        assert f"{db.owner} may not create role {db.runtime}: give it CREATEROLE" in refused.stderr

        with admin() as conn:
            conn.execute(f'ALTER ROLE "{db.owner}" CREATEROLE')
        added = run([str(BIN / "pcelery-migrate")], {**environ, **db.role_environ()})
        assert added.returncode == 0, added.stderr
        runtime = schema.make_engine(db.url(db.runtime))
        try:
            with runtime.begin() as conn:
                store.insert_task(conn, task_id="d1", task_name="shop.tasks.send_receipt", queue="default", args=[1],
                                  kwargs={})
            assert store.claim(runtime, "d1", worker="w:1", lease_seconds=30).outcome == "run"
            with runtime.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="must be owner"):
                conn.exec_driver_sql("DROP TABLE pcelery_tasks")
        finally:
            runtime.dispose()
    finally:
        db.drop()
