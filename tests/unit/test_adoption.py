"""A team's own Celery app made persistent (pcelery.worker.configure, PersistentTask): which tasks
become persistent, which options are refused when the task is defined, where `.delay()` goes, and
what a misnamed PCELERY_CELERY_APP says. The worker running such an app, and Django's submit, are
in tests/integration/test_django.py."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from celery import Celery, shared_task

from pcelery import schema, store
from pcelery.catalog import CATALOG
from pcelery.cli import import_celery_app
from pcelery.outbox import _DEFAULT, Outbox, SubmitError
from pcelery.settings import SettingsError
from pcelery.worker import PersistentTask, configure


def unique(name: str) -> str:
    return f"adopt.{name}.{uuid.uuid4().hex[:8]}"  # declarations are per process: one name, one declaration


def body() -> None:
    return None


@pytest.fixture
def team_app() -> Celery:
    """An app as a team's celery.py makes it, plus the one line."""
    app = Celery("team", set_as_current=False)
    configure(app)
    app.conf.update(task_default_queue="celery", broker_url="redis://cache:6379/0", timezone="Europe/Paris")
    return app


@pytest.fixture
def outbox(tmp_path):
    """An outbox on a SQLite store whose SQS endpoint refuses connections: rows stay pending."""
    from devstack.stack import sqs_client

    engine = schema.make_engine(f"sqlite:///{tmp_path / 'tasks.sqlite3'}")
    schema.migrate(engine)
    yield Outbox(engine, CATALOG, "local", sqs_client("http://127.0.0.1:9"))
    engine.dispose()


def test_every_task_of_a_configured_app_is_persistent_and_keeps_its_options(team_app):
    @team_app.task(name=unique("plain"))
    def plain(x):
        return x

    @team_app.task(name=unique("report"), queue="long", soft_time_limit=600)
    def report():
        return None

    assert isinstance(plain, PersistentTask) and plain.acks_late
    assert (plain.pcelery_queue, plain.soft_time_limit, plain.time_limit) == (
        "default", CATALOG.get("default").soft_time_limit, CATALOG.get("default").hard_time_limit)
    assert (report.pcelery_queue, report.soft_time_limit, report.time_limit) == (
        "long", 600, CATALOG.get("long").hard_time_limit)
    # The product's settings win on the keys they name; the team's others stay.
    assert (team_app.conf.broker_url, team_app.conf.task_default_queue, team_app.conf.timezone) == (
        "sqs://", "default", "Europe/Paris")


def test_one_shared_task_can_be_made_persistent_alone():
    app = Celery("other", set_as_current=False)
    configure(app, persistent_by_default=False)

    @shared_task(name=unique("one"), base=PersistentTask)
    def one():
        return 1

    @app.task(name=unique("untouched"))
    def untouched():
        return 2

    assert isinstance(one, PersistentTask)
    assert not isinstance(untouched, PersistentTask)


@pytest.mark.parametrize("options, message", [
    ({"acks_late": False}, "sets acks_late=False: a persistent task acks its message only after it ran"),
    ({"autoretry_for": (ValueError,), "max_retries": None}, "sets max_retries=None (retry forever)"),
    ({"autoretry_for": (ValueError,), "dont_autoretry_for": (KeyError,)}, "sets dont_autoretry_for: not supported"),
    ({"autoretry_for": (ValueError,), "max_retries": 9},
     "retry.max_attempts=10 must be 1..max_receive_count=5"),
    ({"queue": "urgent"}, "unknown queue 'urgent': the catalog has ['default', 'long']"),
    ({"time_limit": 3600}, "time_limit=3600 does not fit queue 'default''s visibility timeout of 120 s"),
])
def test_options_that_break_the_sqs_contract_are_refused_when_the_task_is_defined(team_app, options, message):
    name = unique("refused")
    with pytest.raises(ValueError, match=rf"^task {name!r}") as caught:
        team_app.task(name=name, shared=False, **options)(body).name  # noqa: B018 - evaluating defines it
    assert message in str(caught.value)


def test_celerys_autoretry_options_become_the_tasks_retry_policy(team_app):
    from pcelery.catalog import RetryPolicy

    @team_app.task(name=unique("autoretry"), autoretry_for=(TimeoutError,), max_retries=2, retry_backoff=3,
                   retry_backoff_max=20, retry_jitter=False)
    def autoretry():
        return None

    @team_app.task(name=unique("fixed"), autoretry_for=(KeyError,), default_retry_delay=7)
    def fixed():
        return None

    assert autoretry.retry_policy == RetryPolicy(max_attempts=3, retry_on=(TimeoutError,), backoff=3.0,
                                                 backoff_max=20.0, jitter=False)
    # Celery without retry_backoff waits default_retry_delay every time; max_retries defaults to 3.
    assert (fixed.retry_policy.max_attempts, fixed.retry_policy.backoff, fixed.retry_policy.backoff_max) == (4, 7, 7)


def test_configure_after_a_task_was_defined_says_where_it_belongs():
    app = Celery("late", set_as_current=False)
    app.task(name=unique("early"))(body).name  # noqa: B018 - builds the app's Task class
    with pytest.raises(RuntimeError, match=r"configure\(app\) came after the app built its task class"):
        configure(app)


