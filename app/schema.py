"""The claim-check database: how to connect to it, its tables, and their migrations.

SQLAlchemy Core 2.x serves Postgres (psycopg 3, production) and SQLite (the embedded default) from
one code path. pcelery.store holds every statement on these tables; this module holds what they
are and how a database gets to the current version (`pcelery-migrate`).

Times are taken from the Python clock in UTC and read back timezone-aware on both databases.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

if TYPE_CHECKING:
    from pcelery.settings import DatabaseRole

SQLITE_BUSY_SECONDS = 30  # worker pool processes, relay and ops share one SQLite file
POSTGRES_CONNECT_TIMEOUT = 10  # a down RDS fails a start-up quickly instead of hanging
# A pooled Postgres connection idle at least this long is pinged before use (see `_ping_when_idle`).
PING_AFTER_IDLE_SECONDS = 10.0
UTC = dt.UTC
T = TypeVar("T")


def utcnow() -> dt.datetime:
    return dt.datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator):
    """Timezone-aware UTC datetimes on both databases. SQLite has no time zones: values are stored
    as naive UTC and given their zone back on read."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- Engine ---------------------------------------------------------------------------------

# Execution option for read-only work on SQLite: a deferred BEGIN, so reads never queue
# behind writers for the write lock.
SQLITE_READ_ONLY = "pcelery_read_only"


def make_engine(url: str, **engine_kwargs: Any) -> sa.Engine:
    """Engine for a SQLAlchemy URL. SQLite gets WAL and a busy timeout so a worker's pool
    processes and the relay can share the file; Postgres pings connections that sat idle in the
    pool (an RDS failover closes them) and `autocommit_write` retries a write on a dead one."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_SECONDS}, **engine_kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own implicit BEGIN is deferred; a deferred transaction that reads and then
            # writes can fail with "database is locked" without waiting. We issue BEGIN ourselves.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: sa.Connection) -> None:
            # IMMEDIATE takes the write lock up front, so two processes cannot both decide they
            # won a claim; the busy timeout makes the loser wait instead of failing.
            read_only = conn.get_execution_options().get(SQLITE_READ_ONLY)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql":
        connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
        engine = sa.create_engine(parsed, connect_args=connect_args, **engine_kwargs)
        _ping_when_idle(engine)
        return engine
    return sa.create_engine(parsed, pool_pre_ping=True, **engine_kwargs)


def _ping_when_idle(engine: sa.Engine) -> None:
    """pool_pre_ping, except for a connection used within PING_AFTER_IDLE_SECONDS: pre-ping costs
    a round trip on every checkout (two of the eight a worker spent per task), yet a connection
    that just answered is very likely alive. One that sat idle (where a failover finds them) is
    pinged and replaced if dead; one that died within the window fails its statement, which
    SQLAlchemy turns into an invalidated pool, and `autocommit_write` retries once."""

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_conn: Any, record: Any) -> None:
        record.info["pcelery_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.pop("pcelery_idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return  # a new connection, or one that just worked
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception:  # noqa: BLE001 - any failure of the ping means a dead connection
            alive = False
        if not alive:
            raise sa.exc.DisconnectionError("connection idle in the pool is gone")  # the pool retries anew


def autocommit_write(engine: sa.Engine, write: Callable[[sa.Connection, bool], T]) -> T:
    """Run `write(conn, retrying)`, a single statement, in its own transaction. On Postgres in
    autocommit: one round trip (no BEGIN, no COMMIT). If the connection turns out dead (a failover
    after it was last used), SQLAlchemy invalidates the pool and this runs it once more on a new
    connection with retrying=True: the statement must then also accept its own first run having
    committed before the connection died. SQLite: a transaction (BEGIN IMMEDIATE) on its file."""
    if engine.dialect.name != "postgresql":
        with engine.begin() as conn:
            return write(conn, False)
    for retrying in (False, True):
        try:
            with engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT")
                return write(conn, retrying)
        except sa.exc.DBAPIError as exc:
            if retrying or not exc.connection_invalidated:
                raise
    raise AssertionError("not reached")


@contextlib.contextmanager
def begin(target: sa.Engine | sa.Connection, *, read_only: bool = False) -> Iterator[sa.Connection]:
    """A transaction on an engine, or the caller's own connection (whose transaction it joins)."""
    if isinstance(target, sa.Connection):
        yield target
        return
    if read_only:
        with target.connect() as conn:
            conn = conn.execution_options(**{SQLITE_READ_ONLY: True})
            with conn.begin():
                yield conn
        return
    with target.begin() as conn:
        yield conn


# --- Tables ---------------------------------------------------------------------------------

