"""The adoption path, proven on the example project (examples/django_shop): a real Django project
on the real Postgres (and SQLite), its unchanged @shared_task functions made persistent by one
line in its celery.py, run by `pcelery-worker` on a moto server. Django runs in subprocesses, as
it does in production: the view and the admin through Django's test client, the relay and the
migrations through manage.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import REPO, Process, make_pg_database, reset_moto, wait_for

from devstack.stack import create_queues, local_environ, sqs_client, start_worker
from pcelery import schema, store
from pcelery.catalog import load_catalog
from pcelery.outbox import Publisher

SHOP = REPO / "examples" / "django_shop"
CATALOG_SPEC = "shop.queues:CATALOG"


class Shop:
    """The example project in one environment: its database, its queues on the moto server, and
    its processes (Django snippets, manage.py commands, the worker)."""

    def __init__(self, endpoint: str, db_url: str, tmp: Path):
        sys.path.insert(0, str(SHOP))
        try:
            catalog = load_catalog(CATALOG_SPEC)
        finally:
            sys.path.remove(str(SHOP))
        self.sqs = sqs_client(endpoint)
        self.queues = create_queues(self.sqs, catalog, "local")
        self.catalog, self.tmp, self.db_url = catalog, tmp, db_url
        self.engine = schema.make_engine(db_url)
        # Only the shop's code and the installed package: what the shop's image holds.
        self.environ = {
            **local_environ(endpoint, db_url, catalog_spec=CATALOG_SPEC, task_modules="shop.tasks"),
            "PYTHONPATH": str(SHOP),
            "DJANGO_SETTINGS_MODULE": "shopsite.settings",
            "PCELERY_CELERY_APP": "shopsite.celery:app",
        }
        self.workers: list[Process] = []

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=SHOP, env={**os.environ, **self.environ},
                              capture_output=True, text=True, timeout=timeout, check=False)

    def django(self, code: str, *, expect_code: int = 0) -> Any:
        """Run `code` in a fresh Django process (set up as a test client needs it); returns the
        JSON it prints on its last line as `print(json.dumps(...))`."""
        script = "import json, django\ndjango.setup()\nfrom django.test.utils import setup_test_environment\n" \
                 "setup_test_environment()\n" + textwrap.dedent(code)
        done = subprocess.run([sys.executable, "-c", script], cwd=SHOP, env={**os.environ, **self.environ},
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == expect_code, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else None

    def worker(self) -> Process:
        p = Process(self.tmp / f"worker-{len(self.workers)}.log",
                    lambda f: start_worker(self.environ, log=f, concurrency=2)).wait_ready()
        self.workers.append(p)
        return p

    def row(self, task_id: str) -> store.TaskRow | None:
        return store.get_task(self.engine, task_id)

    def wait_row(self, task_id: str, state: str, attempts: int = 1, timeout: float = 60) -> store.TaskRow:
        def done() -> store.TaskRow | None:
            row = self.row(task_id)
            return row if row and row.state == state and row.attempts == attempts else None

        return wait_for(done, timeout=timeout, logs=[w.log for w in self.workers],
                        what=lambda: f"task {task_id} {state} after {attempts} attempt(s): {self.row(task_id)}")

    def depth(self, queue: str = "default") -> int:
        a = self.sqs.get_queue_attributes(QueueUrl=self.queues[queue]["url"], AttributeNames=["All"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]) + int(a["ApproximateNumberOfMessagesNotVisible"])

    def receipts(self, order_id: int) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT receipts_sent FROM shop_order WHERE id = :id"),
                                    {"id": order_id}).scalar_one())

    def orders(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT count(*) FROM shop_order")).scalar_one())

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.engine.dispose()


@pytest.fixture
def shop_on(moto_server, tmp_path):
    """shop_on("postgres" | "sqlite"): the example project migrated on a new database."""
    made: list[Shop] = []

    def make(kind: str = "postgres") -> Shop:
        reset_moto(moto_server.endpoint)
        db_url = make_pg_database("shop") if kind == "postgres" else f"sqlite:///{tmp_path / 'shop.sqlite3'}"
        shop = Shop(moto_server.endpoint, db_url, tmp_path)
        made.append(shop)
        migrated = shop.manage("migrate", "--no-input")
        assert migrated.returncode == 0, migrated.stderr
        assert "Applying pcelery.0001_initial... OK" in migrated.stdout
        return shop

    yield make
    for shop in made:
        shop.close()


PLACE_ORDERS = """
    from django.db import transaction
    from django.test import Client
    from shop.models import Order
    from shop.tasks import send_receipt

    client = Client()
    placed = client.post("/orders/", {"item": "tea", "quantity": 2}, content_type="application/json")
    refused = client.post("/orders/", {"item": "tea", "quantity": 500}, content_type="application/json")
    try:  # an exception after the submit: the order and the task's row roll back together
        with transaction.atomic():
            order = Order.objects.create(item="cup", quantity=1)
            rolled_back = send_receipt.delay(order.id).id
            raise RuntimeError("payment declined")
    except RuntimeError:
        pass
    print(json.dumps({"placed": [placed.status_code, placed.json()], "refused": refused.status_code,
                      "rolled_back": rolled_back}))
