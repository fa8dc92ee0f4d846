"""Persistent Celery in a Django project (`pip install persistent-celery[django]`).

Add "pcelery.django" to INSTALLED_APPS and call pcelery.worker.configure(app) in the project's
celery.py. Then:
- `.delay()` / `.apply_async()` of a persistent task inside `transaction.atomic()` writes the
  task's row on Django's own connection, in the caller's transaction: a rollback leaves nothing,
  a commit publishes the id after COMMIT (`on_commit`), and the relay sends it if the process dies
  in between. Outside atomic() the row commits at once, then publishes (Django's autocommit).
- `manage.py migrate` creates (and upgrades) the store's table in the project's database;
  `manage.py pcelery_relay` and `manage.py pcelery_migrate` run the relay and the store migration
  on it, like `pcelery-relay` and `pcelery-migrate` on DATABASE_URL.
- The admin lists the task rows, with filters, their errors, and replay and cancel actions.

The project and the product share one database. `database_settings()` gives settings.py the
DATABASES entry the workers use (DATABASE_URL, or DB_HOST... as ECS passes RDS's secret), so one
variable configures both; a project that keeps its own database settings instead must give the
workers a DATABASE_URL for the same database.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

# The libpq connection parameters a Django OPTIONS dict may carry over to the store's engine; the
# rest (Django's own "pool", "isolation_level"...) mean nothing to SQLAlchemy.
_LIBPQ_OPTIONS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                  "options", "target_session_attrs")


def database_settings(environ: Any = None) -> dict[str, Any]:
    """A Django DATABASES entry for the store the workers use (pcelery.settings: DATABASE_URL, or
    DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD with TLS; SQLite in ./var/ locally), e.g.
    `DATABASES = {"default": database_settings()}`. A bad variable is Django's
    ImproperlyConfigured, naming it and the fix."""
    from django.core.exceptions import ImproperlyConfigured

    from pcelery import settings

    try:
        url = sa.make_url(settings.database_url(environ))
    except settings.SettingsError as exc:
        raise ImproperlyConfigured(str(exc)) from None
    if url.get_backend_name() == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": url.database}
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": url.database or "",
        "USER": url.username or "",
        "PASSWORD": url.password or "",
        "HOST": url.host or "",
        "PORT": str(url.port or ""),
        "OPTIONS": {key: value for key, value in url.query.items() if key in _LIBPQ_OPTIONS},
    }


def database_url(alias: str = "default") -> str:
    """The SQLAlchemy URL of Django's database `alias`, with its password: what the store's engine
    (the outbox's publisher, the admin's actions, the relay and migrate commands) connects to."""
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        db = settings.DATABASES[alias]
    except KeyError:
        raise ImproperlyConfigured(f"PCELERY_DATABASE={alias!r} is not in DATABASES: name the alias of the "
                                   "database that holds the task store") from None
    engine = db.get("ENGINE", "")
    if engine.endswith("sqlite3"):
        return sa.URL.create("sqlite", database=str(db["NAME"])).render_as_string(hide_password=False)
    if not engine.endswith(("postgresql", "postgis")):
        raise ImproperlyConfigured(f"DATABASES[{alias!r}] uses {engine!r}: the task store runs on Django's "
                                   "postgresql or sqlite3 backend")
    options = db.get("OPTIONS") or {}
    return sa.URL.create(
        "postgresql+psycopg", username=db.get("USER") or None, password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None, port=int(db["PORT"]) if db.get("PORT") else None, database=db.get("NAME"),
        query={key: str(options[key]) for key in _LIBPQ_OPTIONS if key in options},
    ).render_as_string(hide_password=False)


def database_alias() -> str:
    """The DATABASES alias that holds the task store: settings.PCELERY_DATABASE, default "default"."""
    from django.conf import settings

    return str(getattr(settings, "PCELERY_DATABASE", "default"))
