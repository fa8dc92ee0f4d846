"""The database roles `pcelery-migrate` creates (pcelery.schema.ensure_roles), against the real
Postgres on 127.0.0.1:5432, each test in a database and roles of its own.

The migration connects like the RDS master user: a login with CREATEROLE that is no superuser and
owns the database. The runtime role (workers, relay) and the ops role (the ops CLI) then get
exactly the statements pcelery.store runs for them; neither can DROP, ALTER, TRUNCATE or DELETE.
Local Postgres trusts every connection, so a password is checked against the SCRAM verifier the
server stored (read as the superuser), not by logging in.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import sqlalchemy as sa
from conftest import PG_ADMIN_URL

from pcelery import schema, store
from pcelery.settings import DatabaseRole, SettingsError, database_roles

ROLE_POWERS = ("rolsuper", "rolcreaterole", "rolcreatedb", "rolreplication", "rolbypassrls")


def admin(database: str | None = None) -> psycopg.Connection:
    """The superuser, on the admin database or on `database`."""
    return psycopg.connect(PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{database}" if database else PG_ADMIN_URL,
                           autocommit=True)


def url(user: str, database: str, password: str = "x") -> str:
    return f"postgresql+psycopg://{user}:{password}@127.0.0.1:5432/{database}"


@dataclass
class Cluster:
    """A database owned by `master` (LOGIN CREATEROLE, like RDS's master user), and the names of
    the two roles the tests provision there."""

    database: str
    master: str
    runtime: str
    ops: str
    engines: list[sa.Engine]

    def engine(self, user: str | None = None) -> sa.Engine:
        engine = schema.make_engine(url(user or self.master, self.database))
        self.engines.append(engine)
        return engine

    def roles(self, runtime_password: str = "runtime-secret", ops_password: str = "ops-secret"
              ) -> list[DatabaseRole]:
        return [DatabaseRole("runtime", self.runtime, runtime_password), DatabaseRole("ops", self.ops, ops_password)]

    def migrated(self) -> sa.Engine:
        engine = self.engine()
        schema.migrate(engine)
        schema.ensure_roles(engine, self.roles())
        return engine


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    suffix = uuid.uuid4().hex[:8]
    c = Cluster(database=f"pcelery_roles_{suffix}", master=f"pcelery_master_{suffix}",
                runtime=f"pcelery_t{suffix}_runtime", ops=f"pcelery_t{suffix}_ops", engines=[])
    with admin() as conn:
        conn.execute(f'CREATE ROLE "{c.master}" LOGIN CREATEROLE PASSWORD \'master\'')
        conn.execute(f'CREATE DATABASE "{c.database}" OWNER "{c.master}"')
    try:
        yield c
    finally:
        for engine in c.engines:
            engine.dispose()
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{c.database}" WITH (FORCE)')
            for (name,) in conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY rolname DESC",
                                        (f"%{suffix}%",)).fetchall():
                conn.execute(f'DROP ROLE "{name}"')


def role_row(name: str) -> dict | None:
    with admin() as conn:
        row = conn.execute("SELECT rolcanlogin, rolpassword, " + ", ".join(ROLE_POWERS) +
                           " FROM pg_authid WHERE rolname = %s", (name,)).fetchone()
    if row is None:
        return None
    return {"login": row[0], "password": row[1], **dict(zip(ROLE_POWERS, row[2:], strict=True))}


def scram_matches(verifier: str, password: str) -> bool:
    """Whether a stored SCRAM-SHA-256 verifier is the one of `password` (RFC 5802's StoredKey)."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert m, verifier
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(m[2]), int(m[1]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(m[3])


def direct_grants(engine: sa.Engine, role: str) -> dict[str, set[str]]:
    """{table: privileges granted to `role` itself} on the store's tables."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT c.relname, a.privilege_type FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a "
            "WHERE c.relname LIKE 'pcelery_%' AND c.relkind = 'r' "
            "AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :role)"), {"role": role}).all()
    found: dict[str, set[str]] = {}
    for table, privilege in rows:
        found.setdefault(table, set()).add(privilege)
    return found


def refused(engine: sa.Engine, statement: str) -> str | None:
    """Postgres's reason when it refuses `statement` (None: it ran, and was rolled back)."""
    with engine.connect() as conn:
        try:
            with conn.begin() as tx:
                conn.exec_driver_sql(statement)
                tx.rollback()
        except sa.exc.DBAPIError as exc:
            return str(exc.orig).splitlines()[0]
    return None


# --------------------------------------------------------------------------- settings


def test_role_settings_come_in_pairs_and_name_distinct_roles():
    assert database_roles({}) == ()
    roles = database_roles({"PCELERY_RUNTIME_DB_USER": "pcelery_prod_runtime", "PCELERY_RUNTIME_DB_PASSWORD": "s3cr3t",
                            "PCELERY_OPS_DB_USER": "pcelery_prod_ops_clone", "PCELERY_OPS_DB_PASSWORD": "b"})
    assert [(r.kind, r.user) for r in roles] == [("runtime", "pcelery_prod_runtime"), ("ops", "pcelery_prod_ops_clone")]
    assert "s3cr3t" not in repr(roles)  # a password never reaches a log line through repr
    with pytest.raises(SettingsError, match="PCELERY_RUNTIME_DB_PASSWORD is not set but its pair is"):
        database_roles({"PCELERY_RUNTIME_DB_USER": "pcelery_prod_runtime"})
    with pytest.raises(SettingsError, match="not a role name"):
        database_roles({"PCELERY_OPS_DB_USER": 'x"; DROP', "PCELERY_OPS_DB_PASSWORD": "b"})
    with pytest.raises(SettingsError, match="name the same role"):
        database_roles({"PCELERY_RUNTIME_DB_USER": "pcelery_a", "PCELERY_RUNTIME_DB_PASSWORD": "a",
                        "PCELERY_OPS_DB_USER": "pcelery_a_clone", "PCELERY_OPS_DB_PASSWORD": "b"})


def test_roles_need_postgres(tmp_path):
    engine = schema.make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    with pytest.raises(schema.RoleError, match="need Postgres"):
        schema.ensure_roles(engine, [DatabaseRole("runtime", "pcelery_x_runtime", "p")])
    assert schema.main([], database_url=f"sqlite:///{tmp_path / 'store.sqlite3'}") == 0  # no roles asked: fine


# --------------------------------------------------------------------------- what the migration creates


def test_migrate_alone_creates_no_role(cluster):
    """What Django's `manage.py migrate` runs (as the project's own user): the schema, no role."""
    schema.migrate(cluster.engine())
    assert role_row(cluster.runtime) is None and role_row(cluster.ops) is None


def test_the_migration_creates_each_login_with_its_secrets_password_and_exactly_its_grants(cluster):
    engine = cluster.engine()
    schema.migrate(engine)
    changes = schema.ensure_roles(engine, cluster.roles())
    assert f"created role {cluster.runtime}" in changes and f"created role {cluster.ops}" in changes
    for name, password in ((cluster.runtime, "runtime-secret"), (cluster.ops, "ops-secret")):
        row = role_row(name)
        assert row["login"] and not any(row[p] for p in ROLE_POWERS), row
        assert scram_matches(row["password"], password)
        assert not scram_matches(row["password"], "something else")
    tables = {t.name for t in schema.metadata.sorted_tables}
    assert direct_grants(engine, cluster.runtime) == {
        t: {"SELECT"} if t == "pcelery_schema_version" else {"SELECT", "INSERT", "UPDATE"} for t in tables}
    assert direct_grants(engine, cluster.ops) == {
        t: {"SELECT"} if t == "pcelery_schema_version" else {"SELECT", "UPDATE"} for t in tables}
    # The tables stay the migration user's: nobody else can change or drop them.
    with engine.connect() as conn:
        owners = set(conn.execute(sa.text(
            "SELECT tableowner FROM pg_tables WHERE tablename LIKE 'pcelery_%'")).scalars())
    assert owners == {cluster.master}


def test_the_password_reaches_the_server_only_as_a_verifier(cluster):
    """ALTER ROLE ... PASSWORD carries the SCRAM verifier computed on the client: no statement,
    and so no server log with log_statement=ddl, holds the password."""
    engine = cluster.engine()
    schema.migrate(engine)
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cursor, statement, *a: statements.append(statement))
    schema.ensure_roles(engine, cluster.roles("p4ssw0rd-runtime", "p4ssw0rd-ops"))
    assert any("PASSWORD 'SCRAM-SHA-256$" in s for s in statements)
    assert not [s for s in statements if "p4ssw0rd" in s]


@pytest.mark.parametrize("statement", [
    "DROP TABLE pcelery_tasks",
    "ALTER TABLE pcelery_tasks ADD COLUMN evil TEXT",
    "ALTER TABLE pcelery_tasks DROP COLUMN payload",
    "TRUNCATE pcelery_tasks",
    "DELETE FROM pcelery_tasks",
    "DROP TABLE pcelery_schema_version",
    "DELETE FROM pcelery_schema_version",
    "INSERT INTO pcelery_schema_version (version, description, applied_at) VALUES (99, 'x', now())",
    "UPDATE pcelery_schema_version SET version = 0",
    "CREATE TABLE pcelery_evil (id int)",
    "CREATE INDEX evil ON pcelery_tasks (payload)",
    "ALTER ROLE CURRENT_USER CREATEROLE",
    "CREATE ROLE pcelery_evil LOGIN",
    "SELECT rolpassword FROM pg_authid",
])
@pytest.mark.parametrize("kind", ["runtime", "ops"])
def test_neither_role_can_change_the_schema_or_destroy_rows(cluster, kind, statement):
    cluster.migrated()
    engine = cluster.engine(cluster.runtime if kind == "runtime" else cluster.ops)
    reason = refused(engine, statement)
    assert reason and re.search(r"permission denied|must be owner|must be superuser|must have", reason), (
        statement, reason)


def test_the_runtime_role_runs_every_statement_of_the_workers_and_the_relay(cluster):
    cluster.migrated()
    db = cluster.engine(cluster.runtime)
    assert schema.schema_version(db) == schema.LATEST_SCHEMA_VERSION  # the start-up check
    # submit (the outbox's INSERTs, idempotent included) and what a worker does with a delivery
    with db.begin() as conn:
        store.insert_task(conn, task_id="t1", task_name="demo.add", queue="default", args=[1, 2], kwargs={})
        row = store.task_row(task_id="t2", task_name="demo.add", queue="default", args=[3], kwargs={})
        assert store.insert_task_if_absent(conn, row) is None
        assert store.insert_task_if_absent(conn, row) == ("demo.add", {"args": [3], "kwargs": {}})
    assert store.existing_ids(db, ["t1", "t2", "t3"]) == {"t1", "t2"}
    assert store.mark_queued(db, {"t1": "m1"}) == 1
    claim = store.claim(db, "t1", worker="w:1", lease_seconds=60, message_id="m1")
    assert claim.outcome == "run"
    assert store.extend_lease(db, "t1", worker="w:1", lease_seconds=60)
    assert store.finish_success(db, "t1", worker="w:1", result={"ok": 3})
    assert store.claim(db, "t1", worker="w:2", lease_seconds=60).outcome == "duplicate"
    assert store.claim(db, "t2", worker="w:1", lease_seconds=60).outcome == "run"
    assert store.release(db, "t2", worker="w:1")
    assert store.claim(db, "t2", worker="w:1", lease_seconds=60).outcome == "run"
    assert store.finish_failure(db, "t2", worker="w:1", error="ValueError: x", final=False)
    assert store.record_unrunnable(db, "t2", task_name="demo.add", error="no such task", final=True)
    assert store.get_task(db, "t2").state == "dead"
    # the relay: lock pending rows (FOR UPDATE SKIP LOCKED), mark them queued, report its metric
    with db.begin() as conn:
        store.insert_task(conn, task_id="t3", task_name="demo.add", queue="default", args=[], kwargs={})
    with db.begin() as conn:
        [entry] = store.claim_unpublished(conn, older_than_seconds=0)
        assert store.mark_queued(conn, {entry.id: "m3"}) == 1
    assert store.pending_summary(db).count == 0
    assert store.get_task(db, "t3").state == "queued"


def test_the_ops_role_runs_what_ops_tasks_replay_and_redrive_do_and_cannot_submit(cluster):
    owner = cluster.migrated()
    with owner.begin() as conn:
        for tid in ("a", "b", "c"):
            store.insert_task(conn, task_id=tid, task_name="demo.add", queue="default", args=[], kwargs={})
    store.claim(owner, "a", worker="w:1", lease_seconds=60)
    store.finish_failure(owner, "a", worker="w:1", error="boom", final=True)
    ops = cluster.engine(cluster.ops)
    assert schema.schema_version(ops) == schema.LATEST_SCHEMA_VERSION  # ops's open_store check
    assert [r.id for r in store.list_tasks(ops, state="dead")] == ["a"]
    assert set(store.get_tasks(ops, ["a", "b"])) == {"a", "b"}
    assert store.count_by_state(ops)["pending"] == 2
    assert store.count_by_queue_and_state(ops)["default"]["dead"] == 1
    assert store.mark_redriven(ops, ["a"]) == ["a"]  # redrive's bookkeeping
    assert store.reset_for_replay(ops, ["a"]) == ["a"]  # replay
    assert [e.id for e in store.pending_entries(ops, ["a"])] == ["a"]
    assert store.mark_queued(ops, {"a": "m"}) == 1  # replay publishes through the outbox
    assert store.cancel(ops, ["b"]) == ["b"]
    assert "permission denied" in refused(
        ops, "INSERT INTO pcelery_tasks (id, task_name, queue, payload, state, created_at, updated_at) "
             "VALUES ('x', 'demo.add', 'default', '{}', 'pending', now(), now())")


# --------------------------------------------------------------------------- idempotent, converging, concurrent


def test_running_it_again_changes_only_the_password_and_takes_back_what_was_granted_by_hand(cluster):
    engine = cluster.migrated()
    assert schema.ensure_roles(engine, cluster.roles()) == [
        f"set the password of {cluster.runtime} (runtime) from its secret",
        f"set the password of {cluster.ops} (ops) from its secret"]
    with admin(cluster.database) as conn:
        conn.execute(f'GRANT DELETE, TRUNCATE ON pcelery_tasks TO "{cluster.runtime}"')
        conn.execute(f'GRANT SELECT ON pcelery_tasks TO "{cluster.ops}" WITH GRANT OPTION')
    changes = schema.ensure_roles(engine, cluster.roles())
    assert f"granted INSERT, SELECT, UPDATE on pcelery_tasks to {cluster.runtime} (and nothing else)" in changes
    assert f"granted SELECT, UPDATE on pcelery_tasks to {cluster.ops} (and nothing else)" in changes
    assert direct_grants(engine, cluster.runtime)["pcelery_tasks"] == {"SELECT", "INSERT", "UPDATE"}
    # A new password in the secret (a rotation by hand) is what the role gets on the next run.
    schema.ensure_roles(engine, cluster.roles("rotated-by-hand"))
    assert scram_matches(role_row(cluster.runtime)["password"], "rotated-by-hand")


def test_migrations_starting_together_do_not_collide(cluster):
    """Every service task starts with a migration: they take the advisory lock in turn, so
    concurrent GRANTs never meet ("tuple concurrently updated") and each role is created once."""
    errors: list[BaseException] = []

    def run() -> None:
        engine = schema.make_engine(url(cluster.master, cluster.database))
        try:
            schema.migrate(engine)
            schema.ensure_roles(engine, cluster.roles())
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert role_row(cluster.runtime)["login"] and role_row(cluster.ops)["login"]


def test_a_login_rotated_to_its_clone_keeps_the_roles_privileges_and_the_old_password(cluster):
    """Secrets Manager's multi-user rotation (prod) creates <role>_clone as the master user and
    grants it <role>; the secret then names the clone. The next migration sets the clone's
    password from the secret and leaves <role>'s alone: tasks started before the rotation, which
    hold <role>'s password, keep logging in until the rotation after next."""
    owner = cluster.migrated()
    clone = f"{cluster.runtime}_clone"
    with owner.begin() as conn:  # what the rotation Lambda runs, as the master user
        conn.exec_driver_sql(f"CREATE ROLE {clone} WITH LOGIN PASSWORD 'pending'")
        conn.exec_driver_sql(f"GRANT {cluster.runtime} TO {clone}")
    changes = schema.ensure_roles(owner, [DatabaseRole("runtime", clone, "rotated"), cluster.roles()[1]])
    assert f"set the password of {clone} (runtime) from its secret" in changes
    assert scram_matches(role_row(clone)["password"], "rotated")
    assert scram_matches(role_row(cluster.runtime)["password"], "runtime-secret")
    # The grants stay on the role; the clone uses them through its membership and has none of its own.
    assert direct_grants(owner, clone) == {}
    db = cluster.engine(clone)
    with db.begin() as conn:
        store.insert_task(conn, task_id="c1", task_name="demo.add", queue="default", args=[], kwargs={})
    assert store.claim(db, "c1", worker="w:1", lease_seconds=60).outcome == "run"
    assert "must be owner" in refused(db, "DROP TABLE pcelery_tasks")
    assert "permission denied" in refused(db, "TRUNCATE pcelery_tasks")


def test_a_clone_the_rotation_has_not_made_yet_is_made_a_member_of_its_role(cluster):
    owner = cluster.migrated()
    clone = f"{cluster.ops}_clone"
    changes = schema.ensure_roles(owner, [DatabaseRole("ops", clone, "fresh")])
    assert f"created role {clone}" in changes and f"made {clone} a member of {cluster.ops}" in changes
    assert store.list_tasks(cluster.engine(clone)) == []


# --------------------------------------------------------------------------- what the migration refuses


def test_a_migration_user_without_createrole_is_refused_with_the_fix_and_nothing_changes(cluster):
    """An application's own user (a Django project's) usually lacks CREATEROLE: asked for roles,
    the migration says what to grant and leaves the database as it was."""
    with admin() as conn:
        conn.execute(f'ALTER ROLE "{cluster.master}" NOCREATEROLE')
    engine = cluster.engine()
    schema.migrate(engine)
    with pytest.raises(schema.RoleError, match=rf"{cluster.master} may not create role {cluster.runtime}: give it "
                                               rf"CREATEROLE \(`ALTER ROLE {cluster.master} CREATEROLE`"):
        schema.ensure_roles(engine, cluster.roles())
    assert role_row(cluster.runtime) is None


def test_a_role_made_by_hand_with_powers_is_refused(cluster):
    with admin() as conn:
        conn.execute(f'CREATE ROLE "{cluster.runtime}" LOGIN CREATEDB')
    engine = cluster.engine()
    schema.migrate(engine)
    with pytest.raises(schema.RoleError, match=rf"role {cluster.runtime} has CREATEDB, which the runtime role must "
                                               rf"not have: remove them \(`ALTER ROLE {cluster.runtime} NOCREATEDB`\)"):
        schema.ensure_roles(engine, cluster.roles())


def test_tables_owned_by_another_user_are_refused_with_the_fix(cluster):
    """The tables belong to whoever first migrated (Django's `manage.py migrate` as the app's
    user); a migration user that does not own them cannot grant on them."""
    other = f"{cluster.master}_app"
    with admin() as conn:
        conn.execute(f'CREATE ROLE "{other}" LOGIN')
    with admin(cluster.database) as db:
        db.execute(f'GRANT CREATE ON SCHEMA public TO "{other}"')
    schema.migrate(cluster.engine(other))
    with pytest.raises(schema.RoleError, match=r"may not grant on pcelery_\w+: the migration's user must own"):
        schema.ensure_roles(cluster.engine(), cluster.roles())


def test_the_migration_user_cannot_be_one_of_the_roles(cluster):
    engine = cluster.engine()
    schema.migrate(engine)
    with pytest.raises(schema.RoleError, match="is the user this migration connects as"):
        schema.ensure_roles(engine, [DatabaseRole("runtime", cluster.master, "x")])


# --------------------------------------------------------------------------- pcelery-migrate


def test_pcelery_migrate_creates_the_roles_it_is_given_and_exits_3_when_refused(cluster, monkeypatch, capsys):
    monkeypatch.setenv("PCELERY_RUNTIME_DB_USER", cluster.runtime)
    monkeypatch.setenv("PCELERY_RUNTIME_DB_PASSWORD", "from-the-secret")
    monkeypatch.setenv("PCELERY_OPS_DB_USER", cluster.ops)
    monkeypatch.setenv("PCELERY_OPS_DB_PASSWORD", "from-the-other-secret")
    assert schema.main([], database_url=url(cluster.master, cluster.database)) == 0
    err = capsys.readouterr().err
    assert f"roles current: {cluster.runtime} (runtime), {cluster.ops} (ops)" in err
    assert "from-the-secret" not in err
    assert scram_matches(role_row(cluster.ops)["password"], "from-the-other-secret")

    with admin() as conn:
        conn.execute(f'ALTER ROLE "{cluster.master}" NOCREATEROLE')
    assert schema.main([], database_url=url(cluster.master, cluster.database)) == 3
    assert "pcelery-migrate: refused:" in capsys.readouterr().err

    monkeypatch.delenv("PCELERY_OPS_DB_PASSWORD")
    assert schema.main([], database_url=url(cluster.master, cluster.database)) == 2
    assert "PCELERY_OPS_DB_PASSWORD is not set" in capsys.readouterr().err


def test_a_lease_written_by_the_runtime_role_reads_back_in_utc(cluster):
    """Guards the grants against a column the code writes that the role could not: every UPDATE
    above went through; this one reads what it wrote."""
    cluster.migrated()
    db = cluster.engine(cluster.runtime)
    with db.begin() as conn:
        store.insert_task(conn, task_id="u1", task_name="demo.add", queue="default", args=[], kwargs={})
    store.claim(db, "u1", worker="w:1", lease_seconds=30)
    lease = store.get_task(db, "u1").lease_until
    assert lease is not None and lease.tzinfo is not None
    assert lease > dt.datetime.now(dt.UTC)