"""


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_an_order_commits_with_its_task_which_runs_once_and_a_rollback_publishes_nothing(shop_on, database):
    shop = shop_on(database)
    out = shop.django(PLACE_ORDERS)
    status, placed = out["placed"]
    assert (status, out["refused"]) == (201, 400)
    task_id, order_id = placed["receipt_task"], placed["order"]

    # Committed: the order, its task's row, and one message published after COMMIT. Rolled back
    # (a 400 that set_rollback, an exception in atomic()): no order, no row, no message.
    assert shop.orders() == 1
    assert shop.row(out["rolled_back"]) is None
    assert store.count_by_state(shop.engine)["queued"] == 1
    assert shop.depth() == 1

    # The shop's unchanged @shared_task runs through the claim-check: claimed, run, recorded.
    shop.worker()
    row = shop.wait_row(task_id, "succeeded")
    assert (row.task_name, row.queue, row.payload, row.result) == (
        "shop.tasks.send_receipt", "default", {"args": [order_id], "kwargs": {}}, {"order": order_id})
    assert shop.receipts(order_id) == 1

    # SQS delivers at least once: a second message for the same task is acked without running.
    Publisher(shop.catalog, "local", shop.sqs).publish([store.OutboxEntry(task_id, row.task_name, "default")])
    wait_for(lambda: shop.depth() == 0, timeout=60, what="the duplicate message acked",
             logs=[w.log for w in shop.workers])
    assert shop.receipts(order_id) == 1
    assert shop.row(task_id).attempts == 1


def test_a_crash_between_commit_and_send_is_recovered_by_the_relay(shop_on):
    shop = shop_on("postgres")
    # The process dies right after COMMIT, before the outbox's on_commit publish (Django runs
    # on_commit callbacks in order, and this one was registered first).
    died = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, django
        django.setup()
        from django.db import transaction
        from shop.models import Order
        from shop.tasks import send_receipt
        with transaction.atomic():
            order = Order.objects.create(item="kettle", quantity=1)
            transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
            print(order.id, send_receipt.delay(order.id).id, flush=True)
    """)], cwd=SHOP, env={**os.environ, **shop.environ}, capture_output=True, text=True, timeout=60, check=False)
    assert died.returncode == -signal.SIGKILL, died.stderr
    order_id, task_id = died.stdout.split()
    assert shop.row(task_id).state == "pending" and shop.depth() == 0  # committed, never sent

    relayed = shop.manage("pcelery_relay", "--once", "--min-age", "0")
    assert relayed.returncode == 0, relayed.stderr
    assert shop.row(task_id).state == "queued" and shop.depth() == 1

    shop.worker()
    shop.wait_row(task_id, "succeeded")
    assert shop.receipts(int(order_id)) == 1


# Two tasks of a team's own that write through the ORM, then lose their pool child (SIGKILL) on their
# first run, after the write and before the verdict: the worst moment for an effect.
CRASHING_TASKS = """
    import os
    import signal

    from celery import shared_task
    from django.db.models import F

    from pcelery.worker import current_run
    from shop.models import Order


    def bump_then_die_once(order_id):
        Order.objects.filter(id=order_id).update(receipts_sent=F("receipts_sent") + 1)
        if current_run().attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return order_id


    @shared_task(name="crashing.bump")
    def bump(order_id):
        return bump_then_die_once(order_id)


    @shared_task(name="crashing.bump_atomic", transactional=True)
    def bump_atomic(order_id):
        return bump_then_die_once(order_id)
"""


