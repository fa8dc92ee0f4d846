"""The CDK app: cdk-nag, cfn-lint and the contract each construct must keep.

All template tests share one in-process synth of every environment (tests/cdk_support.py);
the 3-queue catalog and an image with file and build_args get one more synth of dev each, and the
real CLI runs once. The cdk.json
validation that needs no synth is in tests/unit/test_infra_config.py; app.py failing on a bad key
stays here because it starts a process. Every environment deploys the example shop
(examples/django_shop, cdk.json `application`), so each test reads the queues from the
environment's own catalog (`CONFIGS[env].catalog`, shop.queues:CATALOG). Stack, queue, alarm and
task names are spelled out literally on purpose: they are the contract RUNBOOK.md and on-call rely
on, checked independently of `catalog.resource_name`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from cdk_support import (
    ENVS,
    REPO_ROOT,
    alarms,
    configs,
    context_with,
    resources,
    summary,
    synth,
    synth_all,
    synth_templates,
)

from infra.monitoring import OUTBOX_NAMESPACE, SCHEDULER_PASSES_METRIC, SCHEDULER_SUBMITTED_METRIC
from infra.permissions import (
    CONSUME_ACTIONS,
    DEAD_LETTER_ACTIONS,
    OPS_METRIC_ACTIONS,
    OPS_QUEUE_ACTIONS,
    PUBLISH_ACTIONS,
)
from infra.relay import MIGRATE_COMMAND, OPS_CONTAINER, OPS_ENTRY_POINT, RELAY_COMMAND
from infra.scheduler import SCHEDULER_CONTAINER, SCHEDULER_ENTRY_POINT
from infra.workers import (
    ECS_MAX_STOP_TIMEOUT,
    IDLE_SCALE_IN_MINUTES,
    TMP_VOLUME,
    WORKER_ENTRY_POINT,
    outlasts_stop_timeout,
    stop_timeout,
)
from pcelery.catalog import CATALOG, DLQ_RETENTION, Catalog, QueueContract, sqs_queue_name

SUMMARY_FILE = Path(__file__).with_name("infra_summary.json")
CONFIGS = configs()

# cfn-lint warnings we keep, each with the reason and how narrowly it applies; anything else fails.
EXPLAINED_WARNINGS = {
    # Zones are named in cdk.json on purpose: synth must work offline, without an AZ lookup.
    "W3010": lambda message: "Avoid hardcoding availability zones" in message,
    # A DependsOn that CDK's own custom-resource providers write next to a GetAtt (the one that
    # strips the default security group; in prod the AwsCustomResource Lambda that reads S3's prefix
    # list id); harmless and not ours to change.
    "W3005": lambda message: message.startswith(("'CustomVpcRestrictDefaultSGCustomResourceProviderRole",
                                                 "'AWS679f53fac002430cb0da5b7982bd2287ServiceRole")),
}


ANCHOR_BY_SIGNAL = {
    "dlq-not-empty": "alarm-dlq-not-empty",
    "oldest-message-age": "alarm-queue-backlog-old",
    "running-low": "alarm-service-running-low",
    "outbox-lag": "alarm-outbox-lag",
    "db-cpu-high": "alarm-db-cpu-high",
    "db-free-storage-low": "alarm-db-free-storage-low",
    "db-connections-high": "alarm-db-connections-high",
    "redis-memory-high": "alarm-redis-memory-high",
    "scheduler-stopped": "alarm-scheduler-stopped",
}


def stateful(env):
    return synth_templates(env)[f"pcelery-{env}-stateful"]


def scheduled(env) -> bool:
    """Whether `env` runs the scheduler service (cdk.json application.schedules; all three do)."""
    return CONFIGS[env].application.schedules_spec is not None


def task_count(env) -> int:
    """Task definitions: a worker per queue, the relay, the migrate and ops tasks, the scheduler."""
    return len(CONFIGS[env].catalog) + 3 + scheduled(env)


def container_count(env) -> int:
    """Containers: each worker, the relay and the scheduler with a migrate init container; the
    migrate and ops tasks."""
    return 2 * len(CONFIGS[env].catalog) + 2 + 2 * scheduled(env) + 1 + 1


def stateless(env):
    return synth_templates(env)[f"pcelery-{env}-stateless"]


def resolve(value, producer: dict):
    """Follow a weak cross-stack reference (Fn::GetStackOutput) back to the producer's expression."""
    if isinstance(value, dict) and "Fn::GetStackOutput" in value:
        return producer["Outputs"][value["Fn::GetStackOutput"]["OutputName"]]["Value"]
    return value


def queue_name_of(value, producer: dict) -> str:
    value = resolve(value, producer)
    logical_id = value["Fn::GetAtt"][0] if "Fn::GetAtt" in value else value["Ref"]
    return producer["Resources"][logical_id]["Properties"]["QueueName"]


def statements_of_role(template: dict, role_ref: dict) -> list[dict]:
    role_id = role_ref["Fn::GetAtt"][0]
    return [
        st
        for pol in resources({"t": template}, "AWS::IAM::Policy").values()
        if {"Ref": role_id} in pol["Properties"]["Roles"]
        for st in pol["Properties"]["PolicyDocument"]["Statement"]
    ]


def task_definition(template: dict, family: str) -> dict:
    [task] = [r["Properties"] for r in resources({"t": template}, "AWS::ECS::TaskDefinition").values()
              if r["Properties"]["Family"] == family]
    return task


def as_list(x):
    return x if isinstance(x, list) else [x]


# --------------------------------------------------------------------------- config (through app.py)


