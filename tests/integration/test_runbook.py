"""RUNBOOK.md is held true by tests:

- every alarm the CDK app defines, in every environment, links an anchor that RUNBOOK.md has,
  and every alarm anchor in RUNBOOK.md belongs to some alarm;
- every `python -m ops` line of its code blocks runs, in document order, against a local stack
  (moto server, migrated SQLite store, seeded DLQ messages and rows) and exits 0. Lines marked
  `# needs AWS` or `# not in CI` are parsed by the real CLI (OPS_PARSE_ONLY=1) instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import dead_task, reset_moto

from devstack import DEMO_CATALOG
from devstack.stack import create_queues, local_environ, sqs_client
from pcelery import schema, store
from pcelery.messages import encode_body

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = (REPO / "RUNBOOK.md").read_text()
ANCHOR_RE = re.compile(r'^<a id="([a-z0-9-]+)"></a>$', re.MULTILINE)
PARSE_ONLY_MARKERS = ("# needs AWS", "# not in CI")


def runbook_anchors() -> list[str]:
    return ANCHOR_RE.findall(RUNBOOK)


def ops_lines() -> list[str]:
    """Lines of fenced code blocks that run the ops CLI, in document order."""
    lines, in_block = [], False
    for raw in RUNBOOK.splitlines():
        line = raw.strip()
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block and "python -m ops" in line:
            lines.append(line)
    return lines


# ---------------------------------------------------------------------- alarms <-> anchors


def test_every_alarm_links_an_anchor_of_the_runbook_and_every_alarm_anchor_has_an_alarm():
    from cdk_support import ENVS, alarms

    anchors = set(runbook_anchors())
    linked = set()
    for env in ENVS:
        found = alarms(env)
        assert found, f"no alarms synthesized for {env}"
        for name, description in found.items():
            last = description.split()[-1]
            assert last.startswith("RUNBOOK.md#"), f"{name}: description must end with RUNBOOK.md#<anchor>"
            anchor = last.split("#", 1)[1]
            assert anchor in anchors, f"{name} links RUNBOOK.md#{anchor}, which RUNBOOK.md lacks"
            linked.add(anchor)
    alarm_anchors = {a for a in anchors if a.startswith("alarm-")}
    assert alarm_anchors == linked, f"alarm sections without an alarm: {sorted(alarm_anchors - linked)}"


def test_each_anchor_is_unique_and_sits_right_before_its_heading():
    anchors = runbook_anchors()
    assert len(anchors) == len(set(anchors))
    lines = RUNBOOK.splitlines()
    for i, line in enumerate(lines):
        if ANCHOR_RE.match(line):
            assert lines[i + 1].startswith("#"), f"anchor {line} is not followed by a heading"


def test_every_runbook_link_in_ops_and_the_runbook_resolves():
    anchors = set(runbook_anchors())
    sources = [RUNBOOK] + [p.read_text() for p in (REPO / "ops").glob("*.py")]
    links = {m for text in sources for m in re.findall(r"RUNBOOK\.md#([a-z0-9]+(?:-[a-z0-9]+)*)(?![a-z0-9-])", text)}
    links |= set(re.findall(r"\]\(#([a-z0-9-]+)\)", RUNBOOK))
    assert links and links <= anchors, f"dangling: {sorted(links - anchors)}"


def test_exit_code_table_matches_the_cli():
    from pcelery.ops import EXIT_CODES

    table = dict(re.findall(r"^\| (\d+) \| ([^|]+) \|", RUNBOOK, re.MULTILINE))
    assert sorted(map(int, table)) == sorted(EXIT_CODES)


# ------------------------------------------------------------------ ops inside the VPC (run-task)

# Stands in for the AWS CLI, which needs an account: records each call and answers like it would.
FAKE_AWS = """#!{python}
import json, os, re, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AWS_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
query = args[args.index("--query") + 1] if "--query" in args else ""
if args[:2] == ["cloudformation", "describe-stacks"]:
    key = re.search(r"OutputKey=='(\\w+)'", query).group(1)
    print({{"TaskSubnets": "subnet-a,subnet-b"}}.get(key, "fake-" + key))
elif args[:2] == ["ecs", "run-task"]:
    print("arn:aws:ecs:eu-west-1:123456789012:task/pcelery-prod/0123abcd")
elif args[:2] == ["logs", "tail"]:
    print("ops output")
elif args[:2] == ["ecs", "describe-tasks"]:
    print(os.environ.get("FAKE_EXIT_CODE", "3") if "exitCode" in query else "CannotPullContainerError: ...")