def test_delay_inside_an_outbox_transaction_joins_it(team_app, outbox):
    @team_app.task(name=unique("joined"))
    def joined(x, y=0):
        return x + y

    with outbox.transaction() as conn:
        task_id = joined.delay(1, y=2).id
        assert store.get_task(conn, task_id).state == "pending"  # in the caller's transaction
    assert store.get_task(outbox.engine, task_id).payload == {"args": [1], "kwargs": {"y": 2}}

    submitted: list[str] = []
    with pytest.raises(RuntimeError, match="the caller's transaction fails"), outbox.transaction():  # noqa: PT012
        submitted.append(joined.delay(3).id)
        raise RuntimeError("the caller's transaction fails")
    assert store.get_task(outbox.engine, submitted[0]) is None


def test_delay_outside_a_transaction_commits_on_its_own(team_app, tmp_path, monkeypatch):
    db_url = f"sqlite:///{tmp_path / 'own.sqlite3'}"
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:9")  # refuses: the row stays pending
    monkeypatch.setattr("pcelery.outbox._SUBMITTERS", [])
    _DEFAULT.clear()
    engine = schema.make_engine(db_url)
    schema.migrate(engine)

    @team_app.task(name=unique("alone"))
    def alone():
        return None

    try:
        task_id = alone.delay().id
        assert store.get_task(engine, task_id).state == "pending"  # committed; the relay sends it
    finally:
        _DEFAULT.clear()
        engine.dispose()


@pytest.mark.parametrize("call, message", [
    (lambda t: t.apply_async(countdown=3600), "countdown=3600 exceeds queue 'default''s max_countdown of 60 s"),
    (lambda t: t.apply_async(eta=dt.datetime.now(dt.UTC) + dt.timedelta(days=2)),
     "exceeds queue 'default''s max_countdown of 60 s"),
    (lambda t: t.apply_async(queue="urgent"), "queue='urgent' is not in the catalog"),
    (lambda t: t.apply_async(link=t.s()), "apply_async(link=...): not supported on a persistent task"),
    (lambda t: t.apply_async(expires=60), "apply_async(expires=...): not supported on a persistent task"),
    (lambda t: t.delay(object()), "args[0] of"),
])
def test_submit_options_sqs_cannot_honour_are_refused(team_app, outbox, call, message):
    @team_app.task(name=unique("submitted"))
    def submitted(*args):
        return None

    with outbox.transaction(), pytest.raises(SubmitError) as caught:
        call(submitted)
    assert message in str(caught.value)


def test_the_worker_names_an_app_it_cannot_run(tmp_path, monkeypatch):
    (tmp_path / "teamcelery.py").write_text(
        "from celery import Celery\nimport pcelery.worker\n"
        "plain = Celery('plain', set_as_current=False)\n"
        "ready = pcelery.worker.configure(Celery('ready', set_as_current=False))\n"
        "broken = pcelery.worker.configure(Celery('broken', set_as_current=False))\n"
        "broken.conf.imports = ['teamcelery_missing_module']\n"
        "not_an_app = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    import_celery_app("teamcelery:ready")
    for spec, message in [
        ("teamcelery:plain", "PCELERY_CELERY_APP: the app 'teamcelery:plain' is not configured for SQS: call "
                             "pcelery.worker.configure(app) right after creating it"),
        ("teamcelery:not_an_app", "PCELERY_CELERY_APP: 'teamcelery:not_an_app' is a int, not a Celery app"),
        ("teamcelery:missing", "PCELERY_CELERY_APP: 'teamcelery:missing' cannot be loaded (AttributeError"),
        ("nowhere.celery:app", "PCELERY_CELERY_APP: 'nowhere.celery:app' cannot be loaded (ModuleNotFoundError"),
        ("teamcelery:broken", "PCELERY_CELERY_APP: setting up the app 'teamcelery:broken' failed "
                              "(ModuleNotFoundError"),
    ]:
        with pytest.raises(SettingsError) as caught:
            import_celery_app(spec)
        assert str(caught.value).startswith(message)


def test_an_eager_app_runs_tasks_in_place_after_the_same_checks(team_app):
    team_app.conf.task_always_eager = True  # a test suite's CELERY_TASK_ALWAYS_EAGER

    @team_app.task(name=unique("eager"))
    def eager(x):
        return x * 2

    assert eager.delay(21).get() == 42  # no store, no SQS: run here and now
    with pytest.raises(SubmitError, match="countdown=3600 exceeds queue 'default''s max_countdown of 60 s"):
        eager.apply_async((1,), countdown=3600)


def test_a_transactional_task_without_db_outside_django_names_both_fixes(team_app):
    team_app.conf.task_always_eager = True

    @team_app.task(name=unique("orm"), transactional=True)
    def orm_writes(x):
        return x

    # Only a Django project (pcelery.django registers its atomic()) can run it without `db`.
    with pytest.raises(TypeError, match=r"takes no `db` parameter .* add a `db` parameter .* \"pcelery.django\" to "
                                        r"INSTALLED_APPS"):
        orm_writes.delay(1).get()


def test_the_worker_names_a_task_whose_options_it_refuses_before_celery_starts():
    from pcelery.cli import define_tasks

    app = configure(Celery("refusing", set_as_current=False))
    name = unique("fire_and_forget")
    app.task(name=name, shared=False, acks_late=False)(body)  # lazy: nothing is checked until the app is finalized
    with pytest.raises(SettingsError) as caught:
        define_tasks(app)
    assert str(caught.value).startswith(f"PCELERY_TASK_MODULES: task {name!r} sets acks_late=False")
