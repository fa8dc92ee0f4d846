"""The incident drill of RUNBOOK.md (#drill), end to end on the local stack, every command taken
from the RUNBOOK's own sections as they read now: a poison deploy fills the DLQ, the alarm's
section (#alarm-dlq-not-empty) is followed, then #poison-task, the fix ships, the DLQ is redriven
(#triage-and-redrive-a-dlq, step 4: watch it drain), and every task completes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import wait_for

from pcelery import schema, store

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = (REPO / "RUNBOOK.md").read_text()
TASK = "demo.until_fixed"
COUNT = 6


def section(anchor: str) -> str:
    start = RUNBOOK.index(f'<a id="{anchor}"></a>')
    following = RUNBOOK.find("<a id=", start + 1)
    return RUNBOOK[start:following if following != -1 else len(RUNBOOK)]


def code_blocks(text: str) -> list[list[str]]:
    """The command lines of each fenced block (indented blocks of a list item too)."""
    found = re.findall(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", text, re.MULTILINE | re.DOTALL)
    return [[ln.strip() for ln in block.splitlines() if ln.strip()] for block in found]


def test_the_runbook_drill_from_a_bad_deploy_to_every_task_done(tmp_path):
    state = tmp_path / "local"
    shell = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "PCELERY_")) and k not in ("DATABASE_URL", "PYTHONPATH")}
    shell.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PCELERY_LOCAL_DIR=str(state),
                 AWS_EC2_METADATA_DISABLED="true", TASK=TASK)
    env = dict(shell)  # the shell after `eval "$(python -m ops local up)"`
    transcript: list[str] = []

    def run(line: str, *, ok: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", line], check=False, cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180, stdin=subprocess.DEVNULL)
        transcript.append(f"$ {line}\n{proc.stdout}{proc.stderr}")
        if ok:
            assert proc.returncode == 0, "\n".join(transcript[-3:])
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def depth() -> dict[str, dict]:
        return {r["queue"]: r for r in json.loads(run("python -m ops depth -o json").stdout)}

    drill = code_blocks(section("drill"))
    assert len(drill) == 3, "the drill lost a step"
    [diagnose] = code_blocks(section("alarm-dlq-not-empty"))
    poison_confirm, poison_redrive = code_blocks(section("poison-task"))[:2]
    watch = re.search(r"4\. Watch them run: `([^`]+)` until the queue drains, then\s+`([^`]+)`",
                      section("triage-and-redrive-a-dlq"))
    assert watch, "triage-and-redrive-a-dlq lost its step 4"
    assert "python -m ops local deploy --broken" in drill[0] and drill[1] == ["python -m ops local deploy"]
    assert "Roll back" in section("poison-task")
    assert "[triage and redrive a DLQ](#triage-and-redrive-a-dlq)" in section("alarm-dlq-not-empty")

    try:
        # 1. The broken release ships and work arrives (the drill's first block, in one shell).
        first = subprocess.run(["bash", "-e", "-c", "\n".join(drill[0])], check=False, cwd=REPO, env=shell,
                               capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "deployed the broken release" in first.stdout
        seeded = re.findall(r"^[0-9a-f-]{36}  demo\.until_fixed  (.*)$", first.stdout, re.MULTILINE)
        assert len(seeded) == COUNT and all(e.startswith("fails on every attempt (the broken release)") for e in seeded)
        env.update(json.loads((state / "stack.json").read_text())["shell"])  # what its eval exported

        # 2. The DLQ fills: the alarm's condition.
        wait_for(lambda: depth()["pcelery-local-default"]["dlq"]["visible"] == COUNT, timeout=150, interval=2,
                 what=f"{COUNT} messages in the DLQ", logs=[state / "worker.log"])

        # 3. The alarm's section, Diagnose: one task, one error, right after the deploy.
        out = {line: run(line).stdout for line in diagnose}
        assert "dead=6" in out["python -m ops depth"]
        peek = out["python -m ops peek default-dlq --limit 20"]
        assert peek.count(TASK) >= COUNT and "by task: demo.until_fixed 6" in peek
        assert "is still deployed" in peek  # the error each attempt recorded
        assert out["python -m ops tasks --state dead"].count(TASK) == COUNT

        # 4. Poison task after a bad deploy, step 1: confirm it is one task and the new release.
        out = {line: run(line).stdout for line in poison_confirm}
        assert out['python -m ops tasks --state dead --task "$TASK"'].count(TASK) == COUNT
        assert "no task rows match" in out['python -m ops tasks --state failed --task "$TASK"']

        # 5. Step 2, roll back: the fix ships.
        [deploy] = drill[1]
        assert "deployed the good release" in run(deploy).stdout

        # 6. Step 3: redrive that task, 5 first, then the rest.
        first_five, the_rest = (run(line).stdout for line in poison_redrive)
        assert "moved 5, failed 0" in first_five and "dead -> queued" in first_five  # (or taken by the worker)
        assert "moved 1, failed 0" in the_rest

        # 7. Triage step 4: watch the queue drain, then see what died again (nothing).
        watch_depth, dead_again = watch.groups()

        def drained() -> bool:
            [row] = json.loads(run(f"{watch_depth} -o json").stdout)
            return row["visible"] + row["in_flight"] == 0 and row["dlq"]["visible"] == 0 and (
                row["tasks"]["succeeded"] == COUNT)

        wait_for(drained, timeout=120, interval=1, what="the queue to drain", logs=[state / "worker.log"])
        assert "no task rows match" in run(dead_again).stdout

        # 8. The drill's last block: every task has succeeded; the stack stops.
        tasks_line, down_line = drill[2]
        listed = run(tasks_line).stdout
        assert listed.count("succeeded") == COUNT and "dead" not in listed
        engine = schema.make_engine(env["DATABASE_URL"])
        try:
            rows = store.list_tasks(engine, task_name=TASK, limit=100)
            assert len(rows) == COUNT and {r.state for r in rows} == {"succeeded"}
        finally:
            engine.dispose()
        run(down_line)
        assert not (state / "stack.json").exists()
    finally:
        subprocess.run([sys.executable, "-m", "ops", "local", "down"], check=False, cwd=REPO, env=shell,
                       capture_output=True, timeout=60)
