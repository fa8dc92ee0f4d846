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

from infra.permissions import (
    CONSUME_ACTIONS,
    OPS_METRIC_ACTIONS,
    OPS_QUEUE_ACTIONS,
    PUBLISH_ACTIONS,
)
from infra.relay import MIGRATE_COMMAND, OPS_CONTAINER, OPS_ENTRY_POINT, RELAY_COMMAND
from infra.workers import (
    ECS_MAX_STOP_TIMEOUT,
    IDLE_SCALE_IN_MINUTES,
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
    # A DependsOn that CDK's own custom-resource provider (which strips the default security
    # group) writes next to a GetAtt; harmless and not ours to change.
    "W3005": lambda message: message.startswith("'CustomVpcRestrictDefaultSGCustomResourceProviderRole"),
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
}


def stateful(env):
    return synth_templates(env)[f"pcelery-{env}-stateful"]


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
def test_worker_role_consumes_its_own_queue_publishes_work_and_never_touches_a_dlq(env):
    t, producer = stateless(env), stateful(env)
    work_names = {sqs_queue_name(env, q.name) for q in CONFIGS[env].catalog}
    for q in CONFIGS[env].catalog:
        task = task_definition(t, f"pcelery-{env}-worker-{q.name}")
        grants: dict[str, set[str]] = {}
        for st in statements_of_role(t, task["TaskRoleArn"]):
            assert st["Effect"] == "Allow"
            for resource in as_list(st["Resource"]):
                name = queue_name_of(resource, producer)
                assert not name.endswith("-dlq"), f"worker {q.name} may touch DLQ {name}"
                grants.setdefault(name, set()).update(as_list(st["Action"]))
        own = sqs_queue_name(env, q.name)
        assert grants[own] == set(CONSUME_ACTIONS) | set(PUBLISH_ACTIONS)
        for other in work_names - {own}:
            assert grants[other] == set(PUBLISH_ACTIONS), f"worker {q.name} on {other}: {grants[other]}"
        assert set(grants) == work_names


@pytest.mark.parametrize("env", ENVS)
def test_relay_only_publishes_and_migration_has_no_sqs_access(env):
    t, producer = stateless(env), stateful(env)
    relay = task_definition(t, f"pcelery-{env}-relay")
    statements = statements_of_role(t, relay["TaskRoleArn"])
    assert {a for st in statements for a in as_list(st["Action"])} == set(PUBLISH_ACTIONS)
    assert {queue_name_of(r, producer) for st in statements for r in as_list(st["Resource"])} == {
        sqs_queue_name(env, q.name) for q in CONFIGS[env].catalog}
    migrate = task_definition(t, f"pcelery-{env}-migrate")
    assert statements_of_role(t, migrate["TaskRoleArn"]) == []


# --------------------------------------------------------------------------- containers