"""


def _section(anchor: str) -> str:
    start = RUNBOOK.index(f'<a id="{anchor}"></a>')
    return RUNBOOK[start:RUNBOOK.index("<a id=", start + 1)]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.fixture
def fake_aws(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(FAKE_AWS.format(python=sys.executable))
    (bin_dir / "aws").chmod(0o755)
    log = tmp_path / "aws.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_AWS_LOG": str(log), "USER": "oncall"}
    [out_line] = [line for line in RUNBOOK.splitlines() if line.startswith("out() {")]

    def run(script: str, **extra_env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        log.write_text("")
        proc = subprocess.run(["bash", "-c", f"set -u\nPCELERY_ENV=prod\n{out_line}\n{script}"], check=False,
                              env={**env, **extra_env}, cwd=REPO, capture_output=True, text=True, timeout=60)
        return proc, [json.loads(x) for x in log.read_text().splitlines()]
    return run


def _run_task_call(calls: list[list[str]]) -> tuple[list[str], list[str]]:
    """(the run-task call, the ops arguments it passes as the container command)."""
    [call] = [c for c in calls if c[:2] == ["ecs", "run-task"]]
    override = json.loads(call[call.index("--overrides") + 1])
    [container] = override["containerOverrides"]
    from infra.relay import OPS_CONTAINER

    assert container["name"] == OPS_CONTAINER
    return call, container["command"]


def _cli_accepts(command: list[str]) -> None:
    from infra.relay import OPS_ENTRY_POINT

    assert OPS_ENTRY_POINT == ["pcelery-ops"]  # the console script, as the image installs it
    proc = subprocess.run([str(Path(sys.executable).parent / OPS_ENTRY_POINT[0]), *command], check=False,
                          cwd="/", env={**os.environ, "OPS_PARSE_ONLY": "1", "PCELERY_ENV": "prod"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{command}: {proc.stderr}"


def test_ops_task_recipe_names_what_the_cdk_app_synthesizes():
    from cdk_support import resources, synth_templates

    stateless = synth_templates("prod")["pcelery-prod-stateless"]
    used = set(re.findall(r"\$\(out (\w+)\)", RUNBOOK))
    assert {"TaskSubnets", "OpsSecurityGroup", "OpsLogGroup", "RelayLogGroup"} <= used
    assert used <= set(stateless["Outputs"]), f"outputs the stack lacks: {sorted(used - set(stateless['Outputs']))}"
    families = {r["Properties"]["Family"] for r in resources({"t": stateless}, "AWS::ECS::TaskDefinition").values()}
    clusters = {r["Properties"]["ClusterName"] for r in resources({"t": stateless}, "AWS::ECS::Cluster").values()}
    for call in re.findall(r"^aws ecs run-task .*$", RUNBOOK, re.MULTILINE):
        assert re.search(r"--cluster (\S+)", call).group(1) in clusters | {'"pcelery-$PCELERY_ENV"'}
        family = re.search(r"--task-definition (\S+)", call).group(1).replace('"pcelery-$PCELERY_ENV-', "pcelery-prod-")
        assert family.strip('"') in families, call


def test_ops_task_recipe_runs_the_cli_in_the_vpc(fake_aws):
    """The literal run-task recipe and the ops_task function, run by bash against a stand-in
    AWS CLI: the right subnets, security group and container, and an override the CLI accepts."""
    first, function = _code_blocks(_section("ops-in-the-vpc"))[0], _code_blocks(_section("ops-in-the-vpc"))[2]
    proc, calls = fake_aws(first)
    assert proc.returncode == 0, proc.stderr
    call, command = _run_task_call(calls)
    assert call[call.index("--task-definition") + 1] == "pcelery-prod-ops"
    assert call[call.index("--network-configuration") + 1] == (
        "awsvpcConfiguration={subnets=[subnet-a,subnet-b],securityGroups=[fake-OpsSecurityGroup],assignPublicIp=DISABLED}")
    assert command == ["tasks", "--state", "dead"]
    _cli_accepts(command)

    # Arguments with spaces survive, ops's exit code comes back, its log stream is the task's.
    proc, calls = fake_aws(function + '\nops_task replay --state dead --task "demo slow" --dry-run; echo "exit $?"')
    assert proc.stdout.splitlines()[-2:] == ["ops output", "exit 3"], proc.stdout + proc.stderr
    call, command = _run_task_call(calls)
    assert call[call.index("--task-definition") + 1] == "pcelery-prod-ops"
    assert "securityGroups=[fake-OpsSecurityGroup]" in call[call.index("--network-configuration") + 1]
    assert command == ["replay", "--state", "dead", "--task", "demo slow", "--dry-run"]
    _cli_accepts(command)
    [tail] = [c for c in calls if c[:2] == ["logs", "tail"]]
    # awslogs names a stream <stream prefix>/<container>/<task id>.
    from cdk_support import resources, synth_templates

    [ops] = [c for r in resources(synth_templates("prod"), "AWS::ECS::TaskDefinition").values()
             if r["Properties"]["Family"] == "pcelery-prod-ops" for c in r["Properties"]["ContainerDefinitions"]]
    stream = f"{ops['LogConfiguration']['Options']['awslogs-stream-prefix']}/{ops['Name']}/0123abcd"
    assert tail[2] == "fake-OpsLogGroup" and tail[tail.index("--log-stream-names") + 1] == stream

    # A task that never ran ops (no exit code) says why and is not mistaken for success.
    proc, _ = fake_aws(function + "\nops_task depth; echo \"exit $?\"", FAKE_EXIT_CODE="None")
    assert proc.stdout.splitlines()[-2:] == ["CannotPullContainerError: ...", "exit 4"], proc.stdout + proc.stderr


# ------------------------------------------------------------------ the commands, executed


@pytest.fixture
def runbook_stack(sqs_endpoint, tmp_path):
    reset_moto(sqs_endpoint)
    sqs = sqs_client(sqs_endpoint)
    queues = create_queues(sqs, DEMO_CATALOG, "local")
    db_url = f"sqlite:///{tmp_path / 'tasks.sqlite3'}"
    engine = schema.make_engine(db_url)
    schema.migrate(engine)

    def dead(task_name, error):
        tid = dead_task(engine, task_name, args=["x"], error=error)
        sqs.send_message(QueueUrl=queues["default"]["dlq_url"],
                         MessageBody=encode_body(tid, task_name, queue="default"))
        return tid

    flaky = [dead("demo.flaky", "RuntimeError: flaky") for _ in range(2)]
    failing = [dead("demo.always_fail", "RuntimeError: payment API down") for _ in range(2)]
    sqs.send_message(QueueUrl=queues["default"]["dlq_url"], MessageBody="not a celery message")
    stuck = str(uuid.uuid4())
    with engine.begin() as conn:
        store.insert_task(conn, task_id=stuck, task_name="demo.slow", queue="long", args=[], kwargs={})
    store.claim(engine, stuck, worker="gone", lease_seconds=0)
    engine.dispose()

    local_dir = tmp_path / "local"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **local_environ(sqs_endpoint, db_url), "PCELERY_LOCAL_DIR": str(local_dir),
           "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "TASK": "demo.flaky", "TASK_ID": failing[0],
           "AWS_EC2_METADATA_DISABLED": "true"}
    yield env, {"flaky": flaky, "failing": failing, "stuck": stuck}
    # `local up` from the runbook starts detached processes: never leave them behind.
    subprocess.run([sys.executable, "-m", "ops", "local", "down"], check=False, env=env, cwd=REPO, capture_output=True,
                   timeout=60)


def _run_with_terminal(line: str, env: dict) -> subprocess.CompletedProcess:
    """Run a runbook line in bash with a terminal on stdin where "yes" is already typed, the way
    an operator answers the confirmation prompt."""
    master, slave = os.openpty()
    try:
        os.write(master, b"yes\n")
        return subprocess.run(["bash", "-c", line], check=False, stdin=slave, env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    finally:
        os.close(slave)
        os.close(master)


def test_every_ops_line_of_the_runbook_runs_against_the_local_stack(runbook_stack):
    env, seeded = runbook_stack
    lines = ops_lines()
    assert len(lines) >= 30, "the runbook lost its commands"
    executed = parsed = 0
    for line in lines:
        if any(marker in line for marker in PARSE_ONLY_MARKERS):
            proc = subprocess.run(["bash", "-c", line], check=False, env={**env, "OPS_PARSE_ONLY": "1"}, cwd=REPO,
                                  capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            parsed += 1
        else:
            proc = _run_with_terminal(line, env)
            executed += 1
        assert proc.returncode == 0, f"RUNBOOK line failed ({proc.returncode}): {line}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, f"{line}\n{proc.stderr}"
    assert executed >= 25 and parsed >= 4

    # The procedures did what they say: the DLQ was redriven and the replayed task re-published.
    engine = schema.make_engine(env["DATABASE_URL"])
    try:
        assert store.get_task(engine, seeded["failing"][0]).state == "queued"  # replayed and published
        assert {store.get_task(engine, t).state for t in seeded["flaky"]} == {"queued"}  # redriven
    finally:
        engine.dispose()
    sqs = sqs_client(env["AWS_ENDPOINT_URL_SQS"])
    dlq = sqs.get_queue_url(QueueName="pcelery-local-default-dlq")["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
