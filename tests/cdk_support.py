"""Synthesize the CDK app in-process for tests, once per test session; read cdk.json's context.

`cdk_context()`, `context_with()` and `configs()` start no process (tests/unit/test_infra_config.py
uses them); everything from `synth()` on imports aws_cdk, which starts node, so only
tests/integration uses it. `synth_templates(env)` is what other tests use (the RUNBOOK test lists every alarm through
`alarms(env)`). The first call synthesizes every environment in one App, with cdk-nag and
CloudFormation validation on, exactly like `npx cdk synth`; later calls are dictionary look-ups.
`python app.py` does not read cdk.json, so the context is loaded here the way the CLI passes it,
with the repository's root (cdk.json's directory) as the base of the application's paths.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

REPO_ROOT = Path(__file__).resolve().parent.parent
CDK_JSON = REPO_ROOT / "cdk.json"
ENVS = ("dev", "staging", "prod")


def cdk_context() -> dict:
    """cdk.json's context block: feature flags and pcelery:environments."""
    return json.loads(CDK_JSON.read_text())["context"]


def context_with(env: str, path: str, value) -> dict:
    """cdk.json's context with one key of `env`'s block set to `value` (KeyError: removed).
    `path` is dotted below the environment's block, e.g. "database.instance_type"."""
    from infra.config import CONTEXT_KEY

    ctx = copy.deepcopy(cdk_context())
    node = ctx[CONTEXT_KEY][env]
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return ctx


@functools.cache
def configs() -> dict:
    """{env: EnvConfig} of every deployable environment, parsed from cdk.json as synth does."""
    from infra.config import load_configs

    return {c.name: c for c in load_configs({**cdk_context(), "env": None}.get, base_dir=REPO_ROOT)}


@dataclass
class Synth:
    outdir: Path
    # env -> stack name -> template
    templates: dict[str, dict[str, dict]]
    termination_protection: dict[str, bool]  # stack name -> flag
    metadata: dict[str, dict]  # stack name -> the assembly's metadata.json of that stack
    lookups: list  # context the app asked AWS for (the manifest's "missing"); must stay empty

    def stack_names(self) -> list[str]:
        return [name for stacks in self.templates.values() for name in stacks]


def synth(envs=ENVS, *, catalog=None, context: dict | None = None, nag: bool = True) -> Synth:
    """One App with both stacks of every env in `envs`, synthesized into a temporary cdk.out.

    `catalog` replaces the catalog every environment loaded from its `application.catalog` (the
    containers still get the spec): a test's own catalog without a module to import it from."""
    import aws_cdk as cdk

    from infra.config import load_configs
    from infra.nag import add_checks
    from infra.stacks import build_app

    outdir = Path(tempfile.mkdtemp(prefix="pcelery-cdk-"))
    atexit.register(shutil.rmtree, outdir, ignore_errors=True)
    ctx = dict(cdk_context() if context is None else context)
    ctx["env"] = ",".join(envs)
    app = cdk.App(context=ctx, outdir=str(outdir))
    loaded = load_configs(app.node.try_get_context, base_dir=REPO_ROOT)
    if catalog is not None:
        loaded = [replace(c, application=replace(c.application, catalog=catalog)) for c in loaded]
    built = build_app(app, loaded)
    if nag:
        add_checks(app)
    app.synth()

    manifest = json.loads((outdir / "manifest.json").read_text())
    templates, protection, metadata = {}, {}, {}
    for env, stacks in built.items():
        templates[env] = {}
        for stack in stacks:
            name = stack.stack_name
            templates[env][name] = json.loads((outdir / f"{name}.template.json").read_text())
            artifact = manifest["artifacts"][name]
            protection[name] = bool(artifact.get("properties", {}).get("terminationProtection", False))
            metadata_file = outdir / f"{name}.metadata.json"
            metadata[name] = json.loads(metadata_file.read_text()) if metadata_file.exists() else {}
    return Synth(outdir=outdir, templates=templates, termination_protection=protection, metadata=metadata,
                 lookups=manifest.get("missing", []))


@functools.cache
def synth_all() -> Synth:
    return synth(ENVS)


def synth_templates(env: str) -> dict[str, dict]:
    """{stack name: template dict} of both stacks of `env`, from the session's single synth."""
    return synth_all().templates[env]


def resources(templates: dict[str, dict], type_: str) -> dict[str, dict]:
    """{logical id: resource} of one CloudFormation type across the given stacks."""
    return {
        logical_id: res
        for template in templates.values()
        for logical_id, res in template["Resources"].items()
        if res["Type"] == type_
    }


def alarms(env: str) -> dict[str, str]:
    """{alarm name: description} of every paging alarm of `env` (the RUNBOOK contract).

    Only named alarms page; the unnamed ones are auto-scaling triggers with no SNS action (wake
    a worker service from zero; scale a long-task service in once its queue is idle).
    """
    found = {}
    for res in resources(synth_templates(env), "AWS::CloudWatch::Alarm").values():
        props = res["Properties"]
        if "AlarmName" in props:
            found[props["AlarmName"]] = props["AlarmDescription"]
    return found


def summary(templates: dict[str, dict]) -> dict:
    """Per stack: resource counts per type, paging alarm names, SQS queue names. Reviewed as a diff."""
    out = {}
    for name, template in sorted(templates.items()):
        res = template["Resources"].values()
        out[name] = {
            "resources": dict(sorted(Counter(r["Type"] for r in res).items())),
            "alarms": sorted(r["Properties"]["AlarmName"] for r in res
                             if r["Type"] == "AWS::CloudWatch::Alarm" and "AlarmName" in r["Properties"]),
            "queues": sorted(r["Properties"]["QueueName"] for r in res if r["Type"] == "AWS::SQS::Queue"),
        }
    return out