@pytest.mark.parametrize("env", ENVS)
def test_containers_get_the_runtime_contract_and_secrets_only_as_secrets(env):
    t = stateless(env)
    cfg = CONFIGS[env]
    # The team's secrets (application.secrets: the shop's DJANGO_SECRET_KEY) go where its environment goes.
    app_secrets = set(cfg.application.secrets)
    assert app_secrets == {"DJANGO_SECRET_KEY"}
    secret_names = {"DB_USER", "DB_PASSWORD"} | app_secrets | ({"REDIS_AUTH_TOKEN"} if cfg.cache else set())
    # The catalog spec and the team's own settings go to every container (cdk.json application).
    plain_names = {"PCELERY_ENV", "PCELERY_CATALOG", "AWS_REGION", "DB_HOST", "DB_PORT", "DB_NAME", "DB_SSLROOTCERT",
                   "DJANGO_SETTINGS_MODULE"} | ({"REDIS_HOST", "REDIS_PORT"} if cfg.cache else set())
    # What runs tasks only goes to the worker tasks (whose migrate init container shares it).
    worker_names = {"PCELERY_WORKER_QUEUES", "PCELERY_TASK_MODULES", "PCELERY_CELERY_APP"}
    tasks = [r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()]
    assert len(tasks) == len(CONFIGS[env].catalog) + 3
    for task in tasks:
        family = task["Family"]
        # The ops CLI never touches Redis, so it gets neither its host nor its token.
        ops = family.endswith("-ops")
        for container in task["ContainerDefinitions"]:
            env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
            assert not secret_names & set(env_vars), f"{family} has a secret in plain env"
            for name, value in env_vars.items():
                assert not re.search(r"PASSWORD|TOKEN|SECRET|KEY", name), name
                assert "secretsmanager" not in json.dumps(value), f"{family}: {name} resolves a secret"
            assert {s["Name"] for s in container["Secrets"]} == (
                {"DB_USER", "DB_PASSWORD"} | app_secrets if ops else secret_names), family
            worker = "-worker-" in family
            assert set(env_vars) == (plain_names - {"REDIS_HOST", "REDIS_PORT"} if ops else plain_names) | (
                worker_names if worker else set()), f"{family}/{container['Name']}"
            assert env_vars["PCELERY_ENV"] == env
            assert env_vars["PCELERY_CATALOG"] == "shop.queues:CATALOG"
            assert env_vars["DJANGO_SETTINGS_MODULE"] == "shopsite.settings"
            if worker:
                assert env_vars["PCELERY_TASK_MODULES"] == "shop.tasks"
                assert env_vars["PCELERY_CELERY_APP"] == "shopsite.celery:app"
            assert container["LogConfiguration"]["LogDriver"] == "awslogs"
        main = [c for c in task["ContainerDefinitions"] if c.get("Essential", True)]
        [container] = main
        if family.endswith("-migrate"):
            assert container["EntryPoint"] == MIGRATE_COMMAND
            continue
        if ops:
            continue  # its own test below
        # Services migrate in an init container first: the worker refuses an old schema.
        [init] = [c for c in task["ContainerDefinitions"] if c.get("Essential") is False]
        assert init["EntryPoint"] == MIGRATE_COMMAND
        assert container["DependsOn"] == [{"ContainerName": init["Name"], "Condition": "SUCCESS"}]
        if family.endswith("-relay"):
            assert container["EntryPoint"] == RELAY_COMMAND
        else:
            queue = family.rsplit("-worker-", 1)[1]
            env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
            assert env_vars["PCELERY_WORKER_QUEUES"] == queue
            assert container["EntryPoint"] == WORKER_ENTRY_POINT  # whatever the team's image's ENTRYPOINT is
            assert container["StopTimeout"] == stop_timeout(CONFIGS[env].catalog.get(queue)) <= ECS_MAX_STOP_TIMEOUT


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
    # Workers and relay with their migrate init containers, the migrate task and the ops task.
    assert len(checked) == 2 * len(CONFIGS[env].catalog) + 2 + 2, checked
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
    assert len(found) == 2 * len(CONFIGS[env].catalog) + 2 + 1 + 1
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
    assert len(grants) == len(CONFIGS["prod"].catalog) + 3
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
        if "-worker-" in name.split("/")[0]:
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
def test_the_teams_secrets_reach_every_container_and_only_their_arn_is_read(env):
    """application.secrets (the shop's DJANGO_SECRET_KEY, one placeholder secret per environment)
    is an ECS secret of every container, and each execution role reads exactly its ARN."""
    cfg, t = CONFIGS[env], stateless(env)
    ref = cfg.application.secrets["DJANGO_SECRET_KEY"]
    assert ref.arn == f"arn:aws:secretsmanager:{cfg.region}:{cfg.account}:secret:shop/{env}/django-AbCdEf"
    found = containers(t)
    assert len(found) == 2 * len(cfg.catalog) + 2 + 1 + 1
    for name, container in found.items():
        secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
        assert secrets["DJANGO_SECRET_KEY"] == f"{ref.arn}:secret_key::", name
    for task in (r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()):
        reads = secret_reads(t, task)
        # Exactly the ARN from cdk.json, never a wildcard; beside it only the stack's own secrets
        # (the RDS master secret, and the Redis token but for ops), by reference.
        assert [r for r in reads if isinstance(r, str)] == [ref.arn], task["Family"]
        stack_own = 1 + (1 if cfg.cache and not task["Family"].endswith("-ops") else 0)
        assert len(reads) == 1 + stack_own and all("Fn::GetStackOutput" in r for r in reads if r != ref.arn)
        assert key_decrypts(t, task) == []  # no customer key named: the AWS-managed key needs no grant
        # The task role (the application's code) reads no secret: ECS injects them at start.
        assert not [st for st in statements_of_role(t, task["TaskRoleArn"])
                    if any(a.startswith(("secretsmanager:", "kms:")) for a in as_list(st["Action"]))]


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
def test_ops_task_runs_the_cli_in_the_vpc_with_the_relays_database_settings(env):
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
    relay_secrets = {s["Name"]: s["ValueFrom"] for s in relay["Secrets"]}
    assert {s["Name"]: s["ValueFrom"] for s in container["Secrets"]} == {
        k: relay_secrets[k] for k in ("DB_USER", "DB_PASSWORD", "DJANGO_SECRET_KEY")}
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
    assert kinds["Interface"] == (5 if net.interface_endpoints else 0)
    subnets = resources({"t": t}, "AWS::EC2::Subnet")
    for kind in ("public", "private", "isolated"):
        assert sum(kind in lid for lid in subnets) == len(CONFIGS[env].availability_zones)


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
    # The one secret left is the Redis token: no pcelery-prod/master.
    secrets = [r["Properties"].get("Name") for r in resources({"t": producer}, "AWS::SecretsManager::Secret").values()]
    assert secrets == ["pcelery-prod/redis-auth-token"]
    assert not [r for r in resources({"t": producer}, "AWS::Logs::LogGroup").values()
                if "/aws/rds/" in json.dumps(r["Properties"].get("LogGroupName", ""))]
    # Nothing of a database crosses the stacks.
    assert not [o for o in producer.get("Outputs", {}) if "Database" in o]
    # The team watches its own database: no db-* alarm, no RDS metric on the dashboard.
    found = summary({"t": t})["t"]["alarms"]
    assert set(found) == {n for n in expected_alarms("prod") if "-db-" not in n}
    [board] = resources({"t": t}, "AWS::CloudWatch::Dashboard").values()
    assert "AWS/RDS" not in json.dumps(board["Properties"]["DashboardBody"])
    # Everything else of prod is as it was: the queues, the services, the cache.
    queues = summary({"t": producer})["t"]["queues"]
    assert queues == summary(synth_templates("prod"))["pcelery-prod-stateful"]["queues"]
    assert s.termination_protection["pcelery-prod-stateful"] is True