metadata = sa.MetaData()

tasks = sa.Table(
    "pcelery_tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),  # also the Celery task id on the wire
    sa.Column("task_name", sa.String(200), nullable=False),
    sa.Column("queue", sa.String(80), nullable=False),  # catalog queue name
    sa.Column("payload", sa.Text, nullable=False),  # JSON: {"args": [...], "kwargs": {...}}
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("delay_seconds", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_until", UTCDateTime),
    sa.Column("worker", sa.String(200)),  # hostname/pid of the claiming worker process
    sa.Column("result", sa.Text),  # JSON
    sa.Column("error", sa.Text),  # last error: "ExcType: message"
    sa.Column("message_id", sa.String(100)),  # last SQS MessageId it was published as
    # The SQS MessageId of the delivery that holds the running claim: a second message for a
    # running task (a duplicate publish, a redrive) can then be told apart from SQS handing the
    # running message itself out again. Like lease_until it describes the live claim only and is
    # cleared when the row leaves `running`: during a rolling deploy, v1 code's claims (which do
    # not set it) then read as "unknown" rather than as an earlier run's message (v2).
    sa.Column("claimed_message_id", sa.String(100)),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),  # for `pending` rows: pending since
    sa.Column("queued_at", UTCDateTime),
    sa.Column("started_at", UTCDateTime),
    sa.Column("finished_at", UTCDateTime),
    # When a countdown/ETA falls due; set on every delayed task, and a `scheduled` row (due beyond
    # SQS's 15-minute delay) waits in the store until the relay publishes it (v3).
    sa.Column("due_at", UTCDateTime),
    # Every failed attempt's error, one JSON object per line: {"attempt", "at", "error"} (v3).
    sa.Column("attempt_errors", sa.Text),
    sa.Index("ix_pcelery_tasks_state_created", "state", "created_at"),
    sa.Index("ix_pcelery_tasks_name_state", "task_name", "state"),
    sa.Index("ix_pcelery_tasks_state_due", "state", "due_at"),
)