@pytest.mark.parametrize("database", ["postgres", "sqlite"])
def test_a_transactional_django_task_commits_its_orm_writes_with_its_success(shop_on, database, tmp_path):
    shop = shop_on(database)
    code = tmp_path / "team_code"
    code.mkdir()
    (code / "crashing.py").write_text(textwrap.dedent(CRASHING_TASKS))
    shop.environ["PYTHONPATH"] += os.pathsep + str(code)
    shop.environ["PCELERY_TASK_MODULES"] = "shop.tasks,crashing"
    out = shop.django("""
        from shop.models import Order
        from crashing import bump, bump_atomic
        plain, atomic = Order.objects.create(item="tea", quantity=1), Order.objects.create(item="mug", quantity=1)
        print(json.dumps({"plain": [plain.id, bump.delay(plain.id).id],
                          "atomic": [atomic.id, bump_atomic.delay(atomic.id).id]}))
    """)
    shop.worker()
    (plain_order, plain_task), (atomic_order, atomic_task) = out["plain"], out["atomic"]
    # Both ran twice: the first run's child was killed, SQS delivered the message again.
    assert shop.wait_row(plain_task, "succeeded", attempts=2).result == plain_order
    assert shop.wait_row(atomic_task, "succeeded", attempts=2).result == atomic_order
    # Without transactional=True the first run's write had committed on its own: counted twice
    # (at least once, as the README says). With it, that write died uncommitted with the child.
    assert shop.receipts(plain_order) == 2
    assert shop.receipts(atomic_order) == 1


ADMIN = textwrap.dedent("""
    from django.contrib.auth.models import User
    from django.test import Client
    user = User.objects.filter(username="oncall").first() or User.objects.create_superuser("oncall", "", "x")
    client = Client()
    client.force_login(user)
    base = "/admin/pcelery/task/"

    def page(url):
        response = client.get(url)
        return [response.status_code, response.content.decode()]

    def action(name, ids):
        response = client.post(base, {"action": name, "_selected_action": ids}, follow=True)
        return [response.status_code, [str(m) for m in response.context["messages"]]]
""")


def test_the_admin_lists_filters_cancels_and_replays_task_rows(shop_on):
    shop = shop_on("postgres")
    ids = shop.django("""
        from django.test import Client
        from shop.tasks import sales_report
        made = [Client().post("/orders/", {"item": i, "quantity": 1}, content_type="application/json").json()
                for i in ("pot", "pan")]
        print(json.dumps([m["receipt_task"] for m in made] + [m["order"] for m in made]
                         + [sales_report.delay("not-a-date").id]))
    """)
    keep, cancel, keep_order, cancel_order, report = ids

    listed = shop.django(ADMIN + textwrap.dedent(f"""
        print(json.dumps({{
            "all": page(base), "queued": page(base + "?state__exact=queued"),
            "long": page(base + "?queue__exact=long"),
            "receipts": page(base + "?task_name__exact=shop.tasks.send_receipt"),
            "one": page(base + "{keep}/change/"), "cancel": action("cancel", ["{cancel}"]),
            "add": client.get(base + "add/").status_code,
        }}))
    """))
    assert listed["all"][0] == 200 and all(i in listed["all"][1] for i in (keep, cancel, report))
    assert all(i in listed["queued"][1] for i in (keep, cancel, report))
    assert report in listed["long"][1] and keep not in listed["long"][1]
    assert keep in listed["receipts"][1] and report not in listed["receipts"][1]
    assert listed["one"][0] == 200 and f"&quot;args&quot;: [\n    {keep_order}\n  ]" in listed["one"][1]
    assert listed["cancel"] == [200, ["1 of 1 task(s) cancelled; the others had run or were running (only scheduled, "
                                      "pending, queued, failed tasks can be cancelled)."]]
    assert listed["add"] == 403  # rows come from code, never from a form
    assert shop.row(cancel).state == "cancelled"

    # The cancelled task's message arrives and is acked without running; the other runs; the
    # report fails (a bad date) and the admin shows why.
    shop.worker()
    shop.wait_row(keep, "succeeded")
    shop.wait_row(report, "failed")
    wait_for(lambda: shop.depth() == 0, timeout=60, what="the cancelled task's message acked",
             logs=[w.log for w in shop.workers])
    assert (shop.row(cancel).state, shop.receipts(cancel_order), shop.receipts(keep_order)) == ("cancelled", 0, 1)

    shown = shop.django(ADMIN + textwrap.dedent(f"""
        print(json.dumps({{"failed": page(base + "?state__exact=failed"), "replay": action("replay", ["{keep}"]),
                          "cancel": action("cancel", ["{keep}"])}}))
    """))
    assert report in shown["failed"][1] and "ValidationError" in shown["failed"][1]
    assert shown["replay"] == [200, ["1 task(s) replayed: 1 sent now, 0 left for the relay; 0 running, not replayed."]]
    # The replay ran it again (a replay is explicit: it runs even after a success).
    shop.wait_row(keep, "succeeded", attempts=2)
    assert shop.receipts(keep_order) == 2
    assert shown["cancel"][1] == ["0 of 1 task(s) cancelled; the others had run or were running (only scheduled, "
                                  "pending, queued, failed tasks can be cancelled)."]