def test_every_container_connects_to_the_external_database_with_its_secret(external_prod):
    _, _, t = external_prod
    arn = EXTERNAL_DB["secret_arn"]
    found = containers(t)
    assert len(found) == 2 * len(CONFIGS["prod"].catalog) + 2 + 1 + 1
    for name, container in found.items():
        env_vars = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert {k: env_vars[k] for k in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_SSLROOTCERT")} == {
            "DB_HOST": "shop-db.abcdefghijkl.eu-west-1.rds.amazonaws.com", "DB_PORT": "5433", "DB_NAME": "shop",
            "DB_SSLROOTCERT": "/etc/ssl/certs/rds-global-bundle.pem"}, name
        secrets = {s["Name"]: s["ValueFrom"] for s in container["Secrets"]}
        # The RDS secret format: JSON keys username and password.
        assert (secrets["DB_USER"], secrets["DB_PASSWORD"]) == (f"{arn}:username::", f"{arn}:password::"), name
        assert secrets["DJANGO_SECRET_KEY"].endswith(":secret:shop/prod/django-AbCdEf:secret_key::"), name
        assert secrets["STRIPE_API_KEY"] == STRIPE_SECRET, name  # no field: the whole value


def test_execution_roles_read_exactly_the_external_secret_and_decrypt_only_through_secrets_manager(external_prod):
    _, _, t = external_prod
    django = CONFIGS["prod"].application.secrets["DJANGO_SECRET_KEY"].arn
    tasks = [r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()]
    assert len(tasks) == len(CONFIGS["prod"].catalog) + 3
    for task in tasks:
        reads = secret_reads(t, task)
        literal = sorted(r for r in reads if isinstance(r, str))
        assert literal == sorted([EXTERNAL_DB["secret_arn"], django, STRIPE_SECRET]), task["Family"]
        # By reference only the Redis token (not for ops, which never uses the cache).
        assert len(reads) - len(literal) == (0 if task["Family"].endswith("-ops") else 1), task["Family"]
        decrypts = key_decrypts(t, task)
        assert {a for st in decrypts for a in as_list(st["Action"])} == {"kms:Decrypt"}
        assert sorted(r for st in decrypts for r in as_list(st["Resource"])) == sorted(
            [EXTERNAL_DB["kms_key_arn"], APP_SECRET_KEY]), task["Family"]
        for st in decrypts:
            assert st["Condition"] == {"StringEquals": {"kms:ViaService": "secretsmanager.eu-west-1.amazonaws.com"}}