# One row per periodic schedule (pcelery.scheduler): the latest slot submitted and the next one.
# Each slot's task has an id derived from (schedule, slot), so a slot is submitted once however
# many schedulers run; this table is their progress and what ops shows (v3).
schedules = sa.Table(
    "pcelery_schedules",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("last_slot", UTCDateTime),
    sa.Column("last_task_id", sa.String(36)),
    sa.Column("next_slot", UTCDateTime),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# One row per applied migration step, so an upgrade is "apply the steps above the highest row".
schema_versions = sa.Table(
    "pcelery_schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)


# --- Migrations -----------------------------------------------------------------------------

def _create_tasks_v1(conn: sa.Connection) -> None:
    # The table as version 1 shipped it, spelled out rather than taken from `tasks` (which always
    # describes the newest schema): a fresh database then climbs the same steps as an old one.
    v1 = sa.Table(
        tasks.name, sa.MetaData(),
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("task_name", sa.String(200), nullable=False),
        sa.Column("queue", sa.String(80), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("delay_seconds", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_until", UTCDateTime),
        sa.Column("worker", sa.String(200)),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("message_id", sa.String(100)),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("queued_at", UTCDateTime),
        sa.Column("started_at", UTCDateTime),
        sa.Column("finished_at", UTCDateTime),
        sa.Index("ix_pcelery_tasks_state_created", "state", "created_at"),
        sa.Index("ix_pcelery_tasks_name_state", "task_name", "state"),
    )
    v1.create(conn, checkfirst=True)


def _add_claimed_message_id(conn: sa.Connection) -> None:
    # A nullable column without a default: instant on Postgres (no table rewrite) and on SQLite.
    conn.execute(sa.text(f"ALTER TABLE {tasks.name} ADD COLUMN claimed_message_id VARCHAR(100)"))


def _add_scheduling(conn: sa.Connection) -> None:
    # Nullable columns without defaults (instant on Postgres), one index, one new table.
    timestamp = "TIMESTAMP WITH TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    conn.execute(sa.text(f"ALTER TABLE {tasks.name} ADD COLUMN due_at {timestamp}"))
    conn.execute(sa.text(f"ALTER TABLE {tasks.name} ADD COLUMN attempt_errors TEXT"))
    conn.execute(sa.text(f"CREATE INDEX ix_pcelery_tasks_state_due ON {tasks.name} (state, due_at)"))
    sa.Table(
        schedules.name, sa.MetaData(),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("last_slot", UTCDateTime),
        sa.Column("last_task_id", sa.String(36)),
        sa.Column("next_slot", UTCDateTime),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    ).create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[sa.Connection], None]]] = [
    (1, "create table pcelery_tasks with its state indexes", _create_tasks_v1),
    (2, "add pcelery_tasks.claimed_message_id (the SQS message a claim was made for)", _add_claimed_message_id),
    (3, "add pcelery_tasks.due_at and attempt_errors, table pcelery_schedules (scheduling, retries)",
     _add_scheduling),
]
LATEST_SCHEMA_VERSION = MIGRATIONS[-1][0]
_PG_MIGRATION_LOCK = 0x70636C72  # "pclr": serializes concurrent `migrate` runs (two tasks starting)


def migrate(engine: sa.Engine, *, up_to: int | None = None) -> list[str]:
    """Create or upgrade the schema; idempotent. Returns the steps applied (empty when current).
    up_to: stop after that version (tests build an old database with it)."""
    applied = []
    with engine.begin() as conn:  # DDL is transactional on both databases: all steps or none
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        schema_versions.create(conn, checkfirst=True)
        current = conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0
        for version, description, step in MIGRATIONS:
            if version <= current or (up_to is not None and version > up_to):
                continue
            step(conn)
            conn.execute(schema_versions.insert().values(version=version, description=description,
                                                         applied_at=utcnow()))
            applied.append(f"{version}: {description}")
    return applied


def schema_version(engine: sa.Engine) -> int:
    """Highest applied migration (0 for an empty database); entry points compare it with
    LATEST_SCHEMA_VERSION to refuse running against an old schema."""
    with begin(engine, read_only=True) as conn:
        if not sa.inspect(conn).has_table(schema_versions.name):
            return 0
        return conn.execute(sa.select(sa.func.max(schema_versions.c.version))).scalar() or 0


def unreachable_reason(exc: BaseException) -> str:
    """The first line of a driver error, for one-line messages."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- Database roles -------------------------------------------------------------------------
#
# Who may do what on the store's tables, said in the database itself: workers and the relay log in
# as the runtime role, the ops CLI as the ops role, and only the migration as the tables' owner (the
# RDS master user, or the team's database user). `pcelery-migrate` creates and updates the roles
# when it is given their logins (pcelery.settings.database_roles: the CDK app passes them to the
# migrate containers from the pcelery-<env>/runtime and /ops secrets). `migrate()` itself, which
# Django's `manage.py migrate` runs as the project's own user, never touches a role.

# What each role may do on every product table (`metadata`): exactly the statements pcelery.store
# runs for it. The schema-version table is read-only to both. Neither gets DELETE, TRUNCATE,
# REFERENCES, TRIGGER or MAINTAIN, and neither owns anything, so neither can ALTER or DROP a table.
ROLE_PRIVILEGES: dict[str, tuple[str, ...]] = {
    # submit (INSERT ... ON CONFLICT ... RETURNING), claim / heartbeat / finish / release (UPDATE ...
    # RETURNING), the relay's SELECT ... FOR UPDATE SKIP LOCKED and mark-queued (UPDATE), reads.
    "runtime": ("SELECT", "INSERT", "UPDATE"),
    # ops tasks / peek / depth (SELECT), replay, redrive bookkeeping and cancel (UPDATE).
    "ops": ("SELECT", "UPDATE"),
}
READ_ONLY_TABLES = frozenset({"pcelery_schema_version"})
# Secrets Manager's multi-user rotation alternates a secret between <role> and <role>_clone, a
# member of <role> (it runs `GRANT <role> TO <role>_clone`): the grants stay on <role>.
CLONE_SUFFIX = "_clone"
_SCRAM_VERIFIER_RE = re.compile(r"^SCRAM-SHA-256\$\d+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+$")
# Attributes a login of the product must not have: any one of them is more than a table's worth.
_ROLE_POWERS = {"rolsuper": "SUPERUSER", "rolcreaterole": "CREATEROLE", "rolcreatedb": "CREATEDB",
                "rolreplication": "REPLICATION", "rolbypassrls": "BYPASSRLS"}


class RoleError(Exception):
    """The database refused (or the settings forbid) setting up a role; the message says what and
    the fix. `pcelery-migrate` exits 3 with it."""


def base_role(user: str) -> str:
    """The role that holds the grants for a login: the login itself, or <role> for <role>_clone."""
    return user.removesuffix(CLONE_SUFFIX) or user


def ensure_roles(engine: sa.Engine, roles: Sequence[DatabaseRole]) -> list[str]:
    """Create or update each role, in one transaction under the migration's advisory lock;
    idempotent. For each: the role exists with LOGIN and none of the powers above; its login (the
    role, or its `_clone`, made a member of it) has the given password; the role holds exactly
    ROLE_PRIVILEGES[kind] on every product table that exists (READ_ONLY_TABLES: SELECT), plus
    USAGE on the tables' schema and CONNECT on the database where it lacks them. The password is
    sent as a SCRAM verifier computed here, never in clear text, so no statement log holds it.
    Returns a line per change (the password line every time). Raises RoleError."""
    if engine.dialect.name != "postgresql":
        raise RoleError(f"database roles need Postgres, and this store is {engine.dialect.name}: unset "
                        "PCELERY_RUNTIME_DB_USER/_PASSWORD and PCELERY_OPS_DB_USER/_PASSWORD")
    changes: list[str] = []
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        me = conn.execute(sa.text("SELECT current_user")).scalar_one()
        inspector = sa.inspect(conn)
        tables = [t.name for t in metadata.sorted_tables if inspector.has_table(t.name)]
        for role in roles:
            base = base_role(role.user)
            if me in (base, role.user):
                raise RoleError(f"the {role.kind} role {role.user!r} is the user this migration connects as: "
                                f"the migration connects as the tables' owner, each role has a login of its own")
            changes += _ensure_login(conn, role, base, me)
            changes += _ensure_grants(conn, role.kind, base, me, tables)
    return changes


def _ensure_login(conn: sa.Connection, role: DatabaseRole, base: str, me: str) -> list[str]:
    changes = []
    names = list(dict.fromkeys((base, role.user)))
    found = {r.rolname: r for r in conn.execute(sa.text(
        "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles "
        "WHERE rolname = ANY(:names)"), {"names": names})}
    for name in names:
        if name in found:
            powers = [power for column, power in _ROLE_POWERS.items() if getattr(found[name], column)]
            if powers:
                raise RoleError(f"role {name} has {', '.join(powers)}, which the {role.kind} role must not have: "
                                f"remove them (`ALTER ROLE {name} NO{' NO'.join(powers)}`) and migrate again")
            continue
        _role_ddl(conn, f"CREATE ROLE {_ident(conn, name)} LOGIN",
                  f"{me} may not create role {name}: give it CREATEROLE (`ALTER ROLE {me} CREATEROLE`, as a "
                  f"superuser or the RDS master user), or create {name} yourself (LOGIN, no other attribute) and "
                  f"`GRANT {name} TO {me} WITH ADMIN OPTION`")
        changes.append(f"created role {name}")
    if role.user != base and not conn.execute(sa.text(
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles u ON u.oid = m.member "
            "WHERE r.rolname = :base AND u.rolname = :login"), {"base": base, "login": role.user}).first():
        _role_ddl(conn, f"GRANT {_ident(conn, base)} TO {_ident(conn, role.user)}",
                  f"{me} may not grant role {base}: it needs ADMIN OPTION on it (`GRANT {base} TO {me} WITH ADMIN "
                  "OPTION`)")
        changes.append(f"made {role.user} a member of {base}")
    verifier = _scram_verifier(conn, role.user, role.password)
    _role_ddl(conn, f"ALTER ROLE {_ident(conn, role.user)} WITH LOGIN PASSWORD '{verifier}'",
              f"{me} may not change the password of {role.user}: it needs CREATEROLE and, on Postgres 16 and "
              f"later, ADMIN OPTION on the role (`GRANT {role.user} TO {me} WITH ADMIN OPTION`); a role this "
              "migration created has both")
    changes.append(f"set the password of {role.user} ({role.kind}) from its secret")
    return changes


def _ensure_grants(conn: sa.Connection, kind: str, base: str, me: str, tables: list[str]) -> list[str]:
    changes = []
    schemas = set()
    for table in tables:
        wanted = {"SELECT"} if table in READ_ONLY_TABLES else set(ROLE_PRIVILEGES[kind])
        rows = conn.execute(sa.text(
            "SELECT a.privilege_type, a.is_grantable, n.nspname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN LATERAL aclexplode(c.relacl) a ON a.grantee = (SELECT oid FROM pg_roles WHERE rolname = :role) "
            "WHERE c.oid = to_regclass(:table)"), {"role": base, "table": table}).all()
        schemas.add(rows[0].nspname)
        held = {r.privilege_type for r in rows if r.privilege_type}
        if held == wanted and not any(r.is_grantable for r in rows):
            continue
        fix = (f"{me} may not grant on {table}: the migration's user must own the store's tables "
               f"(`ALTER TABLE {table} OWNER TO {me}`, as their owner)")
        _role_ddl(conn, f"REVOKE ALL ON TABLE {_ident(conn, table)} FROM {_ident(conn, base)}", fix)
        _role_ddl(conn, f"GRANT {', '.join(sorted(wanted))} ON TABLE {_ident(conn, table)} TO {_ident(conn, base)}",
                  fix)
        changes.append(f"granted {', '.join(sorted(wanted))} on {table} to {base} (and nothing else)")
    for schema in sorted(schemas):
        if not conn.execute(sa.text("SELECT has_schema_privilege(:role, :schema, 'USAGE')"),
                            {"role": base, "schema": schema}).scalar_one():
            _role_ddl(conn, f"GRANT USAGE ON SCHEMA {_ident(conn, schema)} TO {_ident(conn, base)}",
                      f"{me} may not grant USAGE on schema {schema}: grant it to {base} as the schema's owner")
            changes.append(f"granted USAGE on schema {schema} to {base}")
    if not conn.execute(sa.text("SELECT has_database_privilege(:role, current_database(), 'CONNECT')"),
                        {"role": base}).scalar_one():
        database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        _role_ddl(conn, f"GRANT CONNECT ON DATABASE {_ident(conn, database)} TO {_ident(conn, base)}",
                  f"{me} may not grant CONNECT on database {database}: grant it to {base} as the database's owner")
        changes.append(f"granted CONNECT on database {database} to {base}")
    return changes


def _ident(conn: sa.Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _scram_verifier(conn: sa.Connection, user: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of `password`, computed by libpq on the client (with SASLprep,
    as the server checks it): what Postgres stores, without the password itself."""
    dbapi: Any = conn.connection.dbapi_connection
    verifier = dbapi.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()
    if not _SCRAM_VERIFIER_RE.match(verifier):  # it is spliced into the statement: it must be exactly this
        raise RoleError(f"libpq returned an unexpected password verifier for {user}")
    return verifier


def _role_ddl(conn: sa.Connection, statement: str, fix: str) -> None:
    """One statement of ensure_roles; a refusal for lack of privilege becomes a RoleError with the fix."""
    try:
        conn.exec_driver_sql(statement)
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            raise RoleError(f"{fix} (Postgres said: {unreachable_reason(exc)})") from None
        raise


# --- CLI: pcelery-migrate -------------------------------------------------------------------

def main(argv: list[str] | None = None, *, database_url: str | None = None) -> int:
    """`pcelery-migrate`: exit 0 migrated or current, 2 bad settings or database unreachable,
    3 refused (a database role could not be set up: ensure_roles says why).
    database_url: the store's, instead of the environment's (manage.py pcelery_migrate)."""
    parser = argparse.ArgumentParser(
        prog="pcelery-migrate",
        description="Create or upgrade the claim-check store's schema (idempotent, safe to run concurrently). "
                    "Reads DATABASE_URL, or DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD. Given "
                    "PCELERY_RUNTIME_DB_USER/_PASSWORD and PCELERY_OPS_DB_USER/_PASSWORD, it then creates or updates "
                    "those login roles and grants each exactly its privileges on the store's tables.",
        epilog="exit codes: 0 migrated or already current; 2 bad settings or the database is unreachable; "
               "3 refused: a role could not be set up (the message says what the database user lacks)")
    parser.parse_args(argv)

    from pcelery.settings import Settings, SettingsError, database_roles

    try:
        roles = database_roles()
        if database_url is None:
            database_url = Settings.from_env().database_url
    except SettingsError as exc:
        print(f"pcelery-migrate: error: {exc}", file=sys.stderr)
        return 2
    engine = make_engine(database_url)
    where = engine.url.render_as_string(hide_password=True)
    if roles and engine.dialect.name != "postgresql":
        print(f"pcelery-migrate: error: database roles need Postgres, and {where} is not: unset "
              "PCELERY_RUNTIME_DB_USER/_PASSWORD and PCELERY_OPS_DB_USER/_PASSWORD", file=sys.stderr)
        return 2
    try:
        steps = migrate(engine)
        for step in steps:
            print(f"applied {step}", file=sys.stderr)
        if not steps:
            print(f"schema is current (version {LATEST_SCHEMA_VERSION}) on {where}", file=sys.stderr)
        if roles:
            for change in ensure_roles(engine, roles):
                print(change, file=sys.stderr)
            print(f"roles current: {', '.join(f'{r.user} ({r.kind})' for r in roles)}", file=sys.stderr)
    except RoleError as exc:
        print(f"pcelery-migrate: refused: {exc}", file=sys.stderr)
        return 3
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        print(f"pcelery-migrate: error: cannot reach the database at {where}: {unreachable_reason(exc)}; check "
              "DATABASE_URL (or DB_HOST...) and that the server is up", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
