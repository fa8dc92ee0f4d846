"""The pcelery app's migrations: each store schema step (pcelery.schema.migrate) runs in the
project's database through one of them."""

from __future__ import annotations

from typing import Any


def create_store(apps: Any, schema_editor: Any) -> None:
    from pcelery.django import database_url
    from pcelery.schema import make_engine, migrate

    engine = make_engine(database_url(schema_editor.connection.alias))
    try:
        migrate(engine)
    finally:
        engine.dispose()