def test_the_external_databases_own_security_group_lets_the_tasks_and_ops_in(external_prod):
    _, _, t = external_prod
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()]
    on_db = [i for i in ingress if i["GroupId"] == EXTERNAL_DB["security_group_id"]]
    assert {json.dumps(i["SourceSecurityGroupId"], sort_keys=True) for i in on_db} == {
        json.dumps(t["Outputs"][o]["Value"], sort_keys=True) for o in ("TaskSecurityGroup", "OpsSecurityGroup")}
    assert [(i["IpProtocol"], i["FromPort"], i["ToPort"]) for i in on_db] == [("tcp", 5433, 5433)] * 2
    # The team's group says whose rules they are.
    assert all(i["Description"].startswith("from pcelery-prod ") for i in on_db), on_db
    # Besides them only the cache's rule: nothing is opened on 5432 or anywhere else.
    assert [(i["FromPort"]) for i in ingress if i not in on_db] == [6379]


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
    """Left out, the team allows the tasks in on its side (infra/README.md); the task groups
    allow all outbound, so the tasks reach the database once it does. No customer key: no decrypt."""
    external = {k: v for k, v in EXTERNAL_DB.items() if k not in ("security_group_id", "kms_key_arn")}
    external.update(port=5432, secret_arn=external["secret_arn"].replace("333333333333", "111111111111"))
    t = synth(("dev",), context=context_with("dev", "database", {"external": external})
              ).templates["dev"]["pcelery-dev-stateless"]
    ingress = [r["Properties"] for r in resources({"t": t}, "AWS::EC2::SecurityGroupIngress").values()]
    assert ingress == []  # dev has no cache either
    for output in ("TaskSecurityGroup", "OpsSecurityGroup"):
        group = t["Resources"][t["Outputs"][output]["Value"]["Fn::GetAtt"][0]]["Properties"]
        assert [(e["CidrIp"], e["IpProtocol"]) for e in group["SecurityGroupEgress"]] == [("0.0.0.0/0", "-1")]
    for task in (r["Properties"] for r in resources({"t": t}, "AWS::ECS::TaskDefinition").values()):
        assert external["secret_arn"] in secret_reads(t, task)
        assert key_decrypts(t, task) == []


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
