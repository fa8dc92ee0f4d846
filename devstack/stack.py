"""The local stack's parts: a moto server on a free loopback port, the catalog's queues created
on any SQS endpoint with the attributes the CDK app gives them, and the product's processes
(worker, relay) started the way ECS starts them: through their console scripts.

`create_queues` is the one code path from a catalog contract to real SQS attributes; the CDK
queues construct is tested against the same `QueueContract.sqs_attributes` numbers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pcelery.catalog import Catalog, sqs_queue_name
from pcelery.settings import DEFAULT_REGION, LOCAL_ACCESS_KEY
from pcelery.sqs import OPS, make_client

from . import DEMO_CATALOG_SPEC

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_REGION = DEFAULT_REGION
# moto accepts any credentials; these keep boto3 and kombu from looking for real ones.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": LOCAL_ACCESS_KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    process: subprocess.Popen
    endpoint: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def supervised(command: list[str], exit_file: Path | None) -> list[str]:
    """`command`, run through devstack.supervise when exit_file is given: it records the exit code,
    signal and time there (the detached local stack, whose starter has long returned)."""
    if exit_file is None:
        return command
    return [sys.executable, "-m", "devstack.supervise", str(exit_file), "--", *command]


def start_moto_server(port: int | None = None, *, log: IO[bytes] | None = None, timeout: float = 30.0,
                      exit_file: Path | None = None) -> MotoServer:
    """Start `moto_server` as a child process bound to 127.0.0.1 and wait until it answers."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        supervised([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], exit_file),
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,  # a detached server never holds the operator's terminal
        stdout=log or subprocess.DEVNULL,
        stderr=log or subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C in a terminal reaches the demo, which stops it in order
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode} while starting on {endpoint}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
            return MotoServer(proc, endpoint)
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"moto server did not answer on {endpoint} within {timeout:.0f} s")


def sqs_client(endpoint: str) -> Any:
    """A client of the local endpoint (the product's own client factory, with the local keys and
    ops's patience: the tests and the demo long-poll with it)."""
    return make_client(endpoint_url=endpoint, region=LOCAL_REGION, timeouts=OPS)


def create_queues(sqs: Any, catalog: Catalog, env: str) -> dict[str, dict[str, str]]:
    """Create (or bring up to date) every catalog queue and its DLQ. Idempotent.

    Returns {queue name: {"url": ..., "arn": ..., "dlq_url": ..., "dlq_arn": ...}}.
    """
    created = {}
    for contract in catalog:
        dlq_url = sqs.create_queue(QueueName=sqs_queue_name(env, contract.name, dlq=True))["QueueUrl"]
        dlq_arn = _arn(sqs, dlq_url)
        url = sqs.create_queue(QueueName=sqs_queue_name(env, contract.name))["QueueUrl"]
        # Attributes are set after creation so that re-running against an existing queue with
        # other values converges instead of failing with QueueAlreadyExists.
        sqs.set_queue_attributes(QueueUrl=url, Attributes=contract.sqs_attributes(dlq_arn))
        arn = _arn(sqs, url)
        sqs.set_queue_attributes(QueueUrl=dlq_url, Attributes=contract.dlq_attributes(arn))
        created[contract.name] = {"url": url, "arn": arn, "dlq_url": dlq_url, "dlq_arn": dlq_arn}
    return created


def _arn(sqs: Any, url: str) -> str:
    return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]


DEMO_TASK_MODULES = "devstack.tasks"


def local_environ(endpoint: str, database_url: str, *, catalog_spec: str = DEMO_CATALOG_SPEC,
                  env: str = "local", result_backend: str | None = None,
                  task_modules: str = DEMO_TASK_MODULES) -> dict[str, str]:
    """The environment every process of the local stack gets (worker, relay, demo, ops).
    PYTHONPATH makes the dev harness (the demo catalog and tasks) importable by the console
    scripts, which do not run from the repository's root."""
    environ = {
        **LOCAL_CREDENTIALS,
        "AWS_REGION": LOCAL_REGION,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "AWS_ENDPOINT_URL_SQS": endpoint,
        "PCELERY_ENV": env,
        "PCELERY_CATALOG": catalog_spec,
        "PCELERY_TASK_MODULES": task_modules,
        "DATABASE_URL": database_url,
        "PYTHONPATH": str(REPO_ROOT),
    }
    if result_backend:
        environ["PCELERY_RESULT_BACKEND"] = result_backend
    return environ


def console_script(name: str) -> str:
    """The path of one of the package's console scripts in this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: install the package into this environment (`make setup`)")
    return str(path)


def start_worker(environ: dict[str, str], *, queues: list[str] | None = None, concurrency: int | None = None,
                 hostname: str | None = None, log: IO[bytes] | None = None,
                 exit_file: Path | None = None) -> subprocess.Popen:
    """Start `pcelery-worker` (the worker image's entry point) with os.environ | environ, in its
    own session: signal the whole group (os.killpg) to stop it and its pool children together."""
    env = {**os.environ, **environ}
    if queues:
        env["PCELERY_WORKER_QUEUES"] = ",".join(queues)
    if concurrency:
        env["PCELERY_CONCURRENCY"] = str(concurrency)
    if hostname:
        env["PCELERY_WORKER_NAME"] = hostname
    return _start(supervised([console_script("pcelery-worker")], exit_file), env, log)


def start_relay(environ: dict[str, str], *, log: IO[bytes] | None = None, interval: float | None = None,
                min_age: float | None = None, exit_file: Path | None = None) -> subprocess.Popen:
    """Start the outbox relay (`pcelery-relay`, the relay service's command) the same way."""
    command = [console_script("pcelery-relay")]
    if interval is not None:
        command += ["--interval", str(interval)]
    if min_age is not None:
        command += ["--min-age", str(min_age)]
    return _start(supervised(command, exit_file), {**os.environ, **environ}, log)


def _start(command: list[str], env: dict[str, str], log: IO[bytes] | None) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_process_group(proc: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal a process started by start_worker/start_relay and its children; SIGKILL the group
    if it has not exited within `timeout`. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # Pool children may outlive a killed parent: always sweep the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None