def test_bad_settings_are_named_by_manage_py_and_the_worker(shop_on):
    shop = shop_on("postgres")
    shop.environ["DATABASE_URL"] = "mysql://shop@db/shop"
    checked = shop.manage("check")
    assert checked.returncode == 1
    # Django shows a settings error as a traceback; its last line names the variable and the fix.
    assert checked.stderr.strip().splitlines()[-1].endswith(
        "Error: DATABASE_URL='mysql://shop@db/shop' names a mysql database; the task store runs on postgresql:// or "
        "sqlite:///")

    shop.environ.update(DATABASE_URL=shop.db_url, PCELERY_CELERY_APP="shopsite.celery:nothing")
    worker = subprocess.run([str(Path(sys.executable).parent / "pcelery-worker")], env={**os.environ, **shop.environ},
                            capture_output=True, text=True, timeout=60, check=False)
    assert (worker.returncode, worker.stderr.strip()) == (2, (
        "pcelery-worker: error: PCELERY_CELERY_APP: 'shopsite.celery:nothing' cannot be loaded (AttributeError: module "
        "'shopsite.celery' has no attribute 'nothing'): fix the name, or install the code that defines the app"))


def test_the_migration_guide_shows_the_real_diff_and_only_commands_marked_for_aws(tmp_path):
    guide = (REPO / "MIGRATING.md").read_text()
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", guide, re.MULTILINE | re.DOTALL)
    [diff] = [body for kind, body in blocks if kind == "diff"]
    # Reversed on a copy of the example, the diff applies cleanly and leaves a plain Celery project.
    before = tmp_path / "shop"
    shutil.copytree(SHOP, before, ignore=shutil.ignore_patterns("__pycache__", "wheels"))
    reverted = subprocess.run(["patch", "-R", "-p1", "--no-backup-if-mismatch"], input=diff, cwd=before,
                              capture_output=True, text=True, check=False)
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    (before / "shop" / "queues.py").unlink()  # the new files, named beside the diff
    (before / "shop" / "schedules.py").unlink()
    (before / "Dockerfile").unlink()  # its entry point, likewise
    left = [str(p.relative_to(before)) for p in before.rglob("*") if p.is_file() and "pcelery" in p.read_text()]
    assert left == []
    assert "celery[redis]" in (before / "requirements.txt").read_text()

    # Everything else is a command against a deployed environment, marked as such; the stacks it
    # deploys are the CDK app's.
    commands = [line for kind, body in blocks if kind == "bash" for line in body.splitlines() if line.strip()]
    assert commands and all("# needs AWS" in line for line in commands)
    for stack in re.findall(r"cdk deploy -c env=(\w+) (\S+)", guide):
        assert stack[1] in (f"pcelery-{stack[0]}-stateful", f"pcelery-{stack[0]}-stateless")


def test_the_django_model_has_every_column_of_the_store(shop_on):
    """The model is unmanaged: pcelery.schema owns the table. This fails when a store migration adds
    a column the model (and a pcelery migration for Django) does not have yet."""
    shop = shop_on("postgres")
    columns = shop.django("""
        from pcelery.django.models import Task
        print(json.dumps(sorted(f.column for f in Task._meta.fields)))
    """)
    from pcelery.schema import tasks

    assert columns == sorted(c.name for c in tasks.columns)
    checked = shop.manage("makemigrations", "pcelery", "--check", "--dry-run")
    assert checked.returncode == 0, checked.stdout + checked.stderr