@pytest.mark.parametrize("path, value, expected", [
    ("database.backup_retention_days", 0,
     "pcelery:environments.staging.database.backup_retention_days: 0 is not valid"),
    # A deployed environment never runs the demo tasks: no task modules, no synth.
    ("application.task_modules", KeyError,
     "pcelery:environments.staging.application.task_modules: missing: set it (list, the modules that declare your "
     "tasks"),
    ("application.catalog", "shop.queues:Catalog",
     "pcelery:environments.staging.application.catalog: catalog spec 'shop.queues:Catalog' names a type, not a "
     "Catalog"),
    # An external database beside the keys of the stack's own RDS instance (staging keeps them all).
    # The schedules are imported at synth as the scheduler would load them.
    ("application.schedules", "shop.schedules:NIGHTLY",
     "pcelery:environments.staging.application.schedules: PCELERY_SCHEDULES='shop.schedules:NIGHTLY' cannot be "
     "loaded (AttributeError: module 'shop.schedules' has no attribute 'NIGHTLY')"),
    ("database.external", {"host": "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "port": 5432, "name": "shop",
                           "secret_arn": "arn:aws:secretsmanager:eu-west-1:222222222222:secret:shop/db-AbCdEf"},
     "pcelery:environments.staging.database.instance_type: sizes the RDS instance the stack creates, and with "
     "database.external it creates none: remove it"),
])
def test_app_py_fails_synth_naming_the_bad_key(tmp_path, path, value, expected):
    """The real entry point, given context the way the CLI gives it (CDK_CONTEXT_JSON), from
    another working directory: the application's paths are relative to cdk.json's directory."""
    ctx = context_with("staging", path, value)
    env = {**os.environ, "CDK_CONTEXT_JSON": json.dumps(ctx), "CDK_OUTDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "app.py")], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- synth, nag, cfn-lint


def test_every_environment_synthesizes_its_two_stacks():
    s = synth_all()
    assert sorted(s.stack_names()) == sorted(f"pcelery-{e}-{k}" for e in ENVS for k in ("stateful", "stateless"))
    # Offline: nothing was looked up (an AZ or VPC lookup would need credentials at synth time).
    assert s.lookups == []
    # Termination protection guards the data in prod; everything else can be torn down.
    assert {n for n, on in s.termination_protection.items() if on} == {"pcelery-prod-stateful"}


def test_nag_acknowledgments_are_scoped_to_resources_and_explained():
    """Synth ran with AwsSolutionsChecks; it fails on any unacknowledged finding, so what is
    left to check is that every acknowledgment sits on a resource (not a whole stack) and says why."""
    found = 0
    for metadata in synth_all().metadata.values():
        for path, entries in metadata.items():
            for entry in entries:
                if entry["type"] != "aws:cdk:acknowledged-rules":
                    continue
                for rule, reason in entry["data"].items():
                    found += 1
                    assert path.count("/") >= 2, f"{rule} acknowledged on the whole stack at {path}"
                    assert len(reason) >= 40, f"{rule} at {path}: reason too thin: {reason!r}"
                    assert re.search(r"AwsSolutions-|CloudFormation-Validate::", rule), rule
    assert found >= 10


def test_nag_fails_synth_on_an_unacknowledged_finding(tmp_path):
    """add_checks is really wired: an unencrypted queue without a DLQ does not synthesize."""
    import aws_cdk as cdk
    from aws_cdk import aws_sqs as sqs

    from infra.nag import add_checks

    app = cdk.App(outdir=str(tmp_path))
    stack = cdk.Stack(app, "nag-probe")
    sqs.Queue(stack, "Plain", encryption=sqs.QueueEncryption.UNENCRYPTED)
    add_checks(app)
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()
    report = (tmp_path / "validation-report.json").read_text()
    assert "AwsSolutions-SQS3" in report or "AwsSolutions-SQS2" in report


def assert_cfn_lint_clean(templates: dict[str, dict], region: str) -> None:
    """No cfn-lint error and no warning but the explained ones, in any of `templates`."""
    from cfnlint.api import lint

    for name, template in templates.items():
        matches = lint(json.dumps(template), regions=[region])
        errors = [f"{m.rule.id} {m.message} ({m.path_string})" for m in matches if m.rule.id[0] == "E"]
        unexplained = [f"{m.rule.id} {m.message}" for m in matches if m.rule.id[0] == "W"
                       and not EXPLAINED_WARNINGS.get(m.rule.id, lambda _: False)(m.message)]
        assert not errors, f"{name}: {errors}"
        assert not unexplained, f"{name}: fix or explain in EXPLAINED_WARNINGS: {unexplained}"


@pytest.mark.parametrize("env", ENVS)
def test_cfn_lint_finds_no_errors_and_only_explained_warnings(env):
    assert_cfn_lint_clean(synth_templates(env), CONFIGS[env].region)


# --------------------------------------------------------------------------- queues


@pytest.mark.parametrize("env", ENVS)
def test_queues_and_dlqs_carry_the_catalog_contract(env):
    t = stateful(env)
    cfg = CONFIGS[env]
    by_name = {r["Properties"]["QueueName"]: (lid, r["Properties"])
               for lid, r in resources({"t": t}, "AWS::SQS::Queue").items()}
    assert len(by_name) == 2 * len(CONFIGS[env].catalog)
    for q in CONFIGS[env].catalog:
        _work_id, work = by_name[sqs_queue_name(env, q.name)]
        dlq_id, dlq = by_name[sqs_queue_name(env, q.name, dlq=True)]
        want = q.sqs_attributes(dlq_arn="<dlq>")
        assert str(work["VisibilityTimeout"]) == want["VisibilityTimeout"]
        assert str(work["MessageRetentionPeriod"]) == want["MessageRetentionPeriod"]
        assert str(work["ReceiveMessageWaitTimeSeconds"]) == want["ReceiveMessageWaitTimeSeconds"]
        assert work["RedrivePolicy"] == {
            "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
            "maxReceiveCount": json.loads(want["RedrivePolicy"])["maxReceiveCount"],
        }
        source_arn = f"arn:aws:sqs:{cfg.region}:{cfg.account}:{sqs_queue_name(env, q.name)}"
        want_dlq = q.dlq_attributes(source_arn)
        assert str(dlq["MessageRetentionPeriod"]) == want_dlq["MessageRetentionPeriod"] == str(DLQ_RETENTION)
        assert dlq["RedriveAllowPolicy"] == json.loads(want_dlq["RedriveAllowPolicy"])
        assert "RedrivePolicy" not in dlq
        for props in (work, dlq):
            assert props["SqsManagedSseEnabled"] is True


@pytest.mark.parametrize("env", ENVS)
def test_every_queue_refuses_plain_http(env):
    t = stateful(env)
    policies = resources({"t": t}, "AWS::SQS::QueuePolicy").values()
    for queue_id in resources({"t": t}, "AWS::SQS::Queue"):
        denies = [st for p in policies if {"Ref": queue_id} in p["Properties"]["Queues"]
                  for st in p["Properties"]["PolicyDocument"]["Statement"]
                  if st["Effect"] == "Deny" and st.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
        assert denies, f"{queue_id} has no TLS-only policy"


# --------------------------------------------------------------------------- IAM


@pytest.mark.parametrize("env", ENVS)
def test_no_wildcard_actions_anywhere(env):
    for name, t in synth_templates(env).items():
        docs = [p["Properties"]["PolicyDocument"] for p in resources({"t": t}, "AWS::IAM::Policy").values()]
        docs += [p["PolicyDocument"] for r in resources({"t": t}, "AWS::IAM::Role").values()
                 for p in r["Properties"].get("Policies", [])]
        for doc in docs:
            for st in doc["Statement"]:
                if st["Effect"] == "Allow":
                    for action in as_list(st["Action"]):
                        assert "*" not in action, f"{name}: wildcard action {action}"


@pytest.mark.parametrize("env", ENVS)
def test_worker_role_consumes_its_own_queue_publishes_work_and_only_sends_to_its_own_dlq(env):
    """A worker giving up on a task sends a copy to its queue's DLQ itself (pcelery.worker
    PersistentTask._send_to_dlq: GetQueueUrl, then SendMessage), then acks the original. It may
    not read, delete from or move any DLQ, nor send to another queue's."""
    t, producer = stateless(env), stateful(env)
    work_names = {sqs_queue_name(env, q.name) for q in CONFIGS[env].catalog}
    for q in CONFIGS[env].catalog:
        task = task_definition(t, f"pcelery-{env}-worker-{q.name}")
        grants: dict[str, set[str]] = {}
        for st in statements_of_role(t, task["TaskRoleArn"]):
            assert st["Effect"] == "Allow" and "Condition" not in st
            for resource in as_list(st["Resource"]):
                grants.setdefault(queue_name_of(resource, producer), set()).update(as_list(st["Action"]))
        own, own_dlq = sqs_queue_name(env, q.name), sqs_queue_name(env, q.name, dlq=True)
        assert grants[own] == set(CONSUME_ACTIONS) | set(PUBLISH_ACTIONS)
        for other in work_names - {own}:
            assert grants[other] == set(PUBLISH_ACTIONS), f"worker {q.name} on {other}: {grants[other]}"
        assert grants[own_dlq] == set(DEAD_LETTER_ACTIONS) == {"sqs:SendMessage", "sqs:GetQueueUrl"}
        assert set(grants) == work_names | {own_dlq}, f"worker {q.name} may touch {set(grants) - work_names}"


@pytest.mark.parametrize("env", ENVS)
def test_relay_and_scheduler_only_publish_and_migration_has_no_sqs_access(env):
    """The relay and the scheduler send to the work queues and look up their URLs (the scheduler
    for every catalog queue at start); nothing on a DLQ, nothing else."""
    t, producer = stateless(env), stateful(env)
    publishers = [f"pcelery-{env}-relay"] + ([f"pcelery-{env}-scheduler"] if scheduled(env) else [])
    for family in publishers:
        statements = statements_of_role(t, task_definition(t, family)["TaskRoleArn"])
        assert all(st["Effect"] == "Allow" and "Condition" not in st for st in statements), family
        assert {a for st in statements for a in as_list(st["Action"])} == set(PUBLISH_ACTIONS), family
        assert {queue_name_of(r, producer) for st in statements for r in as_list(st["Resource"])} == {
            sqs_queue_name(env, q.name) for q in CONFIGS[env].catalog}, family
    migrate = task_definition(t, f"pcelery-{env}-migrate")
    assert statements_of_role(t, migrate["TaskRoleArn"]) == []


# --------------------------------------------------------------------------- containers


def secret_read(value_from, producer: dict) -> str:
    """What an ECS secret's ValueFrom reads, as "<secret name>:<JSON key>" (":" alone: the whole
    value): a literal ARN (the team's secrets, an external database's), or a secret of the stateful
    stack through its output, named by its Name (RDS-attached secrets through their attachment)."""
    key = ""
    if isinstance(value_from, dict) and "Fn::Join" in value_from:
        value_from, suffix = value_from["Fn::Join"][1]
        key = suffix.split(":")[1]
    if isinstance(value_from, str):  # arn:aws:secretsmanager:<region>:<account>:secret:<name>-XXXXXX[:<key>::]
        parts = value_from.split(":")
        return f"{parts[6]}:{parts[7] if len(parts) > 7 else ''}"
    resource = producer["Resources"][resolve(value_from, producer)["Ref"]]
    if resource["Type"] == "AWS::SecretsManager::SecretTargetAttachment":
        resource = producer["Resources"][resource["Properties"]["SecretId"]["Ref"]]
    return f"{resource['Properties']['Name']}:{key}"


def login(secret: str, prefix: str = "DB") -> dict[str, str]:
    return {f"{prefix}_USER": f"{secret}:username", f"{prefix}_PASSWORD": f"{secret}:password"}


# What every container gets: where the database is, the catalog, the team's non-secret settings.
COMMON_ENV = {"PCELERY_ENV", "PCELERY_CATALOG", "AWS_REGION", "DB_HOST", "DB_PORT", "DB_NAME", "DB_SSLROOTCERT",
              "DJANGO_SETTINGS_MODULE"}


def role_of(name: str) -> str:
    """worker, relay, scheduler, migrate or ops, from "<family>/<container>" (the init containers
    migrate)."""
    family, container = name.split("/")
    return "migrate" if container == "migrate" else family.rsplit("-", 1)[1] if "-worker-" not in family else "worker"


def expected_secrets(env: str, role: str, *, master: str | None = None, cache: bool | None = None) -> dict[str, str]:
    """{variable: "<secret name>:<key>"} of a container: exactly what its process reads. `master`:
    the secret the migrations connect with (the RDS master's, or an external database's)."""
    cfg = CONFIGS[env]
    cache = bool(cfg.cache) if cache is None else cache
    runtime, ops = f"pcelery-{env}/runtime", f"pcelery-{env}/ops"
    return {
        # The runtime role, the team's secrets (its code runs here), the Redis token.
        "worker": {**login(runtime), "DJANGO_SECRET_KEY": f"shop/{env}/django-AbCdEf:secret_key",
                   **({"REDIS_AUTH_TOKEN": f"pcelery-{env}/redis-auth-token:"} if cache else {})},
        "relay": login(runtime),
        # The runtime role only: it imports the team's task modules but runs none of its code.
        "scheduler": login(runtime),
        "ops": login(ops),
        # The tables' owner, and the two logins the migration creates the roles with.
        "migrate": {**login(master or f"pcelery-{env}/master"), **login(runtime, "PCELERY_RUNTIME_DB"),
                    **login(ops, "PCELERY_OPS_DB")},
    }[role]


def expected_environment(env: str, role: str, *, cache: bool | None = None) -> set[str]:
    cfg = CONFIGS[env]
    cache = bool(cfg.cache) if cache is None else cache
    if role == "scheduler":  # its schedules and the team's tasks (their declared queues); no Redis
        return COMMON_ENV | {"PCELERY_SCHEDULES", "PCELERY_TASK_MODULES", "PCELERY_CELERY_APP"}
    if role == "ops" and scheduled(env):  # `ops schedules` loads the scheduler's schedules
        return COMMON_ENV | {"PCELERY_SCHEDULES"}
    if role != "worker":
        return COMMON_ENV  # no Redis host, no task modules: the relay, migrations and ops use neither
    return COMMON_ENV | {"PCELERY_WORKER_QUEUES", "PCELERY_TASK_MODULES", "PCELERY_CELERY_APP"} | (
        {"REDIS_HOST", "REDIS_PORT"} if cache else set())


@pytest.mark.parametrize("env", ENVS)
def test_each_container_gets_only_the_secrets_and_settings_its_process_uses(env):
    """Workers log in as the runtime role and alone get the team's secrets and Redis; the relay
    logs in as the runtime role, the ops task as the ops role; only migrations (the one-off task
    and the services' init containers) hold the owner's login, and the roles' logins they create
    the roles with. Secrets only ever as ECS secrets."""
    t, producer = stateless(env), stateful(env)
    found = containers(t)
    assert len(found) == container_count(env)
    roles = Counter(role_of(name) for name in found)
    assert roles == {"worker": len(CONFIGS[env].catalog), "relay": 1, "ops": 1, "scheduler": int(scheduled(env)),
                     "migrate": len(CONFIGS[env].catalog) + 2 + scheduled(env)}
    for name, container in found.items():
        role = role_of(name)
        secrets = {s["Name"]: secret_read(s["ValueFrom"], producer) for s in container["Secrets"]}
        assert secrets == expected_secrets(env, role), name
        env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert set(env_vars) == expected_environment(env, role), name
        assert not set(secrets) & set(env_vars), f"{name} has a secret in plain env"
        for var, value in env_vars.items():
            assert not re.search(r"PASSWORD|TOKEN|SECRET|KEY", var), var
            assert "secretsmanager" not in json.dumps(value), f"{name}: {var} resolves a secret"
        assert env_vars["PCELERY_ENV"] == env
        assert env_vars["PCELERY_CATALOG"] == "shop.queues:CATALOG"
        assert env_vars["DJANGO_SETTINGS_MODULE"] == "shopsite.settings"
        if role in ("worker", "scheduler"):
            assert env_vars["PCELERY_TASK_MODULES"] == "shop.tasks"
            assert env_vars["PCELERY_CELERY_APP"] == "shopsite.celery:app"
        if role in ("scheduler", "ops"):
            assert env_vars["PCELERY_SCHEDULES"] == "shop.schedules:SCHEDULES"
        assert container["LogConfiguration"]["LogDriver"] == "awslogs"


@pytest.mark.parametrize("env", ENVS)
def test_each_execution_role_reads_exactly_the_secrets_of_its_containers(env):
    """The read ECS needs to inject a container's secrets is the only one: a relay's execution role
    cannot read the master secret, an ops task's not the runtime role's, and no task role (what
    the application's code runs as) reads any secret."""
    t, producer = stateless(env), stateful(env)
    for task in (r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()):
        wanted = {v.rsplit(":", 1)[0] for c in task["ContainerDefinitions"]
                  for v in (secret_read(s["ValueFrom"], producer) for s in c["Secrets"])}
        read = {secret_read(r, producer).rsplit(":", 1)[0] for r in secret_reads(t, task)}
        assert read == wanted, task["Family"]
        assert not [st for st in statements_of_role(t, task["TaskRoleArn"])
                    if any(a.startswith(("secretsmanager:", "kms:")) for a in as_list(st["Action"]))]
    # The owner's login reaches migrations only.
    master = f"pcelery-{env}/master"
    holders = {name for name, c in containers(t).items()
               if any(secret_read(s["ValueFrom"], producer).startswith(f"{master}:") for s in c["Secrets"])}
    assert holders and all(name.endswith("/migrate") for name in holders), holders


@pytest.mark.parametrize("env", ENVS)
def test_services_migrate_first_with_the_entry_points_of_the_product(env):
    t = stateless(env)
    tasks = [r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()]
    assert len(tasks) == task_count(env)
    for task in tasks:
        family = task["Family"]
        main = [c for c in task["ContainerDefinitions"] if c.get("Essential", True)]
        [container] = main
        if family.endswith("-migrate"):
            assert container["EntryPoint"] == MIGRATE_COMMAND
            continue
        if family.endswith("-ops"):
            continue  # its own test below
        # Services migrate in an init container first: the worker refuses an old schema, and the
        # migration creates the role the main container logs in as.
        [init] = [c for c in task["ContainerDefinitions"] if c.get("Essential") is False]
        assert init["EntryPoint"] == MIGRATE_COMMAND
        assert container["DependsOn"] == [{"ContainerName": init["Name"], "Condition": "SUCCESS"}]
        if family.endswith("-relay"):
            assert container["EntryPoint"] == RELAY_COMMAND
        elif family.endswith("-scheduler"):
            assert container["EntryPoint"] == SCHEDULER_ENTRY_POINT
        else:
            queue = family.rsplit("-worker-", 1)[1]
            env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
            assert env_vars["PCELERY_WORKER_QUEUES"] == queue
            assert container["EntryPoint"] == WORKER_ENTRY_POINT  # whatever the team's image's ENTRYPOINT is
            assert container["StopTimeout"] == stop_timeout(CONFIGS[env].catalog.get(queue)) <= ECS_MAX_STOP_TIMEOUT


@pytest.mark.parametrize("env", ENVS)
def test_every_container_runs_on_a_read_only_root_and_only_workers_get_a_writable_tmp(env):
    """Celery's prefork pool needs a temporary directory (tests/integration/test_least_privilege.py
    shows a worker dies at start without one): the worker containers mount the task's `tmp`
    volume on /tmp; nothing else is writable anywhere."""
    for task in (r["Properties"] for r in resources({"t": stateless(env)}, "AWS::ECS::TaskDefinition").values()):
        worker_task = "-worker-" in task["Family"]
        assert task.get("Volumes", []) == ([{"Name": TMP_VOLUME}] if worker_task else []), task["Family"]
        for container in task["ContainerDefinitions"]:
            name = f"{task['Family']}/{container['Name']}"
            assert container["ReadonlyRootFilesystem"] is True, name
            mounts = container.get("MountPoints", [])
            if worker_task and container["Name"] == "worker":
                assert mounts == [{"ContainerPath": "/tmp", "ReadOnly": False, "SourceVolume": TMP_VOLUME}], name
            else:
                assert mounts == [], name
            assert "VolumesFrom" not in container or container["VolumesFrom"] == [], name


def test_the_images_let_their_non_root_user_write_the_tmp_volume():
    """Fargate makes a bind-mount volume root-owned 0755 unless the image declares the path a
    VOLUME, which seeds it with the image's /tmp (mode 1777): the shop's image and the product's
    run as a non-root USER, so both must declare it (infra/README.md, what the image must contain)."""
    for dockerfile in (REPO_ROOT / "Dockerfile", REPO_ROOT / "examples" / "django_shop" / "Dockerfile"):
        text = dockerfile.read_text()
        assert re.search(r'^VOLUME \["/tmp"\]$', text, re.MULTILINE), dockerfile
        assert re.search(r"^USER \w+$", text, re.MULTILINE), dockerfile


@pytest.mark.parametrize("env", ENVS)
def test_every_container_that_reaches_the_database_verifies_its_certificate(env):
    """DB_SSLROOTCERT makes app/settings.py use sslmode=verify-full against the image's RDS CA
    bundle; a container with DB_HOST but without it would fall back to unverified TLS."""
    checked = []
    for task in (r["Properties"] for r in resources({"t": stateless(env)}, "AWS::ECS::TaskDefinition").values()):
        for container in task["ContainerDefinitions"]:
            env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
            if "DB_HOST" in env_vars:
                assert env_vars.get("DB_SSLROOTCERT") == "/etc/ssl/certs/rds-global-bundle.pem", (
                    f"{task['Family']}/{container['Name']}")
                checked.append(f"{task['Family']}/{container['Name']}")
    # Workers, relay and scheduler with their migrate init containers, the migrate and ops tasks.
    assert len(checked) == container_count(env), checked
    # The image really puts the CA bundle where the containers look for it: the team's image must
    # (infra/README.md), as the example shop's and the product's own base image do.
    image = CONFIGS[env].application.image
    dockerfiles = [REPO_ROOT / "Dockerfile"]
    if image.directory:
        dockerfiles.append(image.directory / (image.file or "Dockerfile"))
    for dockerfile in dockerfiles:
        assert " /etc/ssl/certs/rds-global-bundle.pem" in dockerfile.read_text(), dockerfile


# --------------------------------------------------------------------------- the application image


def containers(template: dict) -> dict[str, dict]:
    """{family/container: container definition} of every task definition of a template."""
    return {f"{t['Properties']['Family']}/{c['Name']}": c
            for t in resources({"t": template}, "AWS::ECS::TaskDefinition").values()
            for c in t["Properties"]["ContainerDefinitions"]}


def pull_grants(template: dict) -> dict[str, list[str]]:
    """{task family: the ECR repositories (resources as JSON) its execution role may pull from}."""
    grants = {}
    for task in resources({"t": template}, "AWS::ECS::TaskDefinition").values():
        props = task["Properties"]
        grants[props["Family"]] = [
            json.dumps(r, sort_keys=True)
            for st in statements_of_role(template, props["ExecutionRoleArn"])
            if "ecr:BatchGetImage" in as_list(st["Action"]) for r in as_list(st["Resource"])]
    return grants


def join(value) -> str:
    """A Fn::Join of strings and AWS::URLSuffix, as the image URI the task pulls."""
    return "".join("amazonaws.com" if part == {"Ref": "AWS::URLSuffix"} else part for part in value["Fn::Join"][1])


@pytest.mark.parametrize("env", ENVS)
def test_one_application_image_runs_every_container_of_the_environment(env):
    """Workers, relay, the migrate init containers, the migrate and ops tasks: the team's image,
    with the product's console scripts as entry points."""
    found = containers(stateless(env))
    assert len(found) == container_count(env)
    assert len({json.dumps(c["Image"], sort_keys=True) for c in found.values()}) == 1, found.keys()


@pytest.mark.parametrize("env", ["dev", "staging"])
def test_a_directory_image_is_an_asset_of_the_teams_build_context(env):
    """dev and staging build examples/django_shop at deploy: one linux/amd64 asset, pushed to the
    CDK asset repository, which every execution role may pull from."""
    s, name = synth_all(), f"pcelery-{env}-stateless"
    images = json.loads((s.outdir / f"{name}.assets.json").read_text())["dockerImages"]
    [(asset_hash, asset)] = images.items()
    assert asset["source"]["platform"] == "linux/amd64"
    assert "dockerFile" not in asset["source"] and "dockerBuildArgs" not in asset["source"]
    [destination] = asset["destinations"].values()
    repository = destination["repositoryName"]
    assert repository == f"cdk-hnb659fds-container-assets-{CONFIGS[env].account}-{CONFIGS[env].region}"
    # The staged build context is the shop's, and nothing of the dev harness.
    context = s.outdir / asset["source"]["directory"]
    shop = REPO_ROOT / "examples" / "django_shop"
    assert (context / "Dockerfile").read_text() == (shop / "Dockerfile").read_text()
    assert (context / "shop" / "queues.py").is_file()
    assert not any("devstack" in p.parts for p in context.rglob("*"))
    t = stateless(env)
    for container in containers(t).values():
        assert container["Image"]["Fn::Sub"].endswith(f"/{repository}:{asset_hash}")
    for family, repos in pull_grants(t).items():
        assert len(repos) == 1 and repository in repos[0], (family, repos)


def test_a_pinned_uri_image_is_pulled_from_its_ecr_repository_with_the_pull_granted():
    t = stateless("prod")
    for name, container in containers(t).items():
        assert join(container["Image"]) == "333333333333.dkr.ecr.eu-west-1.amazonaws.com/shop:1.0.0", name
    grants = pull_grants(t)
    assert len(grants) == task_count("prod")
    for family, repos in grants.items():
        assert repos == [json.dumps("arn:aws:ecr:eu-west-1:333333333333:repository/shop")], (family, repos)
    # Nothing to build: prod deploys no image asset.
    assets = json.loads((synth_all().outdir / "pcelery-prod-stateless.assets.json").read_text())
    assert not assets.get("dockerImages")


def test_a_directory_image_honours_file_and_build_args():
    ctx = context_with("dev", "application.image", {
        "directory": "examples/django_shop", "file": "Dockerfile", "build_args": {"PCELERY_TEST_ARG": "on"}})
    s = synth(("dev",), context=ctx, nag=False)
    images = json.loads((s.outdir / "pcelery-dev-stateless.assets.json").read_text())["dockerImages"]
    [asset] = images.values()
    assert asset["source"]["dockerFile"] == "Dockerfile"
    assert asset["source"]["dockerBuildArgs"] == {"PCELERY_TEST_ARG": "on"}
    assert asset["source"]["platform"] == "linux/amd64"


@pytest.mark.parametrize("env", ENVS)
def test_no_container_anywhere_runs_the_demo_tasks(env):
    """A deployed environment runs the team's task modules; nothing of the dev harness (devstack/)
    is named in either stack, and every worker names its task modules."""
    for name, template in synth_templates(env).items():
        assert "devstack" not in json.dumps(template), name
    for name, container in containers(stateless(env)).items():
        env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
        if role_of(name) in ("worker", "scheduler"):
            modules = env_vars["PCELERY_TASK_MODULES"].split(",")
            assert modules == list(CONFIGS[env].application.task_modules) == ["shop.tasks"], name
        else:
            assert "PCELERY_TASK_MODULES" not in env_vars, name


# --------------------------------------------------------------------------- secrets the stack does not own


def secret_reads(template: dict, task: dict) -> list:
    """What the execution role of `task` may read from Secrets Manager (resources as written)."""
    reads = []
    for st in statements_of_role(template, task["ExecutionRoleArn"]):
        actions = set(as_list(st["Action"]))
        if any(a.startswith("secretsmanager:") for a in actions):
            assert actions == {"secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"}, actions
            assert st["Effect"] == "Allow" and "Condition" not in st
            reads += as_list(st["Resource"])
    return reads


def key_decrypts(template: dict, task: dict) -> list[dict]:
    """The KMS statements of the execution role of `task`."""
    return [st for st in statements_of_role(template, task["ExecutionRoleArn"])
            if any(a.startswith("kms:") for a in as_list(st["Action"]))]


@pytest.mark.parametrize("env", ENVS)
def test_the_teams_secrets_reach_the_workers_only_and_only_their_arn_is_read(env):
    """application.secrets (the shop's DJANGO_SECRET_KEY, one placeholder secret per environment)
    is an ECS secret of the worker containers, where the team's code runs; the relay, migrations
    and ops run only the product's code and do not get it. Each worker's execution role reads
    exactly its ARN."""
    cfg, t = CONFIGS[env], stateless(env)
    ref = cfg.application.secrets["DJANGO_SECRET_KEY"]
    assert ref.arn == f"arn:aws:secretsmanager:{cfg.region}:{cfg.account}:secret:shop/{env}/django-AbCdEf"
    for name, container in containers(t).items():
        secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
        if role_of(name) == "worker":
            assert secrets["DJANGO_SECRET_KEY"] == f"{ref.arn}:secret_key::", name
        else:
            assert "DJANGO_SECRET_KEY" not in secrets, name
    for task in (r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()):
        reads = secret_reads(t, task)
        # Exactly the ARN from cdk.json, never a wildcard; beside it only the stack's own secrets, by reference.
        literal = [r for r in reads if isinstance(r, str)]
        assert literal == ([ref.arn] if "-worker-" in task["Family"] else []), task["Family"]
        assert all("Fn::GetStackOutput" in json.dumps(r) for r in reads if not isinstance(r, str))
        assert key_decrypts(t, task) == []  # no customer key named: the AWS-managed key needs no grant


# --------------------------------------------------------------------------- the ops one-off task


def _ops_sources() -> list[Path]:
    """Where the ops task's AWS calls live: every module of the ops package, however it is split,
    and the outbox publisher `ops replay` goes through."""
    return [*sorted((REPO_ROOT / "ops").rglob("*.py")), REPO_ROOT / "app" / "outbox.py"]


# A call on (or a reference to the method of) a client whose name says which service it is:
# `sqs.purge_queue(`, `self.sqs.send_message(`, `_call(..., sqs.get_queue_url, ...)`,
# `aws.cloudwatch().get_metric_statistics(`, `cw.get_metric_statistics(`. Only names of the
# service's API count, so `pcelery.sqs.make_client` is not mistaken for one.
_CLIENT_CALL = {
    "sqs": re.compile(r"\b\w*sqs\w*(?:\(\))?\.([a-z_]+)\b"),
    "cloudwatch": re.compile(r"\b\w*(?:cloudwatch|cw)\w*(?:\(\))?\.([a-z_]+)\b"),
}


def _aws_calls_of_the_ops_cli() -> dict[str, set[str]]:
    """{IAM action: files calling it} for every SQS and CloudWatch call in the ops sources, read
    from the source: a new call without a grant fails here, not in prod at 3 a.m."""
    import boto3

    apis = {service: boto3.client(service, region_name="eu-west-1").meta.method_to_api_mapping
            for service in _CLIENT_CALL}
    found: dict[str, set[str]] = {}
    for path in _ops_sources():
        text = path.read_text()  # a source that moved away fails here rather than dropping out
        for service, pattern in _CLIENT_CALL.items():
            for method in pattern.findall(text):
                if method in apis[service]:
                    # A batch call is authorized as its single-message action.
                    action = f"{service}:" + apis[service][method].removesuffix("Batch")
                    found.setdefault(action, set()).add(path.relative_to(REPO_ROOT).as_posix())
    return found


def _sqs_and_metric_calls_of_the_ops_cli() -> set[str]:
    return set(_aws_calls_of_the_ops_cli())


def test_the_ops_cli_source_calls_what_the_reader_expects():
    # Guards the guard: if the regexes stopped matching, or the sources moved, the grant test
    # below would pass on nothing.
    sources = {p.relative_to(REPO_ROOT).as_posix() for p in _ops_sources()}
    assert "app/outbox.py" in sources and any(s.startswith("ops/") for s in sources), sources
    calls = _aws_calls_of_the_ops_cli()
    assert {"sqs:StartMessageMoveTask", "sqs:ListDeadLetterSourceQueues", "sqs:PurgeQueue", "sqs:SendMessage",
            "sqs:ChangeMessageVisibility", "cloudwatch:GetMetricStatistics"} <= set(calls)
    # Both halves are read: the ops package (redrive, purge, depth) and the outbox (replay publishes).
    assert all(f.startswith("ops/") for a in ("sqs:StartMessageMoveTask", "sqs:PurgeQueue",
                                              "cloudwatch:GetMetricStatistics") for f in calls[a]), calls
    assert "app/outbox.py" in calls["sqs:SendMessage"], calls["sqs:SendMessage"]


@pytest.mark.parametrize("env", ENVS)
def test_ops_task_runs_the_cli_in_the_vpc_with_the_relays_database_settings_as_the_ops_role(env):
    t, producer = stateless(env), stateful(env)
    task = task_definition(t, f"pcelery-{env}-ops")
    [container] = task["ContainerDefinitions"]
    # run-task --overrides '{"containerOverrides":[{"name":"ops","command":[...]}]}' (RUNBOOK.md)
    assert container["Name"] == OPS_CONTAINER
    assert container["EntryPoint"] == OPS_ENTRY_POINT and "Command" not in container
    assert task["RequiresCompatibilities"] == ["FARGATE"] and task["NetworkMode"] == "awsvpc"
    relay_task = task_definition(t, f"pcelery-{env}-relay")
    [relay] = [c for c in relay_task["ContainerDefinitions"] if c["Name"] == "relay"]
    assert container["Image"] == relay["Image"]
    env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
    relay_env = {e["Name"]: e["Value"] for e in relay["Environment"]}
    for name in ("PCELERY_ENV", "AWS_REGION", "DB_HOST", "DB_PORT", "DB_NAME", "DB_SSLROOTCERT"):
        assert env_vars[name] == relay_env[name], name
    # `ops schedules` loads the schedules the scheduler runs (none where no scheduler runs).
    schedulers = [c for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()
                  for c in r["Properties"]["ContainerDefinitions"] if c["Name"] == "scheduler"]
    scheduled = {e["Name"]: e["Value"] for c in schedulers for e in c["Environment"]}.get("PCELERY_SCHEDULES")
    assert env_vars.get("PCELERY_SCHEDULES") == scheduled
    # The same database, as the ops role (what `tasks`, `replay` and `redrive` do on its rows).
    assert {s["Name"]: secret_read(s["ValueFrom"], producer) for s in container["Secrets"]} == login(
        f"pcelery-{env}/ops")
    assert "password" not in json.dumps(container["Environment"]).lower()

    # Its own log group: an operator's output is not buried in a service's logs.
    group = container["LogConfiguration"]["Options"]["awslogs-group"]
    other_groups = [c["LogConfiguration"]["Options"]["awslogs-group"]
                    for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()
                    if r["Properties"]["Family"] != f"pcelery-{env}-ops"
                    for c in r["Properties"]["ContainerDefinitions"]]
    assert group not in other_groups
    assert t["Outputs"]["OpsLogGroup"]["Value"] == group

    # Its own security group, allowed into the database on 5432 like the services' group.
    ops_group = t["Outputs"]["OpsSecurityGroup"]["Value"]
    assert ops_group != t["Outputs"]["TaskSecurityGroup"]["Value"]
    [db] = resources({"t": producer}, "AWS::RDS::DBInstance").values()
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()
               if r["Properties"]["SourceSecurityGroupId"] == ops_group]
    assert [(i["FromPort"], i["ToPort"], i["IpProtocol"]) for i in ingress] == [(5432, 5432, "tcp")]
    db_group = resolve(ingress[0]["GroupId"], producer)
    assert db_group["Fn::GetAtt"][0] in json.dumps(db["Properties"]["VPCSecurityGroups"])
    assert t["Outputs"]["OpsTaskDefinition"]["Value"] == f"pcelery-{env}-ops"
    assert {"ClusterName", "TaskSubnets"} <= set(t["Outputs"])


@pytest.mark.parametrize("env", ENVS)
def test_ops_role_has_exactly_what_the_cli_needs_on_this_environments_queues(env):
    t, producer = stateless(env), stateful(env)
    task = task_definition(t, f"pcelery-{env}-ops")
    grants: dict[str, set[str]] = {}
    for st in statements_of_role(t, task["TaskRoleArn"]):
        assert st["Effect"] == "Allow" and "Condition" not in st
        for resource in as_list(st["Resource"]):
            name = "*" if resource == "*" else queue_name_of(resource, producer)
            grants.setdefault(name, set()).update(as_list(st["Action"]))
    work = {sqs_queue_name(env, q.name) for q in CONFIGS[env].catalog}
    dead = {sqs_queue_name(env, q.name, dlq=True) for q in CONFIGS[env].catalog}
    # Every queue and DLQ of this environment, nothing else; "*" only for reading metrics.
    assert set(grants) == work | dead | {"*"}
    assert grants.pop("*") == set(OPS_METRIC_ACTIONS) == {"cloudwatch:GetMetricStatistics"}
    for name, actions in grants.items():
        assert actions == set(OPS_QUEUE_ACTIONS), name
        assert not any("*" in a for a in actions)
    # A native redrive is authorized on the DLQ (move task, receive, delete, attributes) and on
    # the destination (send); a client redrive is the same set by hand. Spelled out, not
    # derived from OPS_QUEUE_ACTIONS, so shrinking that list cannot silently break a redrive.
    for q in CONFIGS[env].catalog:
        assert {"sqs:StartMessageMoveTask", "sqs:ListMessageMoveTasks", "sqs:CancelMessageMoveTask",
                "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                "sqs:ListDeadLetterSourceQueues", "sqs:ChangeMessageVisibility",
                } <= grants[sqs_queue_name(env, q.name, dlq=True)]
        assert "sqs:SendMessage" in grants[sqs_queue_name(env, q.name)]
    granted = set(OPS_QUEUE_ACTIONS) | set(OPS_METRIC_ACTIONS)
    assert _sqs_and_metric_calls_of_the_ops_cli() <= granted
    # And nothing granted that the CLI never calls (GetQueueUrl via resolve(), ListMessageMoveTasks
    # via _native_status are in the source too).
    assert granted == _sqs_and_metric_calls_of_the_ops_cli()


def test_stop_timeout_covers_a_warm_shutdown_where_ecs_allows():
    assert stop_timeout(CATALOG.get("default")) == CATALOG.get("default").hard_time_limit + 15
    assert stop_timeout(CATALOG.get("long")) == ECS_MAX_STOP_TIMEOUT


def test_only_tasks_a_warm_shutdown_cannot_wait_for_are_protected_from_scale_in():
    assert not outlasts_stop_timeout(CATALOG.get("default"))
    assert outlasts_stop_timeout(CATALOG.get("long"))
    assert not outlasts_stop_timeout(EXTRA)  # hard limit 90 s: ECS waits 105 s
    # Below the 120 s ECS allows, but with no room left for the ack and the exit.
    assert outlasts_stop_timeout(replace(EXTRA, hard_time_limit=110))


# --------------------------------------------------------------------------- services and scaling


def idle_scale_in(step_policies: dict[str, dict], alarms_) -> dict[str, tuple[dict, dict]]:
    """{policy id: (step configuration, alarm)} of the scale-in-when-idle policies among
    `step_policies`, found by the alarm that drives them (the one below a threshold)."""
    found = {}
    for lid, policy in step_policies.items():
        for alarm in alarms_:
            props = alarm["Properties"]
            if props.get("AlarmActions") == [{"Ref": lid}] and props["ComparisonOperator"] == "LessThanThreshold":
                found[lid] = (policy["StepScalingPolicyConfiguration"], props)
    return found


@pytest.mark.parametrize("env", ENVS)
def test_worker_services_roll_back_and_scale_on_backlog_per_task(env):
    t = stateless(env)
    cfg = CONFIGS[env]
    [cluster] = resources({"t": t}, "AWS::ECS::Cluster").values()
    assert {"Name": "containerInsights", "Value": "enabled"} in cluster["Properties"]["ClusterSettings"]
    service_ids = {r["Properties"]["ServiceName"]: lid for lid, r in resources({"t": t}, "AWS::ECS::Service").items()}
    services = {name: t["Resources"][lid]["Properties"] for name, lid in service_ids.items()}
    targets = list(resources({"t": t}, "AWS::ApplicationAutoScaling::ScalableTarget").items())
    policies = resources({"t": t}, "AWS::ApplicationAutoScaling::ScalingPolicy")
    alarms_ = resources({"t": t}, "AWS::CloudWatch::Alarm").values()
    for q in CONFIGS[env].catalog:
        name = f"pcelery-{env}-worker-{q.name}"
        service = services[name]
        assert service["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
        assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
        low, high = cfg.worker_bounds(q)
        # Auto scaling owns the count; a deploy must not reset it.
        assert "DesiredCount" not in service
        [(target_id, target)] = [(i, r) for i, r in targets
                                 if json.dumps({"Fn::GetAtt": [service_ids[name], "Name"]})
                                 in json.dumps(r["Properties"]["ResourceId"])]
        assert (target["Properties"]["MinCapacity"], target["Properties"]["MaxCapacity"]) == (low, high)
        mine = {lid: p["Properties"] for lid, p in policies.items()
                if p["Properties"]["ScalingTargetId"] == {"Ref": target_id}}
        [tracking] = [p for p in mine.values() if p["PolicyType"] == "TargetTrackingScaling"]
        conf = tracking["TargetTrackingScalingPolicyConfiguration"]
        assert conf["TargetValue"] == q.backlog_per_worker
        metrics = {m["Id"]: m for m in conf["CustomizedMetricSpecification"]["Metrics"]}
        assert metrics["backlog"]["Expression"] == "(visible + inflight) / running"
        assert metrics["visible"]["MetricStat"]["Metric"]["MetricName"] == "ApproximateNumberOfMessagesVisible"
        assert metrics["running"]["MetricStat"]["Metric"]["MetricName"] == "RunningTaskCount"
        steps = {lid: p for lid, p in mine.items() if p["PolicyType"] == "StepScaling"}
        # A task that outlasts the stop timeout must never be picked by scale-in: tracking only
        # scales out, and the service goes back to its lower bound only when the queue is idle.
        protected = q.name == "long"
        assert outlasts_stop_timeout(q) is protected
        assert conf.get("DisableScaleIn", False) is protected
        idle = idle_scale_in(steps, alarms_)
        if protected:
            [(idle_policy, idle_alarm)] = idle.values()
            assert idle_policy["StepAdjustments"] == [{"MetricIntervalUpperBound": 0, "ScalingAdjustment": low}]
            assert idle_policy["AdjustmentType"] == "ExactCapacity"
            assert "AlarmName" not in idle_alarm  # not a page, no RUNBOOK anchor
            assert idle_alarm["AlarmDescription"].endswith("(not a page).")
            assert (idle_alarm["Threshold"], idle_alarm["ComparisonOperator"]) == (1, "LessThanThreshold")
            assert idle_alarm["EvaluationPeriods"] == idle_alarm["DatapointsToAlarm"] == IDLE_SCALE_IN_MINUTES == 15
            assert idle_alarm["TreatMissingData"] == "breaching"  # SQS goes silent on a long-idle queue
            [expr] = [m for m in idle_alarm["Metrics"] if "Expression" in m]
            assert expr["Expression"] == "FILL(visible, 0) + FILL(inflight, 0)"
            inputs = {m["Id"]: m["MetricStat"] for m in idle_alarm["Metrics"] if "MetricStat" in m}
            assert {i: s["Metric"]["MetricName"] for i, s in inputs.items()} == {
                "visible": "ApproximateNumberOfMessagesVisible", "inflight": "ApproximateNumberOfMessagesNotVisible"}
            assert all(s["Period"] == 60 and s["Stat"] == "Maximum" for s in inputs.values())
            assert {queue_name_of(s["Metric"]["Dimensions"][0]["Value"], stateful(env)) for s in inputs.values()} == {
                sqs_queue_name(env, q.name)}
        else:
            assert idle == {}
        wake = {lid: p for lid, p in steps.items() if lid not in idle}
        if low == 0:
            # Scale-to-zero must wake up: a step policy sets one task when messages wait and none runs.
            [(wake_id, wake)] = wake.items()
            conf = wake["StepScalingPolicyConfiguration"]
            assert conf["AdjustmentType"] == "ExactCapacity"
            assert conf["StepAdjustments"] == [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]
            [wake_alarm] = [a["Properties"] for a in alarms_
                            if a["Properties"].get("AlarmActions") == [{"Ref": wake_id}]]
            assert wake_alarm["Threshold"] == 1
            assert "IF(FILL(running, 0) < 1" in json.dumps(wake_alarm["Metrics"])
        else:
            assert wake == {}
    relay = services[f"pcelery-{env}-relay"]
    assert relay["DesiredCount"] == 1
    assert relay["DeploymentConfiguration"]["DeploymentCircuitBreaker"]["Rollback"] is True


# --------------------------------------------------------------------------- the scheduler


@pytest.mark.parametrize("env", ENVS)
def test_scheduler_service_runs_pcelery_scheduler_on_the_teams_schedules(env):
    """`pcelery-<env>-scheduler`: the application image with entry point pcelery-scheduler,
    PCELERY_SCHEDULES and the team's task modules and Celery app, the relay's database settings and
    login and nothing more, a migrate init container first, a read-only root, its own log group,
    and a fixed count per environment (cdk.json scheduler.tasks: 1 in dev and staging, 2 in prod)."""
    t, producer = stateless(env), stateful(env)
    services = {r["Properties"]["ServiceName"]: r["Properties"]
                for r in resources({"t": t}, "AWS::ECS::Service").values()}
    service = services[f"pcelery-{env}-scheduler"]
    assert service["DesiredCount"] == CONFIGS[env].scheduler.tasks == {"dev": 1, "staging": 1, "prod": 2}[env]
    assert service["LaunchType"] == "FARGATE"
    assert service["DeploymentConfiguration"] == {
        "DeploymentCircuitBreaker": {"Enable": True, "Rollback": True}, "MaximumPercent": 200,
        "MinimumHealthyPercent": 100}
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["AssignPublicIp"] == "DISABLED"
    assert service["Cluster"] == services[f"pcelery-{env}-relay"]["Cluster"]
    assert network["Subnets"] == services[f"pcelery-{env}-relay"]["NetworkConfiguration"]["AwsvpcConfiguration"][
        "Subnets"]
    [family] = [t["Resources"][service["TaskDefinition"]["Ref"]]["Properties"]["Family"]]
    assert family == f"pcelery-{env}-scheduler"

    task = task_definition(t, family)
    assert task["RequiresCompatibilities"] == ["FARGATE"] and (task["Cpu"], task["Memory"]) == ("256", "512")
    by_name = {c["Name"]: c for c in task["ContainerDefinitions"]}
    assert set(by_name) == {SCHEDULER_CONTAINER, "migrate"}
    scheduler, init = by_name[SCHEDULER_CONTAINER], by_name["migrate"]
    assert scheduler["EntryPoint"] == SCHEDULER_ENTRY_POINT == ["pcelery-scheduler"] and "Command" not in scheduler
    assert scheduler.get("Essential", True) is True and init["Essential"] is False
    assert scheduler["DependsOn"] == [{"ContainerName": "migrate", "Condition": "SUCCESS"}]
    assert init["EntryPoint"] == MIGRATE_COMMAND
    assert scheduler["ReadonlyRootFilesystem"] is True and init["ReadonlyRootFilesystem"] is True
    assert "MountPoints" not in scheduler or scheduler["MountPoints"] == []
    assert task.get("Volumes", []) == []

    env_vars = {e["Name"]: e["Value"] for e in scheduler["Environment"]}
    assert env_vars["PCELERY_SCHEDULES"] == CONFIGS[env].application.schedules_spec == "shop.schedules:SCHEDULES"
    assert env_vars["PCELERY_TASK_MODULES"] == "shop.tasks"
    assert env_vars["PCELERY_CELERY_APP"] == "shopsite.celery:app"
    # The relay's environment, as it gets it (database, catalog, the team's DJANGO_SETTINGS_MODULE);
    # no Redis, no queue of its own.
    [relay] = [c for c in task_definition(t, f"pcelery-{env}-relay")["ContainerDefinitions"] if c["Name"] == "relay"]
    relay_env = {e["Name"]: e["Value"] for e in relay["Environment"]}
    assert {k: v for k, v in env_vars.items() if k in relay_env} == relay_env
    assert set(env_vars) - set(relay_env) == {"PCELERY_SCHEDULES", "PCELERY_TASK_MODULES", "PCELERY_CELERY_APP"}
    assert scheduler["Image"] == relay["Image"]
    # Secrets: the runtime role's login, nothing else (not the team's secrets, not the Redis token).
    assert {s["Name"]: secret_read(s["ValueFrom"], producer) for s in scheduler["Secrets"]} == login(
        f"pcelery-{env}/runtime")

    # Its own log group (the scheduler's and its migrations' output), named by an output for RUNBOOK.md.
    groups = {c["Name"]: c["LogConfiguration"]["Options"] for c in task["ContainerDefinitions"]}
    assert groups[SCHEDULER_CONTAINER]["awslogs-stream-prefix"] == SCHEDULER_CONTAINER
    assert groups[SCHEDULER_CONTAINER]["awslogs-group"] == groups["migrate"]["awslogs-group"] == t["Outputs"][
        "SchedulerLogGroup"]["Value"]
    others = [c["LogConfiguration"]["Options"]["awslogs-group"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition")
              .values() if r["Properties"]["Family"] != family for c in r["Properties"]["ContainerDefinitions"]]
    assert groups[SCHEDULER_CONTAINER]["awslogs-group"] not in others


@pytest.mark.parametrize("env", ENVS)
def test_scheduler_stopped_pages_when_no_scheduler_reports_a_pass_for_five_minutes(env):
    t = stateless(env)
    [topic_id] = resources({"t": t}, "AWS::SNS::Topic")
    [alarm] = [r["Properties"] for r in resources({"t": t}, "AWS::CloudWatch::Alarm").values()
               if r["Properties"].get("AlarmName") == f"pcelery-{env}-scheduler-stopped"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("PersistentCelery", "SchedulerPasses")
    assert alarm["Dimensions"] == [{"Name": "Environment", "Value": env}]
    assert (alarm["Statistic"], alarm["Period"]) == ("Sum", 300)
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "LessThanThreshold")
    assert alarm["EvaluationPeriods"] == alarm["DatapointsToAlarm"] == 1
    # No scheduler running writes nothing at all: that must page, not read as "no data".
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["AlarmActions"] == alarm["OKActions"] == [{"Ref": topic_id}]
    assert alarm["AlarmDescription"].startswith(f"No scheduler of pcelery-{env}-scheduler reported a pass")
    assert alarm["AlarmDescription"].endswith(" RUNBOOK.md#alarm-scheduler-stopped")


def test_the_scheduler_alarm_watches_what_the_scheduler_prints():
    """The alarm's namespace, metric and dimension are the EMF line pcelery-scheduler prints every
    pass, and a healthy scheduler passes far more often than once per alarm period."""
    from pcelery.relay import EMF_NAMESPACE
    from pcelery.scheduler import LONGEST_SLEEP, PassResult, emf_line

    line = json.loads(emf_line("prod", PassResult(submitted=2)))
    [directive] = line["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == EMF_NAMESPACE == OUTBOX_NAMESPACE
    assert directive["Dimensions"] == [["Environment"]] and line["Environment"] == "prod"
    assert {m["Name"] for m in directive["Metrics"]} == {SCHEDULER_PASSES_METRIC, SCHEDULER_SUBMITTED_METRIC}
    assert (line[SCHEDULER_PASSES_METRIC], line[SCHEDULER_SUBMITTED_METRIC]) == (1, 2)
    assert LONGEST_SLEEP * 10 <= 300  # dozens of passes per 5-minute period


def test_without_schedules_an_environment_has_no_scheduler_and_nothing_of_it():
    """application.schedules left out (and with it the scheduler block): no service, task
    definition, role, security group, database rule, log group, output, alarm or widget of a
    scheduler; everything else as before, cdk-nag still clean (the synth runs it)."""
    from infra.config import CONTEXT_KEY

    ctx = context_with("dev", "application.schedules", KeyError)
    del ctx[CONTEXT_KEY]["dev"]["scheduler"]
    s = synth(("dev",), context=ctx)
    t, producer = s.templates["dev"]["pcelery-dev-stateless"], s.templates["dev"]["pcelery-dev-stateful"]
    assert "pcelery-scheduler" not in json.dumps(t) and "PCELERY_SCHEDULES" not in json.dumps(t)
    assert not [lid for lid in t["Resources"] if lid.startswith(("Scheduler", "DatabaseFromScheduler"))]
    assert "pcelery-dev-scheduler" not in {r["Properties"]["ServiceName"]
                                           for r in resources({"t": t}, "AWS::ECS::Service").values()}
    assert len(resources({"t": t}, "AWS::ECS::TaskDefinition")) == len(CONFIGS["dev"].catalog) + 3
    assert "SchedulerLogGroup" not in t["Outputs"]
    assert set(service_groups(t)) == {"worker", "relay", "migrate", "ops"}
    found = summary({"t": t})["t"]["alarms"]
    assert set(found) == set(expected_alarms("dev")) - {"pcelery-dev-scheduler-stopped"}
    [board] = resources({"t": t}, "AWS::CloudWatch::Dashboard").values()
    assert "SchedulerPasses" not in json.dumps(board["Properties"]["DashboardBody"])
    # The stateful side does not depend on it at all.
    assert summary({"t": producer}) == summary({"t": stateful("dev")})


# --------------------------------------------------------------------------- data stores and network


@pytest.mark.parametrize("env", ENVS)
def test_database_is_private_encrypted_tls_only_and_protected_per_env(env):
    t = stateful(env)
    cfg = CONFIGS[env]
    [db] = [r for r in resources({"t": t}, "AWS::RDS::DBInstance").values()]
    p = db["Properties"]
    assert p["PubliclyAccessible"] is False and p["StorageEncrypted"] is True
    assert re.fullmatch(r"17\.\d+", p["EngineVersion"]), p["EngineVersion"]
    assert p["BackupRetentionPeriod"] == cfg.database.backup_retention_days >= 1
    assert p["MultiAZ"] is cfg.database.multi_az
    assert p["DeletionProtection"] is cfg.protection.deletion_protection
    assert "MasterUserPassword" in p and "resolve:secretsmanager" in json.dumps(p["MasterUserPassword"])
    params = t["Resources"][p["DBParameterGroupName"]["Ref"]]["Properties"]["Parameters"]
    assert params["rds.force_ssl"] == "1"
    subnet_ids = t["Resources"][p["DBSubnetGroupName"]["Ref"]]["Properties"]["SubnetIds"]
    assert subnet_ids and all("isolated" in s["Ref"] for s in subnet_ids)
    rotations = resources({"t": t}, "AWS::SecretsManager::RotationSchedule")
    assert bool(rotations) is (cfg.database.rotation_days > 0)
    assert db["DeletionPolicy"] == {"destroy": "Delete", "snapshot": "Snapshot", "retain": "Retain"}[
        cfg.protection.removal_policy]
    # The master secret lives as long as the data it opens.
    secret_id = p["MasterUserPassword"]["Fn::Join"][1][1]["Ref"]  # {{resolve:secretsmanager:<Ref>...}}
    assert t["Resources"][secret_id]["DeletionPolicy"] == ("Delete" if cfg.protection.removal_policy == "destroy"
                                                          else "Retain")
    if env == "prod":
        assert p["MultiAZ"] and p["DeletionProtection"] and rotations


@pytest.mark.parametrize("env", ENVS)
def test_redis_only_where_enabled_and_always_encrypted_with_auth(env):
    t = stateful(env)
    groups = list(resources({"t": t}, "AWS::ElastiCache::ReplicationGroup").values())
    if CONFIGS[env].cache is None:
        assert groups == []
        return
    [g] = groups
    p = g["Properties"]
    assert p["TransitEncryptionEnabled"] is True and p["AtRestEncryptionEnabled"] is True
    assert "{{resolve:secretsmanager:" in json.dumps(p["AuthToken"])
    subnet_group = t["Resources"][p["CacheSubnetGroupName"]["Ref"]]["Properties"]
    assert all("isolated" in s["Ref"] for s in subnet_group["SubnetIds"])


@pytest.mark.parametrize("env", ENVS)
def test_network_matches_the_env(env):
    t = stateful(env)
    net = CONFIGS[env].network
    assert len(resources({"t": t}, "AWS::EC2::NatGateway")) == net.nat_gateways
    assert len(resources({"t": t}, "AWS::EC2::FlowLog")) == (1 if net.flow_logs else 0)
    endpoints = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::VPCEndpoint").values()]
    kinds = Counter(e.get("VpcEndpointType", "Gateway") for e in endpoints)
    assert kinds["Gateway"] == 1  # S3, free
    # SQS, Secrets Manager, ECR api and dkr, Logs and CloudWatch (the ops task's `depth`).
    assert kinds["Interface"] == (6 if net.interface_endpoints else 0)
    subnets = resources({"t": t}, "AWS::EC2::Subnet")
    for kind in ("public", "private", "isolated"):
        assert sum(kind in lid for lid in subnets) == len(CONFIGS[env].availability_zones)


def group_rules(template: dict, group_ref: dict, kind: str) -> list[dict]:
    """The ingress or egress rules ("Ingress" / "Egress") of a security group of `template`: its
    inline ones and the separate AWS::EC2::SecurityGroup<kind> resources on it, CDK's dummy
    "disallow all" egress left out."""
    group_id = group_ref["Fn::GetAtt"][0]
    inline = [dict(r) for r in template["Resources"][group_id]["Properties"].get(f"SecurityGroup{kind}", [])
              if r.get("Description") != "Disallow all traffic"]
    separate = [r["Properties"] for r in resources({"t": template}, f"AWS::EC2::SecurityGroup{kind}").values()
                if r["Properties"]["GroupId"] == group_ref]
    return inline + separate


def peer(rule: dict, producer: dict) -> str:
    """Where an egress rule goes: "anywhere", "prefix-list" or the producer's logical id of a group."""
    if rule.get("CidrIp") == "0.0.0.0/0":
        return "anywhere"
    if "DestinationPrefixListId" in rule:
        return "prefix-list"
    target = resolve(rule["DestinationSecurityGroupId"], producer)
    return target["Fn::GetAtt"][0] if isinstance(target, dict) else target


def service_groups(t: dict) -> dict[str, dict]:
    """{worker|relay|migrate|ops|scheduler: the security group reference its tasks run in} (the
    scheduler's only where the environment has one)."""
    services = {r["Properties"]["ServiceName"]: r["Properties"]
                for r in resources({"t": t}, "AWS::ECS::Service").values()}
    relay = next(p for n, p in services.items() if n.endswith("-relay"))
    [relay_group] = relay["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
    worker_groups = {json.dumps(p["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"])
                     for n, p in services.items() if "-worker-" in n}
    assert len(worker_groups) == 1
    outputs = t["Outputs"]
    groups = {"worker": outputs["TaskSecurityGroup"]["Value"], "relay": relay_group,
              "migrate": outputs["MigrateSecurityGroup"]["Value"], "ops": outputs["OpsSecurityGroup"]["Value"]}
    schedulers = [p for n, p in services.items() if n.endswith("-scheduler")]
    if schedulers:
        [[groups["scheduler"]]] = [p["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"]
                                   for p in schedulers]
    return groups


@pytest.mark.parametrize("env", ENVS)
def test_each_service_has_its_own_group_and_only_the_workers_reach_redis(env):
    """One group per kind of task, each allowed into the database by a rule of its own (the
    database's rules and the flow logs tell them apart); Redis (the result backend) lets in the
    workers only: neither the relay nor migrations nor ops use it."""
    t, producer = stateless(env), stateful(env)
    groups = service_groups(t)
    assert set(groups) == {"worker", "relay", "migrate", "ops"} | ({"scheduler"} if scheduled(env) else set())
    assert len({json.dumps(g, sort_keys=True) for g in groups.values()}) == len(groups)
    assert [json.loads(x) for x in {json.dumps(p["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"])
            for n, p in ((r["Properties"]["ServiceName"], r["Properties"])
                         for r in resources({"t": t}, "AWS::ECS::Service").values()) if "-worker-" in n}] == [
        [groups["worker"]]]
    [db] = resources({"t": producer}, "AWS::RDS::DBInstance").values()
    db_group = db["Properties"]["VPCSecurityGroups"][0]["Fn::GetAtt"][0]
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()]
    by_target: dict[str, list] = {}
    for rule in ingress:
        target = resolve(rule["GroupId"], producer)["Fn::GetAtt"][0]
        source = [k for k, g in groups.items() if g == rule["SourceSecurityGroupId"]]
        by_target.setdefault(target, []).append((source[0], rule["FromPort"], rule["ToPort"], rule["IpProtocol"]))
    assert sorted(by_target.pop(db_group)) == sorted((k, 5432, 5432, "tcp") for k in groups)
    if CONFIGS[env].cache:
        [cache_group] = by_target
        assert cache_group.startswith("CacheSecurityGroup")
        assert by_target[cache_group] == [("worker", 6379, 6379, "tcp")]
    else:
        assert by_target == {}


@pytest.mark.parametrize("env", ENVS)
def test_relay_migrate_and_ops_egress_is_what_they_call(env):
    """Workers run the team's code and keep all outbound. The relay, migrations and ops run only
    the product's: the database on its port, and HTTPS for what ECS and the product call (SQS,
    CloudWatch for ops, ECR, Secrets Manager, Logs). Where the network has interface endpoints
    (prod) HTTPS goes only to the endpoints' group and S3's prefix list (the image layers through
    the gateway endpoint); without them AWS's APIs are behind NAT, so HTTPS may go anywhere."""
    t, producer = stateless(env), stateful(env)
    groups = service_groups(t)
    assert group_rules(t, groups["worker"], "Egress") == [
        {"CidrIp": "0.0.0.0/0", "Description": "Allow all outbound traffic by default", "IpProtocol": "-1"}]
    [db] = resources({"t": producer}, "AWS::RDS::DBInstance").values()
    db_group = db["Properties"]["VPCSecurityGroups"][0]["Fn::GetAtt"][0]
    endpoints = CONFIGS[env].network.interface_endpoints
    restricted = ("relay", "migrate", "ops", "scheduler") if scheduled(env) else ("relay", "migrate", "ops")
    for kind in restricted:
        rules = {(peer(r, producer), r["IpProtocol"], r["FromPort"], r["ToPort"])
                 for r in group_rules(t, groups[kind], "Egress")}
        https = ({("NetworkEndpointSecurityGroup6DEF6240", "tcp", 443, 443), ("prefix-list", "tcp", 443, 443)}
                 if endpoints else {("anywhere", "tcp", 443, 443)})
        assert rules == {(db_group, "tcp", 5432, 5432)} | https, (kind, rules)
    if endpoints:
        # The prefix list is S3's in this region, read when the stack deploys (no synth-time lookup).
        [lookup] = resources({"t": producer}, "Custom::AWS").values()
        call = json.loads(lookup["Properties"]["Create"])
        assert (call["service"], call["action"]) == ("EC2", "DescribePrefixLists")
        assert call["parameters"]["Filters"] == [{"Name": "prefix-list-name", "Values": ["com.amazonaws.eu-west-1.s3"]}]
        for kind in restricted:
            [rule] = [r for r in group_rules(t, groups[kind], "Egress") if "DestinationPrefixListId" in r]
            output = resolve(rule["DestinationPrefixListId"], producer)
            assert output["Fn::GetAtt"][0] in resources({"t": producer}, "Custom::AWS")
        # ops depth reads CloudWatch: its endpoint is there, so ops needs no NAT at all.
        services = {json.dumps(r["Properties"]["ServiceName"]) for r in
                    resources({"t": producer}, "AWS::EC2::VPCEndpoint").values()}
        assert any("monitoring" in s for s in services), services
    else:
        assert resources({"t": producer}, "Custom::AWS") == {}


@pytest.mark.parametrize("env", ENVS)
def test_each_database_role_has_its_own_secret_kept_like_the_data_and_rotated_in_prod(env):
    """pcelery-<env>/runtime and pcelery-<env>/ops: generated passwords of the logins
    pcelery_<env>_runtime and pcelery_<env>_ops (pcelery-migrate creates the roles), naming the
    master secret (what multi-user rotation logs in with) and attached to the instance. Where
    rotation_days is set (prod) Secrets Manager's multi-user rotation rotates each one, not at
    deploy (the role does not exist before the first migration); dev and staging acknowledge
    cdk-nag's SMG4 on each secret."""
    producer, cfg = stateful(env), CONFIGS[env]
    secrets = {r["Properties"]["Name"]: (lid, r)
               for lid, r in resources({"t": producer}, "AWS::SecretsManager::Secret").items()}
    master_id = secrets[f"pcelery-{env}/master"][0]
    attachments = {r["Properties"]["SecretId"]["Ref"]: lid
                   for lid, r in resources({"t": producer}, "AWS::SecretsManager::SecretTargetAttachment").items()}
    rotations = {r["Properties"]["SecretId"]["Ref"]: r["Properties"]
                 for r in resources({"t": producer}, "AWS::SecretsManager::RotationSchedule").values()}
    for kind in ("runtime", "ops"):
        lid, secret = secrets[f"pcelery-{env}/{kind}"]
        template = json.dumps(secret["Properties"]["GenerateSecretString"]["SecretStringTemplate"])
        assert f'\\"username\\":\\"pcelery_{env}_{kind}\\"' in template, template
        assert attachments[master_id] in template  # masterarn
        assert secret["DeletionPolicy"] == secrets[f"pcelery-{env}/master"][1]["DeletionPolicy"]
        rotation = rotations.get(attachments[lid])
        if cfg.database.rotation_days:
            assert rotation["RotationRules"] == {"ScheduleExpression": f"rate({cfg.database.rotation_days} days)"}
            assert rotation["RotateImmediatelyOnUpdate"] is False
            app = producer["Resources"][rotation["RotationLambdaARN"]["Fn::GetAtt"][0]]
            mapping = producer["Mappings"][app["Properties"]["Location"]["ApplicationId"]["Fn::FindInMap"][0]]
            assert mapping["aws"]["applicationId"].endswith("/SecretsManagerRDSPostgreSQLRotationMultiUser")
            assert app["Properties"]["Parameters"]["masterSecretArn"] == {"Ref": attachments[master_id]}
        else:
            assert rotation is None
    acknowledged = {(path.rsplit("/", 1)[-1], rule) for path, entries in synth_all().metadata[
        f"pcelery-{env}-stateful"].items() if "/DatabaseRoles/" in path
        for e in entries if e["type"] == "aws:cdk:acknowledged-rules" for rule in e["data"]}
    assert acknowledged == (set() if cfg.database.rotation_days else {
        ("runtime", "Annotation::AwsSolutions-SMG4"), ("ops", "Annotation::AwsSolutions-SMG4")})


# --------------------------------------------------------------------------- alarms and dashboard


def expected_alarms(env: str) -> dict[str, str]:
    names = {}
    for q in CONFIGS[env].catalog:
        names[f"pcelery-{env}-{q.name}-dlq-not-empty"] = "alarm-dlq-not-empty"
        names[f"pcelery-{env}-{q.name}-oldest-message-age"] = "alarm-queue-backlog-old"
        names[f"pcelery-{env}-worker-{q.name}-running-low"] = "alarm-service-running-low"
    names[f"pcelery-{env}-relay-running-low"] = "alarm-service-running-low"
    for signal in ("outbox-lag", "db-cpu-high", "db-free-storage-low", "db-connections-high"):
        names[f"pcelery-{env}-{signal}"] = ANCHOR_BY_SIGNAL[signal]
    if CONFIGS[env].cache:
        names[f"pcelery-{env}-redis-memory-high"] = "alarm-redis-memory-high"
    if scheduled(env):
        names[f"pcelery-{env}-scheduler-stopped"] = ANCHOR_BY_SIGNAL["scheduler-stopped"]
    return names


@pytest.mark.parametrize("env", ENVS)
def test_alarm_names_and_runbook_anchors_follow_the_contract(env):
    found = alarms(env)
    expected = expected_alarms(env)
    assert set(found) == set(expected)
    for name, anchor in expected.items():
        assert found[name].split()[-1] == f"RUNBOOK.md#{anchor}", found[name]
    t = stateless(env)
    [topic_id] = resources({"t": t}, "AWS::SNS::Topic")
    by_name = {r["Properties"]["AlarmName"]: r["Properties"]
               for r in resources({"t": t}, "AWS::CloudWatch::Alarm").values() if "AlarmName" in r["Properties"]}
    for name, props in by_name.items():
        assert props["AlarmActions"] == [{"Ref": topic_id}], name
    lag = by_name[f"pcelery-{env}-outbox-lag"]
    assert lag["Namespace"] == "PersistentCelery" and lag["MetricName"] == "OutboxOldestPendingAgeSeconds"
    assert lag["Dimensions"] == [{"Name": "Environment", "Value": env}]
    assert lag["TreatMissingData"] == "breaching"  # a dead relay reports nothing
    for q in CONFIGS[env].catalog:
        age = by_name[f"pcelery-{env}-{q.name}-oldest-message-age"]
        assert age["Threshold"] == q.oldest_message_alarm_seconds()
        dlq = by_name[f"pcelery-{env}-{q.name}-dlq-not-empty"]
        assert (dlq["Threshold"], dlq["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
        assert queue_name_of(dlq["Dimensions"][0]["Value"], stateful(env)) == sqs_queue_name(env, q.name, dlq=True)
        running = by_name[f"pcelery-{env}-worker-{q.name}-running-low"]
        # desired - running: a service scaled to zero (desired 0) never alarms.
        [expr] = [m for m in running["Metrics"] if "Expression" in m]
        assert expr["Expression"] == "desired - running"


@pytest.mark.parametrize("env", ENVS)
def test_alarm_topic_is_encrypted_and_mail_only_where_configured(env):
    t = stateless(env)
    [topic] = resources({"t": t}, "AWS::SNS::Topic").values()
    assert "KmsMasterKeyId" in topic["Properties"]
    [key] = resources({"t": t}, "AWS::KMS::Key").values()
    assert key["Properties"]["EnableKeyRotation"] is True
    assert "cloudwatch.amazonaws.com" in json.dumps(key["Properties"]["KeyPolicy"])
    subs = [r["Properties"] for r in resources({"t": t}, "AWS::SNS::Subscription").values()]
    email = CONFIGS[env].alarm_email
    assert subs == ([] if not email else [subs[0]])
    if email:
        assert subs[0]["Endpoint"] == email and subs[0]["Protocol"] == "email"


@pytest.mark.parametrize("env", ENVS)
def test_dashboard_shows_depth_age_dlq_workers_and_throughput(env):
    [board] = resources({"t": stateless(env)}, "AWS::CloudWatch::Dashboard").values()
    body = json.dumps(board["Properties"]["DashboardBody"])
    for metric in ("ApproximateNumberOfMessagesVisible", "ApproximateAgeOfOldestMessage", "RunningTaskCount",
                   "NumberOfMessagesDeleted", "OutboxOldestPendingAgeSeconds"):
        assert metric in body, metric
    if scheduled(env):  # passes and submitted slots, with the scheduler's running tasks
        assert "scheduler: passes and submitted slots" in body
        for needle in ("SchedulerPasses", "SchedulerSubmitted", f"pcelery-{env}-scheduler"):
            assert needle in body, needle
    for q in CONFIGS[env].catalog:
        assert f"{q.name}: DLQ depth" in body and f"{q.name}: throughput" in body


# --------------------------------------------------------------------------- database.external

EXTERNAL_DB = {
    "host": "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "port": 5433, "name": "shop",
    "secret_arn": "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/db-AbCdEf",
    "kms_key_arn": "arn:aws:kms:eu-west-1:333333333333:key/0123abcd-4567-89ab-cdef-0123456789ab",
    "security_group_id": "sg-0123456789abcdef0",
}
APP_SECRET_KEY = "arn:aws:kms:eu-west-1:333333333333:key/89abcdef-0123-4567-89ab-cdef01234567"
# A second secret of the team's, passed whole (no field).
STRIPE_SECRET = "arn:aws:secretsmanager:eu-west-1:333333333333:secret:shop/stripe-AbCdEf"


@pytest.fixture(scope="module")
def external_prod():
    """prod on the team's database (port 5433, its security group, the secret under a customer
    key), the shop's Django secret under another key and a whole-value secret; with cdk-nag, like
    every synth."""
    from infra.config import CONTEXT_KEY

    ctx = context_with("prod", "database", {"external": EXTERNAL_DB})
    secrets = ctx[CONTEXT_KEY]["prod"]["application"]["secrets"]
    secrets["DJANGO_SECRET_KEY"]["kms_key_arn"] = APP_SECRET_KEY
    secrets["STRIPE_API_KEY"] = {"arn": STRIPE_SECRET}
    s = synth(("prod",), context=ctx)
    return s, s.templates["prod"]["pcelery-prod-stateful"], s.templates["prod"]["pcelery-prod-stateless"]


def test_an_external_database_leaves_out_the_rds_instance_its_secret_rotation_and_alarms(external_prod):
    s, producer, t = external_prod
    kinds = {r["Type"] for template in (producer, t) for r in template["Resources"].values()}
    assert not {k for k in kinds if k.startswith("AWS::RDS::")}, kinds
    # prod rotates its own master password (a rotation schedule and its SAR Lambda); nothing here.
    assert not {"AWS::SecretsManager::RotationSchedule", "AWS::Serverless::Application",
                "AWS::SecretsManager::SecretTargetAttachment"} & kinds
    # No pcelery-prod/master: the Redis token and the two database roles' logins, which the stack
    # generates for the team's database too (pcelery-migrate creates the roles there).
    secrets = [r["Properties"].get("Name") for r in resources({"t": producer}, "AWS::SecretsManager::Secret").values()]
    assert sorted(secrets) == ["pcelery-prod/ops", "pcelery-prod/redis-auth-token", "pcelery-prod/runtime"]
    assert not [r for r in resources({"t": producer}, "AWS::Logs::LogGroup").values()
                if "/aws/rds/" in json.dumps(r["Properties"].get("LogGroupName", ""))]
    # Nothing of a database crosses the stacks but the roles' logins (pcelery-prod/runtime and /ops).
    assert not [o for o in producer.get("Outputs", {}) if "Database" in o and "DatabaseRoles" not in o]
    # The team watches its own database: no db-* alarm, no RDS metric on the dashboard.
    found = summary({"t": t})["t"]["alarms"]
    assert set(found) == {n for n in expected_alarms("prod") if "-db-" not in n}
    [board] = resources({"t": t}, "AWS::CloudWatch::Dashboard").values()
    assert "AWS/RDS" not in json.dumps(board["Properties"]["DashboardBody"])
    # Everything else of prod is as it was: the queues, the services, the cache.
    queues = summary({"t": producer})["t"]["queues"]
    assert queues == summary(synth_templates("prod"))["pcelery-prod-stateful"]["queues"]
    assert s.termination_protection["pcelery-prod-stateful"] is True


def test_every_container_connects_to_the_external_database_and_only_migrations_with_its_secret(external_prod):
    """database.external's secret is the migrations' (it owns the tables and creates the roles);
    the workers and relay log in as the runtime role, ops as the ops role, with the secrets the
    stack generated; the team's secrets go to the workers."""
    _, producer, t = external_prod
    found = containers(t)
    assert len(found) == container_count("prod")
    for name, container in found.items():
        env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert {k: env_vars[k] for k in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_SSLROOTCERT")} == {
            "DB_HOST": "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "DB_PORT": "5433", "DB_NAME": "shop",
            "DB_SSLROOTCERT": "/etc/ssl/certs/rds-global-bundle.pem"}, name
        role = role_of(name)
        secrets = {s["Name"]: secret_read(s["ValueFrom"], producer) for s in container["Secrets"]}
        wanted = expected_secrets("prod", role, master="shop/db-AbCdEf")
        if role == "worker":
            wanted["STRIPE_API_KEY"] = "shop/stripe-AbCdEf:"  # no field: the whole value
        assert secrets == wanted, name
        raw = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
        if role == "migrate":  # the RDS secret format: JSON keys username and password
            arn = EXTERNAL_DB["secret_arn"]
            assert (raw["DB_USER"], raw["DB_PASSWORD"]) == (f"{arn}:username::", f"{arn}:password::"), name
        if role == "worker":
            assert raw["STRIPE_API_KEY"] == STRIPE_SECRET, name


def test_execution_roles_read_exactly_their_secrets_and_decrypt_only_through_secrets_manager(external_prod):
    _, producer, t = external_prod
    django = CONFIGS["prod"].application.secrets["DJANGO_SECRET_KEY"].arn
    tasks = [r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()]
    assert len(tasks) == task_count("prod")
    for task in tasks:
        family = task["Family"]
        worker, ops = "-worker-" in family, family.endswith("-ops")
        reads = secret_reads(t, task)
        literal = sorted(r for r in reads if isinstance(r, str))
        # The team's database secret wherever a migration runs (every task but ops); its own
        # secrets in the workers only.
        assert literal == sorted([*([] if ops else [EXTERNAL_DB["secret_arn"]]),
                                  *([django, STRIPE_SECRET] if worker else [])]), family
        by_reference = {secret_read(r, producer).rsplit(":", 1)[0] for r in reads if not isinstance(r, str)}
        assert by_reference == ({"pcelery-prod/ops"} if ops else {"pcelery-prod/runtime", "pcelery-prod/ops"} | (
            {"pcelery-prod/redis-auth-token"} if worker else set())), family
        decrypts = key_decrypts(t, task)
        assert {a for st in decrypts for a in as_list(st["Action"])} == (set() if ops else {"kms:Decrypt"})
        assert sorted(r for st in decrypts for r in as_list(st["Resource"])) == sorted(
            [*([] if ops else [EXTERNAL_DB["kms_key_arn"]]), *([APP_SECRET_KEY] if worker else [])]), family
        for st in decrypts:
            assert st["Condition"] == {"StringEquals": {"kms:ViaService": "secretsmanager.eu-west-1.amazonaws.com"}}


def test_the_external_databases_own_security_group_lets_each_kind_of_task_in(external_prod):
    _, producer, t = external_prod
    groups = service_groups(t)
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()]
    on_db = [i for i in ingress if i["GroupId"] == EXTERNAL_DB["security_group_id"]]
    assert sorted(json.dumps(i["SourceSecurityGroupId"], sort_keys=True) for i in on_db) == sorted(
        json.dumps(g, sort_keys=True) for g in groups.values())
    assert len(groups) == 5  # workers, relay, migrations, ops, scheduler
    assert [(i["IpProtocol"], i["FromPort"], i["ToPort"]) for i in on_db] == [("tcp", 5433, 5433)] * len(groups)
    # The team's group says whose rules they are.
    assert all(i["Description"].startswith("from pcelery-prod ") for i in on_db), on_db
    # Besides them only the cache's rule (from the workers): nothing is opened on 5432 or anywhere else.
    assert [(i["FromPort"], i["SourceSecurityGroupId"]) for i in ingress if i not in on_db] == [
        (6379, groups["worker"])]
    # The relay, migrations, ops and the scheduler go out to the team's database group on its port,
    # and nowhere else but HTTPS to the endpoints and S3.
    for kind in ("relay", "migrate", "ops", "scheduler"):
        rules = {(peer(r, producer), r["FromPort"]) for r in group_rules(t, groups[kind], "Egress")}
        assert rules == {(EXTERNAL_DB["security_group_id"], 5433), ("NetworkEndpointSecurityGroup6DEF6240", 443),
                         ("prefix-list", 443)}, kind


def test_nag_and_cfn_lint_accept_an_external_database(external_prod):
    """The synth ran with cdk-nag (an unacknowledged finding fails it); no RDS acknowledgment is
    left over, and cfn-lint is as clean as for the stack's own database."""
    s, producer, t = external_prod
    acknowledged = [(path, rule) for metadata in s.metadata.values() for path, entries in metadata.items()
                    for entry in entries if entry["type"] == "aws:cdk:acknowledged-rules" for rule in entry["data"]]
    assert acknowledged
    assert not [(p, r) for p, r in acknowledged if r.startswith("AwsSolutions-RDS") or "/Database/" in p]
    assert_cfn_lint_clean({"stateful": producer, "stateless": t}, "eu-west-1")


def test_without_its_security_group_an_external_database_gets_no_rule_but_stays_reachable():
    """Left out, the team allows the tasks in on its side (infra/README.md); the workers allow all
    outbound, and the relay, migrations and ops may go out on the database's port (its address is
    the team's, so anywhere) and HTTPS. No customer key: no decrypt."""
    external = {k: v for k, v in EXTERNAL_DB.items() if k not in ("security_group_id", "kms_key_arn")}
    external.update(port=5432, secret_arn=external["secret_arn"].replace("333333333333", "111111111111"))
    s = synth(("dev",), context=context_with("dev", "database", {"external": external}))
    t, producer = s.templates["dev"]["pcelery-dev-stateless"], s.templates["dev"]["pcelery-dev-stateful"]
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()]
    assert ingress == []  # dev has no cache either
    groups = service_groups(t)
    assert [(e["CidrIp"], e["IpProtocol"]) for e in group_rules(t, groups["worker"], "Egress")] == [("0.0.0.0/0", "-1")]
    for kind in ("relay", "migrate", "ops", "scheduler"):
        assert {(peer(r, producer), r["FromPort"]) for r in group_rules(t, groups[kind], "Egress")} == {
            ("anywhere", 5432), ("anywhere", 443)}, kind
    for task in (r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()):
        assert (external["secret_arn"] in secret_reads(t, task)) is (not task["Family"].endswith("-ops"))
        assert key_decrypts(t, task) == []
    # The roles' logins are the stack's, generated: no rotation Lambda reaches the team's database,
    # so cdk-nag's SMG4 is acknowledged on each, with the manual rotation named.
    assert resources({"t": producer}, "AWS::SecretsManager::RotationSchedule") == {}
    smg4 = "Annotation::AwsSolutions-SMG4"
    reasons = [e["data"][smg4] for path, entries in s.metadata["pcelery-dev-stateful"].items()
               for e in entries if e["type"] == "aws:cdk:acknowledged-rules" and smg4 in e["data"]
               and "/DatabaseRoles/" in path]
    assert len(reasons) == 2 and all("RUNBOOK.md#rotate-secrets" in r for r in reasons)


# --------------------------------------------------------------------------- catalog drives everything


EXTRA = QueueContract(
    name="reports", description="test-only third queue", visibility_timeout=200, max_receive_count=4,
    retention=3 * 24 * 3600, soft_time_limit=60, hard_time_limit=90, max_countdown=30,
    min_workers=0, max_workers=3, backlog_per_worker=7,
)


def _without_image(resource: dict) -> dict:
    """The image is content-addressed from the work tree, which may change between two synths."""
    resource = copy.deepcopy(resource)
    for container in resource.get("Properties", {}).get("ContainerDefinitions", []):
        container.pop("Image", None)
    return resource


def test_adding_a_queue_adds_its_queue_dlq_permissions_and_alarms_and_nothing_else():
    three = synth(("dev",), catalog=Catalog(queues=(*CONFIGS["dev"].catalog.queues, EXTRA))).templates["dev"]
    two = synth_templates("dev")
    per_queue = {
        "pcelery-dev-stateful": {"AWS::SQS::Queue": 2, "AWS::SQS::QueuePolicy": 2},
        "pcelery-dev-stateless": {
            "AWS::ECS::Service": 1, "AWS::ECS::TaskDefinition": 1, "AWS::Logs::LogGroup": 1,
            "AWS::IAM::Role": 2, "AWS::IAM::Policy": 2,  # task and execution role of the new service
            "AWS::ApplicationAutoScaling::ScalableTarget": 1,
            "AWS::ApplicationAutoScaling::ScalingPolicy": 2,  # backlog tracking + wake from zero (dev)
            "AWS::CloudWatch::Alarm": 4,  # dlq, age, running-low + the wake trigger
        },
    }
    for stack, delta in per_queue.items():
        before = Counter(r["Type"] for r in two[stack]["Resources"].values())
        after = Counter(r["Type"] for r in three[stack]["Resources"].values())
        assert after - before == Counter(delta) and not before - after, stack
        # Nothing existing is renamed or replaced.
        assert set(two[stack]["Resources"]) <= set(three[stack]["Resources"])
        # What changes in place is only what lists every queue: publish grants and the dashboard.
        changed = {two[stack]["Resources"][lid]["Type"] for lid in two[stack]["Resources"]
                   if _without_image(two[stack]["Resources"][lid]) != _without_image(three[stack]["Resources"][lid])}
        assert changed <= {"AWS::IAM::Policy", "AWS::CloudWatch::Dashboard"}, (stack, changed)

    new_alarms = set(summary(three)["pcelery-dev-stateless"]["alarms"]) - set(
        summary(two)["pcelery-dev-stateless"]["alarms"])
    assert new_alarms == {
        "pcelery-dev-reports-dlq-not-empty", "pcelery-dev-reports-oldest-message-age",
        "pcelery-dev-worker-reports-running-low"}
    queues = {r["Properties"]["QueueName"]: r["Properties"]
              for r in resources({"t": three["pcelery-dev-stateful"]}, "AWS::SQS::Queue").values()}
    assert queues["pcelery-dev-reports"]["VisibilityTimeout"] == EXTRA.visibility_timeout
    assert queues["pcelery-dev-reports"]["RedrivePolicy"]["maxReceiveCount"] == EXTRA.max_receive_count
    assert "pcelery-dev-reports-dlq" in queues
    relay = task_definition(three["pcelery-dev-stateless"], "pcelery-dev-relay")
    published = {queue_name_of(r, three["pcelery-dev-stateful"])
                 for st in statements_of_role(three["pcelery-dev-stateless"], relay["TaskRoleArn"])
                 for r in as_list(st["Resource"])}
    assert "pcelery-dev-reports" in published
    ops = task_definition(three["pcelery-dev-stateless"], "pcelery-dev-ops")
    operated = {queue_name_of(r, three["pcelery-dev-stateful"])
                for st in statements_of_role(three["pcelery-dev-stateless"], ops["TaskRoleArn"])
                for r in as_list(st["Resource"]) if r != "*"}
    assert {"pcelery-dev-reports", "pcelery-dev-reports-dlq"} <= operated

    # Its tasks fit in the stop timeout, so it scales in like any queue: tracking in both
    # directions, and only the wake-from-zero step policy (counted above) beside it.
    t3 = three["pcelery-dev-stateless"]
    [target_id] = [lid for lid in resources({"t": t3}, "AWS::ApplicationAutoScaling::ScalableTarget")
                   if lid.startswith("WorkersreportsScaling")]
    mine = {lid: r["Properties"]
            for lid, r in resources({"t": t3}, "AWS::ApplicationAutoScaling::ScalingPolicy").items()
            if r["Properties"]["ScalingTargetId"] == {"Ref": target_id}}
    [tracking] = [p for p in mine.values() if p["PolicyType"] == "TargetTrackingScaling"]
    assert tracking["TargetTrackingScalingPolicyConfiguration"].get("DisableScaleIn", False) is False
    steps = {lid: p for lid, p in mine.items() if p["PolicyType"] == "StepScaling"}
    assert len(steps) == 1 and idle_scale_in(steps, resources({"t": t3}, "AWS::CloudWatch::Alarm").values()) == {}


# --------------------------------------------------------------------------- drift and the real CLI


def test_summary_matches_the_checked_in_file():
    current = {env: summary(synth_templates(env)) for env in ENVS}
    if os.environ.get("PCELERY_UPDATE_SUMMARY") == "1":
        SUMMARY_FILE.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    expected = json.loads(SUMMARY_FILE.read_text())
    assert current == expected, (
        "the synthesized infrastructure changed: if intended, run "
        "PCELERY_UPDATE_SUMMARY=1 .venv/bin/python -m pytest tests/integration/test_infra.py -k summary "
        "and review the diff"
    )


def test_cdk_cli_synthesizes_every_environment_offline(tmp_path):
    out = tmp_path / "cdk.out"
    env = {**os.environ, "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20", "AWS_EC2_METADATA_DISABLED": "true",
           "CDK_DISABLE_VERSION_CHECK": "1"}
    proc = subprocess.run(
        ["npx", "--no-install", "cdk", "synth", "--quiet", "--no-notices", "--output", str(out)],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    produced = sorted(p.name for p in out.glob("*.template.json"))
    assert produced == sorted(f"pcelery-{e}-{k}.template.json" for e in ENVS for k in ("stateful", "stateless"))
